"""The shard format (version 1): what one sample holds, encoded and decoded without pickle.

See docs/shard-format.md for the full description. A sample is a group of tar members sharing a
key; every member is JSON, NumPy `.npy` (read with `allow_pickle=False`) or JPEG. Member names
that could carry pickles (`.pyd`, `.pickle`, `.pkl`, `.pth`, `.pt`) are refused.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT_VERSION = 1
VL_KIND = "vl"
TEXT_KIND = "text"
UNSAFE_SUFFIXES = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "pyd.gz"})
# Keys a sample may carry; anything else is counted as unexpected and ignored.
VL_MEMBERS = frozenset({"json", "jpg", "boxes.npy", "scores.npy", "features.npy"})
TEXT_MEMBERS = frozenset({"json", "tokens.npy"})


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
    features: np.ndarray | None = None  # [K, D] (float16 when read from a shard)
    jpeg: bytes | None = None  # re-encoded image, decoded later only when the end-to-end mode needs it


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
        match = _NPY_HEADER.match(data[start : start + header_len])
        if match:
            dtype = np.dtype(match.group(1).decode())
            shape = tuple(int(v) for v in match.group(2).decode().replace(" ", "").split(",") if v)
            count = int(np.prod(shape, dtype=np.int64))
            if dtype.kind in _NPY_SAFE_KINDS and len(data) - start - header_len == count * dtype.itemsize:
                return np.frombuffer(data, dtype=dtype, count=count, offset=start + header_len).reshape(shape)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:  # object arrays would need pickle
        raise SampleError("bad_npy", f"{name}: {err}") from err
    except Exception as err:
        raise SampleError("bad_npy", f"{name}: {type(err).__name__}: {err}") from err


def encode_vl(record: VLRecord) -> dict[str, Any]:
    """Tar members of one vision-language sample (keys as webdataset writes them)."""
    meta = {"format": FORMAT_VERSION, "kind": VL_KIND, "caption": record.caption,
            "image_width": int(record.image_width), "image_height": int(record.image_height),
            "num_boxes": int(record.boxes.shape[0])}
    sample: dict[str, Any] = {"__key__": record.key, "json": json.dumps(meta).encode(),
                              "boxes.npy": npy_bytes(record.boxes.astype(np.float32))}
    if record.scores is not None:
        sample["scores.npy"] = npy_bytes(record.scores.astype(np.float16))
    if record.features is not None:
        sample["features.npy"] = npy_bytes(record.features.astype(np.float16))
    if record.jpeg is not None:
        sample["jpg"] = record.jpeg
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
    if meta.get("format") != FORMAT_VERSION:
        raise SampleError("format_version", f"shard format {meta.get('format')}, this reader knows {FORMAT_VERSION}")
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


def _features(sample: dict[str, Any], num_boxes: int) -> np.ndarray:
    if "features.npy" not in sample:
        raise SampleError("missing_features")
    features = load_npy(sample["features.npy"], "features.npy")  # float16 all the way to the model
    if features.ndim != 2 or features.shape[0] != num_boxes:
        raise SampleError("bad_features", f"shape {features.shape} for {num_boxes} boxes")
    if not all_finite(features):
        raise SampleError("nonfinite_features")
    return features


def decode_vl(sample: dict[str, Any], need_features: bool, need_image: bool) -> VLRecord:
    """Decode and check one vision-language sample; raise `SampleError` with a counted reason."""
    _check_members(sample, VL_MEMBERS)
    meta = _meta(sample, VL_KIND)
    caption = meta.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise SampleError("empty_caption")
    width, height, boxes = _image_size_and_boxes(sample, meta)
    scores = features = None
    if "scores.npy" in sample:
        scores = load_npy(sample["scores.npy"], "scores.npy")  # stored float16; widened per selected row later
        if scores.ndim != 2 or scores.shape[0] != boxes.shape[0]:
            raise SampleError("bad_scores", f"shape {scores.shape} for {boxes.shape[0]} boxes")
        if not all_finite(scores):
            raise SampleError("nonfinite_scores")
    if need_features:
        features = _features(sample, boxes.shape[0])
    jpeg = sample.get("jpg")
    if need_image and jpeg is None:
        raise SampleError("missing_image")
    return VLRecord(key=sample.get("__key__", ""), caption=caption, image_width=width, image_height=height,
                    boxes=boxes, scores=scores, features=features, jpeg=jpeg if need_image else None)


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
TASK_MEMBERS = frozenset({"json", "jpg", "boxes.npy", "features.npy"})


@dataclass
class TaskRecord:
    """A fine-tuning item: the image's boxes/features and the task fields of its JSON (see shard-format.md)."""

    key: str
    kind: str
    meta: dict[str, Any]
    image_width: int
    image_height: int
    boxes: np.ndarray  # [K, 4] float32, without the whole-image box
    features: np.ndarray | None = None  # [K, D]
    jpeg: bytes | None = None


def encode_task(record: TaskRecord) -> dict[str, Any]:
    meta = {**record.meta, "format": FORMAT_VERSION, "kind": record.kind, "image_width": int(record.image_width),
            "image_height": int(record.image_height), "num_boxes": int(record.boxes.shape[0])}
    sample: dict[str, Any] = {"__key__": record.key, "json": json.dumps(meta).encode(),
                              "boxes.npy": npy_bytes(record.boxes.astype(np.float32))}
    if record.features is not None:
        sample["features.npy"] = npy_bytes(record.features.astype(np.float16))
    if record.jpeg is not None:
        sample["jpg"] = record.jpeg
    return sample


def decode_task(sample: dict[str, Any], kind: str, need_features: bool = True) -> TaskRecord:
    _check_members(sample, TASK_MEMBERS)
    meta = _meta(sample, kind)
    width, height, boxes = _image_size_and_boxes(sample, meta)
    features = _features(sample, boxes.shape[0]) if need_features else None
    return TaskRecord(key=sample.get("__key__", ""), kind=kind, meta=meta, image_width=width, image_height=height,
                      boxes=boxes, features=features, jpeg=sample.get("jpg"))
