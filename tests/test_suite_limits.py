"""The suite's run limit is set by progress, not by a guessed total (tests/ranks.py: wait_with_progress)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from ranks import wait_with_progress


def _start(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def test_a_run_that_keeps_writing_outlives_the_stall_limit(tmp_path):
    """4 s of work, a line every 0.5 s, under a 2 s stall limit: it is slow, not stuck, and it finishes."""
    log = tmp_path / "log"
    code = f"import time\nfor i in range(8):\n    open({str(log)!r}, 'a').write(f'step {{i}}\\n'); time.sleep(0.5)"
    proc = _start(code)
    start = time.monotonic()
    wait_with_progress([proc], [log], stall_s=2.0)
    assert proc.returncode == 0 and time.monotonic() - start > 3.5
    assert log.read_text().count("step") == 8


def test_a_run_that_stops_writing_is_killed_after_the_stall_limit(tmp_path):
    log = tmp_path / "log"
    proc = _start(f"import time\nopen({str(log)!r}, 'w').write('started\\n')\ntime.sleep(600)")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no progress for 2 s"):
        wait_with_progress([proc], [log], stall_s=2.0)
    proc.wait(timeout=30)
    assert proc.returncode == -9 and time.monotonic() - start < 60
