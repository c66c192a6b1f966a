"""`vlbert-finetune`: VQA, VCR or RefCOCO+ on the same DeepSpeed engine, checkpoints and MLflow as pretraining.

    vlbert-finetune --task vqa --config FILE --init PRETRAINED [section.key=value ...]
    vlbert-finetune --task all --quick [--init PRETRAINED]     # synthetic tasks, pretrained vs BERT-only

`--init` is a pretraining `save_pretrained` folder (`<output_dir>/pretrained` of vlbert-pretrain);
without it the model starts from `model.bert` alone (the "no pretraining" baseline). Heads, losses
and metrics are in `vlbert_ds.model.tasks`, sequences in `vlbert_ds.data.tasks`. `--task all --quick`
is `vlbert_ds.train.ablation`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlbert_ds.bundled import default_bert
from vlbert_ds.train.config import RunConfig, load_config
from vlbert_ds.train.distributed import DistEnv, discover, exit_fast_on_error, init_distributed, setup_process
from vlbert_ds.train.preemption import StopRequests, exit_code_after_stop
from vlbert_ds.train.pretrain import TrainState

log = logging.getLogger("vlbert_ds.finetune")
METRIC_NAMES = {"vqa": "vqa_accuracy", "vcr": "accuracy", "refcoco": "accuracy_iou50"}
# `--task all` budget parts (fields of ablation.Budget) that a flag of the same name overrides.
BUDGET_FLAGS = {"pretrain_steps": "pretraining steps", "finetune_steps": "fine-tuning steps per run",
                "train_scenes": "synthetic training scenes per task",
                "val_scenes": "synthetic validation scenes per task"}


@dataclass
class FinetuneResult:
    state: TrainState
    val_metrics: dict[str, float]
    predictions: dict[str, bool]  # item id -> correct (VCR joint Q->AR combines two runs by id)
    output_dir: str
    export_dir: str | None
    run_id: str | None
    preempted: bool = False
    stop_signal: Any = None


def split_folder(spec: str) -> str:
    """The folder that holds a task split's shards: the spec itself, or the folder of a shard pattern/file."""
    first = spec.split("::")[0].rstrip("/")
    if first.endswith(".tar") or any(c in first for c in "*?[{"):
        return first.rsplit("/", 1)[0] if "/" in first else "."
    return first


def _read_json_list(url: str, key: str, what: str) -> list[str]:
    """A JSON list of strings at a path or fsspec URL (never through pathlib: `s3://` must stay whole)."""
    from vlbert_ds.data import storage

    try:
        value = storage.read_json(url)
    except ValueError as err:
        raise ValueError(f"{key}: {url} is not valid JSON ({err})") from err
    if value is None:
        raise FileNotFoundError(f"{what} not found: {url} (set {key})")
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise ValueError(f"{key}: {url}: expected a non-empty JSON list of strings")
    return value


def answer_vocabulary(config: RunConfig) -> list[str]:
    """VQA's answers: `task.answers`, else `answers.json` in the training split's folder, where
    `vlbert-prep vqa --build-vocabulary --out <train folder>` writes it."""
    from vlbert_ds.data import storage

    if config.task.name != "vqa":
        return []
    url = config.task.answers or storage.join(split_folder(config.task.train), "answers.json")
    return _read_json_list(url, "task.answers", "VQA answer vocabulary (vlbert-prep vqa --build-vocabulary writes it "
                                                "into the training split's --out)")


def object_classes(config: RunConfig) -> list[str]:
    """VCR's auxiliary RoI class list (`task.object_classes`); [] when off or not VCR."""
    from vlbert_ds.data import storage
    from vlbert_ds.data.tasks import COCO_CLASSES

    choice = config.task.object_classes
    if config.task.name != "vcr" or choice == "none":
        return []
    if choice == "auto":
        beside = storage.join(split_folder(config.task.train), "object_classes.json")
        if not storage.exists(beside):
            return list(COCO_CLASSES)
        choice = beside
    if choice == "coco":
        return list(COCO_CLASSES)
    classes = _read_json_list(choice, "task.object_classes", "VCR object class list")
    if len(classes) < 2:
        raise ValueError(f"task.object_classes: {choice}: expected a list of class names, background first")
    return classes


def build_task_model(config: RunConfig, num_answers: int, num_object_classes: int = 0):
    from vlbert_ds.model.tasks import TASK_MODELS

    cls = TASK_MODELS[config.task.name]
    overrides = dict(config.model.overrides, visual_front_end="precomputed",
                     num_region_classes=config.model.num_region_classes)
    if config.task.name == "vqa":
        overrides["num_answers"] = num_answers
    if config.task.name == "vcr":
        overrides["with_pooler"] = True
        overrides["num_object_classes"] = num_object_classes
    if config.task.init:
        return cls.from_pretraining(config.task.init, **overrides)
    bert = default_bert() if config.model.bert in ("", "default") else config.model.bert
    return cls.from_bert(bert, **overrides)


def data_config(config: RunConfig, answers: list[str], train: bool, classes: list[str] = ()):
    from vlbert_ds.data.tasks import TaskDataConfig

    tokenizer = default_bert() if config.data.tokenizer == "default" else config.data.tokenizer
    return TaskDataConfig(task=config.task.name, tokenizer=tokenizer, answers=answers, object_classes=list(classes),
                          vcr_mode=config.task.vcr_mode, max_text=config.task.max_text,
                          batch_size=config.task.batch_size, num_workers=config.data.num_workers if train else 0,
                          shuffle_buffer=config.data.shuffle_buffer, seed=config.train.seed, train=train)


@torch.no_grad()
def evaluate(model, config: RunConfig, answers: list[str], device) -> tuple[dict[str, float], dict[str, bool]]:
    """The task metric over the whole validation split, on this process (rank 0)."""
    from vlbert_ds.data.tasks import TaskStream

    was_training = model.training
    model.eval()
    total = count = 0.0
    predictions: dict[str, bool] = {}
    for item in TaskStream(config.task.val, data_config(config, answers, train=False), loop=False):
        task = item.task.to(device)
        out = model(task)
        if config.task.name == "vqa":
            scores = task.answer_targets.float().gather(1, out.logits.argmax(1, keepdim=True)).squeeze(1)
            total += float(scores.sum())
            right = (scores > 0).tolist()
        elif config.task.name == "vcr":
            right = (out.logits.argmax(1) == task.choice_labels).tolist()
            total += sum(right)
        else:
            right = [float(v) > 0 for v in _referring_correct(task, out.logits)]
            total += sum(right)
        count += len(right)
        predictions.update(zip(task.keys, right, strict=True))
    model.train(was_training)
    return {METRIC_NAMES[config.task.name]: total / max(1.0, count), "val_items": count}, predictions


def _referring_correct(task, logits):
    from torchvision.ops import box_iou

    rows = torch.arange(logits.shape[0], device=logits.device)
    chosen = task.batch.boxes[rows, logits.argmax(1)].float()
    return (box_iou(chosen, task.target_boxes.float()).diagonal() >= 0.5).float()


def finetune(config: RunConfig, dist: DistEnv) -> FinetuneResult:
    from vlbert_ds.train.tracking import Tracker

    stop = StopRequests()
    tracker = Tracker(enabled=config.tracking.enabled and dist.is_main)
    try:
        return _finetune(config, dist, stop, tracker)
    except BaseException as err:
        tracker.fail(err)  # an MLflow run never stays RUNNING after a crash
        raise
    finally:
        stop.close()


def _finetune(config: RunConfig, dist: DistEnv, stop: StopRequests, tracker) -> FinetuneResult:
    import torch.distributed as tdist

    from vlbert_ds.data.tasks import task_loader
    from vlbert_ds.train.checkpoint import CheckpointManager, check_same_model, export_pretrained
    from vlbert_ds.train.config import redact_urls
    from vlbert_ds.train.engine import grad_norm, make_engine
    from vlbert_ds.train.tracking import resolve_uri

    torch.manual_seed(config.train.seed + dist.rank)
    output = Path(config.train.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        print("resolved config:\n" + config.to_yaml(), flush=True)
        (output / "resolved_config.yaml").write_text(config.to_yaml())
    answers = answer_vocabulary(config)
    classes = object_classes(config)
    if dist.is_main and classes:
        print(f"VCR auxiliary RoI classification over {len(classes)} classes ({', '.join(classes[1:6])}, ...)",
              flush=True)
    model = build_task_model(config, len(answers), len(classes))
    if dist.is_main and model.load_report is not None:
        print(model.load_report.summary(), flush=True)
    model_config = model.config.to_dict()
    config.data.vl_per_batch, config.data.text_per_batch = config.task.batch_size, 0  # DeepSpeed's micro-batch
    engine, ds_config = make_engine(model, config, dist.world_size)
    checkpoints = CheckpointManager(config.checkpoint_dir, config.checkpoint.keep, dist.rank)
    state = TrainState()
    tag = checkpoints.latest_tag() if config.checkpoint.resume else None
    if tag is not None:
        check_same_model(checkpoints.model_config(tag), model_config, str(Path(config.checkpoint_dir) / tag))
        state = TrainState.from_client_state(checkpoints.load(engine, tag))
        if dist.is_main:
            print(f"resumed from {tag}: step {state.step}", flush=True)

    uri = None
    if tracker.enabled:
        uri = resolve_uri(config.tracking.uri, str(output))
        tracker.start(uri, config.tracking.experiment, config.tracking.run_name, state.run_id, str(output))
        state.run_id = tracker.run_id
        tracker.log_params({**config.flat(), "world_size": dist.world_size})
        tracker.log_text(json.dumps(ds_config, indent=2), "config/ds_config.json")

    # Data: epoch-seeded shuffles; a resumed run starts a fresh pass (fine-tuning keeps no exact position).
    data_cfg = data_config(config, answers, train=True, classes=classes)
    data_cfg.seed = config.train.seed + 1000 * state.epoch + state.step
    data = iter(task_loader(config.task.train, data_cfg, dist.rank, dist.world_size))
    metric_name = METRIC_NAMES[config.task.name]
    metrics_log = output / "metrics.jsonl"
    progress = None
    if dist.is_main:
        from tqdm import tqdm

        progress = tqdm(total=config.train.steps, initial=state.step, desc=f"finetune {config.task.name}",
                        unit="step", dynamic_ncols=True, file=sys.stdout, disable=None)
    engine.train()
    skipped: dict[str, float] = {}
    val: dict[str, float] = {}
    predictions: dict[str, bool] = {}
    while state.step < config.train.steps:
        start = time.perf_counter()
        losses, correct, count = [], 0.0, 0.0
        for _ in range(config.train.grad_accum):
            item = next(data)
            for reason, n in item.skipped.items():
                skipped[reason] = skipped.get(reason, 0) + n
            out = engine(item.task.to(engine.device))
            engine.backward(out.loss)
            engine.step()
            losses.append(float(out.loss.detach()))
            correct += float(out.metrics.get("correct", out.metrics.get("vqa_score", 0.0)))
            count += float(out.metrics["count"])
        state.step += 1
        reduced = torch.tensor([sum(losses) / len(losses), correct, count], dtype=torch.float64, device=engine.device)
        if tdist.is_initialized():
            tdist.all_reduce(reduced)
        world = dist.world_size
        train_metric = float(reduced[1] / reduced[2].clamp(min=1))
        metrics = {"loss": float(reduced[0]) / world, f"train_{metric_name}": train_metric,
                   "lr": engine.get_lr()[0], "grad_norm": grad_norm(engine),
                   "items_per_s": float(reduced[2]) / (time.perf_counter() - start)}
        metrics.update({f"skipped/{k}": v for k, v in skipped.items()})
        if not math.isfinite(metrics["loss"]):
            log.warning("step %d: non-finite loss %s", state.step, metrics["loss"])
        state.history.append([state.step, metrics["loss"]])
        if dist.is_main and config.task.val and config.task.eval_every and state.step % config.task.eval_every == 0:
            val, predictions = evaluate(engine.module, config, answers, engine.device)
            metrics.update({f"val_{k}": v for k, v in val.items()})
        tracker.queue_metrics(state.step, metrics)
        if dist.is_main:
            with open(metrics_log, "a") as handle:
                handle.write(json.dumps({"step": state.step, **metrics}) + "\n")
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics[f'train_{metric_name}']:.2f}")
        if state.step % config.checkpoint.every == 0 or state.step == config.train.steps:
            checkpoints.save(engine, state.step, state.to_client_state(), model_config)
            tracker.flush()
        if stop.should_stop(engine.device) and state.step < config.train.steps:
            if state.step % config.checkpoint.every != 0:
                checkpoints.save(engine, state.step, state.to_client_state(), model_config)
            tracker.flush()
            print(f"rank {dist.rank}: stopping at step {state.step} on a scheduler signal; checkpoint saved",
                  flush=True)
            tracker.finish(status="KILLED")
            return FinetuneResult(state, {}, {}, str(output), None, state.run_id, True, stop.received)
    if progress is not None:
        progress.close()

    export_dir = None
    if tdist.is_initialized():
        tdist.barrier()
    if dist.is_main:
        if config.task.val:
            val, predictions = evaluate(engine.module, config, answers, engine.device)
            tracker.queue_metrics(state.step, {f"val_{k}": v for k, v in val.items()})
            print(f"{config.task.name} validation: " + " ".join(f"{k}={v:.4f}" for k, v in val.items()), flush=True)
        if config.checkpoint.export:
            export_dir = str(output / "finetuned")
            export_pretrained(config.checkpoint_dir, checkpoints.latest_tag(), type(engine.module),
                              engine.module.config, export_dir)
        (output / "val_metrics.json").write_text(json.dumps({"val": val, "skipped": skipped}, indent=1))
        tracker.finish()
        print("\n".join(["", "=" * 72, f"fine-tuned {config.task.name}: finished at step {state.step}",
                          *(f"  val {k:<30} {v:.4f}" for k, v in val.items()),
                          f"checkpoints: {config.checkpoint_dir}",
                          f"fine-tuned weights (save_pretrained): {export_dir}",
                          f"validation metrics: {output / 'val_metrics.json'}",
                          f"metrics per step: {output / 'metrics.jsonl'}",
                          f"MLflow: run {state.run_id} at {redact_urls(uri or '') or 'off (tracking.enabled=false)'}",
                          "=" * 72]), flush=True)
    if tdist.is_initialized():
        tdist.barrier()
    return FinetuneResult(state, val, predictions, str(output), export_dir, state.run_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlbert-finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, choices=["vqa", "vcr", "refcoco", "all"])
    parser.add_argument("--config", help="YAML or TOML run config")
    parser.add_argument("--init", default=None, help="pretrained save_pretrained folder (task.init)")
    parser.add_argument("--quick", action="store_true", help="with --task all: the synthetic ablation")
    parser.add_argument("--output", default="runs/finetune-ablation", help="with --task all")
    for name, what in BUDGET_FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"with --task all: {what} (default: the budget's)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides, validated) and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dist = discover()
    setup_process(dist)
    if args.task == "all":
        from vlbert_ds.train.ablation import run_ablation

        if dist.world_size != 1:
            print("vlbert-finetune --task all runs in one process", file=sys.stderr)
            return 2
        from dataclasses import replace

        from vlbert_ds.train.ablation import FULL, QUICK

        chosen = {name: getattr(args, name) for name in BUDGET_FLAGS if getattr(args, name) is not None}
        if any(v < 1 for v in chosen.values()):
            print("vlbert-finetune: budget values must be >= 1", file=sys.stderr)
            return 2
        init_distributed(dist)
        try:
            return run_ablation(args.output, args.init, replace(QUICK if args.quick else FULL, **chosen),
                                args.overrides)
        except (ValueError, FileNotFoundError) as err:
            print(f"vlbert-finetune: {err}", file=sys.stderr)
            return 2
    overrides = [f"task.name={args.task}", *([f"task.init={args.init}"] if args.init else []), *args.overrides]
    try:
        config = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"vlbert-finetune: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    init_distributed(dist, timeout_s=config.train.dist_timeout_s)
    print(dist.describe(), flush=True)
    try:
        with exit_fast_on_error(dist):
            result = finetune(config, dist)
    except (ValueError, FileNotFoundError) as err:
        print(f"vlbert-finetune: {err}", file=sys.stderr)
        return 2
    if result.preempted:
        return exit_code_after_stop(dist.is_main, result.stop_signal)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
