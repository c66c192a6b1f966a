"""`VLBatch`: the one structure that crosses from the data plane into the model.

Rows of one batch mix vision-language samples (`has_image`) and text-only samples, as the
official `ResNetVLBERTForPretrainingMultitask` concatenates its caption batch and its "aux" text
batch into one forward pass. Every field is a tensor (or None), so a batch moves to a device with
one call and pickles nowhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class VLBatch:
    """A padded batch of B rows, T text slots and R region slots.

    Text
        input_ids        [B, T] long   WordPiece ids, left-aligned, padded with 0.
        text_mask        [B, T] bool   valid tokens; a prefix of each row, at least one token.
        token_type_ids   [B, T] long   segment A = 0 / B = 1 (RoIs and [END] always get C = 2).
        text_visual_index [B, T] long  RoI whose feature is a token's visual part; None = RoI 0,
                                       the whole image (VCR grounds tagged words on their object).
    Regions (all-False masks on text-only rows)
        has_image        [B] bool      False = text-only sample: no RoIs, shared learned visual vector.
        boxes            [B, R, 4]     (x1, y1, x2, y2) in pixels of the image frame; RoI 0 = whole image.
        region_mask      [B, R] bool   valid RoIs; a prefix of each row.
        image_size       [B, 2]        (width, height) of the frame the boxes live in.
        region_features  [B, R, D]     precomputed appearance features (precomputed front end).
        images           [N, 3, H, W]  pixels of the `has_image` rows in row order, padded at the
                                       bottom/right (end-to-end front end): uint8 RGB (normalised on
                                       the device) or float already normalised (padding 0).
        region_masked    [B, R] bool   RoIs hidden from the model: learned feature (precomputed) or
                                       zeroed pixels (end-to-end), and the mask-[IMG] embedding.
    Targets (optional)
        mlm_labels       [B, T] long   original ids at predicted tokens, -1 elsewhere.
        mrc_select       [B, R] bool   RoIs whose class distribution is predicted.
        mrc_targets      [S, C] float  soft labels of the selected RoIs, in `mrc_select.nonzero()` order.
        sentence_image_labels [B] long 1 = caption matches the image (only with the SIRP head on).
    Compact form (what the loader sends for format-2 shards; `widened` makes the plain form on the
    device, and the models call it first)
        region_feature_scale [B, R] float  `region_features` are int8 or float8 e4m3 codes and a RoI's
                                       feature is code x scale; RoI 0 (the whole image) is then the
                                       mean of the row's visible detector RoIs, computed in `widened`.
        mrc_target_classes [S, k] long `mrc_targets` [S, k] are the probabilities of these classes only.
    """

    input_ids: Tensor
    text_mask: Tensor
    token_type_ids: Tensor
    has_image: Tensor
    boxes: Tensor
    region_mask: Tensor
    image_size: Tensor
    region_features: Tensor | None = None
    images: Tensor | None = None
    region_masked: Tensor | None = None
    text_visual_index: Tensor | None = None
    mlm_labels: Tensor | None = None
    mrc_select: Tensor | None = None
    mrc_targets: Tensor | None = None
    sentence_image_labels: Tensor | None = None
    region_feature_scale: Tensor | None = None
    mrc_target_classes: Tensor | None = None

    def widened(self, num_region_classes: int) -> VLBatch:
        """The plain form of a compact batch: float32 features, dense [S, C] class targets.

        Runs where the batch is (the device), so the host never holds the widened arrays. RoI 0 gets
        the official precomputed whole-image feature, the mean over the boxes left visible; here over
        the boxes in the sequence, so a box cut by the 64-element truncation no longer counts in it
        (format 1 batches, whose RoI 0 the loader computes, count every box of the sample).
        """
        changes: dict[str, Tensor | None] = {}
        if self.region_feature_scale is not None and self.region_features is not None:
            features = self.region_features.float() * self.region_feature_scale[..., None].float()
            if features.shape[1]:
                visible = self.region_mask.bool().clone()
                visible[:, 0] = False
                if self.region_masked is not None:
                    visible &= ~self.region_masked.bool()
                weight = visible.float()[..., None]
                whole = (features * weight).sum(1) / (weight.sum(1) + 1e-5)
                features[:, 0] = torch.where(self.region_mask[:, :1].bool(), whole, features[:, 0])
            changes.update(region_features=features, region_feature_scale=None)
        if self.mrc_target_classes is not None and self.mrc_targets is not None:
            dense = self.mrc_targets.new_zeros(self.mrc_targets.shape[0], num_region_classes, dtype=torch.float32)
            dense.scatter_(1, self.mrc_target_classes.long(), self.mrc_targets.float())
            changes.update(mrc_targets=dense, mrc_target_classes=None)
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def text_only(cls, input_ids: Tensor, text_mask: Tensor | None = None,
                  token_type_ids: Tensor | None = None, mlm_labels: Tensor | None = None) -> VLBatch:
        """A batch of plain text (no image, no RoIs): the text-only pretraining rows, or BERT-style encoding."""
        rows = input_ids.shape[0]
        device = input_ids.device
        return cls(
            input_ids=input_ids,
            text_mask=text_mask.bool() if text_mask is not None else torch.ones_like(input_ids, dtype=torch.bool),
            token_type_ids=token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids),
            has_image=torch.zeros(rows, dtype=torch.bool, device=device),
            boxes=torch.zeros(rows, 0, 4, device=device),
            region_mask=torch.zeros(rows, 0, dtype=torch.bool, device=device),
            image_size=torch.zeros(rows, 2, device=device),
            mlm_labels=mlm_labels,
        )

    def select_rows(self, rows: Tensor) -> VLBatch:
        """The sub-batch of `rows` (sorted indices), trimmed to its own longest text and RoI count."""
        text_len = int(self.text_mask[rows].sum(1).max()) if rows.numel() else 0
        region_len = int(self.region_mask[rows].sum(1).max()) if rows.numel() else 0
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in ("mrc_targets", "mrc_target_classes", "images"):
                continue
            value = value[rows]
            if f.name in ("input_ids", "text_mask", "token_type_ids", "text_visual_index", "mlm_labels"):
                value = value[:, :text_len]
            elif f.name in ("boxes", "region_mask", "region_features", "region_masked", "mrc_select",
                            "region_feature_scale"):
                value = value[:, :region_len]
            out[f.name] = value
        if self.images is not None:
            image_index = torch.cumsum(self.has_image.long(), 0) - 1
            out["images"] = self.images[image_index[rows][self.has_image[rows]]]
        return VLBatch(**out)

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> VLBatch:
        moved = {
            f.name: (v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return VLBatch(**moved)
