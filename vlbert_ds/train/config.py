"""The run configuration: typed dataclasses, loaded from YAML or TOML, with `section.key=value` overrides.

Unknown keys and values of the wrong type are errors before any work starts; the resolved config
is printed and logged to MLflow. Credentials never live here: object storage and tracking servers
take theirs from the environment (`AWS_*`, `MLFLOW_TRACKING_TOKEN`, ...).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass
class ModelSection:
    # A Hugging Face BERT folder to initialise the text side from ("default" = the bundled MiniLM),
    # or empty to build `preset` from scratch.
    bert: str = "default"
    preset: str = "mini"
    visual_front_end: Literal["precomputed", "end_to_end"] = "precomputed"
    num_region_classes: int = 1601
    # Any other VLBertConfig field, e.g. {"hidden_dropout_prob": 0.1}.
    overrides: dict[str, Any] = field(default_factory=dict)
    # Continue from our own save_pretrained folder instead (e.g. an exported checkpoint).
    init_from: str = ""


@dataclass
class DataSection:
    vl_sources: list[str] = field(default_factory=list)  # shard specs; see vlbert_ds.data.storage.expand_urls
    vl_weights: list[float] = field(default_factory=list)  # per source, resampled mode only (default: equal)
    text_sources: list[str] = field(default_factory=list)
    text_weights: list[float] = field(default_factory=list)
    tokenizer: str = "default"
    mode: Literal["resampled", "exact"] = "resampled"
    samples_per_epoch: int = 0  # resampled mode: vision-language samples per (virtual) epoch, all ranks
    vl_per_batch: int = 16  # per rank, per micro-batch
    text_per_batch: int = 16  # per rank, per micro-batch (1:1 as the paper)
    num_workers: int = 2
    shuffle_buffer: int = 1000
    max_elements: int = 64
    text_segment_len: int = 64
    # Prepare the embedded default into this folder if it holds no data yet ("" = never).
    prepare_default: str = ""


@dataclass
class OptimizerSection:
    lr: float = 1e-4  # the real learning rate (not per sample)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    weight_decay: float = 1e-4
    # The official code decays every parameter; BERT practice (default here) spares LayerNorm and biases.
    decay_norm_and_bias: bool = False
    # LR multiplier for parameters that start fresh (not loaded from the BERT checkpoint): the visual
    # side, VL-BERT's new embeddings, heads the checkpoint lacks. The visual LayerNorm gains start at 0
    # (as the reference), and under Adam a gain moves about `lr` per step: short runs need this > 1.
    fresh_lr_multiplier: float = 1.0
    warmup_steps: int = 100
    schedule: Literal["linear", "constant"] = "linear"  # warm-up then linear decay to 0 at train.steps
    grad_clip: float = 10.0


@dataclass
class TrainSection:
    steps: int = 1000  # optimizer steps
    grad_accum: int = 1
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    ds_config: str = "ds_configs/zero2.json"
    seed: int = 12345
    log_every: int = 10
    eval_every: int = 0  # visual-grounding evaluation every N steps (0 = at the end only)
    eval_samples: int = 200
    # Held-out default-scene shards for the grounding check, e.g. the default scenes prepared with a
    # detector's regions (default: <data.prepare_default>/vl/val; "" and no prepare_default = no check).
    grounding_data: str = ""
    output_dir: str = "runs/default"
    dist_timeout_s: float = 600.0  # a collective waiting on a dead rank fails after this long


@dataclass
class CheckpointSection:
    dir: str = ""  # default: <output_dir>/checkpoints
    every: int = 200  # steps
    keep: int = 2
    resume: bool = True  # continue from <dir>/latest when it exists
    export: bool = True  # write consolidated save_pretrained weights at the end
    load_universal: bool = False  # resume from a DeepSpeed universal checkpoint (another world size)


@dataclass
class TrackingSection:
    enabled: bool = True
    uri: str = ""  # default: $MLFLOW_TRACKING_URI, else a local sqlite store under output_dir
    experiment: str = "vlbert_ds-pretrain"
    run_name: str = ""


@dataclass
class TaskSection:
    """Fine-tuning only (`vlbert-finetune`); pretraining ignores it."""

    name: Literal["", "vqa", "vcr", "refcoco"] = ""
    train: str = ""  # task shard spec (see docs/shard-format.md, kinds vqa/vcr/refcoco)
    val: str = ""
    init: str = ""  # a pretraining save_pretrained folder; "" = BERT-only initialisation (model.bert)
    answers: str = ""  # VQA: JSON list of answers (default: answers.json in the train folder, as vlbert-prep writes it)
    vcr_mode: Literal["q2a", "qa2r"] = "q2a"
    # VCR auxiliary RoI classes: "auto" = object_classes.json in the train folder if there, else the
    # 81 COCO classes (official); "coco"; "none" (off); or a JSON list file (index 0 = background).
    object_classes: str = "auto"
    batch_size: int = 16  # items per rank per micro-batch (VCR: each item is one row per choice)
    max_text: int = 64
    eval_every: int = 0  # steps; 0 = at the end only


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    task: TaskSection = field(default_factory=TaskSection)

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"config: {message}")

        need(self.train.precision in ("bf16", "fp16", "fp32"), f"train.precision must be bf16, fp16 or fp32, "
                                                                f"got {self.train.precision!r}")
        need(self.train.steps >= 1, "train.steps must be >= 1")
        need(self.train.grad_accum >= 1, "train.grad_accum must be >= 1")
        need(self.data.mode in ("resampled", "exact"), f"data.mode must be resampled or exact, got {self.data.mode!r}")
        if self.task.name:
            need(self.task.name in ("vqa", "vcr", "refcoco"), f"task.name must be vqa, vcr or refcoco, "
                                                               f"got {self.task.name!r}")
            need(bool(self.task.train), "task.train (the task's training shards) is empty")
            need(self.task.vcr_mode in ("q2a", "qa2r"), "task.vcr_mode must be q2a or qa2r")
            need(self.task.batch_size >= 1, "task.batch_size must be >= 1")
        else:
            need(bool(self.data.vl_sources) or bool(self.data.prepare_default),
                 "data.vl_sources is empty (or set data.prepare_default to a folder)")
        need(not self.data.vl_weights or len(self.data.vl_weights) == len(self.data.vl_sources),
             "data.vl_weights needs one weight per data.vl_sources entry")
        need(not self.data.text_weights or len(self.data.text_weights) == len(self.data.text_sources),
             "data.text_weights needs one weight per data.text_sources entry")
        need(self.optimizer.schedule in ("linear", "constant"), "optimizer.schedule must be linear or constant")
        need(self.optimizer.lr > 0, "optimizer.lr must be > 0")
        need(len(self.optimizer.betas) == 2, "optimizer.betas needs two values")
        need(self.checkpoint.keep >= 1, "checkpoint.keep must be >= 1")
        need(self.model.visual_front_end in ("precomputed", "end_to_end"),
             "model.visual_front_end must be precomputed or end_to_end")
        for key, value in (("train.output_dir", self.train.output_dir), ("checkpoint.dir", self.checkpoint.dir),
                           ("data.prepare_default", self.data.prepare_default)):
            need("://" not in value and "::" not in value,
                 f"{key} must be a local or shared-filesystem path (DeepSpeed writes checkpoints as files), "
                 f"got {value!r}; shard sources (data.*_sources, task.train/val) may be any fsspec URL")

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


def _apply(section: Any, values: dict[str, Any], name: str) -> None:
    hints = typing.get_type_hints(type(section))
    known = {f.name for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"config: unknown key {name}.{key}; {name} has {sorted(known)}")
        setattr(section, key, _coerce(value, hints[key], f"{name}.{key}"))


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    config = RunConfig()
    sections = {f.name for f in dataclasses.fields(config)}
    for name, values in (data or {}).items():
        if name not in sections:
            raise ValueError(f"config: unknown section {name!r}; sections are {sorted(sections)}")
        if not isinstance(values, dict):
            raise ValueError(f"config: section {name!r} must be a mapping")
        _apply(getattr(config, name), values, name)
    return config


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


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    data: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else (yaml.safe_load(text) or {})
    for override in overrides:
        section, key, value = parse_override(override)
        data.setdefault(section, {})[key] = value
    config = config_from_dict(data)
    config.validate()
    return config
