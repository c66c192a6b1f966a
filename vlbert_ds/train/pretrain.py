"""The pretraining recipe: VL-BERT on interleaved vision-language and text-only batches.

Every micro-batch holds vision-language rows (MLM with visual clues + masked RoI classification)
and text-only rows (MLM); the loop is `trainer.Trainer`. The command line (`vlbert-pretrain`) is
`vlbert_ds.cli.pretrain`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vlbert_ds.bundled import default_bert
from vlbert_ds.train.config import PretrainConfig, redact_urls
from vlbert_ds.train.distributed import DistEnv
from vlbert_ds.train.metrics import StepAccumulator
from vlbert_ds.train.trainer import RunResult, Trainer


def _tokenizer(name: str) -> str:
    return default_bert() if name == "default" else name


def loader_config(config: PretrainConfig):
    from vlbert_ds.data import ExampleConfig, LoaderConfig, SourceSpec
    from vlbert_ds.model import VLBertConfig

    def sources(specs: list[str], weights: list[float]) -> list[SourceSpec]:
        return [SourceSpec(s, weights[i] if weights else 1.0) for i, s in enumerate(specs)]

    data = config.data
    return LoaderConfig(
        vl_sources=sources(data.vl_sources, data.vl_weights),
        text_sources=sources(data.text_sources, data.text_weights),
        tokenizer=_tokenizer(data.tokenizer), mode=data.mode,
        vl_per_batch=data.vl_per_batch, text_per_batch=data.text_per_batch,
        samples_per_epoch=data.samples_per_epoch or None, num_workers=data.num_workers, seed=config.train.seed,
        shuffle_buffer=data.shuffle_buffer, readers=data.readers,
        cache_dir=data.cache_dir or None, cache_size_gb=data.cache_size_gb,
        reset_position=data.reset_position or config.checkpoint.force_resume,  # forced: data restarts
        example=ExampleConfig(max_elements=data.max_elements, text_segment_len=data.text_segment_len,
                              num_region_classes=config.model.num_region_classes,
                              visual_front_end=config.model.visual_front_end,
                              feature_dim=int(config.model.overrides.get(
                                  "precomputed_feature_dim", VLBertConfig.precomputed_feature_dim))))


class _Given:
    """Batches given by the caller (tests, benchmarks): no position of their own to save."""

    def __init__(self, batches) -> None:
        self.batches = batches

    def __next__(self) -> Any:
        return next(self.batches)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class PretrainRecipe:
    desc: ClassVar[str] = "pretrain"
    export_name: ClassVar[str] = "pretrained"
    headline: ClassVar[tuple[str, ...]] = ("loss", "mlm_vl_acc", "lr")
    throughput: ClassVar[dict[str, str]] = {"samples": "samples_per_s", "tokens": "tokens_per_s"}

    def __init__(self, config: PretrainConfig, batches=None, grounding_words: frozenset[str] = frozenset()) -> None:
        self.config, self.batches, self.grounding_words = config, batches, grounding_words
        self.eval_every = config.grounding.every
        self.grounding = None
        self.keys_log = None

    def prepare(self, dist: DistEnv) -> None:
        from vlbert_ds.train.grounding import build_grounding_set

        if self.batches is not None:
            return
        from vlbert_ds.data import PretrainStream

        # Sources exist and their first samples are usable, before the model is built.
        PretrainStream(loader_config(self.config), dist.rank, dist.world_size)
        spec = self.config.grounding.data
        if spec and self.grounding_words and dist.is_main:
            self.grounding = build_grounding_set(spec, self.grounding_words, _tokenizer(self.config.data.tokenizer),
                                                 self.config.model.visual_front_end,
                                                 self.config.model.num_region_classes, self.config.grounding.samples)

    def build_model(self) -> nn.Module:
        from vlbert_ds.model import VLBertConfig, VLBertForPretraining

        model = self.config.model
        overrides = dict(model.overrides, visual_front_end=model.visual_front_end,
                         num_region_classes=model.num_region_classes)
        if model.init_from:
            return VLBertForPretraining.from_pretrained(model.init_from, **overrides)
        if model.bert:  # (a preset with a BERT is refused at load: the BERT's shape is the model's)
            return VLBertForPretraining.from_bert(_tokenizer(model.bert), **overrides)
        return VLBertForPretraining(VLBertConfig.preset(model.preset, **overrides))

    def micro_batch_size(self) -> int:
        return self.config.data.vl_per_batch + self.config.data.text_per_batch

    def open_data(self, dist: DistEnv, layout, grad_accum: int):
        if self.batches is not None:
            return _Given(self.batches)
        from vlbert_ds.data import pretrain_loader

        if self.config.data.log_keys:
            folder = Path(self.config.train.output_dir) / "data_keys"
            folder.mkdir(parents=True, exist_ok=True)
            self.keys_log = (folder / f"rank{dist.rank}.jsonl").open("a")  # flushed per line
        return pretrain_loader(loader_config(self.config), dist.rank, dist.world_size, grad_accum=grad_accum,
                               layout=layout, check_sources=False)  # checked once, before the model was built

    def model_input(self, item: Any) -> Any:
        return getattr(item, "batch", item)

    def count(self, item: Any, batch: Any, step: StepAccumulator) -> None:
        if self.keys_log is not None and hasattr(item, "keys"):
            self.keys_log.write(json.dumps({"epoch": item.epoch, "item": item.item, "reader": item.reader,
                                            "padding": item.padding, "keys": item.keys}) + "\n")
            self.keys_log.flush()
        rows = batch.batch_size
        step.count("samples", rows)
        step.count("tokens", float(batch.text_mask.sum() + batch.region_mask.sum() + rows))
        for reason, count in getattr(item, "skipped", {}).items():
            step.count(f"skipped/{reason}", count)
        if getattr(item, "padding", False):
            step.count("padding_batches")

    def evaluate(self, model: nn.Module, device: torch.device, step: int, final: bool) -> dict[str, float]:
        from vlbert_ds.train.grounding import evaluate_grounding

        return evaluate_grounding(model, self.grounding, device) if self.grounding is not None else {}

    def write_outputs(self, trainer: Trainer, final: dict[str, float]) -> None:
        plot = trainer.output / "loss_curve.png"
        save_loss_plot(trainer.state.history, plot)
        trainer.tracker.log_artifact(plot, "plots")


def run(config: PretrainConfig, dist: DistEnv, batches=None,
        grounding_words: frozenset[str] = frozenset()) -> RunResult:
    """Pretrain. `batches`, if given, replaces the shard loader: an iterator of VLBatch for this rank;
    `grounding_words`: the caption words the grounding check masks (none: no check)."""
    return Trainer(PretrainRecipe(config, batches, grounding_words), dist).train()


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


def print_summary(result: RunResult) -> None:
    m = result.final_metrics
    lines = ["", "=" * 72, f"finished at step {result.state.step} (data position {result.state.data})"]
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
