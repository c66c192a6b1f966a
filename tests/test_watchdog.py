"""The step watchdog on its own: a trainer that freezes right after a burst of fast steps is still found."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time


def test_a_run_frozen_after_fast_steps_is_stopped_after_the_step_based_allowance(tmp_path):
    """Five 10 ms steps, then silence. The watcher starts slower than that and never sees two steps in its
    1 s polls; the trainer's own measured median (10 ms) must still apply, so the allowance is the
    5 s minimum, not the 1800 s start-up allowance (which it was before the median came from the trainer)."""
    trainer = textwrap.dedent("""
        import time
        from vlbert_ds.train.watchdog import Watchdog
        dog = Watchdog(factor=5.0, min_s=5.0, startup_s=1800.0, rank=0)
        dog.beat(0)
        for step in range(1, 6):
            time.sleep(0.01)
            dog.beat(step)
        print("frozen", flush=True)
        time.sleep(600)
    """)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", trainer], capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - start
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr[-2000:])
    assert "frozen" in done.stdout
    assert "watchdog (rank 0): no step for" in done.stderr and "after step 5" in done.stderr
    assert "at least 5 s" in done.stderr and elapsed < 120
