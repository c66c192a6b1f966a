"""The suite's run limit is set by progress, not by a guessed total (tests/ranks.py: wait_with_progress)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from ranks import progress_marker, wait_with_progress


def _start(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def test_a_run_that_keeps_writing_outlives_the_stall_limit(tmp_path):
    """8 s of work, a line every 0.5 s, under a 5 s stall limit: it is slow, not stuck, and it finishes (the
    limit is 10 lines' time, so a writer starved for a few seconds on a busy machine still passes)."""
    log = tmp_path / "log"
    code = f"import time\nfor i in range(16):\n    open({str(log)!r}, 'a').write(f'step {{i}}\\n'); time.sleep(0.5)"
    proc = _start(code)
    start = time.monotonic()
    wait_with_progress([proc], [log], stall_s=5.0)
    assert proc.returncode == 0 and time.monotonic() - start > 7.5
    assert log.read_text().count("step") == 16


def test_a_run_that_stops_writing_is_killed_after_the_stall_limit(tmp_path):
    log = tmp_path / "log"
    proc = _start(f"import time\nopen({str(log)!r}, 'w').write('started\\n')\ntime.sleep(600)")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no progress for 2 s"):
        wait_with_progress([proc], [log], stall_s=2.0)
    proc.wait(timeout=30)
    assert proc.returncode == -9 and time.monotonic() - start < 60


def test_folders_that_vanish_while_they_are_scanned_do_not_fail_the_watch(tmp_path):
    """A run's folder changes under the watch (DeepSpeed's universal conversion makes and removes tmp/
    trees): a folder removed between its listing and its scan is skipped, not an error. Path.rglob raised
    FileNotFoundError here and failed an elastic-resume test on a busy machine."""
    import shutil
    import threading

    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            for n in range(20):
                (tmp_path / "tmp" / f"part{n}" / "0" / "1").mkdir(parents=True, exist_ok=True)
                (tmp_path / "tmp" / f"part{n}" / "0" / "1" / "fp32.pt").write_bytes(b"x")
            shutil.rmtree(tmp_path / "tmp", ignore_errors=True)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            progress_marker([tmp_path])
    finally:
        stop.set()
        thread.join()
