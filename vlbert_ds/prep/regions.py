"""Importers for the region formats users already have, and the official box-selection rule.

* Bottom-up-attention TSV (`generate_tsv.py`): tab-separated `image_id, image_w, image_h, num_boxes,
  boxes, features` with base64 float32 arrays, optionally a 7th column of per-box class scores.
  Files can be many GB, so we index byte offsets of each row once (reading only the id) and seek.
* VL-BERT per-image frcnn JSON (`{image_id, image_w, image_h, num_boxes, boxes, classes, features}`,
  base64 float32), one file per image in a folder, named `<image_id>.json`.

Selection (BUA `generate_tsv_v2.py`, reference §2.1): keep boxes whose best non-background class
score is >= 0.5, at least 10 and at most 100 by descending score; the output is sorted by that score
(what the official CC loader sorts by). Without class scores the file's order is kept, capped at 100.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import sys
from dataclasses import dataclass

import fsspec
import numpy as np

from vlbert_ds.data.schema import SampleError

CONF_THRESHOLD, MIN_BOXES, MAX_BOXES = 0.5, 10, 100


@dataclass
class Regions:
    image_width: int
    image_height: int
    boxes: np.ndarray  # [K, 4] float32 in the original image frame
    features: np.ndarray | None  # [K, D] float32
    scores: np.ndarray | None  # [K, C] float32


def _b64_array(text: str, rows: int, field: str) -> np.ndarray:
    try:
        flat = np.frombuffer(base64.b64decode(text), dtype=np.float32)
    except (binascii.Error, ValueError) as err:
        raise SampleError("bad_region_data", f"{field}: {err}") from err
    if rows <= 0 or flat.size % rows:
        raise SampleError("bad_region_data", f"{field}: {flat.size} floats for {rows} boxes")
    return flat.reshape(rows, -1).copy()


def select_boxes(regions: Regions, threshold: float = CONF_THRESHOLD, min_boxes: int = MIN_BOXES,
                 max_boxes: int = MAX_BOXES) -> Regions:
    if regions.scores is None:
        keep = np.arange(min(len(regions.boxes), max_boxes))
    else:
        scores = regions.scores
        confidence = scores[:, 1:].max(1) if scores.shape[1] > 1 else scores[:, 0]  # class 0 = background
        order = np.argsort(-confidence, kind="stable")
        count = int((confidence >= threshold).sum())
        count = min(max(count, min_boxes), max_boxes, len(order))
        keep = order[:count]
    return Regions(regions.image_width, regions.image_height, regions.boxes[keep],
                   None if regions.features is None else regions.features[keep],
                   None if regions.scores is None else regions.scores[keep])


def _validated(regions: Regions) -> Regions:
    for name in ("boxes", "features", "scores"):
        value = getattr(regions, name)
        if value is not None and not np.isfinite(value).all():
            raise SampleError(f"nonfinite_{name}")
    if regions.boxes.shape[1] != 4:
        raise SampleError("bad_region_data", f"boxes have {regions.boxes.shape[1]} columns")
    return regions


def parse_bua_row(fields: list[str]) -> tuple[str, Regions]:
    if len(fields) < 6:
        raise SampleError("bad_region_data", f"TSV row has {len(fields)} fields, expected >= 6")
    image_id, width, height, num = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    boxes = _b64_array(fields[4], num, "boxes")
    features = _b64_array(fields[5], num, "features")
    scores = _b64_array(fields[6], num, "cls_prob") if len(fields) > 6 and fields[6] else None
    return image_id, _validated(Regions(width, height, boxes, features, scores))


def parse_frcnn_json(data: bytes | str) -> tuple[str, Regions]:
    try:
        obj = json.loads(data)
        num = int(obj["num_boxes"])
        image_id = str(obj.get("image_id", ""))
        width, height = int(obj["image_w"]), int(obj["image_h"])
    except (ValueError, KeyError, TypeError) as err:
        raise SampleError("bad_region_data", f"frcnn json: {err}") from err
    boxes = _b64_array(obj["boxes"], num, "boxes")
    features = _b64_array(obj["features"], num, "features") if obj.get("features") else None
    scores = _b64_array(obj["classes"], num, "classes") if obj.get("classes") else None
    return image_id, _validated(Regions(width, height, boxes, features, scores))


class BuaTsvIndex:
    """Random access to rows of bottom-up-attention TSV files by image id (byte offsets, not rows, in memory)."""

    def __init__(self, urls: list[str]) -> None:
        csv.field_size_limit(sys.maxsize)
        self.offsets: dict[str, tuple[str, int]] = {}
        for url in urls:
            with fsspec.open(url, "rb") as handle:
                position = 0
                for line in handle:
                    image_id = line.split(b"\t", 1)[0].decode()
                    self.offsets.setdefault(image_id, (url, position))
                    position += len(line)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.offsets

    def get(self, image_id: str) -> Regions:
        if image_id not in self.offsets:
            raise SampleError("missing_regions", image_id)
        url, offset = self.offsets[image_id]
        with fsspec.open(url, "rb") as handle:
            handle.seek(offset)
            line = handle.readline().decode().rstrip("\r\n")
        return parse_bua_row(line.split("\t"))[1]


class FrcnnJsonFolder:
    """VL-BERT's per-image region JSON files: `<folder>/<image_id>.json`."""

    def __init__(self, folder: str) -> None:
        self.folder = folder.rstrip("/")

    def get(self, image_id: str) -> Regions:
        url = f"{self.folder}/{image_id}.json"
        try:
            with fsspec.open(url, "rb") as handle:
                return parse_frcnn_json(handle.read())[1]
        except FileNotFoundError as err:
            raise SampleError("missing_regions", image_id) from err


def open_regions(spec: str):
    """A region source from a path: `*.tsv` file(s) (comma-separated) or a folder of frcnn JSON."""
    parts = [p for p in spec.split(",") if p]
    if all(p.endswith((".tsv", ".tsv.gz")) for p in parts):
        return BuaTsvIndex(parts)
    if len(parts) == 1:
        return FrcnnJsonFolder(parts[0])
    raise ValueError(f"--regions {spec!r}: give TSV files or one folder of per-image JSON")
