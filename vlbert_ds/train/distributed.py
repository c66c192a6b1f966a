"""Rank discovery and process-group set-up, in Python rather than shell.

Order (as OpenCLIP's `world_info_from_env`): torchrun / the deepspeed launcher (`RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), else Slurm (`SLURM_PROCID`,
`SLURM_NTASKS`, `SLURM_LOCALID`, the address of the first host of `SLURM_JOB_NODELIST`, a port
derived from the job id), else a single process. DeepSpeed reads no SLURM_* variable and would fall back to mpi4py,
so we export the discovered values before `deepspeed.init_distributed(auto_mpi_discovery=False)`.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "launcher", "slurm" or "single"
    local_world_size: int = 1  # processes on this node (CPU thread budget)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """One log line per rank, so a job log shows that every rank took part and how it was found."""
        import socket

        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}) on {socket.gethostname()}, "
                f"ranks from {self.source}, master {self.master_addr}:{self.master_port}")


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `scontrol show hostnames`, or a parse of `n[1-3,5]` forms."""
    out = _scontrol("show", "hostnames", nodelist).split()
    if out:
        return out[0]
    first = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    match = re.match(r"^([^\[,]+)\[(\d+)", first)
    return f"{match.group(1)}{match.group(2)}" if match else first.split(",")[0]


def node_address(node: str) -> str:
    """The address Slurm itself uses for `node` (its NodeAddr), which need not be a resolvable name."""
    match = re.search(r"NodeAddr=(\S+)", _scontrol("show", "node", node, "-o"))
    return match.group(1) if match else node


def _scontrol(*args: str) -> str:
    try:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def slurm_port(job_id: str, base: int = 20000, span: int = 20000) -> int:
    """A port derived from the job id, so concurrent jobs on shared nodes do not collide."""
    return base + int(job_id) % span if job_id.isdigit() else base


def _leading_int(text: str | None) -> int | None:
    """`2(x4)` (Slurm's per-node task counts) -> 2."""
    match = re.match(r"\s*(\d+)", text or "")
    return int(match.group(1)) if match else None


def discover(env: dict[str, str] | None = None) -> DistEnv:
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(int(env["RANK"]), world, int(env.get("LOCAL_RANK", "0")),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")), "launcher",
                       _leading_int(env.get("LOCAL_WORLD_SIZE")) or world)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        local_world = (_leading_int(env.get("SLURM_NTASKS_PER_NODE"))
                       or _leading_int(env.get("SLURM_STEP_TASKS_PER_NODE"))
                       or _leading_int(env.get("SLURM_TASKS_PER_NODE")) or 1)
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")),
                       env.get("MASTER_ADDR") or node_address(first_slurm_host(nodelist)),
                       int(env.get("MASTER_PORT") or slurm_port(env.get("SLURM_JOB_ID", ""))), "slurm", local_world)
    # One process: any free port, so that two single-process runs on one machine do not collide.
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or _free_port()), "single")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(dist: DistEnv, backend: str | None = None, timeout_s: float = 600.0) -> None:
    """Export the discovered values and start the process group through DeepSpeed.

    `timeout_s` bounds how long a collective waits for a peer that died without closing its
    connections; with gloo a dead peer usually fails the next collective at once.
    """
    import time
    from datetime import timedelta

    import deepspeed

    os.environ.update({"RANK": str(dist.rank), "WORLD_SIZE": str(dist.world_size),
                       "LOCAL_RANK": str(dist.local_rank), "MASTER_ADDR": dist.master_addr,
                       "MASTER_PORT": str(dist.master_port)})
    use_environment_extension_cache()
    from deepspeed.accelerator import get_accelerator

    if backend is None:
        backend = get_accelerator().communication_backend_name()
    if get_accelerator().device_name() == "cpu" and not comm_op_built() and dist.local_rank == 0:
        print(f"rank {dist.rank}: building DeepSpeed's CPU communication op (first use in this environment, 1-2 "
              f"minutes; cached in {os.environ['TORCH_EXTENSIONS_DIR']}) ...", flush=True)
    start = time.monotonic()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s))
    if time.monotonic() - start > 20:
        print(f"rank {dist.rank}: process group ready after {time.monotonic() - start:.0f} s (op build and "
              f"rendezvous with {dist.world_size} ranks)", flush=True)


CPU_COMM_OP = "deepspeed_shm_comm"


def use_environment_extension_cache() -> str:
    """Keep JIT-built extension ops (DeepSpeed's CPU communication op) inside this Python environment.

    Torch's default cache is `~/.cache/torch_extensions`, which every fresh HOME, container or CI user
    rebuilds (1-2 minutes of both cores, while the other ranks wait at the rendezvous). A venv owns
    its cache: `scripts/setup.sh` builds the op once there (`python -m vlbert_ds.train.distributed
    --build-ops`). An explicit TORCH_EXTENSIONS_DIR wins.
    """
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    return os.environ.get("TORCH_EXTENSIONS_DIR", "")


def comm_op_built() -> bool:
    folder = os.environ.get("TORCH_EXTENSIONS_DIR")
    return bool(folder) and os.path.isfile(os.path.join(folder, CPU_COMM_OP, f"{CPU_COMM_OP}.so"))


def build_ops() -> int:
    """Build (or find) DeepSpeed's CPU communication op in the environment's cache; 0 when it is usable."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    folder = use_environment_extension_cache()
    if comm_op_built():
        print(f"{CPU_COMM_OP}: already built in {folder}")
        return 0
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible():
        print(f"{CPU_COMM_OP}: not available on this machine; DeepSpeed falls back to torch.distributed")
        return 0
    print(f"building {CPU_COMM_OP} into {folder} (1-2 minutes) ...", flush=True)
    builder.load()
    return 0


@contextlib.contextmanager
def exit_fast_on_error(dist: DistEnv, code: int = 1):
    """On an uncaught error in a multi-rank run, print it and leave at once with `os._exit`.

    After a peer died, a normal interpreter exit can hang for minutes (process-group teardown and
    DataLoader workers wait on the dead peer), which keeps a job that cannot continue holding its
    nodes; the launcher (srun --kill-on-bad-exit, the deepspeed launcher) then ends the other ranks.
    """
    try:
        yield
    except (KeyboardInterrupt, SystemExit, ValueError, FileNotFoundError, FloatingPointError):
        raise  # bad input or divergence: every rank meets it at the same point and exits normally
    except OSError as err:
        if err.errno != 28:  # a full disk (CheckpointDiskFull) is agreed by every rank as well
            _exit_now(dist, code)
        raise
    except BaseException:
        _exit_now(dist, code)
        raise


def _exit_now(dist: DistEnv, code: int) -> None:
    """Leave at once after printing the error being handled (multi-rank runs; one rank returns)."""
    if dist.world_size <= 1:
        return
    traceback.print_exc()
    print(f"rank {dist.rank}: exiting at once after the error above", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def setup_process(dist: DistEnv) -> None:
    """Per-process set-up shared by the entry points: rank-tagged logging, CPU accelerator and threads."""
    import logging

    import torch

    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING,
                        format=f"[rank {dist.rank}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # a launcher's or job script's choice wins
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, dist.local_world_size)))


if __name__ == "__main__":
    if sys.argv[1:] != ["--build-ops"]:
        raise SystemExit("usage: python -m vlbert_ds.train.distributed --build-ops")
    raise SystemExit(build_ops())
