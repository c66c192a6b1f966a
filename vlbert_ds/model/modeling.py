"""`VLBertModel` (the encoder) and `VLBertForPretraining` (encoder + MLM/MRC heads and losses)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vlbert_ds.model.config import VLBertConfig
from vlbert_ds.model.embeddings import VLBertEmbeddings
from vlbert_ds.model.encoder import Encoder, Pooler
from vlbert_ds.model.heads import MLMHead, MRCHead, masked_token_loss, soft_cross_entropy
from vlbert_ds.model.inputs import VLBatch
from vlbert_ds.model.loading import (
    CONFIG_NAME,
    WeightLoadReport,
    load_bert_weights,
    load_weights,
    read_bert_folder,
    save_weights,
)
from vlbert_ds.model.validation import validate_batch
from vlbert_ds.model.visual import FastRCNNAppearance, PrecomputedAppearance, RegionFusion

log = logging.getLogger(__name__)


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's init: normal(0, std) for Linear/Embedding weights, zero biases, LayerNorm 1/0."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if isinstance(sub, nn.Linear) and sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


@dataclass
class VLBertOutput:
    sequence_output: Tensor  # [B, L, H] packed elements
    element_mask: Tensor  # [B, L] bool
    text_output: Tensor  # [B, T, H]: token t of row b is element t (valid where text_mask)
    region_output: Tensor  # [B, R, H]: RoI r of row b (valid where region_mask)
    pooled_output: Tensor | None = None


class _Pretrained(nn.Module):
    """`save_pretrained` / `from_pretrained` / `from_bert` shared by our model classes."""

    bert_prefix: ClassVar[str] = ""
    tied_keys: ClassVar[tuple[str, ...]] = ()
    config: VLBertConfig
    # Set by `from_bert`: which parameters came from the checkpoint and which start fresh.
    load_report: WeightLoadReport | None = None

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder / CONFIG_NAME)
        save_weights(self, folder, skip=self.tied_keys)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any):
        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; is it a save_pretrained folder?")
        config = VLBertConfig.load(folder / CONFIG_NAME)
        if overrides:
            config = VLBertConfig.from_dict({**config.to_dict(), **overrides})
        model = cls(config)
        load_weights(model, folder, allowed_missing=cls.tied_keys)
        return model

    @classmethod
    def from_bert(cls, folder: str | Path, **overrides: Any):
        """Initialise the text side from a Hugging Face BERT folder; dims come from its config.json.

        The load report (loaded / fresh / unused names) is logged and kept as `load_report`.
        """
        bert_config, state = read_bert_folder(folder)
        config = VLBertConfig.from_bert_config(bert_config, **overrides)
        model = cls(config)
        model.load_report = load_bert_weights(model, state, cls.bert_prefix, source=str(folder))
        return model


class VLBertModel(_Pretrained):
    """The VL-BERT encoder: visual front end, packed embeddings, BERT layers (reference §1)."""

    def __init__(self, config: VLBertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VLBertEmbeddings(config)
        if config.visual_front_end == "end_to_end":
            self.appearance: nn.Module = FastRCNNAppearance(config)
        else:
            self.appearance = PrecomputedAppearance(config)
        self.region_fusion = RegionFusion(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config) if config.with_pooler else None
        init_bert_weights(self.embeddings, config.initializer_range)
        init_bert_weights(self.encoder, config.initializer_range)
        if self.pooler is not None:
            init_bert_weights(self.pooler, config.initializer_range)
        self.embeddings.reset_vl_parameters()

    def region_vectors(self, batch: VLBatch) -> Tensor:
        """Fused [B, R, H] RoI vectors (zero at padding); only valid RoIs are computed."""
        region_mask = batch.region_mask.bool()
        rows, slots = region_mask.shape
        out_dtype = self.region_fusion.linear.weight.dtype
        vectors = torch.zeros(rows, slots, self.config.hidden_size, device=region_mask.device, dtype=out_dtype)
        if slots == 0 or not bool(region_mask.any()):
            return vectors
        if isinstance(self.appearance, FastRCNNAppearance):
            image_rows = batch.has_image.bool()
            per_image = self.appearance(
                batch.images, batch.boxes[image_rows], region_mask[image_rows],
                None if batch.region_masked is None else batch.region_masked[image_rows].bool(),
                batch.image_size[image_rows],
            )
            appearance = per_image.new_zeros(rows, slots, self.appearance.feature_dim)
            appearance[image_rows] = per_image
        else:
            appearance = self.appearance(
                batch.region_features, None if batch.region_masked is None else batch.region_masked.bool()
            )
        image_size = batch.image_size[:, None, :].expand(-1, slots, -1)
        fused = self.region_fusion(appearance[region_mask], batch.boxes[region_mask], image_size[region_mask])
        return vectors.masked_scatter(region_mask[..., None], fused.to(out_dtype))

    def forward(self, batch: VLBatch, append_end: bool = True) -> VLBertOutput:
        batch = batch.widened(self.config.num_region_classes)  # compact loader batches (format 2)
        validate_batch(batch, self.config, append_end)
        has_image = batch.has_image.bool()
        if self.config.bucket_by_modality and bool(has_image.any()) and not bool(has_image.all()):
            return self._forward_buckets(batch, has_image, append_end)
        return self._forward_rows(batch, append_end)

    def _forward_buckets(self, batch: VLBatch, has_image: Tensor, append_end: bool) -> VLBertOutput:
        """Run vision-language rows and text-only rows as two packed batches.

        Rows never attend to each other, so this equals one padded pass; it only stops short caption
        rows (~20 elements) from being padded to the 65 of the text segments (~1/3 less compute at
        the paper's 1:1 mix).
        """
        rows_b = batch.input_ids.shape[0]
        parts = [(rows, self._forward_rows(batch.select_rows(rows), append_end))
                 for rows in (has_image.nonzero().flatten(), (~has_image).nonzero().flatten())]
        hidden = parts[0][1].sequence_output.shape[-1]
        like = parts[0][1].sequence_output
        length = max(p.sequence_output.shape[1] for _, p in parts)
        sequence = like.new_zeros(rows_b, length, hidden)
        element_mask = torch.zeros(rows_b, length, dtype=torch.bool, device=like.device)
        text_output = like.new_zeros(rows_b, batch.input_ids.shape[1], hidden)
        region_output = like.new_zeros(rows_b, batch.region_mask.shape[1], hidden)
        pooled = like.new_zeros(rows_b, hidden) if self.pooler is not None else None
        for rows, part in parts:
            sequence = sequence.index_copy(0, rows, nn.functional.pad(
                part.sequence_output, (0, 0, 0, length - part.sequence_output.shape[1])))
            element_mask[rows, : part.element_mask.shape[1]] = part.element_mask
            text_output = text_output.index_copy(0, rows, nn.functional.pad(
                part.text_output, (0, 0, 0, text_output.shape[1] - part.text_output.shape[1])))
            region_output = region_output.index_copy(0, rows, nn.functional.pad(
                part.region_output, (0, 0, 0, region_output.shape[1] - part.region_output.shape[1])))
            if pooled is not None:
                pooled = pooled.index_copy(0, rows, part.pooled_output)
        return VLBertOutput(sequence, element_mask, text_output, region_output, pooled)

    def _forward_rows(self, batch: VLBatch, append_end: bool) -> VLBertOutput:
        region_mask = batch.region_mask.bool()
        embeddings, layout = self.embeddings(
            input_ids=batch.input_ids,
            text_mask=batch.text_mask.bool(),
            token_type_ids=batch.token_type_ids,
            has_image=batch.has_image.bool(),
            region_vectors=self.region_vectors(batch),
            region_mask=region_mask,
            region_masked=None if batch.region_masked is None else batch.region_masked.bool(),
            text_visual_index=batch.text_visual_index,
            append_end=append_end,
        )
        sequence = self.encoder(embeddings, layout.element_mask)
        text_slots = batch.input_ids.shape[1]
        text_output = sequence[:, :text_slots]
        if text_output.shape[1] < text_slots:  # rows shorter than T overall: pad back to [B, T, H]
            text_output = nn.functional.pad(text_output, (0, 0, 0, text_slots - text_output.shape[1]))
        positions = layout.region_positions.clamp(max=sequence.shape[1] - 1)
        region_output = torch.gather(sequence, 1, positions[..., None].expand(-1, -1, sequence.shape[-1]))
        return VLBertOutput(
            sequence_output=sequence,
            element_mask=layout.element_mask,
            text_output=text_output,
            region_output=region_output,
            pooled_output=self.pooler(sequence) if self.pooler is not None else None,
        )


@dataclass
class PretrainingOutput:
    loss: Tensor
    losses: dict[str, Tensor]  # mlm_vl, mlm_text, mrc (and sirp when on), each a scalar
    metrics: dict[str, Tensor] = field(default_factory=dict)  # accuracies and counts, detached

    def weighted_metrics(self) -> dict[str, tuple[Tensor, Tensor]]:
        """name -> (mean, weight): each `X_acc` weighted by its `X_count` (1 when it has none)."""
        one = torch.ones(())
        return {name: (value, self.metrics.get(name[: -len("_acc")] + "_count", one))
                for name, value in self.metrics.items() if name.endswith("_acc")}


class VLBertForPretraining(_Pretrained):
    """VL-BERT pretraining: MLM with visual clues, MLM on text-only rows, masked RoI classification.

    total loss = mlm_vl + mlm_text + mrc (all weight 1, as the official multitask module); each
    MLM loss is averaged over its own predicted tokens (`MLM_LOSS_NORM_IN_BATCH_FIRST: false`).
    """

    bert_prefix = "vlbert."
    tied_keys = ("mlm_head.decoder.weight",)

    def __init__(self, config: VLBertConfig) -> None:
        super().__init__()
        self.config = config
        self.vlbert = VLBertModel(config)
        self.mlm_head = MLMHead(config, self.vlbert.embeddings.word_embeddings)
        self.mrc_head = MRCHead(config)
        self.sentence_image_head = nn.Linear(config.hidden_size, 2) if config.with_sentence_image_head else None
        for head in (self.mlm_head.transform, self.mrc_head, self.sentence_image_head):
            if head is not None:
                init_bert_weights(head, config.initializer_range)

    def forward(self, batch: VLBatch) -> PretrainingOutput:
        batch = batch.widened(self.config.num_region_classes)
        out = self.vlbert(batch)
        has_image = batch.has_image.bool()
        losses: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {}

        if batch.mlm_labels is not None:
            predicted = (batch.mlm_labels >= 0) & batch.text_mask.bool()
            logits = self.mlm_head(out.text_output[predicted])
            labels = batch.mlm_labels[predicted]
            row_has_image = has_image[:, None].expand_as(predicted)[predicted]
            for name, rows in (("mlm_vl", row_has_image), ("mlm_text", ~row_has_image)):
                losses[name], metrics[f"{name}_acc"] = masked_token_loss(logits[rows], labels[rows])
                metrics[f"{name}_count"] = rows.sum()

        if batch.mrc_select is not None and batch.mrc_targets is not None:
            logits = self.mrc_head(out.region_output[batch.mrc_select.bool()])
            losses["mrc"], valid = soft_cross_entropy(logits, batch.mrc_targets)
            correct = (logits.argmax(-1) == batch.mrc_targets.argmax(-1)) & valid
            metrics["mrc_acc"] = correct.sum() / valid.sum().clamp(min=1)
            metrics["mrc_count"] = valid.sum()

        if self.sentence_image_head is not None and batch.sentence_image_labels is not None:
            logits = self.sentence_image_head(out.pooled_output[has_image])
            losses["sirp"], metrics["sirp_acc"] = masked_token_loss(logits, batch.sentence_image_labels[has_image])

        if not losses:
            raise ValueError("VLBatch has no targets: give mlm_labels and/or mrc_select + mrc_targets")
        total = torch.stack([v.float() for v in losses.values()]).sum()
        return PretrainingOutput(loss=total, losses=losses,
                                 metrics={k: v.detach().float() for k, v in metrics.items()})
