"""A fault-injecting HTTP proxy in front of the moto S3 server, run as its own process.

Clients (boto3, delta-rs) are pointed at the proxy instead of moto. Every
request is forwarded unchanged, except that GET requests (object reads and
LIST calls) are answered with a fault:
- the first `--outage-requests` of them: 503 SlowDown (an outage that outlasts
  the clients' own retries);
- then a `--share` of them, drawn from a seeded generator, with one of
  `slowdown` (503 SlowDown), `reset` (the TCP connection is reset, no answer),
  `stall` (no answer for `--stall-s` seconds, then the connection is closed: a
  client read timeout) or `truncate` (the real answer's headers and half its
  body, then a reset) -- the last only for clients whose User-Agent contains
  `--truncate-for` when that is given: delta-rs does not retry a body cut
  short after its headers (object_store retries requests, not bodies).
Requests whose method and path match `--hold` (`PUT:<regex>`) are never
answered (counted as `held`): a writer stopped between writing its data files
and committing, to be killed there.
`GET /__fault_proxy__/stats` answers the counts as JSON, with one count per object path read
(`object GET /<bucket>/<key>`).

    python -m imgemb_support.fault_proxy --upstream http://127.0.0.1:5000 --port 5001 --share 0.2
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from imgemb_support.moto_server import free_port, stop, wait_until_listening

STATS_PATH = "/__fault_proxy__/stats"
# Stats keys of object reads: this, then the request path (/<bucket>/<key>).
OBJECT_GET = "object GET "
_REPO_ROOT = Path(__file__).resolve().parents[1]
FAULT_KINDS = ("slowdown", "reset", "stall", "truncate")
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "content-length"}
)
_HOLD_S = 3600.0
_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)


class FaultPlan:
    """Decides, request by request, which fault (if any) a GET gets; thread-safe and seeded."""

    def __init__(
        self,
        share: float,
        seed: int,
        kinds: tuple[str, ...],
        outage_requests: int,
        hold: str | None = None,
        truncate_for: str | None = None,
    ) -> None:
        self._truncate_for = truncate_for
        self._hold_method, _, hold_pattern = (hold or "").partition(":")
        self._hold_path = re.compile(hold_pattern) if hold else None
        self._share = share
        self._kinds = kinds
        self._outage_requests = outage_requests
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def fault_for(self, method: str, path: str, user_agent: str = "") -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            if self._hold_path is not None and method == self._hold_method and self._hold_path.search(path):
                self.counts["held"] += 1
                return "hold"
            if method != "GET":
                return None
            self.counts["gets"] += 1
            path_only, _, query = path.partition("?")
            if "list-type=" not in query and "delimiter=" not in query:
                self.counts[f"{OBJECT_GET}{path_only}"] += 1  # which objects were read, and how often
            if self.counts["gets"] <= self._outage_requests:
                fault: str | None = "slowdown"
            elif self._random.random() < self._share:
                fault = self._random.choice(self._kinds)
            else:
                fault = None
            if fault == "truncate" and self._truncate_for and self._truncate_for not in user_agent:
                fault = None
            if fault is not None:
                self.counts[fault] += 1
            return fault


def _handler_class(upstream: str, plan: FaultPlan, stall_s: float) -> type[BaseHTTPRequestHandler]:
    target = urlparse(upstream)

    class FaultInjectingHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # the base class's name
            pass

        def do_GET(self) -> None:
            if self.path == STATS_PATH:
                self._answer(200, {"Content-Type": "application/json"}, json.dumps(plan.counts).encode())
                return
            self._proxy()

        def do_HEAD(self) -> None:
            self._proxy()

        def do_PUT(self) -> None:
            self._proxy()

        def do_POST(self) -> None:
            self._proxy()

        def do_DELETE(self) -> None:
            self._proxy()

        def _proxy(self) -> None:
            body = self._request_body()
            fault = plan.fault_for(self.command, self.path, self.headers.get("User-Agent", ""))
            if fault == "slowdown":
                self._answer(503, {"Content-Type": "application/xml"}, _SLOWDOWN_BODY)
            elif fault == "reset":
                self._reset_connection()
            elif fault == "stall":
                time.sleep(stall_s)
                self.close_connection = True
            elif fault == "hold":
                time.sleep(_HOLD_S)
                self.close_connection = True
            else:
                self._forward(body, truncate=fault == "truncate")

        def _request_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes, truncate: bool = False) -> None:
            connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                answer_headers = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
                if self.command == "HEAD":
                    answer_headers["Content-Length"] = response.getheader("Content-Length", "0")
                    self._answer(response.status, answer_headers, b"", head=True)
                elif truncate:
                    self._answer(response.status, answer_headers, payload, cut_after=len(payload) // 2)
                else:
                    self._answer(response.status, answer_headers, payload)
            finally:
                connection.close()

        def _answer(
            self, status: int, headers: dict[str, str], payload: bytes, head: bool = False, cut_after: int | None = None
        ) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if not head:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if cut_after is not None:
                self.wfile.write(payload[:cut_after])
                self.wfile.flush()
                self._reset_connection()
            elif payload:
                self.wfile.write(payload)

        def _reset_connection(self) -> None:
            # SO_LINGER 0: close() sends RST, as a dropped connection does.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

    return FaultInjectingHandler


def serve(upstream: str, port: int, plan: FaultPlan, stall_s: float) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler_class(upstream, plan, stall_s))
    server.daemon_threads = True
    server.serve_forever()


@dataclass(frozen=True)
class FaultProxy:
    url: str

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.url}{STATS_PATH}", timeout=10) as response:
            return json.loads(response.read())


@contextmanager
def running_fault_proxy(
    upstream: str,
    share: float = 0.0,
    seed: int = 0,
    kinds: tuple[str, ...] = FAULT_KINDS,
    outage_requests: int = 0,
    stall_s: float = 3.0,
    hold: str | None = None,
    truncate_for: str | None = None,
) -> Iterator[FaultProxy]:
    """A proxy subprocess in front of `upstream`, stopped on exit."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "imgemb_support.fault_proxy",
            "--upstream", upstream, "--port", str(port), "--share", str(share), "--seed", str(seed),
            "--kinds", ",".join(kinds), "--outage-requests", str(outage_requests), "--stall-s", str(stall_s),
            *(["--hold", hold] if hold else []),
            *(["--truncate-for", truncate_for] if truncate_for else []),
        ],
        cwd=_REPO_ROOT,  # where `imgemb_support` is importable
        start_new_session=True,
    )  # fmt: skip
    proxy = FaultProxy(f"http://127.0.0.1:{port}")
    try:
        wait_until_listening(f"{proxy.url}{STATS_PATH}", process)
        yield proxy
    finally:
        stop(process)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--share", type=float, default=0.0, help="share of GET requests given a fault")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(FAULT_KINDS))
    parser.add_argument("--outage-requests", type=int, default=0, help="first GETs answered 503 SlowDown")
    parser.add_argument("--stall-s", type=float, default=3.0)
    parser.add_argument("--hold", default=None, help="METHOD:REGEX of requests never answered")
    parser.add_argument("--truncate-for", default=None, help="truncate only for User-Agents containing this")
    args = parser.parse_args(argv)
    kinds = tuple(kind for kind in args.kinds.split(",") if kind)
    unknown = set(kinds) - set(FAULT_KINDS)
    if unknown:
        parser.error(f"unknown fault kinds {sorted(unknown)}; choose from {FAULT_KINDS}")
    plan = FaultPlan(args.share, args.seed, kinds, args.outage_requests, args.hold, args.truncate_for)
    serve(args.upstream, args.port, plan, args.stall_s)


if __name__ == "__main__":
    main()
