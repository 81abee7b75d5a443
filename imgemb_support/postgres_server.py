"""A real PostgreSQL server for the tests: Debian's server binaries, a fresh cluster in a temporary
directory, listening on 127.0.0.1 and a free port, stopped and removed at the end.

PostgreSQL refuses to run as root, and CI runs the tests as root: the cluster is then created and
run as the unprivileged `postgres` user that Debian's package creates. Authentication is `trust`,
which is safe only because the server listens on 127.0.0.1 and a socket directory nobody else uses.

conftest.py loads this module as a pytest plugin, so every test module can ask for the
`postgres_server` and `postgres_url` fixtures.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from imgemb_support.debian_packages import installed_or_fail
from imgemb_support.moto_server import free_port

# Debian installs the server binaries per major version, off PATH.
POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"
SUPERUSER = "postgres"
# The instance reads the database URL from this variable, as the deployments do: no secret in dagster.yaml.
PG_URL_VARIABLE = "DAGSTER_PG_URL"


def with_postgres_storage(instance_config: Path) -> dict[str, Any]:
    """A shipped instance config's settings, with its storage in the server that PG_URL_VARIABLE names."""
    config = yaml.safe_load(instance_config.read_text())
    config["storage"] = {"postgres": {"postgres_url": {"env": PG_URL_VARIABLE}}}
    return config


@dataclass(frozen=True)
class PostgresServer:
    """A running server that anyone on 127.0.0.1 may use as `SUPERUSER`, without a password."""

    host: str
    port: int

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database on the server; its URL."""
        import psycopg2  # installed with dagster-postgres

        name = f"imgemb_{uuid.uuid4().hex[:12]}"
        connection = psycopg2.connect(self.url())
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in bin_dir.parent.name.split(".") if part.isdigit())


def find_postgres_bin() -> Path | None:
    """The bin directory of the newest installed PostgreSQL server, if any."""
    candidates = [Path(p) for p in glob.glob(POSTGRES_BIN_GLOB) if (Path(p) / "initdb").is_file()]
    return max(candidates, key=_version_key) if candidates else None


def postgres_bin_or_fail() -> Path:
    """The server binaries, installed from Debian's package when missing and running as root."""
    return installed_or_fail("postgresql", find_postgres_bin, f"{POSTGRES_BIN_GLOB}/initdb")


def _server_account() -> pwd.struct_passwd | None:
    """Whom to run the server as: the `postgres` account when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SUPERUSER)
    except KeyError:
        pytest.fail(
            f"running as root and there is no `{SUPERUSER}` user to run PostgreSQL as (Debian's package creates it)"
        )


def _run_as(account: pwd.struct_passwd | None, args: list[str], log: Path) -> None:
    # subprocess drops to the account itself (setgid, setgroups([]), setuid), like `setpriv --clear-groups`.
    drop = {} if account is None else {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, check=False, **drop)
    if done.returncode != 0:
        server_log = log.read_text()[-3000:] if log.exists() else ""
        pytest.fail(
            f"`{' '.join(args)}` failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}\n{server_log}"
        )


@contextmanager
def running_postgres_server() -> Iterator[PostgresServer]:
    """A fresh cluster, started on 127.0.0.1 and a free port; stopped and deleted on exit."""
    bin_dir = postgres_bin_or_fail()
    account = _server_account()
    # Not pytest's tmp_path: its parents are private to root, and the server account must reach the directory.
    root = Path(tempfile.mkdtemp(prefix="imgemb-pg-"))
    data, log = root / "data", root / "server.log"
    if account is not None:
        os.chown(root, account.pw_uid, account.pw_gid)
    port = free_port()
    try:
        # --no-sync and fsync=off: a throwaway cluster need not survive a power cut, and fsyncs are slow on shared CI disks.
        _run_as(
            account,
            [str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync"],
            log,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
        _run_as(
            account,
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"],
            log,
        )
        try:
            yield PostgresServer(host="127.0.0.1", port=port)
        finally:
            _run_as(account, [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"], log)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One server for the whole session; each test takes its own database with `postgres_url`."""
    with running_postgres_server() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a new, empty database on the session's server."""
    return postgres_server.create_database()
