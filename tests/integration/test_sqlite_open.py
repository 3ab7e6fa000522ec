"""Several worker processes open the same fresh SQLite files at the same moment (`serve --workers N`
does that at start-up). Before `open_sqlite`, the switch to WAL failed with "database is locked"
in about one start in a hundred; here every store is opened by many processes released at once,
over many fresh files, and every open must succeed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_RACE = textwrap.dedent(
    """
    import multiprocessing as mp, os, sys, tempfile, traceback
    from pathlib import Path

    def opener(kind):
        if kind == "open_sqlite":
            from setpoint.sqlite_open import open_sqlite
            return lambda p: open_sqlite(p, synchronous="NORMAL").execute("CREATE TABLE IF NOT EXISTS t (x)")
        if kind == "keys":
            from setpoint.keys.store import SqliteKeyStore
            return SqliteKeyStore
        if kind == "state":
            from setpoint.state.sqlite import SqliteStateStore
            return SqliteStateStore
        from setpoint.logstore.sqlite_store import SqliteLogStore
        return SqliteLogStore

    def child(open_, path, go):
        go.wait()
        try:
            open_(path)
        except BaseException:
            traceback.print_exc()
            os._exit(3)
        os._exit(0)

    if __name__ == "__main__":
        kind, rounds, procs, root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
        open_ = opener(kind)
        ctx = mp.get_context("fork")
        failed = 0
        for i in range(rounds):
            path = root / f"{i}.db"
            go = ctx.Event()
            ps = [ctx.Process(target=child, args=(open_, path, go)) for _ in range(procs)]
            for p in ps:
                p.start()
            go.set()
            for p in ps:
                p.join(60)
            failed += sum(p.exitcode != 0 for p in ps)
        print(f"failed={failed}")
    """
)


@pytest.mark.parametrize("kind", ["open_sqlite", "keys", "state", "logstore"])
def test_many_processes_open_a_fresh_file_at_once(kind: str, tmp_path: Path) -> None:
    script = tmp_path / "race.py"
    script.write_text(_RACE)
    out = subprocess.run(
        [sys.executable, str(script), kind, "60", "6", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("failed=0"), out.stdout + out.stderr[-3000:]
