"""Start N ranks of a training run as separate processes on this machine (what a launcher does)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services import free_port

WORKER = Path(__file__).parent / "helpers" / "train_worker.py"

# The model of every multi-process test that is not about MiniLM's weights: the `tiny` preset built from
# scratch (2 layers of 64, the real 30,522-word vocabulary the shards are tokenized with). A step and a
# checkpoint cost a tenth of MiniLM's (a ~30 MB checkpoint instead of 374 MB); what these tests check
# (resume, faults, exits, ranks) does not depend on the weights.
TINY = ["model.bert=", "model.preset=tiny"]

# A run is failed when nothing it writes (rank logs, its output folder) changes for this long: a time limit
# set by progress, not by a guess of the total, so a slow or busy machine is not mistaken for a hang.
STALL_S = 600.0


def progress_marker(paths: list[Path]) -> tuple:
    """Sizes and modification times of every file under `paths`: it changes while a run makes progress.

    Files and folders come and go while a run writes (DeepSpeed's universal-checkpoint conversion makes and
    removes a tmp/ tree): os.walk skips a folder that vanished between its listing and its scan, where
    Path.rglob raised FileNotFoundError and failed the test."""
    marker = []
    for path in paths:
        files = ([Path(root) / name for root, _, names in os.walk(path) for name in names] if path.is_dir()
                 else [path])
        for file in files:
            try:
                stat = file.stat()
            except OSError:
                continue
            marker.append((str(file), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(marker))


def wait_with_progress(procs: list[subprocess.Popen], watched: list[Path], stall_s: float = STALL_S) -> None:
    """Wait for every process; kill them all (their process groups too) when `watched` stops changing
    for `stall_s` seconds, and raise with the silence's length."""
    marker, changed = progress_marker(watched), time.monotonic()
    while any(p.poll() is None for p in procs):
        time.sleep(1.0)
        now = progress_marker(watched)
        if now != marker:
            marker, changed = now, time.monotonic()
        elif time.monotonic() - changed > stall_s:
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(OSError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.kill()
            raise TimeoutError(f"no progress for {stall_s:.0f} s (nothing under {[str(w) for w in watched]} "
                               "changed): killed the run")


def _output_dir(overrides: list[str]) -> Path | None:
    found = [o.split("=", 1)[1] for o in overrides if o.startswith("train.output_dir=")]
    return Path(found[-1]) if found else None


def run_ranks(spec: dict, world_size: int, tmp: Path, env_extra: dict | None = None, expect_ok: bool = True,
              stall_s: float = STALL_S) -> tuple[dict | None, list[subprocess.CompletedProcess]]:
    """Run the worker on `world_size` ranks; return (rank 0's report, each rank's completed process).
    The ranks are failed when they stop making progress for `stall_s` (see `wait_with_progress`)."""
    spec = dict(spec, out=str(tmp / f"report-{os.getpid()}-{free_port()}.json"))
    spec_file = tmp / f"spec-{free_port()}.json"
    spec_file.write_text(json.dumps(spec))
    port = free_port()
    procs, logs = [], []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env_extra or {})}
        path = tmp / f"rank{rank}-{port}.log"
        with open(path, "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(spec_file)], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(path)
    output = _output_dir(spec.get("overrides", []))
    try:
        wait_with_progress(procs, [*logs, *([output] if output else [])], stall_s)
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    results = [subprocess.CompletedProcess(proc.args, proc.returncode, path.read_text(), "")
               for proc, path in zip(procs, logs, strict=True)]
    if expect_ok:
        for result in results:
            assert result.returncode == 0, result.stdout[-4000:]
    out = Path(spec["out"])
    return (json.loads(out.read_text()) if out.exists() else None), results
