"""The Dagster webserver (`dagster dev`) on 127.0.0.1, as the tests and the benchmarks wait for it."""

from __future__ import annotations

import urllib.request


def webserver_answers(port: int) -> bool:
    """Whether the webserver on 127.0.0.1:`port` is up: its /server_info answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
