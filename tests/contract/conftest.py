"""A throwaway `redis-server` for the state-store contract suite.

One server per test session, started from the installed binary on a free loopback port with no
persistence (`--save "" --appendonly no`) in a temporary directory, killed at teardown. Every test
gets its own database number, flushed before use. Set `SETPOINT_TEST_REDIS_URL` to use an existing
server instead (its database is flushed; outage tests are skipped since it cannot be stopped).
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
_DATABASES = 256  # one per test (mod this), so a leftover key from one test never meets another


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


class RedisServer:
    """A redis-server subprocess owned by the tests (`stop()` / `start()` for outage tests)."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.host = LOOPBACK
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.is_external = False

    def url(self, db: int) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    @property
    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        assert not self.is_running, "redis-server is already running"
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
        """Kill the server (an outage, not a clean shutdown) and wait until the port is closed."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        self.proc = None
        deadline = time.monotonic() + 5
        while _pings(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.02)


class ExternalRedis:
    """`SETPOINT_TEST_REDIS_URL`: a server the tests do not own (never stopped)."""

    is_external = True

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._parts = parts
        self.host = parts.hostname or LOOPBACK
        self.port = parts.port or 6379
        self.base_db = int(parts.path.lstrip("/") or 0)

    def url(self, db: int) -> str:
        return urlunsplit(self._parts._replace(path=f"/{db}"))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer | ExternalRedis]:
    external = os.environ.get("SETPOINT_TEST_REDIS_URL")
    if external:
        yield ExternalRedis(external)
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (and SETPOINT_TEST_REDIS_URL is not set)")
    with tempfile.TemporaryDirectory(prefix="setpoint-redis-") as tmp:
        server = RedisServer(binary, Path(tmp))
        server.start()
        try:
            yield server
        finally:
            server.stop()


_db_numbers = itertools.count(1)


@pytest.fixture
def redis_url(redis_server: RedisServer | ExternalRedis) -> str:
    """A URL of an empty Redis database for this test (FLUSHDB before use)."""
    if isinstance(redis_server, ExternalRedis):
        url = redis_server.url(redis_server.base_db)
    else:
        if not redis_server.is_running:  # an outage test failed before restarting it
            redis_server.start()
        url = redis_server.url(next(_db_numbers) % (_DATABASES - 1) + 1)  # 1..255
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


@pytest.fixture
def redis_control(redis_server: RedisServer | ExternalRedis) -> Iterator[RedisServer]:
    """The owned server, to `stop()` and `start()` it; running again after the test."""
    if isinstance(redis_server, ExternalRedis):
        pytest.skip("outage tests need a redis-server they own; SETPOINT_TEST_REDIS_URL cannot be stopped")
    yield redis_server
    if not redis_server.is_running:
        redis_server.start()
