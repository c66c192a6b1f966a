"""Per-step metrics: a typed accumulator fed by the model's outputs, reduced over ranks, sent to four sinks.

What is logged is what the model returns, with no list of names here: every entry of `out.losses`
(averaged over micro-batches and ranks, beside the total `loss`) and every `out.weighted_metrics()`
entry (a mean weighted by its count, e.g. `mlm_vl_acc` over the masked tokens). The loop adds counts
(samples, tokens, skipped samples by reason, padding batches), which are per-step totals over ranks.

The sinks (rank 0): a progress bar (a terminal only), a console line every `train.log_every` steps
when there is no bar, `metrics.jsonl` in the run folder, and MLflow. Exactly once: MLflow receives a
step's metrics only when a checkpoint that covers it is committed (`commit`), and on resume
`metrics.jsonl` is cut back to the checkpoint's step, so a resumed run never has a step twice.
"""

from __future__ import annotations

import json
import logging
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class StepAccumulator:
    """One optimizer step's sums on this rank (micro-batch by micro-batch)."""

    micro_batches: int = 0
    losses: dict[str, float] = field(default_factory=dict)  # name -> sum over micro-batches
    weighted: dict[str, list[float]] = field(default_factory=dict)  # name -> [sum of mean * weight, weight]
    counts: dict[str, float] = field(default_factory=dict)  # name -> total (summed over ranks too)
    wait_seconds: float = 0.0  # waiting for the loader

    def add_output(self, out: Any) -> None:
        """A micro-batch that went through backward: its total loss, loss parts and weighted metrics."""
        self.micro_batches += 1
        for name, value in (("loss", out.loss), *out.losses.items()):
            self.losses[name] = self.losses.get(name, 0.0) + float(value.detach())
        for name, (mean, weight) in out.weighted_metrics().items():
            pair = self.weighted.setdefault(name, [0.0, 0.0])
            weight = float(weight)
            pair[0] += float(mean) * weight
            pair[1] += weight

    def count(self, name: str, value: float = 1.0) -> None:
        self.counts[name] = self.counts.get(name, 0.0) + float(value)

    def reduce(self, device: torch.device) -> StepTotals:
        """Sum over ranks (every rank calls it). Ranks may differ in keys (a skip reason seen on one rank
        only): a checksum of the key list is compared first (one tiny all-reduce) and only when they
        differ are the lists gathered and their union used."""
        import torch.distributed as tdist

        flat = {**{f"loss/{k}": v for k, v in self.losses.items()},
                **{f"weighted/{k}": v[0] for k, v in self.weighted.items()},
                **{f"weight/{k}": v[1] for k, v in self.weighted.items()},
                **{f"count/{k}": v for k, v in self.counts.items()}, "wait_seconds": self.wait_seconds}
        keys = sorted(flat)
        world = 1
        if tdist.is_initialized():
            world = tdist.get_world_size()
            checksum = torch.tensor([zlib.crc32("\n".join(keys).encode())] * 2, dtype=torch.float64, device=device)
            checksum[1] = -checksum[1]
            tdist.all_reduce(checksum, op=tdist.ReduceOp.MAX)
            if checksum[0] != -checksum[1]:
                every: list[list[str]] = [[] for _ in range(world)]
                tdist.all_gather_object(every, keys)
                keys = sorted(set().union(*every))
        values = torch.tensor([flat.get(k, 0.0) for k in keys], dtype=torch.float64, device=device)  # NCCL: GPU
        if tdist.is_initialized():
            tdist.all_reduce(values)
        total = dict(zip(keys, values.tolist(), strict=True))
        order = [*self.losses, *(k.split("/", 1)[1] for k in keys if k.startswith("loss/")
                                 and k.split("/", 1)[1] not in self.losses)]
        losses = {name: total[f"loss/{name}"] / (self.micro_batches * world) for name in order}
        weighted = {k.split("/", 1)[1]: total[k] / max(1.0, total["weight/" + k.split("/", 1)[1]])
                    for k in keys if k.startswith("weighted/")}
        counts = {k.split("/", 1)[1]: total[k] for k in keys if k.startswith("count/")}
        return StepTotals(losses, weighted, counts, total["wait_seconds"], world)


@dataclass
class StepTotals:
    """A step over all ranks: mean losses, weighted means, summed counts."""

    losses: dict[str, float]
    weighted: dict[str, float]
    counts: dict[str, float]
    wait_seconds: float
    world_size: int

    def metrics(self, seconds: float, throughput: dict[str, str]) -> dict[str, float]:
        """The logged dict: losses, weighted metrics, then counts; `throughput` maps a count (e.g.
        samples) to the rate logged for it (samples_per_s); those counts are not logged themselves."""
        out: dict[str, float] = {**self.losses, **self.weighted}
        out.update({k: v for k, v in self.counts.items() if k not in throughput})
        for count, rate in throughput.items():
            out[rate] = self.counts.get(count, 0.0) / seconds
        out["data_wait_fraction"] = self.wait_seconds / (seconds * self.world_size)
        return out


class MetricsLogger:
    """The four sinks of one run; only rank 0 writes (other ranks hold a disabled logger).

    `metrics.jsonl` is the durable record: a row is written when its step ends, before any checkpoint
    can cover it. MLflow gets a step's metrics when a checkpoint covering it is committed; a run killed
    between the commit and that send is made whole on resume, from the file (`Tracker.log_missing`).
    """

    def __init__(self, output_dir: str | Path, tracker, enabled: bool, total_steps: int, desc: str,
                 log_every: int, headline: tuple[str, ...] = ("loss",)) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tracker, self.enabled, self.log_every, self.headline = tracker, enabled, log_every, headline
        self.total_steps, self.desc = total_steps, desc
        self.progress = None
        self.skipped_total: dict[str, float] = {}  # over the whole run (this process's life)

    def start(self, step: int) -> None:
        """Open the progress bar at `step`; on resume, drop the rows of steps after the checkpoint."""
        if not self.enabled:
            return
        if self.path.exists():
            rows = [row for row in self.read_rows() if row["step"] <= step]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            self.tracker.log_missing([(row["step"], {k: v for k, v in row.items() if k != "step"}) for row in rows])
        from tqdm import tqdm

        self.progress = tqdm(total=self.total_steps, initial=step, desc=self.desc, unit="step", dynamic_ncols=True,
                             file=sys.stdout, disable=None)

    def read_rows(self) -> list[dict[str, Any]]:
        """The file's rows; a torn last line (a crash mid-write) is dropped with a warning, a damaged
        line before it is an error naming the line."""
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    raise ValueError("no integer step")
            except ValueError as err:
                if number == len(lines):
                    log.warning("%s: dropping a torn last line (%d characters): %s", self.path, len(line), err)
                    break
                raise ValueError(f"{self.path}: line {number} is not a metrics row ({err}); "
                                 "repair or remove the file") from None
            rows.append(row)
        return rows

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if key.startswith("skipped/"):
                self.skipped_total[key[len("skipped/"):]] = self.skipped_total.get(key[len("skipped/"):], 0) + value
        self.tracker.queue_metrics(step, metrics)
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix({k: f"{metrics[k]:.3g}" for k in self.headline if k in metrics})
            if self.log_every and step % self.log_every == 0 and self.progress.disable:
                print(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)

    def log_final(self, step: int, metrics: dict[str, float]) -> None:
        """End-of-run evaluations, to MLflow at the last step (the JSONL keeps per-step rows only)."""
        self.tracker.queue_metrics(step, metrics)

    def commit(self) -> None:
        """A checkpoint up to here is committed: the queued MLflow metrics may go out."""
        self.tracker.flush()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
