"""The shard format (version 2; version 1 still read): one sample, encoded and decoded without pickle.

See docs/shard-format.md for the full description. A sample is a group of tar members sharing a
key; every member is JSON, NumPy `.npy` (read with `allow_pickle=False`) or JPEG. Member names
that could carry pickles (`.pyd`, `.pickle`, `.pkl`, `.pth`, `.pt`) are refused.

Version 2 stores region features compactly (int8 or float8 e4m3 codes with a per-box scale) and
class distributions sparsely (top-k classes with renormalised probabilities): about 3.4x fewer bytes
for a bottom-up-attention sample. The loader keeps them compact; the model widens them on the
device (`VLBatch.widened`).
"""

from __future__ import annotations

import functools
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
VL_KIND = "vl"
TEXT_KIND = "text"
UNSAFE_SUFFIXES = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "pyd.gz"})
# Keys a sample may carry; anything else is counted as unexpected and ignored.
VL_MEMBERS = frozenset({"json", "jpg", "boxes.npy", "scores.npy", "features.npy", "feature_scale.npy",
                        "class_ids.npy", "class_probs.npy"})
TEXT_MEMBERS = frozenset({"json", "tokens.npy"})

FeatureDtype = Literal["float16", "int8", "float8"]
FEATURE_DTYPES: tuple[str, ...] = get_args(FeatureDtype)
# Chosen by benchmarks/feature_compaction.py: the smallest k that keeps >= 99% of the probability mass
# on 95% of the boxes of a 1601-way detector-like distribution (Dirichlet, mean top-1 probability 0.30:
# k = 27) and all of the default scenes' (9 non-zero classes), rounded up to 32.
DEFAULT_CLASS_TOPK = 32
INT8_MAX = 127.0
FLOAT8_E4M3_MAX = 448.0


@dataclass(frozen=True)
class Compaction:
    """How `vlbert-prep` stores region features and class distributions (format 2)."""

    feature_dtype: FeatureDtype = "int8"
    # None: DEFAULT_CLASS_TOPK where that is fewer than half the classes (else sparse would not be
    # smaller, and the distributions stay dense and exact); 0: dense; k: exactly k, at most the class count.
    class_topk: int | None = None

    def __post_init__(self) -> None:
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature dtype must be one of {', '.join(FEATURE_DTYPES)}, got {self.feature_dtype!r}")
        if self.class_topk is not None and self.class_topk < 0:
            raise ValueError(f"class top-k must be >= 0 (0 keeps dense distributions), got {self.class_topk}")

    def topk_for(self, num_classes: int) -> int:
        """The k to store for distributions over `num_classes` (0 = dense)."""
        if self.class_topk is None:
            return DEFAULT_CLASS_TOPK if num_classes / 2 > DEFAULT_CLASS_TOPK else 0
        if self.class_topk > num_classes:
            raise ValueError(f"class top-k {self.class_topk} is larger than the {num_classes} classes of the region "
                             f"scores: use --class-topk {num_classes} or less (0 keeps them dense)")
        return self.class_topk


def quantize_features(features: np.ndarray, dtype: FeatureDtype) -> tuple[np.ndarray, np.ndarray | None]:
    """[K, D] float -> (codes, per-box scale or None). int8: symmetric, scale = max|x| / 127 per box;
    float8: e4m3 (stored as its uint8 bit pattern), scale = max|x| / 448 per box, so each box uses the
    format's whole range."""
    values = np.asarray(features, dtype=np.float32)
    if dtype == "float16":
        return values.astype(np.float16), None
    peak = np.abs(values).max(axis=1) if values.size else np.zeros(values.shape[0], np.float32)
    limit = INT8_MAX if dtype == "int8" else FLOAT8_E4M3_MAX
    scale = (peak / limit).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)[:, None]
    if dtype == "int8":
        return np.clip(np.rint(values / safe), -INT8_MAX, INT8_MAX).astype(np.int8), scale
    import torch

    scaled = torch.from_numpy(np.clip(values / safe, -FLOAT8_E4M3_MAX, FLOAT8_E4M3_MAX))
    return scaled.to(torch.float8_e4m3fn).view(torch.uint8).numpy(), scale


def dequantize_features(codes: np.ndarray, scale: np.ndarray | None, dtype: FeatureDtype) -> np.ndarray:
    """The float32 features that `codes` stand for (tests, conversion and the mixed-format fallback)."""
    if scale is None:
        return codes.astype(np.float32)
    if dtype == "float8":
        import torch

        values = torch.from_numpy(np.ascontiguousarray(codes)).view(torch.float8_e4m3fn).float().numpy()
    else:
        values = codes.astype(np.float32)
    return values * scale[:, None]


def sparse_classes(scores: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
    """[K, C] distributions -> (class ids int16 [K, k], probabilities float16 [K, k]): the k most likely
    classes of each box, renormalised to sum to 1 (a box whose scores sum to 0 keeps zeros)."""
    scores = np.asarray(scores, dtype=np.float32)
    classes = scores.shape[1]
    if topk > classes:
        raise ValueError(f"class top-k {topk} is larger than the {classes} classes of the region scores: "
                         f"use --class-topk {classes} or less (0 keeps them dense)")
    if classes > np.iinfo(np.int16).max:
        raise ValueError(f"{classes} classes do not fit the int16 class ids of format 2")
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :topk]
    probs = np.take_along_axis(scores, ids, axis=1)
    total = probs.sum(1, keepdims=True)
    probs = np.where(total > 0, probs / np.where(total > 0, total, 1.0), 0.0)
    return ids.astype(np.int16), probs.astype(np.float16)


class SampleError(ValueError):
    """A sample that cannot be used; `reason` is the counter it is skipped under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class VLRecord:
    """A decoded vision-language sample. Boxes exclude the whole image (the loader adds RoI 0)."""

    key: str
    caption: str
    image_width: int
    image_height: int
    boxes: np.ndarray  # [K, 4] float32, pixels of the stored (resized) frame, by descending confidence
    scores: np.ndarray | None = None  # [K, C] soft class distribution (float16 when read from a shard)
    features: np.ndarray | None = None  # [K, D] float16, or the codes of `feature_dtype` when scaled
    jpeg: bytes | None = None  # re-encoded image, decoded later only when the end-to-end mode needs it
    # Format 2: compact features (int8 / float8 e4m3 bits as uint8, value = code * scale[box]) ...
    feature_scale: np.ndarray | None = None  # [K] float32
    feature_dtype: FeatureDtype = "float16"
    # ... and sparse class distributions instead of `scores`.
    class_ids: np.ndarray | None = None  # [K, k] int16
    class_probs: np.ndarray | None = None  # [K, k] float16, each row renormalised to sum to 1
    num_classes: int = 0  # C of the dense distribution the sparse one was cut from

    @property
    def has_class_scores(self) -> bool:
        return self.scores is not None or self.class_ids is not None

    def dense_features(self) -> np.ndarray | None:
        """float32 features (conversion and tests; training keeps them compact)."""
        if self.features is None:
            return None
        return dequantize_features(self.features, self.feature_scale, self.feature_dtype)

    def dense_scores(self) -> np.ndarray | None:
        if self.class_ids is None:
            return self.scores
        dense = np.zeros((self.class_ids.shape[0], self.num_classes), dtype=np.float32)
        np.put_along_axis(dense, self.class_ids.astype(np.int64), self.class_probs.astype(np.float32), axis=1)
        return dense


@dataclass
class TextRecord:
    key: str
    tokens: np.ndarray  # [N] int32 WordPiece ids of one segment (>= 64 basic tokens before WordPiece)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# The header numpy writes for a plain C-ordered array:
#   {'descr': '<f2', 'fortran_order': False, 'shape': (50, 2048), }
_NPY_HEADER = re.compile(
    rb"\{'descr': '([<|>]?[a-zA-Z]\d{0,2})', 'fortran_order': False, 'shape': \(([\d, ]*)\), \}\s*$")
_NPY_SAFE_KINDS = frozenset("fiub")


@functools.lru_cache(maxsize=4096)
def _parse_npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, count) of a plain numeric array's header; cached: a shard repeats a few headers."""
    match = _NPY_HEADER.match(header)
    if not match:
        return None
    dtype = np.dtype(match.group(1).decode())
    if dtype.kind not in _NPY_SAFE_KINDS:
        return None
    shape = tuple(int(v) for v in match.group(2).decode().replace(" ", "").split(",") if v)
    return dtype, shape, int(np.prod(shape, dtype=np.int64))


def load_npy(data: bytes, name: str) -> np.ndarray:
    """Read `.npy` bytes without pickle.

    Fast path for the plain numeric arrays our writer produces (a regex on the header instead of
    numpy's `ast`-based parser, which costs ~80 µs per array); anything else goes through `np.load`.
    """
    if data[:8] in (b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00"):
        if data[6] == 1:
            header_len, start = int.from_bytes(data[8:10], "little"), 10
        else:
            header_len, start = int.from_bytes(data[8:12], "little"), 12
        parsed = _parse_npy_header(bytes(data[start : start + header_len]))
        if parsed is not None:
            dtype, shape, count = parsed
            if len(data) - start - header_len == count * dtype.itemsize:
                return np.frombuffer(data, dtype=dtype, count=count, offset=start + header_len).reshape(shape)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:  # object arrays would need pickle
        raise SampleError("bad_npy", f"{name}: {err}") from err
    except Exception as err:
        raise SampleError("bad_npy", f"{name}: {type(err).__name__}: {err}") from err


def _encode_features(sample: dict[str, Any], meta: dict[str, Any], features: np.ndarray,
                     compaction: Compaction) -> None:
    if not np.isfinite(np.asarray(features, dtype=np.float32)).all():
        raise SampleError("nonfinite_features")
    codes, scale = quantize_features(features, compaction.feature_dtype)
    meta["feature_dtype"] = compaction.feature_dtype
    sample["features.npy"] = npy_bytes(codes)
    if scale is not None:
        sample["feature_scale.npy"] = npy_bytes(scale)


def encode_vl(record: VLRecord, compaction: Compaction | None = None) -> dict[str, Any]:
    """Tar members of one vision-language sample (keys as webdataset writes them), format 2.

    `record` holds float features and dense scores (as prep makes them, or as `dense_*` give back).
    """
    compaction = compaction or Compaction()
    meta = {"format": FORMAT_VERSION, "kind": VL_KIND, "caption": record.caption,
            "image_width": int(record.image_width), "image_height": int(record.image_height),
            "num_boxes": int(record.boxes.shape[0])}
    sample: dict[str, Any] = {"__key__": record.key, "boxes.npy": npy_bytes(record.boxes.astype(np.float32))}
    scores = record.dense_scores()
    if scores is not None:
        meta["num_classes"] = int(scores.shape[1])
        topk = compaction.topk_for(scores.shape[1])
        if topk:
            ids, probs = sparse_classes(scores, topk)
            meta["class_topk"] = int(ids.shape[1])
            sample["class_ids.npy"], sample["class_probs.npy"] = npy_bytes(ids), npy_bytes(probs)
        else:
            sample["scores.npy"] = npy_bytes(scores.astype(np.float16))
    features = record.dense_features() if record.feature_scale is not None else record.features
    if features is not None:
        _encode_features(sample, meta, features, compaction)
    if record.jpeg is not None:
        sample["jpg"] = record.jpeg
    sample["json"] = json.dumps(meta).encode()
    return sample


def encode_text(record: TextRecord) -> dict[str, Any]:
    meta = {"format": FORMAT_VERSION, "kind": TEXT_KIND, "num_tokens": int(record.tokens.shape[0])}
    return {"__key__": record.key, "json": json.dumps(meta).encode(),
            "tokens.npy": npy_bytes(record.tokens.astype(np.int32))}


def all_finite(array: np.ndarray) -> bool:
    """`np.isfinite(a).all()`, on float16 by exponent bits (numpy's float16 ufuncs are slow)."""
    if array.dtype == np.float16:
        return not bool(((array.view(np.uint16) & 0x7C00) == 0x7C00).any())
    return bool(np.isfinite(array).all())


def _check_members(sample: dict[str, Any], allowed: frozenset[str]) -> None:
    for name in sample:
        if name.startswith("__"):
            continue
        if name in UNSAFE_SUFFIXES or name.rsplit(".", 1)[-1] in UNSAFE_SUFFIXES:
            raise SampleError("unsafe_member", f"refusing pickle-capable member {name!r}")


def _meta(sample: dict[str, Any], kind: str) -> dict[str, Any]:
    raw = sample.get("json")
    if raw is None:
        raise SampleError("missing_json")
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise SampleError("bad_json", str(err)) from err
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, dict) else meta
        raise SampleError("wrong_kind", f"expected kind {kind!r}, got {found!r}")
    if meta.get("format") not in READABLE_FORMATS:
        raise SampleError("format_version", f"shard format {meta.get('format')}, this reader knows "
                          f"{', '.join(map(str, READABLE_FORMATS))}")
    return meta


def _image_size_and_boxes(sample: dict[str, Any], meta: dict[str, Any]) -> tuple[int, int, np.ndarray]:
    """The frame size from the JSON and the checked `[K, 4]` boxes (shared by every image-bearing kind)."""
    width, height = meta.get("image_width"), meta.get("image_height")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise SampleError("bad_image_size", f"{width} x {height}")
    if "boxes.npy" not in sample:
        raise SampleError("missing_boxes")
    boxes = load_npy(sample["boxes.npy"], "boxes.npy").astype(np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise SampleError("bad_boxes", f"shape {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise SampleError("nonfinite_boxes")
    return width, height, boxes


_FEATURE_CODE_DTYPES = {"float16": np.float16, "int8": np.int8, "float8": np.uint8}


def _features(sample: dict[str, Any], meta: dict[str, Any],
              num_boxes: int) -> tuple[np.ndarray, np.ndarray | None, FeatureDtype]:
    """(codes, per-box scale or None, dtype); compact codes stay compact all the way to the device."""
    if "features.npy" not in sample:
        raise SampleError("missing_features")
    dtype = meta.get("feature_dtype", "float16")
    if dtype not in _FEATURE_CODE_DTYPES:
        raise SampleError("bad_features", f"feature_dtype {dtype!r}")
    features = load_npy(sample["features.npy"], "features.npy")
    if features.ndim != 2 or features.shape[0] != num_boxes:
        raise SampleError("bad_features", f"shape {features.shape} for {num_boxes} boxes")
    if features.dtype != _FEATURE_CODE_DTYPES[dtype] and not (dtype == "float16" and features.dtype.kind == "f"):
        raise SampleError("bad_features", f"{features.dtype} codes for feature_dtype {dtype}")
    scale = None
    if dtype == "float16":
        if not all_finite(features):
            raise SampleError("nonfinite_features")
    else:
        if "feature_scale.npy" not in sample:
            raise SampleError("bad_features", f"{dtype} features without feature_scale.npy")
        scale = load_npy(sample["feature_scale.npy"], "feature_scale.npy")
        if scale.shape != (num_boxes,) or scale.dtype != np.float32:
            raise SampleError("bad_features", f"feature_scale {scale.dtype} {scale.shape} for {num_boxes} boxes")
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            raise SampleError("nonfinite_features", "feature_scale")
        if dtype == "float8" and bool(((features & 0x7F) == 0x7F).any()):  # e4m3fn's only NaN pattern
            raise SampleError("nonfinite_features")
    return features, scale, dtype


def _class_scores(sample: dict[str, Any], meta: dict[str, Any], num_boxes: int) -> dict[str, Any]:
    """The class distribution fields of a `VLRecord`: dense `scores` (format 1, or 2 without top-k) or
    sparse `class_ids` / `class_probs`; {} when the sample has none."""
    if "class_ids.npy" in sample or "class_probs.npy" in sample:
        if "class_ids.npy" not in sample or "class_probs.npy" not in sample:
            raise SampleError("bad_scores", "class_ids.npy and class_probs.npy come together")
        classes = meta.get("num_classes")
        if not isinstance(classes, int) or classes < 1:
            raise SampleError("bad_scores", f"num_classes {classes!r}")
        ids = load_npy(sample["class_ids.npy"], "class_ids.npy")
        probs = load_npy(sample["class_probs.npy"], "class_probs.npy")
        if ids.ndim != 2 or ids.shape[0] != num_boxes or probs.shape != ids.shape or ids.dtype.kind not in "iu":
            raise SampleError("bad_scores", f"class ids {ids.dtype} {ids.shape}, probs {probs.shape} "
                              f"for {num_boxes} boxes")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= classes):
            raise SampleError("bad_scores", f"class ids outside [0, {classes})")
        if not all_finite(probs):
            raise SampleError("nonfinite_scores")
        return {"class_ids": ids, "class_probs": probs, "num_classes": classes}
    if "scores.npy" in sample:
        scores = load_npy(sample["scores.npy"], "scores.npy")  # stored float16; widened per selected row later
        if scores.ndim != 2 or scores.shape[0] != num_boxes:
            raise SampleError("bad_scores", f"shape {scores.shape} for {num_boxes} boxes")
        if not all_finite(scores):
            raise SampleError("nonfinite_scores")
        return {"scores": scores, "num_classes": int(scores.shape[1])}
    return {}


def decode_vl(sample: dict[str, Any], need_features: bool, need_image: bool) -> VLRecord:
    """Decode and check one vision-language sample; raise `SampleError` with a counted reason."""
    _check_members(sample, VL_MEMBERS)
    meta = _meta(sample, VL_KIND)
    caption = meta.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise SampleError("empty_caption")
    width, height, boxes = _image_size_and_boxes(sample, meta)
    classes = _class_scores(sample, meta, boxes.shape[0])
    features = scale = None
    dtype: FeatureDtype = "float16"
    if need_features:
        features, scale, dtype = _features(sample, meta, boxes.shape[0])
    jpeg = sample.get("jpg")
    if need_image and jpeg is None:
        raise SampleError("missing_image")
    return VLRecord(key=sample.get("__key__", ""), caption=caption, image_width=width, image_height=height,
                    boxes=boxes, features=features, feature_scale=scale, feature_dtype=dtype,
                    jpeg=jpeg if need_image else None, **classes)


def decode_text(sample: dict[str, Any]) -> TextRecord:
    _check_members(sample, TEXT_MEMBERS)
    _meta(sample, TEXT_KIND)
    if "tokens.npy" not in sample:
        raise SampleError("missing_tokens")
    tokens = load_npy(sample["tokens.npy"], "tokens.npy")
    if tokens.ndim != 1 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise SampleError("bad_tokens", f"shape {tokens.shape} dtype {tokens.dtype}")
    return TextRecord(key=sample.get("__key__", ""), tokens=tokens.astype(np.int64))


# ----------------------------------------------------------------------------- fine-tuning tasks
TASK_KINDS = ("vqa", "vcr", "refcoco")
TASK_MEMBERS = frozenset({"json", "jpg", "boxes.npy", "features.npy", "feature_scale.npy"})


@dataclass
class TaskRecord:
    """A fine-tuning item: the image's boxes/features and the task fields of its JSON (see shard-format.md)."""

    key: str
    kind: str
    meta: dict[str, Any]
    image_width: int
    image_height: int
    boxes: np.ndarray  # [K, 4] float32, without the whole-image box
    features: np.ndarray | None = None  # [K, D] float16, or codes of `feature_dtype` when scaled
    jpeg: bytes | None = None
    feature_scale: np.ndarray | None = None  # [K] float32 (format 2 compact features)
    feature_dtype: FeatureDtype = "float16"

    def dense_features(self) -> np.ndarray | None:
        if self.features is None:
            return None
        return dequantize_features(self.features, self.feature_scale, self.feature_dtype)


_SAMPLE_FIELDS = ("format", "kind", "image_width", "image_height", "num_boxes", "feature_dtype")


def encode_task(record: TaskRecord, compaction: Compaction | None = None) -> dict[str, Any]:
    compaction = compaction or Compaction()
    meta = {**{k: v for k, v in record.meta.items() if k not in _SAMPLE_FIELDS}, "format": FORMAT_VERSION,
            "kind": record.kind, "image_width": int(record.image_width),
            "image_height": int(record.image_height), "num_boxes": int(record.boxes.shape[0])}
    sample: dict[str, Any] = {"__key__": record.key, "boxes.npy": npy_bytes(record.boxes.astype(np.float32))}
    features = record.dense_features() if record.feature_scale is not None else record.features
    if features is not None:
        _encode_features(sample, meta, features, compaction)
    if record.jpeg is not None:
        sample["jpg"] = record.jpeg
    sample["json"] = json.dumps(meta).encode()
    return sample


def decode_task(sample: dict[str, Any], kind: str, need_features: bool = True) -> TaskRecord:
    _check_members(sample, TASK_MEMBERS)
    meta = _meta(sample, kind)
    width, height, boxes = _image_size_and_boxes(sample, meta)
    features = scale = None
    dtype: FeatureDtype = "float16"
    if need_features:
        features, scale, dtype = _features(sample, meta, boxes.shape[0])
    return TaskRecord(key=sample.get("__key__", ""), kind=kind, meta=meta, image_width=width, image_height=height,
                      boxes=boxes, features=features, jpeg=sample.get("jpg"), feature_scale=scale,
                      feature_dtype=dtype)
