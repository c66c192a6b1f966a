"""The one training loop, for pretraining and fine-tuning alike.

A `Recipe` says what is trained (the model, its batches, its evaluation); the `Trainer` owns
everything else: the DeepSpeed engine, checkpoints and the data position in them, MLflow, the
metrics sinks, stop signals and fault hooks. Read `Trainer.train` top to bottom:

    set_up()                      model, engine, resume, tracking, data at its saved position
    while step < steps:
        train_step()              micro-batches: forward, finite-loss agreement, backward, step
        log metrics               every loss and metric the model returned (metrics.py)
        maybe_checkpoint()        every `checkpoint.every` steps and at the end
        maybe_stop()              a scheduler signal: checkpoint now, return preempted
    finish()                      final evaluation, exported weights, the recipe's outputs
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from vlbert_ds.data.elastic import Layout
from vlbert_ds.train.checkpoint import CheckpointManager, export_pretrained
from vlbert_ds.train.config import RunConfig, read_ds_config, redact_urls, resume_changes
from vlbert_ds.train.distributed import DistEnv
from vlbert_ds.train.engine import apply_optimizer_config, build_ds_config, grad_norm, make_engine
from vlbert_ds.train.faults import Faults
from vlbert_ds.train.metrics import MetricsLogger, StepAccumulator
from vlbert_ds.train.precision import slow_bf16_warning, training_device_type
from vlbert_ds.train.preemption import StopRequests
from vlbert_ds.train.run_lock import RunFolderBusy, RunLock
from vlbert_ds.train.tracking import Tracker, resolve_uri
from vlbert_ds.train.watchdog import Watchdog

log = logging.getLogger("vlbert_ds.trainer")

# A run that keeps producing non-finite losses has diverged: stop instead of skipping for ever.
MAX_CONSECUTIVE_NONFINITE = 20


@dataclass
class TrainState:
    """What a checkpoint carries besides weights and optimizer: enough to continue the same run."""

    step: int = 0
    samples: int = 0
    run_id: str | None = None
    history: list[list[float]] = field(default_factory=list)  # [step, loss] for the loss plot
    data: dict[str, Any] = field(default_factory=dict)  # the data stream's state_dict()

    def to_client_state(self) -> dict[str, Any]:
        # `iteration` and `universal_checkpoint_info` let DeepSpeed's ds_to_universal convert the checkpoint.
        return {"iteration": self.step, "universal_checkpoint_info": {},
                "vlbert_ds": {"step": self.step, "samples": self.samples, "run_id": self.run_id,
                              "history": self.history, "data": self.data}}

    @classmethod
    def from_client_state(cls, client_state: dict[str, Any]) -> TrainState:
        saved = dict(client_state.get("vlbert_ds", {}))
        if "data" not in saved and "epoch" in saved:  # written before the stream owned its position
            saved["data"] = {"epoch": saved["epoch"], "consumed": saved.get("consumed", 0)}
        return cls(**{k: v for k, v in saved.items() if k in ("step", "samples", "run_id", "history", "data")})


@dataclass
class RunResult:
    state: TrainState
    final_metrics: dict[str, float]
    step_losses: dict[int, float]
    output_dir: str
    checkpoint_dir: str
    export_dir: str | None
    tracking_uri: str | None
    run_id: str | None
    engine: Any = None
    preempted: bool = False  # stopped on a scheduler signal after saving a checkpoint
    stop_signal: Any = None  # which signal (a signal.Signals), when preempted
    predictions: dict[str, bool] = field(default_factory=dict)  # fine-tuning: item id -> correct


class Batches(Protocol):
    """What a recipe's data is: an endless iterator with a resumable position (data.ResumableLoader)."""

    def __next__(self) -> Any:
        """The next micro-batch's loader item."""

    def state_dict(self) -> dict[str, Any]:
        """The position after the last item returned (saved in checkpoints)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position."""

    def close(self) -> None:
        """Stop loader workers now."""


class Recipe(Protocol):
    """What is trained. Pretraining and fine-tuning are the two (pretrain.py, finetune.py)."""

    config: RunConfig
    desc: str  # the progress bar's label
    export_name: str  # <output_dir>/<export_name>: the consolidated save_pretrained weights
    headline: tuple[str, ...]  # metrics shown on the progress bar
    throughput: dict[str, str]  # counts logged as rates, e.g. {"samples": "samples_per_s"}

    def prepare(self, dist: DistEnv) -> None:
        """Check the inputs (sources, vocabularies) before the model is built."""

    def build_model(self) -> nn.Module:
        """The model to train (from BERT, a pretraining folder or a preset)."""

    def micro_batch_size(self) -> int:
        """Rows per rank per micro-batch (DeepSpeed's micro batch)."""

    def open_data(self, dist: DistEnv, layout: Layout | None, grad_accum: int) -> Batches:
        """This rank's endless, resumable batches in the run's global order (`layout`: the checkpoint's, or
        None for a fresh run: world size x `grad_accum` micro-batches per step)."""

    def model_input(self, item: Any) -> Any:
        """The loader's item -> what the model takes."""

    def count(self, item: Any, model_input: Any, step: StepAccumulator) -> None:
        """Add the item's counts (rows, tokens, skipped samples) to the step."""

    def evaluate(self, model: nn.Module, device: torch.device, step: int, final: bool) -> dict[str, float]:
        """Evaluation metrics (rank 0), during the run and at its end."""

    def write_outputs(self, trainer: Trainer, final: dict[str, float]) -> None:
        """The recipe's own outputs at the end (rank 0): plots, validation files."""


class Trainer:
    def __init__(self, recipe: Recipe, dist: DistEnv) -> None:
        self.recipe, self.config, self.dist = recipe, recipe.config, dist
        self.output = Path(self.config.train.output_dir)
        self.stop = StopRequests()  # before any DataLoader worker is forked, so workers inherit the handlers
        self.tracker = Tracker(enabled=self.config.tracking.enabled and dist.is_main)
        self.faults = Faults.from_env()
        self.state = TrainState()
        self.step_losses: dict[int, float] = {}
        self.last_metrics: dict[str, float] = {}
        self.nonfinite_in_a_row = 0
        self.tracking_uri: str | None = None
        self.lock: RunLock | None = None
        self.changes: list[tuple[str, Any, Any]] = []
        self.watchdog: Watchdog | None = None

    # ------------------------------------------------------------------------- the loop
    def train(self) -> RunResult:
        try:
            self.set_up()
            self.start_watchdog()
            while self.state.step < self.config.train.steps:
                metrics = self.train_step()
                self.metrics.log(self.state.step, metrics)
                self.last_metrics = metrics
                self.maybe_checkpoint()
                self.faults.maybe_exit_after(self.state.step, self.dist.rank)
                self.faults.maybe_raise(self.state.step, self.dist.rank)
                self.faults.pause_after_step()
                if self.maybe_stop():
                    return self.result(preempted=True)
                self.beat()
            self.stop_watchdog()
            return self.finish()
        except BaseException as err:
            self.tracker.fail(err)  # an MLflow run never stays RUNNING after a crash
            raise
        finally:
            self.stop_watchdog()
            self.stop.close()
            if self.lock is not None:
                self.lock.release()
            if hasattr(self, "data"):
                self.data.close()
            if hasattr(self, "metrics"):
                self.metrics.close()

    def train_step(self) -> dict[str, float]:
        """One optimizer step of `grad_accum` good micro-batches; returns the step's metrics."""
        start = time.perf_counter()
        step = StepAccumulator()
        while step.micro_batches < self.grad_accum:
            wait_start = time.perf_counter()
            item = next(self.data)
            step.wait_seconds += time.perf_counter() - wait_start
            model_input = self.recipe.model_input(item).to(self.engine.device)
            out = self.engine(model_input)
            poisoned = self.faults.poison_loss(self.state.step + 1, self.dist.rank)
            loss = out.loss * float("nan") if poisoned else out.loss
            if not self.finite_everywhere(loss):
                self.drop_nonfinite(loss, out, step)
                continue
            self.nonfinite_in_a_row = 0
            self.engine.backward(loss)
            self.engine.step()
            step.add_output(out)
            self.recipe.count(item, model_input, step)
        self.state.step += 1
        totals = step.reduce(self.engine.device)
        metrics = totals.metrics(time.perf_counter() - start, self.recipe.throughput)
        metrics.update({"lr": self.engine.get_lr()[0], "grad_norm": grad_norm(self.engine)})
        self.state.samples += int(next((totals.counts.get(c, 0) for c in self.recipe.throughput), 0))
        self.state.history.append([self.state.step, metrics["loss"]])
        self.step_losses[self.state.step] = metrics["loss"]
        if not math.isfinite(metrics["loss"]):
            log.warning("step %d: non-finite loss %s (%s)", self.state.step, metrics["loss"],
                        ", ".join(f"{k} {v}" for k, v in totals.losses.items()))
        every = getattr(self.recipe, "eval_every", 0)
        if self.dist.is_main and every and self.state.step % every == 0:
            self.beat("evaluate")
            metrics.update(self.recipe.evaluate(self.engine.module, self.engine.device, self.state.step, final=False))
        return metrics

    def finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (one tiny all-reduce; all ranks must call it)."""
        import torch.distributed as tdist

        flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=self.engine.device)
        if tdist.is_initialized():
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item() == 0)

    def drop_nonfinite(self, loss: torch.Tensor, out: Any, step: StepAccumulator) -> None:
        """Every rank drops this micro-batch before backward, so no non-finite gradient is reduced and
        DeepSpeed only ever sees finite micro-batches; the step goes on with the next one. (A non-finite
        gradient from a finite loss is DeepSpeed's to catch: bf16/fp16 overflow checks skip that step.)"""
        self.nonfinite_in_a_row += 1
        if self.dist.is_main:  # every rank dropped it; count it once
            step.count("skipped/nonfinite_loss")
        log.warning("step %d: non-finite loss %s on some rank (%s); micro-batch dropped", self.state.step + 1,
                    float(loss.detach()), ", ".join(f"{k} {float(v.detach())}" for k, v in out.losses.items()))
        if self.nonfinite_in_a_row >= MAX_CONSECUTIVE_NONFINITE:
            raise FloatingPointError(f"{self.nonfinite_in_a_row} non-finite losses in a row at step "
                                     f"{self.state.step + 1}: the run has diverged; resume from an earlier "
                                     "checkpoint with a lower learning rate")

    def start_watchdog(self) -> None:
        train = self.config.train
        if train.watchdog == "on" or (train.watchdog == "auto" and self.dist.world_size > 1):
            self.watchdog = Watchdog(train.watchdog_factor, train.watchdog_min_s, train.watchdog_startup_s,
                                     self.dist.rank)
            self.beat()

    def beat(self, phase: str = "train") -> None:
        if self.watchdog is not None:
            self.watchdog.beat(self.state.step, phase, self.tracking_uri, self.state.run_id)

    def stop_watchdog(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None

    def save_checkpoint(self) -> None:
        self.beat("checkpoint")
        self.state.data = self.data.state_dict()  # global: every rank's part (one all-gather)
        self.checkpoints.save(self.engine, self.state.step, self.state.to_client_state(), self.model_config,
                              redact_urls(self.config.to_dict()), self.state.data)
        self.faults.maybe_crash_after_commit(self.state.step, self.dist.rank)
        # Metrics up to a committed checkpoint go to MLflow now; if the process dies before this, the
        # resumed run sends them from metrics.jsonl (MetricsLogger.start), so none is lost or doubled.
        self.metrics.commit()

    def maybe_checkpoint(self) -> None:
        if self.state.step % self.config.checkpoint.every == 0 or self.state.step == self.config.train.steps:
            self.save_checkpoint()

    def maybe_stop(self) -> bool:
        """On a scheduler signal (agreed by every rank): make sure a checkpoint of this step exists."""
        if not self.stop.should_stop(self.engine.device) or self.state.step >= self.config.train.steps:
            return False
        if self.state.step % self.config.checkpoint.every != 0:
            self.save_checkpoint()
        self.metrics.commit()
        waited = self.stop.seconds_since_signal()
        print(f"rank {self.dist.rank}: stopping at step {self.state.step} on a scheduler signal; checkpoint "
              f"{self.checkpoints.latest_tag()} saved" + (f" {waited:.1f}s after the signal" if waited else ""),
              flush=True)
        self.metrics.close()
        self.tracker.set_tags({"vlbert_ds.stopped_at_step": str(self.state.step)})
        self.tracker.finish(status="KILLED")  # a requeued job re-attaches and sets it RUNNING again
        return True

    # ------------------------------------------------------------------------- set-up and the end
    def set_up(self) -> None:
        config, dist, recipe = self.config, self.dist, self.recipe
        torch.manual_seed(config.train.seed + dist.rank)
        self.output.mkdir(parents=True, exist_ok=True)
        self.take_run_folder()
        if dist.is_main:
            print("resolved config:\n" + config.to_yaml(), flush=True)
            (self.output / "resolved_config.yaml").write_text(config.to_yaml())
            self.announce_precision()
        self.checkpoints = CheckpointManager(
            config.checkpoint_dir, config.checkpoint.keep, dist.rank,
            before_commit=lambda step: self.faults.maybe_crash_in_checkpoint(step, dist.rank),
            prune_before_save=config.checkpoint.prune_before_save)
        self.changes = self.check_resume_config()  # before anything is built
        self.layout, self.grad_accum, self.load_universal = self.plan_layout()
        # The DeepSpeed JSON: a contradiction with the run config is an error before any model is built.
        ds_config = build_ds_config(config.train, config.optimizer, recipe.micro_batch_size(), dist.world_size,
                                    read_ds_config(config.train.ds_config), self.load_universal, self.grad_accum)
        recipe.prepare(dist)
        model = recipe.build_model()
        if dist.is_main and getattr(model, "load_report", None) is not None:
            print(model.load_report.summary(), flush=True)
        self.model_config = model.config.to_dict()
        self.engine = make_engine(model, ds_config, config.optimizer, config.train.steps)
        self.resume()
        self.start_tracking(ds_config)
        self.data = recipe.open_data(dist, self.layout, self.grad_accum)
        if self.state.data:
            self.data.load_state_dict(self.state.data)
        self.metrics = MetricsLogger(self.output, self.tracker, dist.is_main, config.train.steps, recipe.desc,
                                     config.train.log_every, recipe.headline)
        self.metrics.start(self.state.step)
        self.engine.train()

    def announce_precision(self) -> None:
        """Say which precision runs and why; warn, with the measured slowdown, when bf16 is emulated."""
        train = self.config.train
        print(f"precision {train.precision}: {train.precision_reason}", flush=True)
        warning = slow_bf16_warning(train.precision, training_device_type())
        if warning:
            log.warning(warning)

    def take_run_folder(self) -> None:
        """Rank 0 locks the output folder (one run per folder); every rank learns whether it did."""
        import torch.distributed as tdist

        refused = None
        if self.dist.is_main:
            self.lock = RunLock(self.output)
            try:
                self.lock.acquire()
            except RunFolderBusy as err:
                refused = err
        flag = torch.tensor([0.0 if refused else 1.0], device="cuda" if torch.cuda.is_available() else "cpu")
        if tdist.is_initialized():
            tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
        if refused is not None:
            raise refused
        if flag.item() == 0:
            raise RunFolderBusy(f"rank 0 found {self.output} in use by another run")

    def check_resume_config(self) -> list[tuple[str, Any, Any]]:
        """The keys changed since the checkpoint this run resumes from (fixed ones are refused)."""
        config = self.config
        tag = self.checkpoints.latest_tag() if config.checkpoint.resume else None
        saved = self.checkpoints.run_config(tag) if tag else None
        return resume_changes(saved, config, str(Path(config.checkpoint_dir) / str(tag)))

    def plan_layout(self) -> tuple[Layout | None, int, bool]:
        """The run's global batch and logical readers, the accumulation that keeps them on this world size,
        and whether the checkpoint must be converted (DeepSpeed universal) because the world size changed.

        A resumed run keeps its checkpoint's layout: a requeued job on fewer or more ranks re-derives
        `grad_accum`; a world size that cannot keep the global batch is refused, naming the valid ones.
        """
        config, world = self.config, self.dist.world_size
        tag = self.checkpoints.latest_tag() if config.checkpoint.resume else None
        saved = self.checkpoints.data_position(tag) if tag else None
        if not saved or saved.get("format") != 2:  # a fresh run: the stream lays out world x grad_accum
            return None, config.train.grad_accum, config.checkpoint.load_universal
        layout = Layout(**saved["layout"])
        universal = config.checkpoint.load_universal or saved["world_size"] != world
        if config.data.reset_position and (layout.slots != world * config.train.grad_accum
                                           or config.data.readers not in (0, layout.readers)):
            return None, config.train.grad_accum, universal  # the data restarts with the new layout
        run = self.checkpoints.run_config(tag) or {}
        saved_accum = run.get("train", {}).get("grad_accum", config.train.grad_accum)
        if config.train.grad_accum != saved_accum and config.train.grad_accum * world != layout.slots:
            raise ValueError(f"train.grad_accum {saved_accum} -> {config.train.grad_accum} on {world} rank(s) changes "
                             f"the global batch ({layout.slots} micro-batches per step -> "
                             f"{config.train.grad_accum * world}); the data position depends on it. Keep it, or set "
                             "data.reset_position=true to start the data at the next epoch with the new batch")
        if config.data.readers not in (0, layout.readers):
            raise ValueError(f"data.readers {layout.readers} -> {config.data.readers}: the data position depends on "
                             "it; keep it (0 = the checkpoint's), or set data.reset_position=true")
        accum = layout.grad_accum(world)  # LayoutError naming the valid world sizes
        if self.dist.is_main and (accum != config.train.grad_accum or universal):
            print(f"resuming on {world} rank(s) (checkpoint written on {saved['world_size']}): gradient accumulation "
                  f"{accum} keeps the global batch of {layout.slots} micro-batches per step"
                  + ("; DeepSpeed state converted to a universal checkpoint" if universal else ""), flush=True)
        return layout, accum, universal

    def resume(self) -> None:
        """The newest usable checkpoint into the engine (`latest`, else the newest older one that verifies)."""
        config = self.config
        if not config.checkpoint.resume or self.checkpoints.latest_tag() is None:
            return
        tag, client_state = self.checkpoints.load_newest_usable(self.engine, self.model_config, self.load_universal)
        self.state = TrainState.from_client_state(client_state)
        if any(key.startswith("optimizer.") or key == "train.steps" for key, _, _ in self.changes):
            apply_optimizer_config(self.engine, config.optimizer, config.train.steps)
        if self.dist.is_main:
            print(f"resumed from {tag}: step {self.state.step}, data position {self.state.data}", flush=True)
            for key, old, new in self.changes:
                print(f"  changed since that checkpoint: {key} {old!r} -> {new!r} (from step {self.state.step + 1})",
                      flush=True)

    def start_tracking(self, ds_config: dict[str, Any]) -> None:
        """MLflow on rank 0, re-attached to the checkpoint's run."""
        if not self.tracker.enabled:
            return
        config = self.config
        self.tracking_uri = resolve_uri(config.tracking.uri, str(self.output))
        self.tracker.start(self.tracking_uri, config.tracking.experiment, config.tracking.run_name, self.state.run_id,
                           str(self.output))
        self.state.run_id = self.tracker.run_id
        self.tracker.log_params({**config.flat(), "world_size": self.dist.world_size})
        self.tracker.log_text(config.to_yaml(), "config/resolved_config.yaml")
        self.tracker.log_text(json.dumps(ds_config, indent=2), "config/ds_config.json")
        if self.changes:  # MLflow params keep the first value: the changes are tags with the step they took effect
            step = self.state.step + 1
            self.tracker.set_tags({f"vlbert_ds.changed_at_step_{step}.{key}": f"{old!r} -> {new!r}"[:5000]
                                   for key, old, new in self.changes})
            self.tracker.log_text(config.to_yaml(), f"config/resolved_config_from_step_{step}.yaml")
        print(f"MLflow run {self.tracker.run_id} at {redact_urls(self.tracking_uri)}", flush=True)

    def finish(self) -> RunResult:
        import torch.distributed as tdist

        self.metrics.close()
        final = dict(self.last_metrics)
        self.export_dir = None
        if tdist.is_initialized():
            tdist.barrier()
        if self.dist.is_main:
            evaluated = self.recipe.evaluate(self.engine.module, self.engine.device, self.state.step, final=True)
            final.update(evaluated)
            if self.config.checkpoint.export:
                self.export_dir = str(self.output / self.recipe.export_name)
                export_pretrained(self.config.checkpoint_dir, self.checkpoints.latest_tag(), type(self.engine.module),
                                  self.engine.module.config, self.export_dir)
            self.metrics.log_final(self.state.step, evaluated)
            self.recipe.write_outputs(self, final)
            self.tracker.finish()
        if tdist.is_initialized():
            tdist.barrier()
        return self.result(final=final)

    def result(self, preempted: bool = False, final: dict[str, float] | None = None) -> RunResult:
        return RunResult(self.state, dict(self.last_metrics if final is None else final), self.step_losses,
                         str(self.output), self.config.checkpoint_dir, getattr(self, "export_dir", None),
                         self.tracking_uri, self.state.run_id, self.engine, preempted=preempted,
                         stop_signal=self.stop.received if preempted else None,
                         predictions=dict(getattr(self.recipe, "predictions", {})))
