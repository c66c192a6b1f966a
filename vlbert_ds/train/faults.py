"""Fault injection for the reliability suite (tests/test_faults.py), off unless the variables are set.

    VLBERT_FAULT_EXIT_AFTER_STEP=N        exit abruptly (code 17, no cleanup) after step N
    VLBERT_FAULT_NAN_LOSS_AT_STEP=N       make rank 0's loss NaN on the first micro-batch of step N
    VLBERT_FAULT_CRASH_IN_CHECKPOINT=N    exit abruptly (code 18) while saving the checkpoint of step N,
                                          after DeepSpeed wrote its files and before COMPLETE/latest
    VLBERT_FAULT_CRASH_AFTER_COMMIT=N     exit abruptly (code 19) right after the checkpoint of step N is
                                          committed (`latest` moved), before its metrics go to MLflow
    VLBERT_FAULT_RAISE_AT_STEP=N          raise a RuntimeError (an ordinary crash: the exit path runs) at step N
    VLBERT_FAULT_RANK=R                   only rank R injects (default: every rank for exits, rank 0 for NaN)
    VLBERT_FAULT_STEP_PAUSE_S=S           sleep S seconds after every step: a tiny test model's steps take
                                          milliseconds, and a test that signals or kills a run mid-way
                                          needs the run to still be running when the signal lands

They live in one place so that the training loop reads as training, with one call per hook.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field


def _int(name: str) -> int:
    return int(os.environ.get(name, "0") or 0)


@dataclass
class Faults:
    exit_after_step: int = 0
    nan_loss_at_step: int = 0
    crash_in_checkpoint: int = 0
    raise_at_step: int = 0
    rank: int = -1  # -1 = default per fault
    crash_after_commit: int = 0
    step_pause_s: float = 0.0
    _poisoned: bool = field(default=False, repr=False)

    @classmethod
    def from_env(cls) -> Faults:
        rank = os.environ.get("VLBERT_FAULT_RANK")
        return cls(_int("VLBERT_FAULT_EXIT_AFTER_STEP"), _int("VLBERT_FAULT_NAN_LOSS_AT_STEP"),
                   _int("VLBERT_FAULT_CRASH_IN_CHECKPOINT"), _int("VLBERT_FAULT_RAISE_AT_STEP"),
                   int(rank) if rank else -1, _int("VLBERT_FAULT_CRASH_AFTER_COMMIT"),
                   float(os.environ.get("VLBERT_FAULT_STEP_PAUSE_S", "0") or 0))

    def _mine(self, rank: int, default_all: bool) -> bool:
        return rank == self.rank if self.rank >= 0 else (default_all or rank == 0)

    def maybe_exit_after(self, step: int, rank: int) -> None:
        if self.exit_after_step and step == self.exit_after_step and self._mine(rank, default_all=True):
            sys.stdout.flush()
            os._exit(17)

    def poison_loss(self, step: int, rank: int) -> bool:
        """True (once) when this micro-batch's loss should be replaced by NaN."""
        if self._poisoned or not self.nan_loss_at_step or step != self.nan_loss_at_step:
            return False
        self._poisoned = self._mine(rank, default_all=False)
        return self._poisoned

    def maybe_crash_in_checkpoint(self, step: int, rank: int) -> None:
        if self.crash_in_checkpoint and step == self.crash_in_checkpoint and self._mine(rank, default_all=True):
            sys.stdout.flush()
            os._exit(18)

    def maybe_crash_after_commit(self, step: int, rank: int) -> None:
        if self.crash_after_commit and step == self.crash_after_commit and self._mine(rank, default_all=True):
            sys.stdout.flush()
            os._exit(19)

    def pause_after_step(self) -> None:
        if self.step_pause_s > 0:
            time.sleep(self.step_pause_s)

    def maybe_raise(self, step: int, rank: int) -> None:
        if self.raise_at_step and step == self.raise_at_step and self._mine(rank, default_all=True):
            raise RuntimeError(f"injected fault: crash at step {step} (VLBERT_FAULT_RAISE_AT_STEP)")
