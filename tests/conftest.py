"""Shared fixtures for the integration tests.

Everything runs on loopback: the gateway either in-process on a background loop
(`BackgroundGateway`) or as a `setpoint serve` subprocess; upstreams are the built-in simulated
provider, `setpoint sim-provider` as a subprocess, or tiny aiohttp apps served from a thread.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import openai
import pytest
import redis
import yaml
from aiohttp import web
from logstore.pg import PgServer, pg_ctl_for_tests, pg_server_fixture, pg_url_fixture
from pytest_postgresql import factories

from setpoint.clock import Clock
from setpoint.config.compile import compile_config
from setpoint.config.load import parse_config
from setpoint.proxy.background import BackgroundGateway

# Static virtual keys declared in the default config (at least 16 characters each).
ALL_KEY = "sk-test-all-models-0123456789"
LIMITED_KEY = "sk-test-limited-0123456789ab"
MASTER_KEY = "mk-test-master-key-0123456789"

LOOPBACK = "127.0.0.1"


# -- config -------------------------------------------------------------------------------------


# One throwaway PostgreSQL for the whole session (request-log, durability and dashboard tests):
# pytest-postgresql's `postgresql_proc`, started only when a test asks for `pg_server` (tests/logstore/pg.py).
postgresql_proc = factories.postgresql_proc(executable=pg_ctl_for_tests(), port=None)


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> Iterator[PgServer]:
    yield from pg_server_fixture(request)


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """URL of an empty database of its own on the test server."""
    yield from pg_url_fixture(pg_server)


def sim_provider(seed: int = 1, **extra: Any) -> dict[str, Any]:
    """A fast, deterministic simulated provider config."""
    cfg: dict[str, Any] = {
        "type": "simulated",
        "seed": seed,
        "latency": {"ttft_ms": 1, "per_token_ms": 0.05, "jitter": 0},
        "output": {"min_tokens": 4, "max_tokens": 12},
    }
    cfg.update(extra)
    return cfg


def default_config(data_dir: str | Path | None = None) -> dict[str, Any]:
    """Two chat models and one embedding model on the simulated provider; two static keys."""
    cfg: dict[str, Any] = {
        "admin": {"master_key": MASTER_KEY},
        "providers": {"sim": sim_provider()},
        "models": {
            "chat-a": {"deployments": [{"provider": "sim", "model": "sim-small",
                                        "pricing": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}]},
            "chat-b": {"deployments": [{"provider": "sim", "model": "sim-large"}]},
            "embed": {"kind": "embedding", "deployments": [{"provider": "sim", "model": "sim-embed"}]},
        },
        "keys": [
            {"name": "all", "key": ALL_KEY, "team": "team-all"},
            {"name": "limited", "key": LIMITED_KEY, "team": "team-limited", "models": ["chat-a", "embed"]},
        ],
    }
    if data_dir is not None:
        cfg["data_dir"] = str(data_dir)
    return cfg


# -- helpers ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _read_rows(db_path: str | Path, where: str = "", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    path = Path(db_path)
    if not path.exists():
        return []
    conn = sqlite3.connect(path)
    try:
        conn.row_factory = sqlite3.Row
        try:
            rows = conn.execute(f"SELECT * FROM requests {where} ORDER BY ts", params).fetchall()
        except sqlite3.OperationalError as exc:  # the drainer has not created the table yet
            if "no such table" in str(exc):
                return []
            raise
        return [dict(r) for r in rows]
    finally:
        conn.close()


def _wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `predicate` until it is true (a synchronization helper, not a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


@dataclass(frozen=True)
class KeySet:
    all: str = ALL_KEY  # every model
    limited: str = LIMITED_KEY  # chat-a and embed only
    master: str = MASTER_KEY  # admin API


@pytest.fixture
def keys() -> KeySet:
    """The secrets of the default config's static keys and master key."""
    return KeySet()


@pytest.fixture(name="default_config")
def default_config_fixture() -> Callable[..., dict[str, Any]]:
    """`default_config(data_dir=None)` -> a fresh copy of the default config dict."""
    return default_config


@pytest.fixture(name="sim_provider")
def sim_provider_fixture() -> Callable[..., dict[str, Any]]:
    """`sim_provider(seed=1, **overrides)` -> a fast simulated provider config dict."""
    return sim_provider


@pytest.fixture
def free_port() -> Callable[[], int]:
    """`free_port()` -> a loopback TCP port nobody listens on right now."""
    return _free_port


@pytest.fixture
def read_rows() -> Callable[..., list[dict[str, Any]]]:
    """`read_rows(db_path, where="", params=())` -> request records as dicts, oldest first."""
    return _read_rows


@pytest.fixture
def wait_until() -> Callable[[Callable[[], bool], float, str], None]:
    return _wait_until


# -- in-process gateway -------------------------------------------------------------------------


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[Callable[..., BackgroundGateway]]:
    """`make_gateway(config_dict, clock=None)` -> a started `BackgroundGateway` (on `clock`, e.g. a
    ManualClock, when given); closed at teardown.

    `data_dir` defaults to a fresh directory under `tmp_path`."""
    started: list[BackgroundGateway] = []
    counter = itertools.count()

    def make(config: dict[str, Any], clock: Clock | None = None) -> BackgroundGateway:
        cfg = dict(config)
        cfg.setdefault("data_dir", str(tmp_path / f"gw{next(counter)}"))
        gw = BackgroundGateway(compile_config(parse_config(cfg, env={}), clock=clock))
        gw.__enter__()
        started.append(gw)
        return gw

    yield make
    for gw in reversed(started):
        gw.__exit__(None, None, None)


@pytest.fixture
def gateway(make_gateway: Callable[[dict[str, Any]], BackgroundGateway]) -> BackgroundGateway:
    """The default gateway: simulated provider, static keys `ALL_KEY` and `LIMITED_KEY`, admin on."""
    return make_gateway(default_config())


@pytest.fixture
def gateway_rows(read_rows: Callable[..., list[dict[str, Any]]]) -> Callable[..., list[dict[str, Any]]]:
    """`gateway_rows(gw)` -> flush the gateway's request log, then return its records."""

    def rows(gw: BackgroundGateway, where: str = "", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        assert gw.flush_log(10), "request log did not flush"
        assert gw.server is not None
        return read_rows(gw.server.gateway.request_log.db_path, where, params)

    return rows


@pytest.fixture
def make_client() -> Iterator[Callable[..., openai.OpenAI]]:
    """`make_client(base_url, api_key)` -> an `openai.OpenAI` without retries; closed at teardown."""
    clients: list[openai.OpenAI] = []

    def make(base_url: str, api_key: str = ALL_KEY, **kw: Any) -> openai.OpenAI:
        kw.setdefault("timeout", 20.0)
        c = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, **kw)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def client(gateway: BackgroundGateway, make_client: Callable[..., openai.OpenAI]) -> openai.OpenAI:
    """SDK client on the default gateway with the all-models key."""
    return make_client(gateway.base_url, ALL_KEY)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """A plain HTTP client for raw requests (absolute URLs)."""
    with httpx.Client(timeout=20.0, trust_env=False) as c:
        yield c


# -- tiny aiohttp upstreams on a background thread ----------------------------------------------


class ThreadedApp:
    """Serve an aiohttp `Application` on 127.0.0.1:<random port> from its own loop and thread."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-upstream", daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def _start(self) -> None:
        # A short shutdown timeout: handlers that stall on purpose must not hold up teardown.
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    def start(self) -> ThreadedApp:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def serve_app() -> Iterator[Callable[[web.Application], ThreadedApp]]:
    """`serve_app(app)` -> a started `ThreadedApp` (`.url`, `.port`); stopped at teardown."""
    apps: list[ThreadedApp] = []

    def start(app: web.Application) -> ThreadedApp:
        t = ThreadedApp(app).start()
        apps.append(t)
        return t

    yield start
    for t in reversed(apps):
        t.stop()


# -- subprocesses -------------------------------------------------------------------------------


def setpoint_command() -> list[str]:
    """The `setpoint` console script next to this interpreter, or `python -m setpoint.cli.main`."""
    script = Path(sys.executable).with_name("setpoint")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "setpoint.cli.main"]


def _subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("SETPOINT_MASTER_KEY", None)
    if extra:
        env.update(extra)
    return env


class Proc:
    """A started `setpoint ...` subprocess in its own session, output captured to files."""

    def __init__(self, args: list[str], log_dir: Path, name: str, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.args = args
        self._out_path = log_dir / f"{name}.stdout"
        self._err_path = log_dir / f"{name}.stderr"
        self._out = self._out_path.open("wb")
        self._err = self._err_path.open("wb")
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            setpoint_command() + args, stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL,
            env=_subprocess_env(env), cwd=cwd, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        self._out.flush()
        self._err.flush()
        return (
            f"$ {' '.join(self.args)}\n--- stdout ---\n{self._out_path.read_text(errors='replace')}"
            f"--- stderr ---\n{self._err_path.read_text(errors='replace')}"
        )

    def wait_http(self, url: str, timeout_s: float = 30.0) -> float:
        """Poll `url` until it answers 200; returns seconds since the process started."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as c:
            while True:
                if self.popen.poll() is not None:
                    raise AssertionError(f"process exited with {self.popen.returncode} before it was ready\n{self.output()}")
                try:
                    if c.get(url).status_code == 200:
                        return time.monotonic() - self.started
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"{url} not ready after {timeout_s}s\n{self.output()}")
                time.sleep(0.05)

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process did not exit {timeout_s}s after SIGTERM\n{self.output()}") from None

    def kill(self) -> None:
        """Teardown: stop this process and anything it spawned (its own session), then close files."""
        try:
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            try:  # worker processes live in the same session/process group as their parent
                os.killpg(self.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if self.popen.poll() is None:
                self.popen.wait(timeout=10)
        finally:
            self._out.close()
            self._err.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """`spawn(args, name=..., env=..., cwd=tmp_path)` -> a started `setpoint <args>` subprocess, in
    its own session; stopped (SIGTERM, then SIGKILL to its process group) at teardown."""
    procs: list[Proc] = []
    counter = itertools.count()
    log_dir = tmp_path / "proc-logs"
    log_dir.mkdir(exist_ok=True)

    def start(args: list[str], name: str | None = None, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Proc:
        p = Proc(args, log_dir, name or f"proc{next(counter)}", env=env, cwd=cwd or tmp_path)
        procs.append(p)
        return p

    yield start
    for p in reversed(procs):
        p.kill()


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`run_cli(*args)` -> the finished `setpoint <args>` (text stdout/stderr, 60 s timeout)."""

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            setpoint_command() + list(args), capture_output=True, text=True, timeout=60,
            env=_subprocess_env(env), stdin=subprocess.DEVNULL, cwd=tmp_path,
        )

    return run


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """`write_config(dict_or_text, name=...)` -> path of a YAML config file under tmp_path."""
    counter = itertools.count()

    def write(config: dict[str, Any] | str, name: str | None = None) -> Path:
        d = tmp_path / (name or f"cfg{next(counter)}")
        d.mkdir(parents=True, exist_ok=True)
        path = d / "setpoint.yaml"
        path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
        return path

    return write


class SimProvider:
    def __init__(self, proc: Proc, port: int) -> None:
        self.proc = proc
        self.port = port
        self.base_url = f"http://{LOOPBACK}:{port}/v1"


@pytest.fixture
def sim_provider_proc(spawn: Callable[..., Proc], free_port: Callable[[], int]) -> SimProvider:
    """`setpoint sim-provider` as a subprocess on a free port (fast latencies)."""
    port = free_port()
    p = spawn(["sim-provider", "--host", LOOPBACK, "--port", str(port), "--seed", "3",
               "--ttft-ms", "1", "--per-token-ms", "0.1"], name="sim-provider")
    p.wait_http(f"http://{LOOPBACK}:{port}/v1/models")
    return SimProvider(p, port)


class ServedGateway:
    def __init__(self, proc: Proc, port: int, config_path: Path, data_dir: Path, startup_s: float) -> None:
        self.proc = proc
        self.port = port
        self.config_path = config_path
        self.data_dir = data_dir
        self.startup_s = startup_s
        self.root_url = f"http://{LOOPBACK}:{port}"
        self.base_url = self.root_url + "/v1"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "requests.db"


@pytest.fixture
def serve_gateway(
    spawn: Callable[..., Proc], free_port: Callable[[], int], write_config: Callable[..., Path]
) -> Callable[..., ServedGateway]:
    """`serve_gateway(config_dict_or_path, workers=1)` -> `setpoint serve` on a free port, ready.

    A dict config gets `data_dir: data` (relative to the config file) unless it sets one."""

    def start(config: dict[str, Any] | Path, workers: int = 1, env: dict[str, str] | None = None) -> ServedGateway:
        if isinstance(config, Path):
            path = config
        else:
            cfg = dict(config)
            cfg.setdefault("data_dir", "data")
            path = write_config(cfg)
        raw = yaml.safe_load(path.read_text()) or {}
        data_dir = Path(raw.get("data_dir", ".setpoint"))
        if not data_dir.is_absolute():
            data_dir = path.parent / data_dir
        port = free_port()
        args = ["serve", "--config", str(path), "--host", LOOPBACK, "--port", str(port)]
        if workers != 1:
            args += ["--workers", str(workers)]
        p = spawn(args, name=f"serve-{port}", env=env)
        startup = p.wait_http(f"http://{LOOPBACK}:{port}/health")
        print(f"setpoint serve ({workers} worker(s)) ready in {startup:.2f}s")  # information only
        return ServedGateway(p, port, path, data_dir, startup)

    return start


# -- a throwaway redis-server ---------------------------------------------------------------------
# One server per test session, started from the installed binary on a free loopback port with no
# persistence (`--save "" --appendonly no`) in a temporary directory, killed at teardown. Every test
# that asks for `redis_url` gets its own database number, flushed before use. Set
# `SETPOINT_TEST_REDIS_URL` to use an existing server instead (its database is flushed; outage tests
# are skipped since it cannot be stopped). Without either, Redis tests are skipped with a reason.

_DATABASES = 256  # one per test (mod this), so a leftover key from one test never meets another




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
        assert client.dbsize() == 0
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
