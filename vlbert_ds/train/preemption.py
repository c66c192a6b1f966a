"""Stop cleanly when the scheduler asks: checkpoint at a step boundary, then requeue or exit with a code.

Slurm sends `--signal=USR1@<seconds>` before the time limit and SIGTERM on preemption or cancel (then
SIGKILL after `KillWait`). A signal only sets a flag here; the training loop asks `should_stop()` after
each optimiser step, and all ranks agree through one all-reduce, so every rank saves the same step even
when the signal reached them at different moments. After the checkpoint:

- under `launch/slurm/pretrain.sbatch` (`VLBERT_REQUEUE_ON_STOP=1`) and when the signal was the
  time-limit warning (SIGUSR1; `VLBERT_REQUEUE_SIGNALS` widens the set), rank 0 runs `scontrol
  requeue` for its own job, as PyTorch Lightning does; Slurm ends every task and queues the job again,
  and the new run resumes from `latest` in the same MLflow run. Rank 0 does it rather than the job
  script: with `srun --kill-on-bad-exit`, the first rank to exit with a non-zero code would have the
  others killed, so an exit code cannot carry "stopped, requeue me" reliably from every rank;
- on SIGTERM the checkpoint is saved but the job does not requeue itself by default: `scancel` sends
  SIGTERM, and a requeue from inside a cancelled job does succeed on Slurm 22.05 (tried), so a user
  could never cancel. Preemption with `PreemptMode=REQUEUE` is requeued by Slurm itself;
- otherwise every rank exits with `PREEMPTED_EXIT_CODE`, for whatever restarts the job.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

import torch

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", with a checkpoint to continue from
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequests:
    """Catches the scheduler's signals while training runs; restores the previous handlers on `close`."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.received: signal.Signals | None = None
        self.received_at: float | None = None
        self._pid = os.getpid()
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        # Slurm signals every process of the task, DataLoader workers too: they inherit this handler
        # (installed before they fork) and ignore the signal; the training process decides.
        if os.getpid() == self._pid and self.received is None:
            self.received, self.received_at = signal.Signals(signum), time.monotonic()
            log.warning("received %s: stopping after this step with a checkpoint", self.received.name)

    def should_stop(self, device: torch.device | str = "cpu") -> bool:
        """True on every rank once any rank has received a stop signal (a collective: call it on all ranks).

        `device` is the engine's: NCCL reduces only CUDA tensors.
        """
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def seconds_since_signal(self) -> float | None:
        return None if self.received_at is None else time.monotonic() - self.received_at

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def requeue_wanted(received: signal.Signals | None, env: dict[str, str] | None = None) -> bool:
    """Whether the launcher asked for a self-requeue after a stop on `received` (see the module doc)."""
    env = dict(os.environ if env is None else env)
    if env.get("VLBERT_REQUEUE_ON_STOP") != "1" or not env.get("SLURM_JOB_ID") or received is None:
        return False
    wanted = {name.strip().upper().removeprefix("SIG") for name in env.get("VLBERT_REQUEUE_SIGNALS", "USR1").split(",")}
    return received.name.removeprefix("SIG") in wanted


def requeue_slurm_job(env: dict[str, str] | None = None) -> str | None:
    """`scontrol requeue` this job; returns the job id when requeued.

    `VLBERT_MAX_REQUEUES` (default 100) bounds the restarts so that a job failing the same way every
    time does not loop for ever.
    """
    env = dict(os.environ if env is None else env)
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return None
    restarts, limit = int(env.get("SLURM_RESTART_COUNT") or 0), int(env.get("VLBERT_MAX_REQUEUES") or 100)
    if restarts >= limit:
        log.warning("not requeueing job %s: it has restarted %d times (VLBERT_MAX_REQUEUES=%d)", job_id, restarts,
                    limit)
        return None
    print(f"requeueing job {job_id} (restart {restarts + 1})", flush=True)
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job_id, done.stderr.strip())
        return None
    return job_id


def exit_code_after_stop(is_main: bool, received: signal.Signals | None) -> int:
    """The process exit code after a stop with a checkpoint saved (requeueing first where asked).

    Rank 0 requeues the Slurm job (which ends every task); the other ranks exit 0 meanwhile, so that
    `srun --kill-on-bad-exit` does not end rank 0 before it has asked. The signal is rank 0's.
    """
    if os.environ.get("VLBERT_REQUEUE_ON_STOP") == "1" and os.environ.get("SLURM_JOB_ID"):
        if not is_main:
            return 0
        if requeue_wanted(received) and requeue_slurm_job():
            return 0
    return PREEMPTED_EXIT_CODE
