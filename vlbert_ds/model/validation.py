"""Input checks: a clear `ValueError` naming the field and the limit, never a silent broadcast.

Shape checks are free and always run. Value checks (boxes inside the image, prefix masks, id
ranges) read tensors back from the device, so they can be turned off with
`VLBertConfig.check_inputs=False` once a data pipeline is trusted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlbert_ds.model.config import VLBertConfig
from vlbert_ds.model.inputs import VLBatch

# Detector boxes may touch the far edge (x2 == W); allow that plus rounding.
_BOX_TOLERANCE = 1e-3


def _fail(field: str, message: str) -> None:
    raise ValueError(f"VLBatch.{field}: {message}")


def _shape(field: str, tensor: Tensor | None, expected: tuple[int | None, ...]) -> None:
    if tensor is None:
        return
    actual = tuple(tensor.shape)
    if len(actual) != len(expected) or any(e is not None and a != e for a, e in zip(actual, expected, strict=False)):
        shown = tuple("*" if e is None else e for e in expected)
        _fail(field, f"expected shape {shown}, got {actual}")


def _is_prefix(mask: Tensor) -> bool:
    """True when every row is True...True False...False."""
    if mask.shape[-1] <= 1:
        return True
    return not bool((mask[..., 1:] & ~mask[..., :-1]).any())


def validate_batch(batch: VLBatch, config: VLBertConfig, append_end: bool = True) -> None:
    rows, text_slots = batch.input_ids.shape if batch.input_ids.dim() == 2 else (None, None)
    if rows is None:
        _fail("input_ids", f"expected 2 dims [B, T], got shape {tuple(batch.input_ids.shape)}")
    region_slots = batch.region_mask.shape[1] if batch.region_mask.dim() == 2 else None
    _shape("text_mask", batch.text_mask, (rows, text_slots))
    _shape("token_type_ids", batch.token_type_ids, (rows, text_slots))
    _shape("text_visual_index", batch.text_visual_index, (rows, text_slots))
    _shape("mlm_labels", batch.mlm_labels, (rows, text_slots))
    _shape("has_image", batch.has_image, (rows,))
    _shape("region_mask", batch.region_mask, (rows, None))
    _shape("boxes", batch.boxes, (rows, region_slots, 4))
    _shape("image_size", batch.image_size, (rows, 2))
    _shape("region_masked", batch.region_masked, (rows, region_slots))
    _shape("mrc_select", batch.mrc_select, (rows, region_slots))

    if region_slots > config.max_regions:
        _fail("region_mask", f"{region_slots} region slots, more than max_regions={config.max_regions}")
    if text_slots + 2 > config.max_position_embeddings:
        _fail("input_ids", f"{text_slots} text slots; text + RoIs + [END] need positions up to T+1, "
                           f"so T must be <= max_position_embeddings - 2 = {config.max_position_embeddings - 2}")

    if config.visual_front_end == "precomputed":
        if batch.region_features is None and region_slots > 0 and bool(batch.region_mask.any()):
            _fail("region_features", "required by the precomputed visual front end")
        _shape("region_features", batch.region_features, (rows, region_slots, config.precomputed_feature_dim))
    else:
        images_needed = int(batch.has_image.sum())
        if images_needed and batch.images is None:
            _fail("images", "required by the end_to_end visual front end")
        _shape("images", batch.images, (images_needed, 3, None, None))

    if batch.mrc_targets is not None:
        if batch.mrc_select is None:
            _fail("mrc_select", "required when mrc_targets is given")
        _shape("mrc_targets", batch.mrc_targets, (None, config.num_region_classes))

    if not config.check_inputs:
        return
    _validate_values(batch, config, region_slots)


def _validate_values(batch: VLBatch, config: VLBertConfig, region_slots: int) -> None:
    text_mask, region_mask, has_image = batch.text_mask.bool(), batch.region_mask.bool(), batch.has_image.bool()
    if not _is_prefix(text_mask):
        _fail("text_mask", "each row must be a prefix (valid tokens first, then padding)")
    empty = (~text_mask.any(1)).nonzero().flatten()
    if empty.numel():
        _fail("text_mask", f"row {int(empty[0])} has empty text (at least 1 token is needed)")
    ids = batch.input_ids[text_mask]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size):
        _fail("input_ids", f"ids must lie in [0, vocab_size={config.vocab_size}), "
                           f"got [{int(ids.min())}, {int(ids.max())}]")
    types = batch.token_type_ids[text_mask]
    if types.numel() and (int(types.min()) < 0 or int(types.max()) > 1):
        _fail("token_type_ids", "text segments must be 0 (A) or 1 (B); C = 2 is reserved for RoIs and [END]")

    if region_slots == 0:
        if bool(has_image.any()):
            _fail("region_mask", "rows with has_image need at least RoI 0 (the whole image)")
        return
    if not _is_prefix(region_mask):
        _fail("region_mask", "each row must be a prefix (valid RoIs first, then padding)")
    if bool((region_mask.any(1) & ~has_image).any()):
        _fail("region_mask", "text-only rows (has_image False) must have no RoIs")
    if bool((~region_mask[:, 0] & has_image).any()):
        _fail("region_mask", "rows with has_image need at least RoI 0 (the whole image)")

    boxes = batch.boxes[region_mask].float()
    if boxes.numel():
        if not bool(torch.isfinite(boxes).all()):
            _fail("boxes", "contains NaN or infinite coordinates")
        size = batch.image_size.float()[:, None, :].expand(-1, region_slots, -1)[region_mask]
        if bool((size <= 0).any()):
            _fail("image_size", "width and height of rows with RoIs must be > 0")
        if bool((boxes[:, 2] < boxes[:, 0]).any() | (boxes[:, 3] < boxes[:, 1]).any()):
            _fail("boxes", "need x2 >= x1 and y2 >= y1")
        low = boxes[:, :2].min()
        over = (boxes[:, 2:] - size).max()
        if float(low) < -_BOX_TOLERANCE or float(over) > _BOX_TOLERANCE:
            _fail("boxes", f"boxes must lie inside the image [0, W] x [0, H]; found a coordinate "
                           f"{float(low):.2f} below 0 or {float(over):.2f} pixels past the edge")
    if batch.images is not None:
        height, width = batch.images.shape[-2:]
        frame = batch.image_size.float()[has_image]
        if frame.numel() and (float(frame[:, 0].max()) > width + _BOX_TOLERANCE
                              or float(frame[:, 1].max()) > height + _BOX_TOLERANCE):
            _fail("image_size", f"larger than the images tensor ({width} x {height})")
    if batch.region_features is not None:
        features = batch.region_features[region_mask]
        if not bool(torch.isfinite(features).all()):
            _fail("region_features", "contains NaN or infinite values")
    if batch.text_visual_index is not None:
        index = batch.text_visual_index
        limit = region_mask.sum(1, keepdim=True).expand_as(index)
        bad = text_mask & has_image[:, None] & ((index < 0) | (index >= limit))
        if bool(bad.any()):
            _fail("text_visual_index", "must point at a valid RoI of its row (0 <= index < RoI count)")
    if batch.mrc_select is not None and batch.mrc_targets is not None:
        selected = int(batch.mrc_select.sum())
        if selected != batch.mrc_targets.shape[0]:
            _fail("mrc_targets", f"has {batch.mrc_targets.shape[0]} rows but mrc_select selects {selected} RoIs")
        if bool((batch.mrc_select & ~region_mask).any()):
            _fail("mrc_select", "selects a RoI outside region_mask")
