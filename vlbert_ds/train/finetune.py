"""The fine-tuning recipe: VQA, VCR or RefCOCO+ on the same loop, engine, checkpoints and MLflow as pretraining.

The model starts from a pretraining `save_pretrained` folder (`task.init`, `--init`) or, without
one, from `model.bert` alone (the "no pretraining" baseline). Heads, losses and metrics are in
`vlbert_ds.model.task_heads`, sequences in `vlbert_ds.data.task_batches`; the loop is
`trainer.Trainer`; the command line (`vlbert-finetune`) is `vlbert_ds.cli.finetune`.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import torch
from torch import nn

from vlbert_ds.bundled import default_bert
from vlbert_ds.train.config import FinetuneConfig, redact_urls
from vlbert_ds.train.distributed import DistEnv
from vlbert_ds.train.metrics import StepAccumulator
from vlbert_ds.train.trainer import RunResult, Trainer

METRIC_NAMES = {"vqa": "vqa_accuracy", "vcr": "accuracy", "refcoco": "accuracy_iou50"}


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


def answer_vocabulary(config: FinetuneConfig) -> list[str]:
    """VQA's answers: `task.answers`, else `answers.json` in the training split's folder, where
    `vlbert-prep vqa --build-vocabulary --out <train folder>` writes it."""
    from vlbert_ds.data import storage

    if config.task.name != "vqa":
        return []
    url = config.task.answers or storage.join(split_folder(config.task.train), "answers.json")
    return _read_json_list(url, "task.answers", "VQA answer vocabulary (vlbert-prep vqa --build-vocabulary writes it "
                                                "into the training split's --out)")


def object_classes(config: FinetuneConfig) -> list[str]:
    """VCR's auxiliary RoI class list (`task.object_classes`); [] when off or not VCR."""
    from vlbert_ds.data import storage
    from vlbert_ds.data.task_batches import COCO_CLASSES

    choice = config.task.object_classes
    if config.task.name != "vcr" or choice == "none":
        return []
    if choice == "coco":
        return list(COCO_CLASSES)
    if choice == "auto":
        beside = storage.join(split_folder(config.task.train), "object_classes.json")
        if not storage.exists(beside):
            return list(COCO_CLASSES)
        url, key = beside, "task.object_classes=auto"
    else:
        url, key = config.task.object_classes_file, "task.object_classes_file"
    classes = _read_json_list(url, key, "VCR object class list")
    if len(classes) < 2:
        raise ValueError(f"{key}: {url}: expected a list of class names, background first")
    return classes


def data_config(config: FinetuneConfig, answers: list[str], train: bool, classes: list[str] = ()):
    from vlbert_ds.data.task_batches import TaskDataConfig

    tokenizer = default_bert() if config.data.tokenizer == "default" else config.data.tokenizer
    return TaskDataConfig(task=config.task.name, tokenizer=tokenizer, answers=answers, object_classes=list(classes),
                          vcr_mode=config.task.vcr_mode, max_text=config.task.max_text,
                          batch_size=config.task.batch_size, num_workers=config.data.num_workers if train else 0,
                          shuffle_buffer=config.data.shuffle_buffer, seed=config.train.seed, train=train,
                          readers=config.data.readers, cache_dir=config.data.cache_dir or None,
                          cache_size_gb=config.data.cache_size_gb,
                          reset_position=config.data.reset_position or config.checkpoint.force_resume)


class FinetuneRecipe:
    export_name: ClassVar[str] = "finetuned"
    throughput: ClassVar[dict[str, str]] = {"items": "items_per_s"}

    def __init__(self, config: FinetuneConfig) -> None:
        self.config = config
        self.metric = METRIC_NAMES[config.task.name]
        self.desc = f"finetune {config.task.name}"
        self.headline = ("loss", self.metric, "lr")
        self.eval_every = config.task.eval_every if config.task.val else 0
        self.answers: list[str] = []
        self.classes: list[str] = []
        self.predictions: dict[str, bool] = {}

    def prepare(self, dist: DistEnv) -> None:
        self.answers = answer_vocabulary(self.config)
        self.classes = object_classes(self.config)
        if dist.is_main and self.classes:
            print(f"VCR auxiliary RoI classification over {len(self.classes)} classes "
                  f"({', '.join(self.classes[1:6])}, ...)", flush=True)

    def build_model(self) -> nn.Module:
        from vlbert_ds.model.task_heads import TASK_MODELS

        config = self.config
        cls = TASK_MODELS[config.task.name]
        overrides = dict(config.model.overrides, visual_front_end="precomputed",
                         num_region_classes=config.model.num_region_classes)
        if config.task.name == "vqa":
            overrides["num_answers"] = len(self.answers)
        if config.task.name == "vcr":
            overrides["with_pooler"] = True
            overrides["num_object_classes"] = len(self.classes)
        if config.task.init:
            return cls.from_pretraining(config.task.init, **overrides)
        return cls.from_bert(default_bert() if config.model.bert in ("", "default") else config.model.bert,
                             **overrides)

    def micro_batch_size(self) -> int:
        return self.config.task.batch_size

    def open_data(self, dist: DistEnv, layout, grad_accum: int):
        from vlbert_ds.data.task_batches import task_loader

        return task_loader(self.config.task.train, data_config(self.config, self.answers, True, self.classes),
                           dist.rank, dist.world_size, grad_accum, layout)

    def model_input(self, item: Any) -> Any:
        return item.task

    def count(self, item: Any, task: Any, step: StepAccumulator) -> None:
        step.count("items", task.batch_size)
        for reason, n in item.skipped.items():
            step.count(f"skipped/{reason}", n)

    def evaluate(self, model: nn.Module, device: torch.device, step: int, final: bool) -> dict[str, float]:
        if not self.config.task.val:
            return {}
        val, self.predictions = evaluate(model, self.config, self.answers, device)
        return {f"val_{k}": v for k, v in val.items()}

    def write_outputs(self, trainer: Trainer, final: dict[str, float]) -> None:
        val = {k[len("val_"):]: v for k, v in final.items() if k.startswith("val_")}
        if val:
            print(f"{self.config.task.name} validation: " + " ".join(f"{k}={v:.4f}" for k, v in val.items()),
                  flush=True)
        (trainer.output / "val_metrics.json").write_text(
            json.dumps({"val": val, "skipped": trainer.metrics.skipped_total}, indent=1))


@torch.no_grad()
def evaluate(model, config: FinetuneConfig, answers: list[str], device,
             classes: list[str] = ()) -> tuple[dict[str, float], dict[str, bool]]:
    """The task metric over the whole validation split, on this process (rank 0)."""
    from vlbert_ds.data.task_batches import TaskStream
    from vlbert_ds.model.task_heads import referring_hits

    was_training = model.training
    model.eval()
    total = count = 0.0
    predictions: dict[str, bool] = {}
    for item in TaskStream(config.task.val, data_config(config, answers, False, classes), loop=False):
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
            rows = torch.arange(out.logits.shape[0], device=out.logits.device)
            hits = referring_hits(task.batch.boxes[rows, out.logits.argmax(1)], task.target_boxes)
            right = [float(v) > 0 for v in hits]
            total += sum(right)
        count += len(right)
        predictions.update(zip(task.keys, right, strict=True))
    model.train(was_training)
    return {METRIC_NAMES[config.task.name]: total / max(1.0, count), "val_items": count}, predictions


def finetune(config: FinetuneConfig, dist: DistEnv) -> RunResult:
    return Trainer(FinetuneRecipe(config), dist).train()


def print_summary(result: RunResult, config: FinetuneConfig) -> None:
    val = {k: v for k, v in result.final_metrics.items() if k.startswith("val_")}
    print("\n".join(["", "=" * 72, f"fine-tuned {config.task.name}: finished at step {result.state.step}",
                      *(f"  {k:<34} {v:.4f}" for k, v in val.items()),
                      f"checkpoints: {result.checkpoint_dir}",
                      f"fine-tuned weights (save_pretrained): {result.export_dir}",
                      f"validation metrics: {result.output_dir}/val_metrics.json",
                      f"metrics per step: {result.output_dir}/metrics.jsonl",
                      f"MLflow: run {result.run_id} at "
                      f"{redact_urls(result.tracking_uri or '') or 'off (tracking.enabled=false)'}",
                      "=" * 72]), flush=True)
