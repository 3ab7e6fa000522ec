"""Fixtures for the scenario ("proof") tests: a throwaway `redis-server` shared by the session.

The server is the installed binary on a free loopback port, with no persistence
(`--save "" --appendonly no`), in a temporary directory, killed at teardown. Each test that asks
for `redis_db_url` gets its own database number, flushed before use, so every round starts from
empty state. Set `SETPOINT_TEST_REDIS_URL` to use an existing server instead (its database is
flushed before each use). Without either, the Redis scenarios are skipped with a reason.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

LOOPBACK = "127.0.0.1"
_DATABASES = 64


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _pings(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class ThrowawayRedis:
    """A redis-server subprocess owned by the test session."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.host = LOOPBACK
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_db = 0

    def url(self, db: int) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def start(self, timeout_s: float = 10.0) -> None:
        log = (self.workdir / "redis.log").open("ab")
        try:
            self.proc = subprocess.Popen(
                [self.binary, "--save", "", "--appendonly", "no", "--port", str(self.port), "--bind", LOOPBACK,
                 "--dir", str(self.workdir), "--databases", str(_DATABASES), "--protected-mode", "no",
                 "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while not _pings(self.host, self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode}:\n"
                    + (self.workdir / "redis.log").read_text(errors="replace")
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING within {timeout_s}s")
            time.sleep(0.02)

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        self.proc = None


class ExternalRedis:
    """`SETPOINT_TEST_REDIS_URL`: a server the tests do not own (never stopped)."""

    def __init__(self, url: str) -> None:
        self._parts = urlsplit(url)
        self.host = self._parts.hostname or LOOPBACK
        self.port = self._parts.port or 6379
        self.base_db = int(self._parts.path.lstrip("/") or 0)

    def url(self, db: int) -> str:
        return urlunsplit(self._parts._replace(path=f"/{db}"))


@pytest.fixture(scope="session")
def scenario_redis() -> Iterator[ThrowawayRedis | ExternalRedis]:
    external = os.environ.get("SETPOINT_TEST_REDIS_URL")
    if external:
        yield ExternalRedis(external)
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (and SETPOINT_TEST_REDIS_URL is not set)")
    with tempfile.TemporaryDirectory(prefix="setpoint-scenario-redis-") as tmp:
        server = ThrowawayRedis(binary, Path(tmp))
        server.start()
        try:
            yield server
        finally:
            server.stop()


_db_numbers = itertools.count(1)


@pytest.fixture
def redis_db_url(scenario_redis: ThrowawayRedis | ExternalRedis) -> str:
    """The URL of an empty Redis database for this test (a new db number, FLUSHDB before use).

    With `SETPOINT_TEST_REDIS_URL` the configured database itself is flushed and reused."""
    if isinstance(scenario_redis, ExternalRedis):
        url = scenario_redis.url(scenario_redis.base_db)
    else:
        url = scenario_redis.url(next(_db_numbers) % _DATABASES)
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.flushdb()
        assert client.dbsize() == 0
    finally:
        client.close()
    return url
