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

Not mapped (listed as unused in the report): the end-to-end ResNet-101 backbone and res5 head of the
`e2e` checkpoints (`image_feature_extractor.backbone.*`, `.head.*`), whose layout differs from
torchvision's; load them with a torchvision ResNet state-dict conversion of your own if needed.
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
)]
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
    """Copy an official VL-BERT pretraining state dict into a `VLBertForPretraining`; report what moved."""
    ours = dict(model.named_parameters())
    report = WeightLoadReport(source=source)
    for key, value in state.items():
        if _TIED.match(key.removeprefix("module.")):
            continue  # the decoder is the word embedding table
        name = official_name(key)
        if name is None or name not in ours:
            report.unused.append(key)
            continue
        param = ours[name]
        if value.dim() == param.dim() + 1 and value.shape[0] == 1:
            value = value[0]  # nn.Embedding(1, H) vectors -> our [H] parameters
        if value.shape != param.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, our {name} has {tuple(param.shape)}; "
                             "build the model with the checkpoint's config (preset base/large, num_region_classes)")
        with torch.no_grad():
            param.copy_(value)
        report.loaded.append(name)
    loaded = set(report.loaded)
    report.fresh = [n for n in ours if n not in loaded]
    return report


def load_official_checkpoint(model: nn.Module, path: str | Path) -> WeightLoadReport:
    """Read a released `.model` file safely (weights_only) and load it with `load_official_state`."""
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict with a 'state_dict' of tensors")
    return load_official_state(model, state, str(path))
