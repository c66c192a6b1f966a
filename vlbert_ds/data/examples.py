"""From decoded records to model-ready examples, and from examples to one `VLBatch`.

A vision-language example is `[CLS] caption [SEP]` + RoI 0 (the whole image) + detector boxes, masked
and truncated as the official `ConceptualCaptionsDataset`; a text example is one corpus segment of
at most 64 WordPiece ids (the model appends [END]).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlbert_ds.data.boxes import with_image_roi
from vlbert_ds.data.masking import IGNORE, MaskingConfig, mask_regions, mask_words, truncation_lengths
from vlbert_ds.data.schema import SampleError, TextRecord, VLRecord, dequantize_features
from vlbert_ds.model.inputs import VLBatch


class TokenizerTools:
    """What masking needs from a BERT WordPiece tokenizer, precomputed once per worker."""

    def __init__(self, folder: str | Path) -> None:
        from transformers import BertTokenizerFast

        self.tokenizer = BertTokenizerFast.from_pretrained(str(folder))
        # The Rust tokenizer without the truncation / padding a tokenizer.json may carry (MiniLM's:
        # 128), which the Python wrapper turns off per call.
        self.backend = copy.deepcopy(self.tokenizer.backend_tokenizer)
        self.backend.no_truncation()
        self.backend.no_padding()
        vocab = self.tokenizer.get_vocab()
        self.vocab_size = len(vocab)
        if self.vocab_size < 100:
            raise ValueError(f"tokenizer at {folder} has only {self.vocab_size} tokens")
        self.cls_id = self.tokenizer.cls_token_id
        self.sep_id = self.tokenizer.sep_token_id
        self.mask_id = self.tokenizer.mask_token_id
        self.continuation = np.zeros(max(vocab.values()) + 1, dtype=bool)
        for token, index in vocab.items():
            if token.startswith("##"):
                self.continuation[index] = True
        special = set(self.tokenizer.all_special_ids)
        self.replacement_ids = np.array(
            sorted(i for t, i in vocab.items() if i not in special and not t.startswith("[unused")), dtype=np.int64)

    def caption_pieces(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
        """WordPiece ids of a caption and where each basic-tokenizer word starts.

        Calls the Rust tokenizer directly: the same encoding as `tokenizer(caption)`, without the
        Python wrapper that cost more than the tokenisation itself (benchmarks/loader_throughput.py)."""
        encoding = self.backend.encode(caption, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        words = np.asarray([-1 if w is None else w for w in encoding.word_ids], dtype=np.int64)
        starts = np.ones(words.size, dtype=bool)
        starts[1:] = words[1:] != words[:-1]
        return ids, starts

    def word_starts(self, ids: np.ndarray) -> np.ndarray:
        ids = np.clip(ids, 0, self.continuation.size - 1)
        return ~self.continuation[ids]


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, sample key): masks do not depend on who reads."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


@dataclass
class VLExample:
    key: str
    input_ids: np.ndarray  # [T]
    mlm_labels: np.ndarray  # [T]
    boxes: np.ndarray  # [R, 4], RoI 0 first
    image_size: tuple[float, float]  # (W, H)
    region_hidden: np.ndarray  # [R] bool
    region_selected: np.ndarray  # [R] bool (predicted, with a valid soft label)
    region_targets: np.ndarray  # [S, C] float32, rows of the selected RoIs in order ([S, k] when sparse)
    # Precomputed front end: detector-box features as stored ([R-1, D], float16 from shards) and the
    # whole-image RoI-0 feature [D]; kept apart so that no per-sample copy joins them (collate does).
    features: np.ndarray | None = None
    whole_image_feature: np.ndarray | None = None  # None with compact features: the device computes it
    feature_scale: np.ndarray | None = None  # float32: `features` are int8 / float8 codes
    feature_dtype: str = "float16"
    region_target_classes: np.ndarray | None = None  # [S, k]: `region_targets` are sparse (format 2 top-k)
    image: torch.Tensor | None = None  # [3, H, W] uint8 RGB (end-to-end)
    shard: str = ""  # where the sample was read from (for accounting)


@dataclass
class TextExample:
    key: str
    input_ids: np.ndarray
    mlm_labels: np.ndarray
    shard: str = ""


@dataclass(frozen=True)
class ExampleConfig:
    max_elements: int = 64  # text incl. [CLS]/[SEP] + RoIs incl. RoI 0 (the official SEQ_LEN)
    text_segment_len: int = 64
    num_region_classes: int = 1601
    visual_front_end: str = "precomputed"
    max_image_pixels: int = 40_000_000
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    feature_dim: int = 0  # precomputed features the model takes (0: not checked here)


def decode_image(jpeg: bytes, width: int, height: int, max_pixels: int) -> torch.Tensor:
    """JPEG -> uint8 RGB [3, H, W] (Pillow); decompression bombs refused from the header before decoding.

    Normalisation happens on the device (`FastRCNNAppearance.normalise`): 4x fewer bytes to move.
    """
    try:
        decoder = Image.open(io.BytesIO(jpeg))  # reads the header only
        if decoder.width * decoder.height > max_pixels:
            raise SampleError("image_too_large", f"{decoder.width} x {decoder.height}")
        if decoder.format != "JPEG":
            raise SampleError("bad_image", f"expected JPEG, got {decoder.format}")
        image = torch.from_numpy(np.asarray(decoder.convert("RGB"))).permute(2, 0, 1)
    except SampleError:
        raise
    except Image.DecompressionBombError as err:  # Pillow's own header check, above its ~179M-pixel limit
        raise SampleError("image_too_large", str(err)) from err
    except Exception as err:
        raise SampleError("bad_image", f"{type(err).__name__}: {err}") from err
    if tuple(image.shape[1:]) != (height, width):
        raise SampleError("image_size_mismatch", f"json says {width} x {height}, jpeg is {tuple(image.shape[1:])}")
    return image


def make_vl_example(record: VLRecord, tools: TokenizerTools, config: ExampleConfig,
                    rng: np.random.Generator) -> VLExample:
    width, height = float(record.image_width), float(record.image_height)
    pieces, starts = tools.caption_pieces(record.caption)
    if pieces.size == 0:
        raise SampleError("empty_caption", "caption tokenises to nothing")
    masked, labels = mask_words(pieces, starts, rng, tools.mask_id, tools.replacement_ids, config.masking)
    text = np.concatenate(([tools.cls_id], masked, [tools.sep_id]))
    text_labels = np.concatenate(([IGNORE], labels, [IGNORE]))

    all_boxes = with_image_roi(record.boxes, width, height)
    num_boxes = all_boxes.shape[0] - 1
    # Class distributions: dense [K, C] (format 1) or sparse top-k ids + probabilities (format 2).
    sparse = record.class_ids is not None
    scores = record.class_probs if sparse else record.scores
    if scores is not None and record.num_classes > config.num_region_classes:
        raise SampleError("too_many_classes", f"{record.num_classes} > num_region_classes {config.num_region_classes}")
    if scores is not None:
        selected, hidden = mask_regions(num_boxes, rng, config.masking)
        chosen = np.flatnonzero(selected)  # only valid distributions are targets (checked on chosen rows only)
        selected[chosen] = np.abs(scores[chosen].astype(np.float32).sum(1) - 1.0) < 0.1
    else:  # no class scores: nothing to predict, so nothing is hidden either
        selected = hidden = np.zeros(num_boxes, dtype=bool)

    hidden_all = np.concatenate(([False], hidden))
    selected_all = np.concatenate(([False], selected))
    features = whole = scale = None
    if config.visual_front_end == "precomputed":
        if record.features is None:
            raise SampleError("missing_features")
        features, scale = record.features, record.feature_scale
        if config.feature_dim and features.shape[1] != config.feature_dim:
            raise SampleError("feature_dim_mismatch", f"{features.shape[1]}-d features, the model takes "
                              f"{config.feature_dim}")
        if scale is None:
            kept = ~hidden
            # The official whole-image feature: mean over the boxes that stay visible (summed in float32).
            whole = torch.from_numpy(record.features[kept]).float().sum(0).numpy() / (kept.sum() + 1e-5)
        # Compact codes are never widened here: `VLBatch.widened` takes the same mean on the device.

    keep_text, keep_boxes = truncation_lengths(text.size, all_boxes.shape[0], config.max_elements)
    if keep_text < text.size:
        text = np.concatenate((text[: keep_text - 1], text[-1:]))
        text_labels = np.concatenate((text_labels[: keep_text - 1], text_labels[-1:]))
    all_boxes, hidden_all, selected_all = all_boxes[:keep_boxes], hidden_all[:keep_boxes], selected_all[:keep_boxes]
    if features is not None:
        features = features[: keep_boxes - 1]
        scale = None if scale is None else scale[: keep_boxes - 1]
    target_rows = np.flatnonzero(selected_all) - 1
    target_classes = None
    if sparse:  # stays sparse: densified on the device
        targets = scores[target_rows].astype(np.float32)
        target_classes = record.class_ids[target_rows].astype(np.int64)
    else:
        targets = np.zeros((target_rows.size, config.num_region_classes), dtype=np.float32)
        if target_rows.size:
            rows = scores[target_rows]
            targets[:, : rows.shape[1]] = rows  # widened to float32 for the selected rows only

    image = None
    if config.visual_front_end == "end_to_end":
        if record.jpeg is None:
            raise SampleError("missing_image")
        image = decode_image(record.jpeg, record.image_width, record.image_height, config.max_image_pixels)
    return VLExample(key=record.key, input_ids=text, mlm_labels=text_labels, boxes=all_boxes,
                     image_size=(width, height), region_hidden=hidden_all, region_selected=selected_all,
                     region_targets=targets, features=features, whole_image_feature=whole, image=image,
                     feature_scale=scale, feature_dtype=record.feature_dtype, region_target_classes=target_classes)


def make_text_example(record: TextRecord, tools: TokenizerTools, config: ExampleConfig,
                      rng: np.random.Generator) -> TextExample:
    ids = record.tokens[: config.text_segment_len]
    if ids.min() < 0 or ids.max() >= tools.vocab_size:
        raise SampleError("token_out_of_vocab", f"ids in [{ids.min()}, {ids.max()}], vocab {tools.vocab_size}")
    masked, labels = mask_words(ids, tools.word_starts(ids), rng, tools.mask_id, tools.replacement_ids,
                                config.masking)
    return TextExample(key=record.key, input_ids=masked, mlm_labels=labels)


FEATURE_TENSOR_DTYPES = {"int8": torch.int8, "float8": torch.float8_e4m3fn}
_NUMPY_CODES = {torch.int8: np.int8, torch.float8_e4m3fn: np.uint8, torch.float16: np.float16,
                torch.float32: np.float32}


def _widened_on_host(example: VLExample) -> VLExample:
    """A compact-feature example as float32 with its RoI-0 mean (only for batches that mix formats)."""
    if example.feature_scale is None:
        return example
    values = dequantize_features(example.features, example.feature_scale, example.feature_dtype)
    visible = ~example.region_hidden[1 : 1 + values.shape[0]]
    whole = values[visible].sum(0) / (visible.sum() + 1e-5)
    return dataclasses.replace(example, features=values, whole_image_feature=whole.astype(np.float32),
                               feature_scale=None, feature_dtype="float16")


def _dense_targets(example: VLExample, num_classes: int | None) -> np.ndarray:
    if example.region_target_classes is None:
        return example.region_targets
    if num_classes is None:
        raise ValueError("collate: a batch mixing sparse and dense class targets needs num_region_classes")
    dense = np.zeros((example.region_targets.shape[0], num_classes), dtype=np.float32)
    np.put_along_axis(dense, example.region_target_classes, example.region_targets, axis=1)
    return dense


def collate(vl: list[VLExample], text: list[TextExample], drop_labels: bool = False,
            num_region_classes: int | None = None) -> VLBatch:
    """Vision-language rows first, then text rows, padded into one `VLBatch`.

    Compact features and sparse class targets (format 2) stay compact (`VLBatch.widened` undoes them
    on the device); a batch that mixes them with format 1 rows is widened here, for which the sparse
    targets need `num_region_classes`. `drop_labels` keeps the inputs but removes every target
    (padding batches of exact-epoch mode).
    """
    rows = len(vl) + len(text)
    examples = [*vl, *text]
    text_slots = max(e.input_ids.size for e in examples)
    region_slots = max((e.boxes.shape[0] for e in vl), default=0)
    input_ids = torch.zeros(rows, text_slots, dtype=torch.long)
    text_mask = torch.zeros(rows, text_slots, dtype=torch.bool)
    labels = torch.full((rows, text_slots), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = example.input_ids.size
        input_ids[row, :n] = torch.from_numpy(example.input_ids)
        text_mask[row, :n] = True
        labels[row, :n] = torch.from_numpy(example.mlm_labels)
    boxes = torch.zeros(rows, region_slots, 4)
    region_mask = torch.zeros(rows, region_slots, dtype=torch.bool)
    hidden = torch.zeros(rows, region_slots, dtype=torch.bool)
    selected = torch.zeros(rows, region_slots, dtype=torch.bool)
    image_size = torch.zeros(rows, 2)
    features = feature_scale = None
    if vl and vl[0].features is not None:
        compact = all(e.feature_scale is not None and e.feature_dtype == vl[0].feature_dtype for e in vl)
        if not compact and any(e.feature_scale is not None for e in vl):
            vl = [_widened_on_host(e) for e in vl]  # a batch mixing formats: the rare slow path
        if compact:
            dtype = FEATURE_TENSOR_DTYPES[vl[0].feature_dtype]
            feature_scale = np.zeros((rows, region_slots), dtype=np.float32)
        else:
            dtype = torch.float16 if all(e.features.dtype == np.float16 for e in vl) else torch.float32
        # Filled in numpy (one memcpy a row; torch's per-slice copies cost ~4x more), then shared as a tensor.
        features = np.zeros((rows, region_slots, vl[0].features.shape[1]), dtype=_NUMPY_CODES[dtype])
    images = None
    if vl and vl[0].image is not None:
        height = max(e.image.shape[1] for e in vl)
        width = max(e.image.shape[2] for e in vl)
        images = torch.zeros(len(vl), 3, height, width, dtype=torch.uint8)
    targets = []
    for row, example in enumerate(vl):
        k = example.boxes.shape[0]
        boxes[row, :k] = torch.from_numpy(example.boxes)
        region_mask[row, :k] = True
        hidden[row, :k] = torch.from_numpy(example.region_hidden)
        selected[row, :k] = torch.from_numpy(example.region_selected)
        image_size[row] = torch.tensor(example.image_size)
        if feature_scale is not None:  # RoI 0 stays zero: the device fills it with the visible boxes' mean
            features[row, 1:k] = example.features
            feature_scale[row, 1:k] = example.feature_scale
        elif features is not None:
            features[row, 0] = example.whole_image_feature
            features[row, 1:k] = example.features
        if images is not None:
            _, h, w = example.image.shape
            images[row, :, :h, :w] = example.image
    sparse_widths = {e.region_target_classes.shape[1] for e in vl if e.region_target_classes is not None}
    dense_rows = any(e.region_target_classes is None and e.region_targets.shape[0] for e in vl)
    mrc_classes = None
    if len(sparse_widths) == 1 and not dense_rows:
        (width,) = sparse_widths
        sparse_rows = [(e.region_targets, e.region_target_classes) if e.region_target_classes is not None
                       else (np.zeros((0, width), np.float32), np.zeros((0, width), np.int64)) for e in vl]
        targets = [torch.from_numpy(probs) for probs, _ in sparse_rows]
        mrc_classes = torch.cat([torch.from_numpy(classes) for _, classes in sparse_rows])
    else:
        targets = [torch.from_numpy(_dense_targets(e, num_region_classes)) for e in vl]
    mrc_targets = torch.cat(targets) if targets else None
    if features is not None:
        features = torch.from_numpy(features).view(dtype)
    if drop_labels:
        labels.fill_(IGNORE)
        selected.fill_(False)
        if mrc_targets is not None:
            mrc_targets = mrc_targets[:0]
            mrc_classes = None if mrc_classes is None else mrc_classes[:0]
    return VLBatch(
        input_ids=input_ids, text_mask=text_mask, token_type_ids=torch.zeros_like(input_ids),
        has_image=torch.arange(rows) < len(vl), boxes=boxes, region_mask=region_mask, image_size=image_size,
        region_features=features, images=images, region_masked=hidden, mlm_labels=labels,
        mrc_select=selected if mrc_targets is not None else None, mrc_targets=mrc_targets,
        region_feature_scale=None if feature_scale is None else torch.from_numpy(feature_scale),
        mrc_target_classes=mrc_classes,
    )
