"""Run configurations: typed, frozen dataclasses loaded from YAML or TOML with `section.key=value` overrides.

One dataclass per component (model, data, optimizer, the loop, grounding check, checkpoint, tracking,
the fine-tuning task); `PretrainConfig` and `FinetuneConfig` each hold the sections their command
reads, so a key of the other command is an error naming that command. Unknown keys, wrong types and
values outside a `Literal` choice are errors before any work starts. The config is resolved once at
load (defaults that follow from other keys filled in) and never changes afterwards. Credentials
never live here: object storage and tracking servers take theirs from the environment (`AWS_*`,
`MLFLOW_TRACKING_TOKEN`, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml


def option(default: Any, help: str) -> Any:
    """A config field with its one line of `--help` (lists and dicts are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class ModelSection:
    bert: str = option("default", "Hugging Face BERT folder for the text side ('default' = the bundled MiniLM; "
                                  "'' = build `preset` from scratch)")
    preset: str = option("", "VLBertConfig preset (tiny, mini, base, large) to build from scratch; only with "
                             "model.bert=''")
    visual_front_end: Literal["precomputed", "end_to_end"] = option(
        "precomputed", "region features from the shards, or the ResNet front end on the shards' images")
    num_region_classes: int = option(1601, "classes of the masked-RoI targets (1601 for bottom-up-attention)")
    overrides: dict[str, Any] = option({}, "any other VLBertConfig field, e.g. {hidden_dropout_prob: 0.1}")
    init_from: str = option("", "continue from our own save_pretrained folder instead (an exported run)")


@dataclass(frozen=True)
class StreamOptions:
    """How shards are streamed, the same for pretraining and fine-tuning (`vlbert_ds.data`)."""

    num_workers: int = option(2, "DataLoader worker processes per rank (may change on resume)")
    shuffle_buffer: int = option(1000, "samples in each logical reader's shuffle buffer (per stream)")
    readers: int = option(0, "logical readers: the global sample order's unit, fixed for a run (0 = 4 per "
                             "micro-batch of a step); a rank holds readers / world size shuffle buffers")
    reset_position: bool = option(False, "resume even though the data config changed: the data starts afresh "
                                         "(pretraining: at the next epoch; said at start-up)")
    cache_dir: str = option("", "node-local folder that keeps a copy of every shard read, shared by the node's "
                                "ranks, so that epoch 2 on reads local disk ('' = off)")
    cache_size_gb: float = option(0.0, "bound of data.cache_dir in GB, least recently used shards evicted first "
                                       "(0 = no bound)")


@dataclass(frozen=True)
class DataSection(StreamOptions):
    vl_sources: list[str] = option([], "image-caption shard specs (folder, brace pattern, glob, '::' list; "
                                       "any fsspec URL)")
    vl_weights: list[float] = option([], "sampling weight per vl source (resampled mode; default equal)")
    text_sources: list[str] = option([], "text-only shard specs")
    text_weights: list[float] = option([], "sampling weight per text source")
    tokenizer: str = option("default", "tokenizer folder ('default' = the bundled MiniLM's)")
    mode: Literal["resampled", "exact"] = option(
        "resampled", "resampled: shards drawn by weight, epochs of samples_per_epoch; exact: every sample once")
    samples_per_epoch: int = option(0, "resampled mode: vision-language samples per (virtual) epoch, all ranks")
    vl_per_batch: int = option(16, "vision-language rows per rank per micro-batch")
    text_per_batch: int = option(16, "text-only rows per rank per micro-batch (1:1 as the paper)")
    log_keys: bool = option(False, "append every micro-batch's sample keys to <output_dir>/data_keys/rank<r>.jsonl "
                                   "(to audit what a run saw)")
    max_elements: int = option(64, "text tokens + RoIs per row (the official SEQ_LEN)")
    text_segment_len: int = option(64, "tokens per text-only row")
    prepare_default: str = option("", "prepare the embedded default into this folder if it holds none, and "
                                      "read it when the sources are empty ('' = never)")


@dataclass(frozen=True)
class TaskDataSection(StreamOptions):
    """What fine-tuning reads of `data`: the task's shards are named in `task`."""

    tokenizer: str = option("default", "tokenizer folder ('default' = the bundled MiniLM's)")


@dataclass(frozen=True)
class OptimizerSection:
    lr: float = option(1e-4, "peak learning rate (not per sample)")
    betas: list[float] = option([0.9, 0.999], "AdamW betas")
    eps: float = option(1e-6, "AdamW epsilon")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    decay_norm_and_bias: bool = option(False, "decay LayerNorm and bias parameters too (the official code does)")
    # The visual LayerNorm gains start at 0 (as the reference), and under Adam a gain moves about `lr`
    # per step: short runs need this > 1.
    fresh_lr_multiplier: float = option(1.0, "LR multiplier for parameters the BERT checkpoint lacks "
                                             "(visual side, new embeddings, heads)")
    warmup_steps: int = option(100, "linear warm-up steps")
    schedule: Literal["linear", "constant"] = option("linear", "after warm-up: linear decay to 0, or constant")
    grad_clip: float = option(10.0, "global gradient-norm clip")


@dataclass(frozen=True)
class TrainSection:
    steps: int = option(1000, "optimizer steps")
    grad_accum: int = option(1, "micro-batches per rank per optimizer step; resumed on another world size it "
                                "is re-derived to keep the global batch (world x grad_accum micro-batches)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = option(
        "auto", "training precision; auto = bf16 where the GPU or CPU computes it natively (AVX512-BF16, AMX, "
                "Ampere on), else fp32 (resolved at load; fp16 needs a GPU and is never chosen by auto)")
    precision_reason: str = option("", "set at load: why train.precision resolved as it did (not an input)")
    ds_config: str = option("ds_configs/zero2.json", "DeepSpeed JSON (ZeRO stage, buckets, offload); "
                                                     "ds_configs/* are shipped with the package")
    seed: int = option(12345, "seed of the model, masking and data order")
    log_every: int = option(10, "console line every N steps when there is no progress bar (0 = never)")
    output_dir: str = option("runs/default", "run folder: resolved config, metrics.jsonl, plots, exports")
    dist_timeout_s: float = option(600.0, "a collective waiting on a dead rank fails after this long")
    watchdog: Literal["auto", "on", "off"] = option(
        "auto", "stop a run whose steps stop coming (stacks dumped, MLflow marked, non-zero exit); auto = "
                "on for multi-rank runs")
    watchdog_factor: float = option(10.0, "watchdog: allowed silence in median step times")
    watchdog_min_s: float = option(300.0, "watchdog: never fire after less silence than this")
    watchdog_startup_s: float = option(1800.0, "watchdog: allowance before the first step and during checkpoint "
                                               "saves and evaluations")


@dataclass(frozen=True)
class GroundingSection:
    """The visual-grounding check on held-out default scenes (masked colour/shape/relation words)."""

    data: str = option("", "held-out default-scene shards (default: <data.prepare_default>/vl/val; "
                           "'' and no prepare_default = no check)")
    every: int = option(0, "evaluate every N steps (0 = at the end only)")
    samples: int = option(200, "held-out captions evaluated")


@dataclass(frozen=True)
class CheckpointSection:
    dir: str = option("", "checkpoint folder (default: <train.output_dir>/checkpoints)")
    every: int = option(200, "steps between checkpoints")
    keep: int = option(2, "checkpoints kept")
    resume: bool = option(True, "continue from <dir>/latest when it exists")
    export: bool = option(True, "write consolidated save_pretrained weights at the end")
    load_universal: bool = option(False, "resume from a DeepSpeed universal checkpoint (another world size)")
    force_resume: bool = option(False, "resume even though a key fixed for the run (model, data stream, seed, "
                                       "batch) changed; the changes are recorded, a changed data stream restarts "
                                       "at the next epoch")
    prune_before_save: bool = option(False, "delete the oldest checkpoint before writing a new one, so keep (not "
                                            "keep + 1) fit on the disk; a crash mid-save then leaves keep - 1")


@dataclass(frozen=True)
class TrackingSection:
    enabled: bool = option(True, "log to MLflow (rank 0)")
    uri: str = option("", "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under output_dir)")
    experiment: str = option("vlbert_ds-pretrain", "MLflow experiment")
    run_name: str = option("", "MLflow run name")


@dataclass(frozen=True)
class TaskSection:
    name: Literal["vqa", "vcr", "refcoco"] = option("vqa", "the task (set by vlbert-finetune --task)")
    train: str = option("", "the task's training shards (kind vqa/vcr/refcoco, docs/shard-format.md)")
    val: str = option("", "validation shards ('' = no validation)")
    init: str = option("", "pretraining save_pretrained folder (--init); '' = BERT-only start (model.bert)")
    answers: str = option("", "VQA: JSON list of answers (default: answers.json in the train folder)")
    vcr_mode: Literal["q2a", "qa2r"] = option("q2a", "VCR: question->answer or question+answer->rationale")
    object_classes: Literal["auto", "coco", "none", "file"] = option(
        "auto", "VCR auxiliary RoI classes: auto (object_classes.json in the train folder, else COCO's 81), "
                "coco, none (off), file (task.object_classes_file)")
    object_classes_file: str = option("", "with object_classes=file: JSON list of class names, background first")
    batch_size: int = option(16, "items per rank per micro-batch (VCR: each item is one row per choice)")
    max_text: int = option(64, "text tokens per row")
    eval_every: int = option(0, "validate every N steps (0 = at the end only)")


# ----------------------------------------------------------------------------- the two run configs
def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(section.key, saved value, current value) for every key whose value differs."""
    out = []
    for section, values in current.items():
        for key, value in values.items():
            old = saved.get(section, {}).get(key, value)
            if old != value:
                out.append((f"{section}.{key}", old, value))
    return out


def resume_changes(saved: dict[str, Any] | None, config: RunConfig, where: str) -> list[tuple[str, Any, Any]]:
    """What changed since the checkpoint at `where` was written (its `run_config.json`, credentials
    masked); a key fixed for the run is refused, naming it, unless checkpoint.force_resume."""
    if saved is None:
        return []
    changes = config_changes(saved, redact_urls(config.to_dict()))
    fixed = [c for c in changes if c[0] in config.fixed_on_resume]
    if config.data.reset_position:  # the data restarts: its keys may change
        fixed = [c for c in fixed if c[0] not in config.data_keys]
    if fixed and not config.checkpoint.force_resume:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in fixed)
        if any(key == "train.precision" for key, _, _ in fixed):
            listed += (" (train.precision=auto resolves from this machine's hardware: set train.precision to the "
                       "checkpoint's value to continue here)")
        raise ValueError(f"resuming {where} with changed keys that are fixed for a run ({listed}): the checkpoint's "
                         "weights, data position or batch depend on them. Restore them, start a new run (another "
                         "train.output_dir), set data.reset_position=true when only the data changed (it restarts "
                         "at the next epoch), or checkpoint.force_resume=true")
    return changes


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"config: {message}")


@dataclass(frozen=True)
class RunConfig:
    """What both commands share; use `PretrainConfig` or `FinetuneConfig`."""

    command: ClassVar[str] = ""
    # Keys a resumed run may not change (the checkpoint's data position or batch depend on them):
    # refused unless checkpoint.force_resume. The model's shape is checked against the checkpoint's
    # model_config.json instead (checkpoint.check_same_model, naming the field). Any other key may
    # change; it applies from the resumed step and is recorded.
    # The global batch (world size x train.grad_accum) is checked against the checkpoint's data position
    # (trainer.Trainer.plan_layout): another world size re-derives the accumulation.
    fixed_on_resume: ClassVar[tuple[str, ...]] = ("train.seed", "train.precision")
    # What data.reset_position=true lets change (the data restarts at the next epoch).
    data_keys: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        _need(self.train.steps >= 1, "train.steps must be >= 1")
        _need(self.train.grad_accum >= 1, "train.grad_accum must be >= 1")
        _need(self.train.log_every >= 0, "train.log_every must be >= 0")
        for key in ("watchdog_factor", "watchdog_min_s", "watchdog_startup_s"):
            value = getattr(self.train, key)
            _need(math.isfinite(value) and value > 0, f"train.{key} must be a finite number > 0, got {value}")
        _need(math.isfinite(self.train.dist_timeout_s) and self.train.dist_timeout_s > 0,
              f"train.dist_timeout_s must be a positive number of seconds, got {self.train.dist_timeout_s}")
        optimizer = self.optimizer
        _need(math.isfinite(optimizer.lr) and optimizer.lr > 0, f"optimizer.lr must be a finite number > 0, "
                                                                  f"got {optimizer.lr}")
        _need(len(optimizer.betas) == 2 and all(0 <= b < 1 for b in optimizer.betas),
              f"optimizer.betas needs two values in [0, 1), got {optimizer.betas}")
        _need(math.isfinite(optimizer.eps) and optimizer.eps > 0, f"optimizer.eps must be > 0, got {optimizer.eps}")
        for key in ("weight_decay", "grad_clip", "fresh_lr_multiplier"):
            value = getattr(optimizer, key)
            _need(math.isfinite(value) and value >= 0, f"optimizer.{key} must be a finite number >= 0, got {value}")
        _need(optimizer.fresh_lr_multiplier > 0, "optimizer.fresh_lr_multiplier must be > 0")
        _need(optimizer.warmup_steps >= 0, "optimizer.warmup_steps must be >= 0")
        _need(self.checkpoint.keep >= 1, "checkpoint.keep must be >= 1")
        _need(self.checkpoint.every >= 1, f"checkpoint.every must be >= 1 (steps), got {self.checkpoint.every}")
        read_ds_config(self.train.ds_config)  # exists and is JSON, before anything is built
        for key, value in self._local_paths():
            _need("://" not in value and "::" not in value,
                  f"{key} must be a local or shared-filesystem path (DeepSpeed writes checkpoints as files), "
                  f"got {value!r}; shard sources (data.*_sources, task.train/val) may be any fsspec URL")

    def _local_paths(self) -> list[tuple[str, str]]:
        return [("train.output_dir", self.train.output_dir), ("checkpoint.dir", self.checkpoint.dir)]

    def resolved(self) -> RunConfig:
        """Defaults that follow from other keys, filled in (called once by `load_config`)."""
        return self

    def with_precision_resolved(self, device_type: str | None = None) -> RunConfig:
        """`train.precision: auto` -> bf16 or fp32 for this machine's hardware, the reason beside it
        (`precision.resolve_precision`); an explicit choice is kept."""
        from vlbert_ds.train.precision import resolve_precision

        choice = resolve_precision(self.train.precision, device_type)
        train = dataclasses.replace(self.train, precision=choice.precision, precision_reason=choice.reason)
        return dataclasses.replace(self, train=train)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or str(Path(self.train.output_dir) / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`section.key -> value` (lists and dicts as JSON), for MLflow params; credentials in URLs masked."""
        out = {}
        for section, values in redact_urls(self.to_dict()).items():
            for key, value in values.items():
                out[f"{section}.{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
        return out

    def to_yaml(self) -> str:
        """The config as printed and logged: credentials in URLs (`scheme://user:secret@host`) masked."""
        return yaml.safe_dump(redact_urls(self.to_dict()), sort_keys=False)


@dataclass(frozen=True)
class PretrainConfig(RunConfig):
    command: ClassVar[str] = "vlbert-pretrain"
    fixed_on_resume: ClassVar[tuple[str, ...]] = (
        *RunConfig.fixed_on_resume, "model.visual_front_end", "data.vl_sources", "data.vl_weights",
        "data.text_sources", "data.text_weights", "data.tokenizer", "data.mode", "data.samples_per_epoch",
        "data.vl_per_batch", "data.text_per_batch", "data.shuffle_buffer", "data.readers", "data.max_elements",
        "data.text_segment_len")
    data_keys: ClassVar[tuple[str, ...]] = (*(k for k in fixed_on_resume if k.startswith("data.")), "train.seed")
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    train: TrainSection = field(default_factory=TrainSection)
    grounding: GroundingSection = field(default_factory=GroundingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def validate(self) -> None:
        super().validate()
        _need(bool(self.model.bert) != bool(self.model.preset),
              f"model.preset={self.model.preset!r} applies only with model.bert='' (the text side from scratch)"
              if self.model.preset else "model.bert='' builds from scratch: set model.preset (tiny, mini, base, "
                                        "large)")
        _need(bool(self.data.vl_sources) or bool(self.data.prepare_default),
              "data.vl_sources is empty (or set data.prepare_default to a folder)")
        _need(not self.data.vl_weights or len(self.data.vl_weights) == len(self.data.vl_sources),
              "data.vl_weights needs one weight per data.vl_sources entry")
        _need(not self.data.text_weights or len(self.data.text_weights) == len(self.data.text_sources),
              "data.text_weights needs one weight per data.text_sources entry")
        data = self.data
        _need(all(math.isfinite(w) and w > 0 for w in [*data.vl_weights, *data.text_weights]),
              "data.vl_weights / data.text_weights must be finite numbers > 0")
        _need(data.vl_per_batch >= 1, f"data.vl_per_batch must be >= 1, got {data.vl_per_batch}")
        _need(data.text_per_batch >= 0, f"data.text_per_batch must be >= 0, got {data.text_per_batch}")
        _need(data.num_workers >= 0, f"data.num_workers must be >= 0, got {data.num_workers}")
        _need(data.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {data.shuffle_buffer}")
        _need(math.isfinite(data.cache_size_gb) and data.cache_size_gb >= 0,
              f"data.cache_size_gb must be >= 0 (0 = no bound), got {data.cache_size_gb}")
        _need(data.max_elements >= 4, f"data.max_elements must be >= 4 ([CLS] word [SEP] + RoI 0), "
                                      f"got {data.max_elements}")
        _need(data.text_segment_len >= 3, f"data.text_segment_len must be >= 3, got {data.text_segment_len}")
        _need(data.samples_per_epoch >= 0, f"data.samples_per_epoch must be >= 0, got {data.samples_per_epoch}")
        _need(self.grounding.samples >= 1 and self.grounding.every >= 0,
              "grounding.samples must be >= 1 and grounding.every >= 0")
        _need(self.model.num_region_classes >= 2, "model.num_region_classes must be >= 2 (background + a class)")

    def _local_paths(self) -> list[tuple[str, str]]:
        return [*super()._local_paths(), ("data.prepare_default", self.data.prepare_default)]

    def resolved(self) -> PretrainConfig:
        folder = self.data.prepare_default
        if not folder:
            return self
        data = dataclasses.replace(self.data, vl_sources=self.data.vl_sources or [str(Path(folder) / "vl/train")],
                                   text_sources=self.data.text_sources or [str(Path(folder) / "text/train")])
        grounding = dataclasses.replace(self.grounding, data=self.grounding.data or str(Path(folder) / "vl/val"))
        return dataclasses.replace(self, data=data, grounding=grounding)


@dataclass(frozen=True)
class FinetuneModelSection:
    bert: str = option("default", "BERT folder for the BERT-only start, without task.init ('default' = MiniLM)")
    num_region_classes: int = option(1601, "classes of the pretraining RoI head (read from task.init's config)")
    overrides: dict[str, Any] = option({}, "any other VLBertConfig field, e.g. {hidden_dropout_prob: 0.1}")


@dataclass(frozen=True)
class FinetuneConfig(RunConfig):
    command: ClassVar[str] = "vlbert-finetune"
    fixed_on_resume: ClassVar[tuple[str, ...]] = (
        *RunConfig.fixed_on_resume, "task.name", "task.train",
        "task.answers", "task.vcr_mode", "task.object_classes", "task.object_classes_file", "task.batch_size",
        "task.max_text", "data.tokenizer", "data.shuffle_buffer", "data.readers")
    data_keys: ClassVar[tuple[str, ...]] = ("train.seed", "task.train", "task.max_text", "data.shuffle_buffer",
                                            "data.readers")
    model: FinetuneModelSection = field(default_factory=FinetuneModelSection)
    task: TaskSection = field(default_factory=TaskSection)
    data: TaskDataSection = field(default_factory=TaskDataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    train: TrainSection = field(default_factory=lambda: TrainSection(output_dir="runs/finetune"))
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingSection = field(default_factory=lambda: TrackingSection(experiment="vlbert_ds-finetune"))

    def validate(self) -> None:
        super().validate()
        _need(bool(self.task.train), "task.train (the task's training shards) is empty")
        _need(self.task.batch_size >= 1, f"task.batch_size must be >= 1, got {self.task.batch_size}")
        _need(self.task.max_text >= 4, f"task.max_text must be >= 4, got {self.task.max_text}")
        _need(self.task.eval_every >= 0, "task.eval_every must be >= 0")
        _need(self.data.num_workers >= 0 and self.data.shuffle_buffer >= 0,
              "data.num_workers and data.shuffle_buffer must be >= 0")
        _need(math.isfinite(self.data.cache_size_gb) and self.data.cache_size_gb >= 0,
              f"data.cache_size_gb must be >= 0 (0 = no bound), got {self.data.cache_size_gb}")
        _need(self.task.object_classes != "file" or bool(self.task.object_classes_file),
              "task.object_classes=file needs task.object_classes_file")


CONFIGS: tuple[type[RunConfig], ...] = (PretrainConfig, FinetuneConfig)


# ----------------------------------------------------------------------------- loading
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact_urls(value: Any) -> Any:
    """Mask the user-info part of every URL in a nested config value (tracking tokens, S3 keys in URLs)."""
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub(lambda m: m.group("scheme") + "***@", value)
    if isinstance(value, dict):
        return {k: redact_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_urls(v) for v in value]
    return value


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check (and gently convert) a value against a dataclass field annotation."""
    hint = typing.get_origin(annotation) or annotation
    if annotation is Any:
        return value
    if hint is Literal:  # a closed choice: refused before anything is built, naming the choices
        allowed = typing.get_args(annotation)
        if isinstance(value, bool) and {"on", "off"} <= set(allowed):  # YAML 1.1 reads on/off as booleans
            value = "on" if value else "off"
        if value not in allowed:
            raise ValueError(f"config: {where} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
        return value
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"config: {where} must be a number, got {value!r}") from None
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ValueError(f"config: {where} must be {hint.__name__}, got {value!r}")
    if hint is list:
        (item,) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str) and item is str:  # one source given without brackets
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"config: {where} must be a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config: {where} must be a mapping, got {value!r}")
        return value
    if hint in (typing.Union, types.UnionType):
        return value
    return value


def _section_types(kind: type[RunConfig]) -> dict[str, type]:
    hints = typing.get_type_hints(kind)
    return {f.name: hints[f.name] for f in dataclasses.fields(kind)}


def _owner_of(kind: type[RunConfig], section: str, key: str | None = None) -> str | None:
    """The other command that takes `section.key`, for the error message."""
    for other in CONFIGS:
        if other is kind:
            continue
        sections = _section_types(other)
        if section in sections and (key is None or key in {f.name for f in dataclasses.fields(sections[section])}):
            return other.command
    return None


def _build_section(cls: type, values: dict[str, Any], name: str, kind: type[RunConfig], base: Any) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            owner = _owner_of(kind, name, key)
            if owner:
                raise ValueError(f"config: {name}.{key} is a {owner} key; {kind.command} does not take it")
            raise ValueError(f"config: unknown key {name}.{key}; {name} has {sorted(known)}")
    checked = {key: _coerce(value, hints[key], f"{name}.{key}") for key, value in values.items()}
    return dataclasses.replace(base, **checked)


def config_from_dict(data: dict[str, Any], kind: type[RunConfig] = PretrainConfig) -> RunConfig:
    sections = _section_types(kind)
    defaults = kind()
    built = {}
    for name, values in (data or {}).items():
        if name not in sections:
            owner = _owner_of(kind, name)
            if owner:
                raise ValueError(f"config: section {name!r} is for {owner}; {kind.command} does not take it")
            raise ValueError(f"config: unknown section {name!r}; sections are {sorted(sections)}")
        if not isinstance(values, dict):
            raise ValueError(f"config: section {name!r} must be a mapping")
        built[name] = _build_section(sections[name], values, name, kind, getattr(defaults, name))
    return dataclasses.replace(defaults, **built)


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside braces: `a-{0..3}.tar, b-{x,y}.tar` -> two items."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += (char == "{") - (char == "}")
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    return [*items, current.strip()] if current.strip() else items


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value`; the value is YAML, except lists of URLs with brace patterns, kept verbatim."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ValueError(f"override {text!r} must look like section.key=value")
    path, raw = text.split("=", 1)
    section, key = path.split(".", 1)
    if not raw:
        return section, key, ""
    try:
        return section, key, yaml.safe_load(raw)
    except yaml.YAMLError:
        if raw.startswith("[") and raw.endswith("]"):
            return section, key, _split_top_level(raw[1:-1])
        return section, key, raw


def _read_config_file(path: Path) -> dict[str, Any]:
    """A YAML or TOML mapping; a syntax error names the file, line and column."""
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ValueError(f"config file {path}: {where}{err.problem or err}") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"config file {path}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def read_ds_config(path: str) -> dict[str, Any]:
    """A DeepSpeed JSON: the path as given, else one shipped with the package (`ds_configs/zero2.json`
    names `vlbert_ds/train/ds_configs/zero2.json`, so a non-editable install finds the defaults)."""
    candidate = Path(path)
    text = None
    if candidate.is_file():
        text = candidate.read_text()
    elif not candidate.is_absolute():
        shipped = resources.files("vlbert_ds.train").joinpath(*candidate.parts)
        if shipped.is_file():
            text = shipped.read_text()
    if text is None:
        known = sorted(f"ds_configs/{f.name}" for f in resources.files("vlbert_ds.train").joinpath("ds_configs")
                       .iterdir() if f.name.endswith(".json"))
        raise FileNotFoundError(f"train.ds_config: {path} not found (shipped: {', '.join(known)})")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"train.ds_config: {path}: not valid JSON (line {err.lineno}, column {err.colno}: "
                         f"{err.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"train.ds_config: {path}: expected a JSON object")
    return value


def takes_key(kind: type[RunConfig], override: str) -> bool:
    """Whether `kind` has the `section.key` of an override (shared overrides are routed with this)."""
    section, key, _ = parse_override(override)
    sections = _section_types(kind)
    return section in sections and key in {f.name for f in dataclasses.fields(sections[section])}


def load_config(path: str | Path | None, overrides: list[str] = (),
                kind: type[RunConfig] = PretrainConfig) -> RunConfig:
    """File + overrides -> the validated, resolved config of one command."""
    data: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = _read_config_file(path)
    for override in overrides:
        section, key, value = parse_override(override)
        data.setdefault(section, {})[key] = value
    config = config_from_dict(data, kind)
    config.validate()
    return config.resolved().with_precision_resolved()


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return f"list[{_type_name(typing.get_args(annotation)[0])}]"
    return getattr(annotation, "__name__", str(annotation))


def config_help(kind: type[RunConfig]) -> str:
    """Every key of a command's config with its type, default and help (for `--help`)."""
    defaults = kind()
    lines = ["config keys (in the --config file as section: {key: value}, or as section.key=value):"]
    for name, cls in _section_types(kind).items():
        section = getattr(defaults, name)
        hints = typing.get_type_hints(cls)
        lines.append(f"  {name}:")
        for f in dataclasses.fields(cls):
            default = json.dumps(getattr(section, f.name))
            lines.append(f"    {name}.{f.name} ({_type_name(hints[f.name])}, default {default})")
            lines.append(f"        {f.metadata.get('help', '')}")
    return "\n".join(lines)
