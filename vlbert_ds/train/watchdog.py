"""A step-progress watchdog: a run whose steps stop coming is stopped, loudly, instead of hanging.

A hung rank (a deadlocked collective, a stopped process, a filesystem that stopped answering) is
found by nothing else: its peers wait in a collective for `train.dist_timeout_s`, and a single
process waits for ever. The trainer beats a heartbeat file in node-local memory (`/dev/shm`) after
every step; a small separate process (so that it runs even when the trainer is frozen) watches it.
When no step came for `max(watchdog_min_s, watchdog_factor x the median step time)` (or
`watchdog_startup_s` before the first step), it

1. says so on the run's stderr,
2. makes the trainer dump every thread's stack (faulthandler on SIGUSR2, after a SIGCONT),
3. marks the MLflow run FAILED with the reason,
4. SIGKILLs the trainer, whose non-zero exit lets Slurm requeue the job (its loader workers die with it).

The watcher ends with the trainer (parent-death signal, and it polls the trainer's pid).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class Watchdog:
    """The trainer's side: start the watcher, beat after every step, stop it at the end."""

    def __init__(self, factor: float, min_s: float, startup_s: float, rank: int) -> None:
        folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        self.path = folder / f"vlbert_ds-heartbeat-{os.getpid()}-{rank}"
        self.info: dict = {"step": 0, "time": time.time(), "rank": rank}
        self.step_seconds: list[float] = []  # measured here, at every step, not by the watcher's 1 s polls
        self._write()
        faulthandler.register(signal.SIGUSR2, all_threads=True, chain=False)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vlbert_ds.train.watchdog", str(os.getpid()), str(self.path), str(factor),
             str(min_s), str(startup_s)], stdin=subprocess.DEVNULL)

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.info))
        os.replace(tmp, self.path)

    def beat(self, step: int, phase: str = "train", tracking_uri: str | None = None,
             run_id: str | None = None) -> None:
        """After a step (phase train), or before a long stretch without steps (checkpoint, evaluate: the
        start-up allowance applies to those)."""
        now = time.time()
        if phase == "train" and step > self.info["step"]:  # from the previous beat: a checkpoint is not a step
            per_step = (now - self.info["time"]) / (step - self.info["step"])
            self.step_seconds = [*self.step_seconds[-99:], per_step]
        median = statistics.median(self.step_seconds) if self.step_seconds else None
        self.info.update(step=step, phase=phase, time=now, beat=self.info.get("beat", 0) + 1,
                         tracking_uri=tracking_uri, run_id=run_id, median_step_s=median)
        self._write()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for path in (self.path, self.path.with_name(self.path.name + ".tmp")):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _mark_mlflow(info: dict, reason: str) -> None:
    if not (info.get("tracking_uri") and info.get("run_id")):
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(info["tracking_uri"])
        client.set_tag(info["run_id"], "vlbert_ds.error", f"watchdog: {reason}")
        client.set_terminated(info["run_id"], status="FAILED")
    except Exception as err:  # the tracking server may be what hangs
        print(f"watchdog: could not mark MLflow run {info['run_id']} failed: {err}", file=sys.stderr, flush=True)


def watch(pid: int, path: Path, factor: float, min_s: float, startup_s: float) -> int:
    from vlbert_ds.lifecycle import die_with_parent

    die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # Slurm signals every process of a task: the trainer decides
    last_step, last_beat, last_change, step_time = None, None, time.time(), time.time()
    durations: list[float] = []
    while _alive(pid) and os.getppid() == pid:
        time.sleep(1.0)
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if info.get("beat") != last_beat:
            if last_step is not None and info["step"] > last_step:  # (polled once a second: maybe several steps)
                per_step = (info["time"] - step_time) / (info["step"] - last_step)
                durations = [*durations[-99:], per_step]
            # a step's time runs from the previous beat: a checkpoint save before it is not counted in it
            last_step, last_beat, last_change, step_time = info["step"], info.get("beat"), info["time"], info["time"]
            continue
        quiet = time.time() - last_change
        # The trainer's own median (every step measured); the watcher's polls see steps only when they last
        # over a second, and a run frozen before two polls saw two steps would get the start-up allowance.
        median = info.get("median_step_s") or (statistics.median(durations) if durations else None)
        in_steps = info.get("phase", "train") == "train" and median is not None
        allowed = max(min_s, factor * median) if in_steps else startup_s
        if quiet <= allowed:
            continue
        reason = (f"no step for {quiet:.0f} s after step {last_step} (allowed {allowed:.0f} s: "
                  + (f"{factor:g} x the median step of {median:.2f} s, at least {min_s:g} s)"
                     if in_steps else f"the allowance outside steps, phase {info.get('phase')})"))
        print(f"watchdog (rank {info.get('rank')}): {reason}; dumping the trainer's stacks and stopping it",
              file=sys.stderr, flush=True)
        os.kill(pid, signal.SIGCONT)  # a stopped process handles no signal but this one and SIGKILL
        os.kill(pid, signal.SIGUSR2)  # faulthandler: every thread's stack to the trainer's stderr
        time.sleep(3.0)
        os.kill(pid, signal.SIGSTOP)  # still now: it writes nothing more while the run is marked
        for stale in (path, path.with_name(path.name + ".tmp")):
            stale.unlink(missing_ok=True)  # the trainer cannot clean up after a SIGKILL
        _mark_mlflow(info, reason)
        os.kill(pid, signal.SIGKILL)  # (this watcher dies with it: parent-death signal)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="watch a trainer's heartbeat (started by the trainer)")
    parser.add_argument("pid", type=int)
    parser.add_argument("path", type=Path)
    parser.add_argument("factor", type=float)
    parser.add_argument("min_s", type=float)
    parser.add_argument("startup_s", type=float)
    args = parser.parse_args()
    return watch(args.pid, args.path, args.factor, args.min_s, args.startup_s)


if __name__ == "__main__":
    raise SystemExit(main())
