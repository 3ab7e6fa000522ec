"""`setpoint demo`, the README's first command: a real subprocess, no keys, no services."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.conftest import setpoint_command


def test_demo_serves_a_burst_and_prints_the_table(tmp_path: Path) -> None:
    out = subprocess.run([*setpoint_command(), "demo"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "client saw: ok=40" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("sim-")]
    assert {r[0] for r in rows} == {"sim-embed", "sim-flaky", "sim-large", "sim-mini"}
    assert sum(int(r[1]) for r in rows) == 40  # every request is in the log
    assert "nan" not in text
    m = re.search(r"40 requests logged, total cost (\d+) micro-dollars \(\$([0-9.]+)\)", text)
    assert m and int(m.group(1)) > 0 and abs(int(m.group(1)) / 1e6 - float(m.group(2))) < 1e-6
