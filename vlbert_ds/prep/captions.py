"""`vlbert-prep captions`: image-caption manifests (+ optional region files) -> vision-language shards.

Manifest rows (JSONL, TSV/CSV with a header, or parquet) have `caption` and either `image` (a path
relative to `--image-root` or an fsspec URL such as `s3://bucket/x.jpg`) or, with `--no-images`, only
an `image_id` whose regions come from `--regions`. Optional: `boxes` ([[x1, y1, x2, y2], ...] in
original image pixels) and `image_id` (the join key into `--regions`). Absolute paths and `..` are
refused: a manifest must not be able to read arbitrary files of the machine that runs the tool.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from vlbert_ds.data.schema import SampleError, VLRecord, encode_vl
from vlbert_ds.prep.images import check_boxes, open_image, read_bytes, resize_and_encode
from vlbert_ds.prep.lazy import LazyTools
from vlbert_ds.prep.regions import Regions, open_regions, select_boxes


@dataclass
class CaptionRow:
    caption: str
    image: str | None = None
    image_id: str | None = None
    boxes: Any = None


def read_manifest(url: str) -> list[CaptionRow]:
    """Parse a manifest; malformed rows become rows with an empty caption (counted when processed)."""
    lower = url.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fsspec.open(url, "rb") as handle:
            records = pq.read_table(handle).to_pylist()
    else:
        with fsspec.open(url, "rt", encoding="utf-8") as handle:
            text = handle.read()
        if lower.endswith((".tsv", ".csv")):
            delimiter = "\t" if lower.endswith(".tsv") else ","
            records = list(csv.DictReader(io.StringIO(text), delimiter=delimiter))
        else:
            records = []
            for line in text.splitlines():
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except ValueError:
                    records.append({})
    rows = []
    for record in records:
        boxes = record.get("boxes")
        if isinstance(boxes, str) and boxes.strip():
            try:
                boxes = json.loads(boxes)
            except ValueError:
                boxes = "invalid"
        caption = record.get("caption")
        if isinstance(caption, list):  # CC's official jsonl stores a list of words
            caption = " ".join(map(str, caption))
        image_id = record.get("image_id")
        rows.append(CaptionRow(caption=caption if isinstance(caption, str) else "",
                               image=record.get("image") or None,
                               image_id=None if image_id in (None, "") else str(image_id), boxes=boxes))
    return rows


def resolve_image(reference: str, image_root: str) -> str:
    if "://" in reference:
        return reference
    if reference.startswith("/") or ".." in reference.replace("\\", "/").split("/"):
        raise SampleError("unsafe_path", reference)
    return posixpath.join(image_root.rstrip("/"), reference) if image_root else reference


class CaptionSampleMaker(LazyTools):
    """Turns one manifest row into one encoded sample; picklable, loads its tools lazily per process."""

    LAZY = ("_tokenizer", "_regions")

    def __init__(self, image_root: str, regions: str | None, tokenizer: str, with_images: bool = True,
                 short_side: int = 600, max_long_side: int = 1000, quality: int = 90) -> None:
        self.image_root, self.regions_spec, self.tokenizer_folder = image_root, regions, tokenizer
        self.with_images, self.short_side, self.max_long_side, self.quality = (
            with_images, short_side, max_long_side, quality)
        self._regions = self._tokenizer = None

    @property
    def regions(self):
        if self._regions is None and self.regions_spec:
            self._regions = open_regions(self.regions_spec)
        return self._regions

    def __call__(self, row: CaptionRow, shard: int, position: int) -> list[dict[str, Any]]:
        caption = " ".join((row.caption or "").split())
        if not caption or not self.tokenizer(caption, add_special_tokens=False)["input_ids"]:
            raise SampleError("empty_caption")
        regions: Regions | None = None
        if self.regions is not None:
            if row.image_id is None:
                raise SampleError("missing_image_id")
            regions = select_boxes(self.regions.get(row.image_id))
        features = scores = None
        jpeg = None
        if self.with_images:
            if not row.image:
                raise SampleError("missing_image")
            image = open_image(read_bytes(resolve_image(row.image, self.image_root)))
            width0, height0 = image.size
            jpeg, width, height, scale = resize_and_encode(image, self.short_side, self.max_long_side, self.quality)
        else:
            if regions is None:
                raise SampleError("missing_regions", "--no-images needs --regions")
            width0, height0, width, height, scale = (regions.image_width, regions.image_height,
                                                     regions.image_width, regions.image_height, 1.0)
        if regions is not None:
            if (regions.image_width, regions.image_height) != (width0, height0):
                raise SampleError("region_size_mismatch", f"regions for {regions.image_width} x "
                                  f"{regions.image_height}, image {width0} x {height0}")
            boxes = check_boxes(regions.boxes, width0, height0)
            features, scores = regions.features, regions.scores
        elif row.boxes is not None and len(row.boxes) > 0:
            try:
                given = np.asarray(row.boxes, dtype=np.float32)
            except (ValueError, TypeError) as err:
                raise SampleError("bad_boxes", str(err)) from err
            boxes = check_boxes(given, width0, height0)
        else:
            boxes = np.zeros((0, 4), dtype=np.float32)
        if not self.with_images and features is None:
            raise SampleError("missing_features")
        record = VLRecord(key=f"{shard:06d}_{position:06d}", caption=caption, image_width=width,
                          image_height=height, boxes=boxes * scale, scores=scores, features=features, jpeg=jpeg)
        sample = encode_vl(record)
        meta = json.loads(sample["json"])
        meta["source"] = {"image": row.image, "image_id": row.image_id}
        sample["json"] = json.dumps(meta).encode()
        return [sample]
