"""Helpers for the durability tests: records, reading requests.db, drainers that are always
stopped, spools left behind by processes that really died (SIGKILL), and `setpoint serve`
subprocesses that are always killed."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from setpoint.logstore.drainer import SpoolDrainer
from setpoint.logstore.spool import Spool

SRC_DIR = str(Path(__file__).resolve().parents[2] / "src")

def make_record(i: int | str, **extra: Any) -> dict[str, Any]:
    """A record shaped like `logstore.record.build_record` output (every NOT NULL column set)."""
    rec: dict[str, Any] = {
        "id": f"rec-{i}" if isinstance(i, int) else i, "ts": 1_700_000_000.0 + (i if isinstance(i, int) else 0),
        "endpoint": "chat", "status": 200, "model": "m", "is_stream": 0, "prompt_tokens": 3,
        "completion_tokens": 5, "cached_tokens": 0, "reasoning_tokens": 0, "latency_ms": 1.5,
    }
    rec.update(extra)
    return rec


def db_id_counts(db: Path) -> dict[str, int]:
    """id -> number of rows with that id (the table has a primary key, so >1 would be a schema bug)."""
    if not db.exists():
        return {}
    conn = sqlite3.connect(db, timeout=10)
    try:
        try:
            rows = conn.execute("SELECT id, COUNT(*) FROM requests GROUP BY id").fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return {}
            raise
        return {r[0]: r[1] for r in rows}
    finally:
        conn.close()


def db_total_rows(db: Path) -> int:
    conn = sqlite3.connect(db, timeout=10)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0])
    finally:
        conn.close()


def segments(spool_dir: Path, owner: str | None = None) -> list[Path]:
    pattern = f"{owner}-*.jsonl" if owner else "*.jsonl"
    return sorted(spool_dir.glob(pattern))


def spool_bytes(spool_dir: Path) -> int:
    return sum(p.stat().st_size for p in segments(spool_dir))


def drain_all(drainer: SpoolDrainer, timeout_s: float = 20.0) -> None:
    """Wait until every record appended before this call has been through a drain tick.

    `flush()` alone can return after a tick that started *before* the call (see
    test_flush_waits_for_a_tick_that_started_after_the_call), so flush twice: the second flush can
    only be satisfied by a tick that began after the first one returned."""
    assert drainer.flush(timeout_s), "drainer did not finish a tick"
    assert drainer.flush(timeout_s), "drainer did not finish a tick"


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture
def start_drainer() -> Iterator[Callable[..., SpoolDrainer]]:
    """`start_drainer(spool, db_path, batch_size=1000, interval_s=60)` -> a started drainer, stopped
    (which also closes and releases its spool) at teardown."""
    started: list[SpoolDrainer] = []

    def start(spool: Spool, db: Path, batch_size: int = 1000, interval_s: float = 60.0) -> SpoolDrainer:
        d = SpoolDrainer(spool, db, batch_size, interval_s)
        d.start()
        started.append(d)
        return d

    yield start
    for d in reversed(started):
        d.stop()


# -- spools of processes that died --------------------------------------------------------------

_DEAD_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import orjson
    from setpoint.logstore.spool import Spool

    spec = orjson.loads(sys.stdin.buffer.read())
    spool = Spool(Path(spec["dir"]), spec["segment_bytes"])
    sys.stdout.write(spool.owner + "\\n")
    sys.stdout.flush()
    for rec in spec["records"]:
        if isinstance(rec, str):  # raw bytes straight into the current segment (garbage, torn lines)
            os.write(spool._fd, rec.encode())
        else:
            spool.append(rec)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC_DIR + os.pathsep + env.get("PYTHONPATH", "")
    return env


def spool_of_dead_process(spool_dir: Path, records: list[dict[str, Any] | str], segment_bytes: int = 1 << 20) -> str:
    """Run a child that appends `records` to a Spool in `spool_dir` (strings are written raw, e.g. a
    torn line) and then SIGKILLs itself. Returns the dead owner's id."""
    import orjson

    spec = orjson.dumps({"dir": str(spool_dir), "segment_bytes": segment_bytes, "records": records})
    proc = subprocess.run([sys.executable, "-c", _DEAD_WRITER], input=spec, capture_output=True, timeout=60,
                          env=_child_env())
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    owner = proc.stdout.decode().strip()
    assert re.fullmatch(r"\d+-[0-9a-f]{16}", owner), owner
    assert (spool_dir / f"{owner}.lock").exists()  # a killed process leaves its lock file behind
    return owner


_CRASH_BEFORE_DELETE = textwrap.dedent(
    """
    import os, signal, sys, pathlib
    import orjson
    from setpoint.logstore.spool import Spool
    from setpoint.logstore.drainer import SpoolDrainer

    spec = orjson.loads(sys.stdin.buffer.read())
    base = pathlib.Path(spec["dir"])
    spool = Spool(base / "spool", spec["segment_bytes"])
    sys.stdout.write(spool.owner + "\\n")
    sys.stdout.flush()
    for rec in spec["records"]:
        spool.append(rec)

    real_unlink = pathlib.Path.unlink

    def unlink(self, missing_ok=False):
        if self.suffix == ".jsonl":
            # The drainer committed this segment's records and offset and is about to delete the
            # file: die right here, like a power cut or an OOM kill.
            os.kill(os.getpid(), signal.SIGKILL)
        return real_unlink(self, missing_ok=missing_ok)

    pathlib.Path.unlink = unlink
    drainer = SpoolDrainer(spool, base / "requests.db", spec["batch_size"], 60.0)
    drainer.start()
    drainer.flush(30)
    drainer.flush(30)
    sys.exit(3)  # not reached: the first drained segment kills us
    """
)


def drain_and_crash_before_delete(base: Path, records: list[dict[str, Any]], segment_bytes: int, batch_size: int) -> str:
    import orjson

    spec = orjson.dumps({"dir": str(base), "segment_bytes": segment_bytes, "records": records, "batch_size": batch_size})
    proc = subprocess.run([sys.executable, "-c", _CRASH_BEFORE_DELETE], input=spec, capture_output=True, timeout=60,
                          env=_child_env())
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr.decode())
    return proc.stdout.decode().strip()


# -- `setpoint serve` subprocesses --------------------------------------------------------------

STATIC_KEY = "sk-durability-0123456789abcdef"


class ServeProc:
    """`setpoint serve --config F --port 0` in its own session; output in files; always killed."""

    def __init__(self, config_path: Path, log_dir: Path, name: str) -> None:
        self.config_path = config_path
        self.err_path = log_dir / f"{name}.stderr"
        self.out_path = log_dir / f"{name}.stdout"
        self._out = self.out_path.open("wb")
        self._err = self.err_path.open("wb")
        env = _child_env()
        env["PYTHONUNBUFFERED"] = "1"
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "setpoint.cli.main", "serve", "--config", str(config_path),
             "--host", "127.0.0.1", "--port", "0"],
            stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def logs(self) -> str:
        self._err.flush()
        return self.err_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)/v1", self.err_path.read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
                return
            if self.popen.poll() is not None:
                raise AssertionError(f"setpoint serve exited with {self.popen.returncode}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"setpoint serve not ready after {timeout_s}s\n{self.logs()}")
            time.sleep(0.05)

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)
        assert self.popen.returncode == -signal.SIGKILL

    def terminate(self, timeout_s: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=timeout_s)

    def cleanup(self) -> None:
        try:
            if self.popen.poll() is None:
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(timeout=10)
        finally:
            self._out.close()
            self._err.close()


def serve_config(data_dir: Path, **logging: Any) -> dict[str, Any]:
    return {
        "data_dir": str(data_dir),
        "logging": {"flush_interval_ms": 60_000, **logging},
        # These tests inject upstream faults on purpose to check that error answers are logged too:
        # keep retries and the breaker out of the way (they have their own tests in tests/scenarios).
        "resilience": {"max_attempts": 1, "breaker": {"min_calls": 1_000_000}},
        "providers": {"sim": {"type": "simulated", "seed": 11,
                              "latency": {"ttft_ms": 1, "per_token_ms": 0.2, "jitter": 0},
                              "output": {"min_tokens": 4, "max_tokens": 16}}},
        "models": {
            "chat": {"deployments": [{"provider": "sim", "model": "sim-chat",
                                      "pricing": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}]},
            "embed": {"kind": "embedding", "deployments": [{"provider": "sim", "model": "sim-embed"}]},
        },
        "keys": [{"name": "durability", "key": STATIC_KEY}],
    }


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], ServeProc]]:
    """`serve(config_dict)` -> a ready `setpoint serve` subprocess; SIGKILLed at teardown if alive."""
    procs: list[ServeProc] = []
    log_dir = tmp_path / "serve-logs"
    log_dir.mkdir(exist_ok=True)

    def start(config: dict[str, Any]) -> ServeProc:
        n = len(procs)
        path = tmp_path / f"setpoint-{n}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        p = ServeProc(path, log_dir, f"serve{n}")
        procs.append(p)
        p.wait_ready()
        return p

    yield start
    for p in reversed(procs):
        p.cleanup()
