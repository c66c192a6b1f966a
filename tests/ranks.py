"""Start N ranks of a training run as separate processes on this machine (what a launcher does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from services import free_port

WORKER = Path(__file__).parent / "helpers" / "train_worker.py"


def run_ranks(spec: dict, world_size: int, tmp: Path, timeout: float = 600, env_extra: dict | None = None,
              expect_ok: bool = True) -> tuple[dict | None, list[subprocess.CompletedProcess]]:
    """Run the worker on `world_size` ranks; return (rank 0's report, each rank's completed process)."""
    spec = dict(spec, out=str(tmp / f"report-{os.getpid()}-{free_port()}.json"))
    spec_file = tmp / f"spec-{free_port()}.json"
    spec_file.write_text(json.dumps(spec))
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env_extra or {})}
        log = open(tmp / f"rank{rank}-{port}.log", "w")  # noqa: SIM115
        procs.append((subprocess.Popen([sys.executable, str(WORKER), str(spec_file)], env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log, tmp / f"rank{rank}-{port}.log"))
    results = []
    for proc, log, path in procs:
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, path.read_text(), ""))
    if expect_ok:
        for result in results:
            assert result.returncode == 0, result.stdout[-4000:]
    out = Path(spec["out"])
    return (json.loads(out.read_text()) if out.exists() else None), results
