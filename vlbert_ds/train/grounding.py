"""Does the model use the image? MLM accuracy on words only the image can determine, with and without it.

On the held-out scenes of the embedded default, every colour, shape and spatial-relation word of a
caption is masked (all its WordPieces), nothing else. The same model then predicts them twice: with
the image (RoI 0 + boxes, nothing hidden) and with the image withheld: every RoI, the whole-image
RoI 0 included, hidden exactly as masked RoIs are in pretraining (learned feature / zeroed pixels,
mask-[IMG]), so the input stays in the distribution the model was trained on and only the
appearance is gone. A model that learned visual grounding is clearly more accurate with the image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from vlbert_ds.data import storage
from vlbert_ds.data.boxes import with_image_roi
from vlbert_ds.data.examples import TokenizerTools, VLExample, collate, decode_image
from vlbert_ds.data.masking import IGNORE
from vlbert_ds.data.schema import SampleError, decode_vl
from vlbert_ds.data.streams import ReadSettings, ShardPiece, SkipCounter, read_piece
from vlbert_ds.model.inputs import VLBatch


@dataclass
class GroundingSet:
    with_image: list[VLBatch]
    withheld: list[VLBatch]
    targets: int


def build_grounding_set(spec: str, grounded_words: frozenset[str], tokenizer: str, visual_front_end: str,
                        num_region_classes: int, max_samples: int = 200, batch_size: int = 32) -> GroundingSet:
    """Captions of `spec` with every word of `grounded_words` masked (the words the image decides)."""
    tools = TokenizerTools(tokenizer)
    backend = tools.tokenizer.backend_tokenizer
    vl_rows: list[VLExample] = []
    skipped = SkipCounter()
    for url in storage.expand_urls(spec):
        for sample in read_piece(ShardPiece(url, -1), ReadSettings(), skipped):
            if len(vl_rows) >= max_samples:
                break
            try:
                record = decode_vl(sample, need_features=visual_front_end == "precomputed",
                                   need_image=visual_front_end == "end_to_end")
            except SampleError:
                continue
            words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(
                record.caption))]
            encoding = tools.tokenizer(words, is_split_into_words=True, add_special_tokens=False)
            ids = np.asarray(encoding["input_ids"], dtype=np.int64)
            grounded = np.array([words[w] in grounded_words for w in encoding.word_ids()], dtype=bool)
            if not grounded.any():
                continue
            masked = np.where(grounded, tools.mask_id, ids)
            text = np.concatenate(([tools.cls_id], masked, [tools.sep_id]))
            labels = np.concatenate(([IGNORE], np.where(grounded, ids, IGNORE), [IGNORE]))
            width, height = float(record.image_width), float(record.image_height)
            boxes = with_image_roi(record.boxes, width, height)
            count = boxes.shape[0]
            features = whole = image = None
            if visual_front_end == "precomputed":
                features = record.features
                if record.feature_scale is None:  # compact codes: the model widens them and takes the mean
                    whole = record.features.astype(np.float32).mean(0)
            else:
                image = decode_image(record.jpeg, record.image_width, record.image_height, 40_000_000)
            vl_rows.append(VLExample(key=record.key, input_ids=text, mlm_labels=labels, boxes=boxes,
                                     image_size=(width, height), region_hidden=np.zeros(count, dtype=bool),
                                     region_selected=np.zeros(count, dtype=bool),
                                     region_targets=np.zeros((0, num_region_classes), dtype=np.float32),
                                     features=features, whole_image_feature=whole, image=image,
                                     feature_scale=record.feature_scale, feature_dtype=record.feature_dtype))
        if len(vl_rows) >= max_samples:
            break
    if not vl_rows:
        listed = ", ".join(sorted(grounded_words)[:8])
        raise ValueError(f"no caption of {spec} has a word of the grounding list ({listed}, ...)")
    with_image = [collate(vl_rows[i : i + batch_size], []) for i in range(0, len(vl_rows), batch_size)]
    withheld = []
    for batch in with_image:
        hidden = dataclasses.replace(batch, region_masked=batch.region_mask.clone())
        withheld.append(hidden)
    targets = int(sum((r.mlm_labels >= 0).sum() for r in vl_rows))
    return GroundingSet(with_image, withheld, targets)


@torch.no_grad()
def evaluate_grounding(model, grounding: GroundingSet, device: torch.device) -> dict[str, float]:
    """`model` is a VLBertForPretraining (or a DeepSpeed engine's module)."""
    was_training = model.training
    model.eval()
    results = {}
    for name, batches in (("with_image", grounding.with_image), ("image_withheld", grounding.withheld)):
        correct = total = 0
        for batch in batches:
            batch = batch.to(device)
            hidden = model.vlbert(batch).text_output
            predicted = batch.mlm_labels >= 0
            logits = model.mlm_head(hidden[predicted])
            correct += int((logits.argmax(-1) == batch.mlm_labels[predicted]).sum())
            total += int(predicted.sum())
        results[f"grounded_mlm_acc_{name}"] = correct / max(1, total)
    results["grounded_targets"] = float(grounding.targets)
    model.train(was_training)
    return results
