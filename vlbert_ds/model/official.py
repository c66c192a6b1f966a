"""Load the released VL-BERT checkpoints (`vl-bert-{base,large}-{prec,e2e}.model`) into our model.

The files are torch pickles holding `{"state_dict": ...}` with the official module names (reference
§6), saved through DataParallel (`module.` prefix). They are read with `torch.load(weights_only=True)`,
which refuses anything but tensors and plain containers. Name mapping (official -> ours):

    vlbert.word/position/token_type_embeddings  -> vlbert.embeddings.*
    vlbert.end_embedding.weight [1, H]          -> vlbert.embeddings.end_embedding [H]
    vlbert.embedding_LayerNorm                  -> vlbert.embeddings.LayerNorm
    vlbert.visual_ln_text / visual_ln_object    -> vlbert.embeddings.visual_ln_text / visual_ln_object
    vlbert.encoder.* / vlbert.pooler.*          -> vlbert.encoder.* / vlbert.pooler.* (BERT names)
    object_linguistic_embeddings [1, H]         -> vlbert.embeddings.image_token_embedding (the [IMG] vector)
    object_mask_word_embedding [1, H]           -> vlbert.embeddings.masked_image_token_embedding
    aux_text_visual_embedding [1, H]            -> vlbert.embeddings.text_only_visual_embedding
    object_mask_visual_embedding [1, 2048]      -> vlbert.appearance.masked_region_feature
    image_feature_extractor.obj_downsample.1    -> vlbert.region_fusion.linear (geometry+appearance -> H)
    vlbert.mlm_head.predictions.transform/bias  -> mlm_head.transform / mlm_head.bias (decoder: tied)
    vlbert.mvrc_head.transform / region_cls_pred -> mrc_head.transform / mrc_head.classifier
    vlbert.relationsip_head.caption_image_relationship -> sentence_image_head (sic, the official spelling)

The end-to-end (`e2e`) checkpoints add the official `FastRCNN` ResNet (`common/fast_rcnn.py`, a
torchvision-named ResNet with every BatchNorm an `nn.BatchNorm2d`):

    image_feature_extractor.backbone.conv1 / bn1           -> vlbert.appearance.stem.0 / stem.1
    image_feature_extractor.backbone.layer1 / 2 / 3         -> vlbert.appearance.res2 / res3 / res4
    image_feature_extractor.roi_head_feature_extractor.*    -> vlbert.appearance.res5.*
    image_feature_extractor.head.0.*                        -> the same res5 (the official `head` Sequential
                                                               holds that module again; both copies must agree)

BatchNorm statistics (`running_mean`, `running_var`) load into our frozen-BN buffers; the
`num_batches_tracked` counters are dropped (frozen statistics never count batches).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from vlbert_ds.model.loading import WeightLoadReport

_RULES: list[tuple[re.Pattern[str], str]] = [(re.compile(p), r) for p, r in (
    (r"^vlbert\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight$", r"vlbert.embeddings.\1.weight"),
    (r"^vlbert\.end_embedding\.weight$", "vlbert.embeddings.end_embedding"),
    (r"^vlbert\.embedding_LayerNorm\.(weight|bias)$", r"vlbert.embeddings.LayerNorm.\1"),
    (r"^vlbert\.visual_ln_(text|object)\.(weight|bias)$", r"vlbert.embeddings.visual_ln_\1.\2"),
    (r"^vlbert\.encoder\.(.+)$", r"vlbert.encoder.\1"),
    (r"^vlbert\.pooler\.(.+)$", r"vlbert.pooler.\1"),
    (r"^object_linguistic_embeddings\.weight$", "vlbert.embeddings.image_token_embedding"),
    (r"^object_mask_word_embedding\.weight$", "vlbert.embeddings.masked_image_token_embedding"),
    (r"^aux_text_visual_embedding\.weight$", "vlbert.embeddings.text_only_visual_embedding"),
    (r"^object_mask_visual_embedding\.weight$", "vlbert.appearance.masked_region_feature"),
    (r"^image_feature_extractor\.obj_downsample\.1\.(weight|bias)$", r"vlbert.region_fusion.linear.\1"),
    (r"^vlbert\.mlm_head\.predictions\.transform\.(.+)$", r"mlm_head.transform.\1"),
    (r"^vlbert\.mlm_head\.predictions\.bias$", "mlm_head.bias"),
    (r"^vlbert\.mvrc_head\.transform\.(.+)$", r"mrc_head.transform.\1"),
    (r"^vlbert\.mvrc_head\.region_cls_pred\.(weight|bias)$", r"mrc_head.classifier.\1"),
    (r"^vlbert\.relationsip_head\.caption_image_relationship\.(weight|bias)$", r"sentence_image_head.\1"),
    # e2e: the official FastRCNN ResNet
    (r"^image_feature_extractor\.backbone\.conv1\.weight$", "vlbert.appearance.stem.0.weight"),
    (r"^image_feature_extractor\.backbone\.bn1\.(.+)$", r"vlbert.appearance.stem.1.\1"),
    (r"^image_feature_extractor\.backbone\.layer1\.(.+)$", r"vlbert.appearance.res2.\1"),
    (r"^image_feature_extractor\.backbone\.layer2\.(.+)$", r"vlbert.appearance.res3.\1"),
    (r"^image_feature_extractor\.backbone\.layer3\.(.+)$", r"vlbert.appearance.res4.\1"),
    (r"^image_feature_extractor\.(?:roi_head_feature_extractor|head\.0)\.(.+)$", r"vlbert.appearance.res5.\1"),
)]
_COUNTER = re.compile(r"\.num_batches_tracked$")
_TIED = re.compile(r"^vlbert\.mlm_head\.predictions\.decoder\.weight$")


def official_name(key: str) -> str | None:
    """Our parameter name for an official state-dict key (None when it has no counterpart)."""
    key = key.removeprefix("module.")
    key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))  # old BertLayerNorm names
    for pattern, replacement in _RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return None


def load_official_state(model: nn.Module, state: dict[str, Tensor], source: str = "official") -> WeightLoadReport:
    """Copy an official VL-BERT state dict (prec or e2e) into a `VLBertForPretraining`; report what moved."""
    kept = set(model.state_dict())
    ours = {name: t for name, t in (*model.named_parameters(), *model.named_buffers()) if name in kept}
    report = WeightLoadReport(source=source)
    loaded: dict[str, str] = {}  # our name -> the official key it came from
    for key, value in state.items():
        if _TIED.match(key.removeprefix("module.")):
            continue  # the decoder is the word embedding table
        name = official_name(key)
        if name is not None and _COUNTER.search(key) and name.removesuffix(".num_batches_tracked") + ".running_mean" \
                in ours:
            continue  # a BatchNorm step counter: our BatchNorms are frozen
        if name is None or name not in ours:
            report.unused.append(key)
            continue
        target = ours[name]
        if value.dim() == target.dim() + 1 and value.shape[0] == 1:
            value = value[0]  # nn.Embedding(1, H) vectors -> our [H] parameters
        if value.shape != target.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, our {name} has {tuple(target.shape)}; "
                             "build the model with the checkpoint's config (preset base/large, num_region_classes, "
                             "backbone)")
        if name in loaded:  # the e2e res5 is stored twice (roi_head_feature_extractor and head.0)
            if not torch.equal(target, value.to(target.dtype)):
                raise ValueError(f"{source}: {key} differs from {loaded[name]}, which loads into the same {name}")
            continue
        with torch.no_grad():
            target.copy_(value)
        loaded[name] = key
    report.loaded = list(loaded)
    report.fresh = [n for n in ours if n not in loaded]
    return report


def load_official_checkpoint(model: nn.Module, path: str | Path) -> WeightLoadReport:
    """Read a released `.model` file safely (weights_only) and load it with `load_official_state`."""
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict with a 'state_dict' of tensors")
    return load_official_state(model, state, str(path))
