"""`vlbert-pretrain`: VL-BERT pretraining on a DeepSpeed ZeRO engine, top to bottom in one loop.

    vlbert-pretrain --config configs/default.yaml [section.key=value ...]

Every step: a batch that interleaves vision-language rows (MLM with visual clues + masked RoI
classification) and text-only rows (MLM) -> engine forward/backward/step -> metrics -> checkpoint.
Launch one process per device (launch/local.sh, launch/slurm/pretrain.sbatch, torchrun or the
deepspeed launcher); rank discovery is in `vlbert_ds.train.distributed`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlbert_ds.bundled import default_bert
from vlbert_ds.train.config import RunConfig, load_config, redact_urls
from vlbert_ds.train.distributed import DistEnv, discover, exit_fast_on_error, init_distributed, setup_process
from vlbert_ds.train.faults import Faults
from vlbert_ds.train.preemption import StopRequests, exit_code_after_stop

log = logging.getLogger("vlbert_ds.pretrain")

# A run that keeps producing non-finite losses has diverged: stop instead of skipping for ever.
MAX_CONSECUTIVE_NONFINITE = 20


@dataclass
class TrainState:
    """What a checkpoint carries besides weights and optimizer: enough to continue the same run."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0  # micro-batches of `epoch` already used by each rank
    samples: int = 0
    run_id: str | None = None
    history: list[list[float]] = field(default_factory=list)  # [step, loss] for the loss plot

    def to_client_state(self) -> dict[str, Any]:
        # `iteration` and `universal_checkpoint_info` let DeepSpeed's ds_to_universal convert the checkpoint.
        return {"iteration": self.step, "universal_checkpoint_info": {},
                "vlbert_ds": {"step": self.step, "epoch": self.epoch, "consumed": self.consumed,
                              "samples": self.samples, "run_id": self.run_id, "history": self.history}}

    @classmethod
    def from_client_state(cls, client_state: dict[str, Any]) -> TrainState:
        return cls(**client_state.get("vlbert_ds", {}))


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


# ----------------------------------------------------------------------------- set-up helpers
def build_model(config: RunConfig):
    from vlbert_ds.model import VLBertConfig, VLBertForPretraining

    overrides = dict(config.model.overrides, visual_front_end=config.model.visual_front_end,
                     num_region_classes=config.model.num_region_classes)
    if config.model.init_from:
        return VLBertForPretraining.from_pretrained(config.model.init_from, **overrides)
    if config.model.bert:
        bert = default_bert() if config.model.bert == "default" else config.model.bert
        model = VLBertForPretraining.from_bert(bert, **overrides)
        return model
    return VLBertForPretraining(VLBertConfig.preset(config.model.preset, **overrides))


def loader_config(config: RunConfig):
    from vlbert_ds.data import ExampleConfig, LoaderConfig, SourceSpec

    def sources(specs: list[str], weights: list[float]) -> list[SourceSpec]:
        return [SourceSpec(s, weights[i] if weights else 1.0) for i, s in enumerate(specs)]

    data = config.data
    return LoaderConfig(
        vl_sources=sources(data.vl_sources, data.vl_weights),
        text_sources=sources(data.text_sources, data.text_weights),
        tokenizer=default_bert() if data.tokenizer == "default" else data.tokenizer, mode=data.mode,
        vl_per_batch=data.vl_per_batch, text_per_batch=data.text_per_batch,
        samples_per_epoch=data.samples_per_epoch or None, num_workers=data.num_workers, seed=config.train.seed,
        shuffle_buffer=data.shuffle_buffer,
        example=ExampleConfig(max_elements=data.max_elements, text_segment_len=data.text_segment_len,
                              num_region_classes=config.model.num_region_classes,
                              visual_front_end=config.model.visual_front_end))


def prepare_default_data(config: RunConfig, dist: DistEnv) -> None:
    """Write the embedded default (rank 0) if `data.prepare_default` names a folder without it."""
    import torch.distributed as tdist

    folder = config.data.prepare_default
    if not folder:
        return
    if dist.is_main and not (Path(folder) / "text/train/sizes.json").is_file():
        from vlbert_ds.prep.default import prepare_default

        print(f"preparing the embedded default data in {folder} ...", flush=True)
        for summary in prepare_default(folder, default_bert(), processes=max(1, os.cpu_count() or 1)):
            print(summary.table(), flush=True)
    if tdist.is_initialized():
        tdist.barrier()
    if not config.data.vl_sources:
        config.data.vl_sources = [str(Path(folder) / "vl/train")]
    if not config.data.text_sources:
        config.data.text_sources = [str(Path(folder) / "text/train")]


def finite_everywhere(loss: torch.Tensor, device) -> bool:
    """Whether the loss is finite on every rank (one tiny all-reduce; all ranks must call it)."""
    import torch.distributed as tdist

    flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=device)
    if tdist.is_initialized():
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    return bool(flag.item() == 0)


def step_metrics(engine, sums: dict[str, float], micro_steps: int) -> dict[str, float]:
    """Average this step's per-micro-batch losses over micro-batches and ranks; accuracies by count."""
    import torch.distributed as tdist

    keys = sorted(sums)
    if tdist.is_initialized():
        # Ranks may differ in keys (a skip reason seen on one rank only). Compare a checksum of the key
        # list first (one tiny all-reduce); only when they differ gather the lists and use the union.
        checksum = torch.tensor([zlib.crc32("\n".join(keys).encode())] * 2, dtype=torch.float64,
                                device=engine.device)
        checksum[1] = -checksum[1]
        tdist.all_reduce(checksum, op=tdist.ReduceOp.MAX)
        if checksum[0] != -checksum[1]:
            every: list[list[str]] = [[] for _ in range(tdist.get_world_size())]
            tdist.all_gather_object(every, keys)
            keys = sorted(set().union(*every))
    values = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64, device=engine.device)  # NCCL: GPU
    if tdist.is_initialized():
        tdist.all_reduce(values)
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    total = dict(zip(keys, values.tolist(), strict=True))
    out = {}
    for name in ("loss", "mlm_vl", "mlm_text", "mrc"):
        if name in total:
            out[name] = total[name] / (micro_steps * world)
    for name in ("mlm_vl", "mlm_text", "mrc"):
        if f"{name}_correct" in total:
            out[f"{name}_acc"] = total[f"{name}_correct"] / max(1.0, total[f"{name}_count"])
    for key in keys:
        if key.startswith(("skipped", "padding_batches", "rows", "elements", "wait")):
            out[key] = total[key]
    return out


def save_loss_plot(history: list[list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    steps = [h[0] for h in history]
    ax.plot(steps, [h[1] for h in history], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("total loss (mlm_vl + mlm_text + mrc)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- the run
def run(config: RunConfig, dist: DistEnv, batches=None) -> RunResult:
    """Train. `batches`, if given, replaces the shard loader: an iterator of VLBatch for this rank."""
    from vlbert_ds.train.tracking import Tracker

    stop = StopRequests()  # before any DataLoader worker is forked, so workers inherit the handlers too
    tracker = Tracker(enabled=config.tracking.enabled and dist.is_main)
    try:
        return _run(config, dist, batches, stop, tracker)
    except BaseException as err:
        tracker.fail(err)  # an MLflow run never stays RUNNING after a crash
        raise
    finally:
        stop.close()


def _run(config: RunConfig, dist: DistEnv, batches, stop: StopRequests, tracker) -> RunResult:
    import deepspeed  # noqa: F401 (initialised by main)
    import torch.distributed as tdist

    from vlbert_ds.data import build_loader
    from vlbert_ds.train.checkpoint import CheckpointManager, check_same_model, export_pretrained
    from vlbert_ds.train.engine import grad_norm, make_engine
    from vlbert_ds.train.grounding import build_grounding_set, evaluate_grounding
    from vlbert_ds.train.tracking import resolve_uri

    torch.manual_seed(config.train.seed + dist.rank)
    output = Path(config.train.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if batches is None:
        prepare_default_data(config, dist)
    if dist.is_main:
        print("resolved config:\n" + config.to_yaml(), flush=True)
        (output / "resolved_config.yaml").write_text(config.to_yaml())

    if batches is None:  # sources exist and their first samples are usable, before the model is built
        from vlbert_ds.data import PretrainStream

        PretrainStream(loader_config(config), dist.rank, dist.world_size)

    # Model, engine, and (when there is one) the checkpoint to continue from.
    model = build_model(config)
    if dist.is_main and model.load_report is not None:
        print(model.load_report.summary(), flush=True)
    model_config = model.config.to_dict()
    engine, ds_config = make_engine(model, config, dist.world_size)
    faults = Faults.from_env()
    checkpoints = CheckpointManager(config.checkpoint_dir, config.checkpoint.keep, dist.rank,
                                    before_commit=lambda step: faults.maybe_crash_in_checkpoint(step, dist.rank))
    state = TrainState()
    tag = checkpoints.latest_tag() if config.checkpoint.resume else None
    if tag is not None:
        check_same_model(checkpoints.model_config(tag), model_config, str(Path(config.checkpoint_dir) / tag))
        if config.checkpoint.load_universal:
            tag = checkpoints.universal_tag(tag)
        state = TrainState.from_client_state(checkpoints.load(engine, tag, config.checkpoint.load_universal))
        if config.checkpoint.load_universal:  # another world size: the exact data position does not carry over
            state.epoch, state.consumed = state.epoch + 1, 0
        if dist.is_main:
            print(f"resumed from {tag}: step {state.step}, epoch {state.epoch}, batch {state.consumed}", flush=True)

    # Tracking (rank 0), re-attached to the checkpoint's run.
    tracking_uri = resolve_uri(config.tracking.uri, str(output)) if tracker.enabled else None
    if tracker.enabled:
        tracker.start(tracking_uri, config.tracking.experiment, config.tracking.run_name, state.run_id, str(output))
        state.run_id = tracker.run_id
        tracker.log_params({**config.flat(), "world_size": dist.world_size})
        tracker.log_text(config.to_yaml(), "config/resolved_config.yaml")
        tracker.log_text(json.dumps(ds_config, indent=2), "config/ds_config.json")
        print(f"MLflow run {tracker.run_id} at {redact_urls(tracking_uri)}", flush=True)

    # Data: continue the same stream from the checkpoint's position.
    def open_epoch(epoch: int, consumed: int):
        if batches is not None:
            return None, batches
        stream, loader = build_loader(loader_config(config), dist.rank, dist.world_size, epoch, consumed,
                                      check_sources=False)  # checked once, before the model was built
        # Starting DataLoader workers draws a seed from torch's global generator; keep that draw out of
        # the training RNG stream (dropout), or a resumed run would diverge from an uninterrupted one.
        rng = torch.get_rng_state()
        iterator = iter(loader)
        torch.set_rng_state(rng)
        return stream, iterator

    _, data = open_epoch(state.epoch, state.consumed)
    grounding = None
    val_spec = config.train.grounding_data or (
        str(Path(config.data.prepare_default) / "vl/val") if config.data.prepare_default else "")
    if batches is None and val_spec and dist.is_main:
        grounding = build_grounding_set(val_spec, loader_config(config).tokenizer, config.model.visual_front_end,
                                        config.model.num_region_classes, config.train.eval_samples)

    # A local copy of every step's metrics; on resume, steps after the checkpoint are dropped from it.
    metrics_log = output / "metrics.jsonl"
    if dist.is_main and metrics_log.exists():
        kept = [line for line in metrics_log.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= state.step]
        metrics_log.write_text("".join(line + "\n" for line in kept))
    nonfinite_in_a_row = 0
    progress = None
    if dist.is_main:
        from tqdm import tqdm

        progress = tqdm(total=config.train.steps, initial=state.step, desc="pretrain", unit="step",
                        dynamic_ncols=True, file=sys.stdout, disable=None)
    step_losses: dict[int, float] = {}
    engine.train()
    last_metrics: dict[str, float] = {}
    while state.step < config.train.steps:
        step_start = time.perf_counter()
        sums: dict[str, float] = {}
        good = 0
        while good < config.train.grad_accum:
            wait_start = time.perf_counter()
            try:
                item = next(data)
            except StopIteration:  # end of the (virtual) epoch: every rank ends it at the same batch
                state.epoch, state.consumed = state.epoch + 1, 0
                _, data = open_epoch(state.epoch, 0)
                item = next(data)
            wait = time.perf_counter() - wait_start
            batch = getattr(item, "batch", item).to(engine.device)
            out = engine(batch)
            loss = out.loss * float("nan") if faults.poison_loss(state.step + 1, dist.rank) else out.loss
            state.consumed += 1
            if not finite_everywhere(loss, engine.device):
                # Every rank drops this micro-batch before backward, so no non-finite gradient is
                # reduced and DeepSpeed only ever sees finite micro-batches; the step goes on with
                # the next one. (A non-finite gradient from a finite loss is DeepSpeed's to catch:
                # bf16.check_grad_overflow / fp16 loss scaling skip that optimizer step.)
                nonfinite_in_a_row += 1
                if dist.is_main:  # every rank dropped it; count it once
                    sums["skipped/nonfinite_loss"] = sums.get("skipped/nonfinite_loss", 0.0) + 1
                log.warning("step %d: non-finite loss %s on some rank (mlm_vl %s, mlm_text %s, mrc %s); "
                            "micro-batch dropped", state.step + 1, float(loss.detach()),
                            *(float(out.losses[k].detach()) if k in out.losses else None
                              for k in ("mlm_vl", "mlm_text", "mrc")))
                if nonfinite_in_a_row >= MAX_CONSECUTIVE_NONFINITE:
                    raise FloatingPointError(f"{nonfinite_in_a_row} non-finite losses in a row at step "
                                             f"{state.step + 1}: the run has diverged; resume from an earlier "
                                             "checkpoint with a lower learning rate")
                continue
            nonfinite_in_a_row, good = 0, good + 1
            engine.backward(loss)
            engine.step()
            for name, value in (("loss", out.loss), *out.losses.items()):
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            for name in ("mlm_vl", "mlm_text", "mrc"):
                if f"{name}_acc" in out.metrics:
                    count = float(out.metrics[f"{name}_count"])
                    correct = float(out.metrics[f"{name}_acc"]) * count
                    sums[f"{name}_correct"] = sums.get(f"{name}_correct", 0.0) + correct
                    sums[f"{name}_count"] = sums.get(f"{name}_count", 0.0) + count
            rows = batch.batch_size
            sums["rows"] = sums.get("rows", 0.0) + rows
            sums["elements"] = sums.get("elements", 0.0) + float(batch.text_mask.sum() + batch.region_mask.sum()
                                                                 + rows)
            sums["wait_seconds"] = sums.get("wait_seconds", 0.0) + wait
            for reason, count in getattr(item, "skipped", {}).items():
                sums[f"skipped/{reason}"] = sums.get(f"skipped/{reason}", 0.0) + count
            if getattr(item, "padding", False):
                sums["padding_batches"] = sums.get("padding_batches", 0.0) + 1
        state.step += 1
        seconds = time.perf_counter() - step_start
        metrics = step_metrics(engine, sums, config.train.grad_accum)
        rows = metrics.pop("rows")  # summed over ranks
        metrics.update({"lr": engine.get_lr()[0], "grad_norm": grad_norm(engine), "samples_per_s": rows / seconds,
                        "tokens_per_s": metrics.pop("elements") / seconds,
                        "data_wait_fraction": metrics.pop("wait_seconds") / (seconds * dist.world_size)})
        state.samples += int(rows)
        state.history.append([state.step, metrics["loss"]])
        step_losses[state.step] = metrics["loss"]
        if not math.isfinite(metrics["loss"]):
            log.warning("step %d: non-finite loss %s (mlm_vl %s, mlm_text %s, mrc %s)", state.step, metrics["loss"],
                        metrics.get("mlm_vl"), metrics.get("mlm_text"), metrics.get("mrc"))
        if grounding is not None and config.train.eval_every and state.step % config.train.eval_every == 0:
            metrics.update(evaluate_grounding(engine.module, grounding, engine.device))
        tracker.queue_metrics(state.step, metrics)
        if dist.is_main:
            with open(metrics_log, "a") as handle:
                handle.write(json.dumps({"step": state.step, **metrics}) + "\n")
        last_metrics = metrics
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", mlm_vl_acc=f"{metrics.get('mlm_vl_acc', 0):.2f}",
                                 lr=f"{metrics['lr']:.2e}")
            if config.train.log_every and state.step % config.train.log_every == 0 and progress.disable:
                print(f"step {state.step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
        if state.step % config.checkpoint.every == 0 or state.step == config.train.steps:
            checkpoints.save(engine, state.step, state.to_client_state(), model_config)
            tracker.flush()  # metrics up to a committed checkpoint are never logged twice
        faults.maybe_exit_after(state.step, dist.rank)
        faults.maybe_raise(state.step, dist.rank)
        if stop.should_stop(engine.device) and state.step < config.train.steps:
            if state.step % config.checkpoint.every != 0:
                checkpoints.save(engine, state.step, state.to_client_state(), model_config)
            tracker.flush()
            waited = stop.seconds_since_signal()
            print(f"rank {dist.rank}: stopping at step {state.step} on a scheduler signal; checkpoint "
                  f"{checkpoints.latest_tag()} saved" + (f" {waited:.1f}s after the signal" if waited else ""),
                  flush=True)
            if progress is not None:
                progress.close()
            tracker.set_tags({"vlbert_ds.stopped_at_step": str(state.step)})
            tracker.finish(status="KILLED")  # a requeued job re-attaches and sets it RUNNING again
            return RunResult(state, dict(last_metrics), step_losses, str(output), config.checkpoint_dir, None,
                             tracking_uri, state.run_id, engine, preempted=True, stop_signal=stop.received)
    if progress is not None:
        progress.close()

    # The end: grounding evaluation, consolidated weights, plots, summary.
    final = dict(last_metrics)
    export_dir = None
    if tdist.is_initialized():
        tdist.barrier()
    if dist.is_main:
        if grounding is not None:
            final.update(evaluate_grounding(engine.module, grounding, engine.device))
        if config.checkpoint.export:
            export_dir = str(output / "pretrained")
            export_pretrained(config.checkpoint_dir, checkpoints.latest_tag(), type(engine.module),
                              engine.module.config, export_dir)
        save_loss_plot(state.history, output / "loss_curve.png")
        tracker.queue_metrics(state.step, {k: v for k, v in final.items() if k.startswith("grounded")})
        tracker.log_artifact(output / "loss_curve.png", "plots")
        tracker.finish()
    if tdist.is_initialized():
        tdist.barrier()
    return RunResult(state, final, step_losses, str(output), config.checkpoint_dir, export_dir, tracking_uri,
                     state.run_id, engine)


def print_summary(result: RunResult) -> None:
    m = result.final_metrics
    lines = ["", "=" * 72, f"finished at step {result.state.step} (epoch {result.state.epoch})"]
    for key in ("loss", "mlm_vl", "mlm_text", "mrc", "mlm_vl_acc", "mlm_text_acc", "mrc_acc", "samples_per_s"):
        if key in m:
            lines.append(f"  {key:<34} {m[key]:.4f}")
    if "grounded_mlm_acc_with_image" in m:
        lines += ["visual grounding on held-out scenes (masked colour/shape/relation words, "
                  f"{int(m['grounded_targets'])} targets):",
                  f"  MLM accuracy with the image          {m['grounded_mlm_acc_with_image']:.3f}",
                  f"  MLM accuracy with the image withheld {m['grounded_mlm_acc_image_withheld']:.3f}"]
    lines += [f"checkpoints: {result.checkpoint_dir}",
              f"exported weights (save_pretrained): {result.export_dir}",
              f"MLflow: run {result.run_id} at {redact_urls(result.tracking_uri or '')}",
              f"loss curve: {Path(result.output_dir) / 'loss_curve.png'}", "=" * 72]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlbert-pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML or TOML run config")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides, validated) and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"vlbert-pretrain: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    dist = discover()
    setup_process(dist)
    init_distributed(dist, timeout_s=config.train.dist_timeout_s)
    print(dist.describe(), flush=True)
    try:
        with exit_fast_on_error(dist):
            result = run(config, dist)
    except (ValueError, FileNotFoundError) as err:
        print(f"vlbert-pretrain: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # diverged: stopped without writing a non-finite checkpoint
        print(f"vlbert-pretrain: {err}", file=sys.stderr)
        return 3
    if result.preempted:
        return exit_code_after_stop(dist.is_main, result.stop_signal)
    if dist.is_main:
        print_summary(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
