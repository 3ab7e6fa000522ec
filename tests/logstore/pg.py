"""A throwaway PostgreSQL for the request-log tests, started by pytest-postgresql's `postgresql_proc`.

`pg_ctl` is looked up on PATH, then in /usr/lib/postgresql/<version>/bin (Debian's server package
does not put it on PATH), and wrapped in a tiny script (`_WRAPPER`). PostgreSQL refuses to run as
root, so when the tests run as root the wrapper drops to an unprivileged user (`postgres`, else
`nobody`) after handing it the data directory and log file pytest-postgresql asked for.

Set `SETPOINT_TEST_POSTGRES_URL` to use an existing server instead (a fresh database is created per
test in it; outage tests are skipped because that server cannot be stopped). Without either, the
PostgreSQL tests are skipped with a reason.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

__all__ = ["PgServer", "find_pg_ctl", "pg_ctl_for_tests", "pg_server_fixture", "pg_url_fixture"]

_UNPRIVILEGED = ("postgres", "nobody")


def find_pg_ctl() -> str | None:
    found = shutil.which("pg_ctl")
    if found:
        return found

    def version(path: str) -> tuple[int, ...]:
        part = Path(path).parts[-3]
        return tuple(int(x) for x in part.split(".") if x.isdigit())

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=version, reverse=True)
    return candidates[0] if candidates else None


_WRAPPER = '''\
#!{python}
"""pg_ctl for the tests (written by tests/logstore/pg.py): without mirakuru's marker in the server's
environment, and as an unprivileged user when run as root (PostgreSQL refuses root)."""
import hashlib, os, pwd, sys
from pathlib import Path

REAL, USER, HOME = {real!r}, {user!r}, {home!r}
args = sys.argv[1:]
# At exit, every process that imported mirakuru (any pytest session on this machine with the
# pytest-postgresql plugin) SIGKILLs the processes whose `mirakuru_uuid` *contains* its pid as a
# substring: the server must not carry it. (It is stopped with `pg_ctl stop` anyway.)
os.environ.pop("mirakuru_uuid", None)

if USER is not None:
    # The unprivileged user cannot reach pytest's temporary directory (pytest resets it to 0700
    # whenever a session starts): its data directory and log file live under HOME instead, at a
    # place derived from the path pytest-postgresql asked for (which is kept, empty, for its checks).
    pw = pwd.getpwnam(USER)

    def moved(path, is_dir):
        p = Path(path).resolve()
        (p if is_dir else p.parent).mkdir(parents=True, exist_ok=True)
        real = Path(HOME) / hashlib.sha1(str(p).encode()).hexdigest()[:16] / ("data" if is_dir else "log")
        real.parent.mkdir(exist_ok=True)
        os.chown(real.parent, pw.pw_uid, pw.pw_gid)
        return str(real)

    args = [moved(v, is_dir=True) if f in ("-D", "--pgdata") else moved(v, is_dir=False) if f in ("-l", "--log")
            else v for f, v in zip([None, *args], args)]
    os.chdir("/")
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
os.execv(REAL, [REAL, *args])
'''


def pg_ctl_for_tests() -> str | None:
    """The `pg_ctl` pytest-postgresql should run: a wrapper around the real one (see `_WRAPPER`)."""
    real = find_pg_ctl()
    if real is None:
        return None
    user = None
    if os.geteuid() == 0:
        import pwd

        for name in _UNPRIVILEGED:
            try:
                pwd.getpwnam(name)
            except KeyError:
                continue
            user = name
            break
        else:
            return None
    wrapper_dir = Path(tempfile.mkdtemp(prefix="setpoint-pg-ctl-"))  # data directories too, as root
    atexit.register(shutil.rmtree, wrapper_dir, True)
    os.chmod(wrapper_dir, 0o755)
    wrapper = wrapper_dir / "pg_ctl"
    wrapper.write_text(_WRAPPER.format(python=sys.executable, real=real, user=user, home=str(wrapper_dir)))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(wrapper)


@dataclass
class PgServer:
    """Where the test server is; `executor` is pytest-postgresql's (None for an external server)."""

    host: str
    port: int
    user: str
    password: str | None
    executor: Any = None
    base_url: str | None = None

    def url(self, dbname: str) -> str:
        if self.base_url is not None:
            return urlunsplit(urlsplit(self.base_url)._replace(path=f"/{dbname}"))
        auth = self.user if not self.password else f"{self.user}:{self.password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    @property
    def maintenance_url(self) -> str:
        if self.base_url is not None:
            return self.base_url
        return self.url("postgres")

    @property
    def can_stop(self) -> bool:
        return self.executor is not None

    def stop(self) -> None:
        self.executor.stop()

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the (stopped) server and wait until it accepts queries: its port opens while it
        still answers "the database system is starting up"."""
        import psycopg

        self.executor.start()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with psycopg.connect(self.maintenance_url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def accepts_connections(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.maintenance_url, connect_timeout=5):
                return True
        except psycopg.OperationalError:
            return False

    def ensure_running(self) -> None:
        """Restart the server if it is gone: stopped by an outage test that failed before restarting
        it, or killed (at exit, mirakuru SIGKILLs every process whose MIRAKURU_UUID merely *contains*
        the exiting process's pid, and other test sessions on this machine use mirakuru too). Its
        liveness is a connection, not `pg_ctl status`: without an init that reaps them, a killed
        postmaster stays a zombie whose pid still "runs"."""
        if not self.can_stop or self.accepts_connections():
            return
        deadline = time.monotonic() + 60
        while True:
            self.executor._clear_process()  # noqa: SLF001 - forget the old launcher; its server is gone
            try:
                self.start()
                return
            except Exception:  # noqa: BLE001 - the killed server's processes may still hold its memory
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def pg_server_fixture(request: pytest.FixtureRequest) -> Iterator[PgServer]:
    """Body of a session fixture: an external server, or `postgresql_proc`, or skip."""
    external = os.environ.get("SETPOINT_TEST_POSTGRES_URL")
    if external:
        parts = urlsplit(external)
        yield PgServer(parts.hostname or "127.0.0.1", parts.port or 5432, parts.username or "postgres",
                       parts.password, base_url=external)
        return
    if find_pg_ctl() is None:
        pytest.skip("PostgreSQL server binaries (pg_ctl) are not installed and SETPOINT_TEST_POSTGRES_URL is not set")
    proc = request.getfixturevalue("postgresql_proc")
    server = PgServer(proc.host, proc.port, proc.user, proc.password, executor=proc)
    yield server
    server.ensure_running()  # pytest-postgresql's teardown connects to it to drop its template database


_databases = itertools.count()


def pg_url_fixture(server: PgServer) -> Iterator[str]:
    """Body of a function fixture: the URL of a fresh, empty database, dropped afterwards."""
    import psycopg

    server.ensure_running()  # an outage test failed before restarting it, or it was killed
    name = f"sp_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(server.maintenance_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.url(name)
    finally:
        server.ensure_running()
        with psycopg.connect(server.maintenance_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
