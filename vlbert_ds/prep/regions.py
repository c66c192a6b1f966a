"""Importers for the region formats users already have, and the official box-selection rule.

* Bottom-up-attention TSV (`generate_tsv.py`): tab-separated `image_id, image_w, image_h, num_boxes,
  boxes, features` with base64 float32 arrays, optionally a 7th column of per-box class scores.
  `generate_tsv.py` names its per-GPU outputs `feats.tsv.0`, `feats.tsv.1`, ...: any file is read as
  a TSV (only a folder is taken for per-image JSON), and `.gz`/`.bz2`/`.xz` files are decompressed.
* LXMERT TSV (its released COCO/VG features): `img_id, img_h, img_w, objects_id, objects_conf,
  attrs_id, attrs_conf, num_boxes, boxes, features` (height before width; int64 object/attribute ids,
  float32 confidences). It carries each box's best class and confidence, not the whole distribution:
  the 1601-way soft label (class 0 background, as bottom-up-attention's) is rebuilt as `conf` on class
  `objects_id + 1` and `1 - conf` on background, so the selection rule below sees the same confidence.
  The layout is told from the number of fields (6/7 vs 10) of each file's first row.
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
import re
import sys
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from vlbert_ds.data.schema import SampleError

CONF_THRESHOLD, MIN_BOXES, MAX_BOXES = 0.5, 10, 100


def regions_name(index: int) -> str:
    """The region file `vlbert-prep regions` writes for its file (or, with --detector, shard) `index`."""
    return f"regions-{index:06d}.tsv"


def regions_stats_name(index: int) -> str:
    return f"regions-{index:06d}_stats.json"


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
    image_id, width, height, num = fields[0], _int(fields[1], "image_w"), _int(fields[2], "image_h"), \
        _int(fields[3], "num_boxes")
    boxes = _b64_array(fields[4], num, "boxes")
    features = _b64_array(fields[5], num, "features")
    scores = _b64_array(fields[6], num, "cls_prob") if len(fields) > 6 and fields[6] else None
    return image_id, _validated(Regions(width, height, boxes, features, scores))


LXMERT_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes",
                 "boxes", "features")
BUA_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features", "[cls_prob]")
VG_CLASSES = 1601  # 1600 Visual Genome objects + background


def parse_lxmert_row(fields: list[str], num_classes: int = VG_CLASSES) -> tuple[str, Regions]:
    if len(fields) != len(LXMERT_FIELDS):
        raise SampleError("bad_region_data", f"LXMERT TSV row has {len(fields)} fields, expected 10")
    image_id, height, width, num = fields[0], _int(fields[1], "img_h"), _int(fields[2], "img_w"), \
        _int(fields[7], "num_boxes")
    try:
        objects = np.frombuffer(base64.b64decode(fields[3]), dtype=np.int64)
        confidence = np.frombuffer(base64.b64decode(fields[4]), dtype=np.float32)
    except (binascii.Error, ValueError) as err:
        raise SampleError("bad_region_data", f"objects_id/objects_conf: {err}") from err
    if objects.size != num or confidence.size != num:
        raise SampleError("bad_region_data", f"{objects.size} objects_id and {confidence.size} objects_conf for "
                                             f"{num} boxes")
    if num and (objects.min() < 0 or objects.max() >= num_classes - 1):
        raise SampleError("bad_region_data", f"objects_id outside 0..{num_classes - 2}")
    boxes = _b64_array(fields[8], num, "boxes")
    features = _b64_array(fields[9], num, "features")
    conf = np.clip(confidence.astype(np.float32), 0.0, 1.0)
    scores = np.zeros((num, num_classes), dtype=np.float32)
    scores[np.arange(num), objects + 1] = conf
    scores[:, 0] += 1.0 - conf
    return image_id, _validated(Regions(width, height, boxes, features, scores))


def _int(text: str, field: str) -> int:
    try:
        return int(text)
    except ValueError as err:
        raise SampleError("bad_region_data", f"{field} is {text[:20]!r}, not an integer") from err


def tsv_layout(fields: list[str], where: str) -> str:
    """'bua' or 'lxmert' from a row's fields; a ValueError that names both layouts otherwise."""
    if len(fields) in (6, 7) and fields[3].strip().isdigit():
        return "bua"
    if len(fields) == 10 and fields[7].strip().isdigit():
        return "lxmert"
    raise ValueError(f"{where}: {len(fields)} tab-separated fields, which is neither region TSV layout we read: "
                     f"bottom-up-attention ({', '.join(BUA_FIELDS)}) or LXMERT ({', '.join(LXMERT_FIELDS)})")


PARSERS = {"bua": parse_bua_row, "lxmert": parse_lxmert_row}


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
    """Random access to rows of region TSV files (bottom-up-attention or LXMERT layout) by image id.

    Byte offsets of each row, not rows, are kept in memory. Each file's layout comes from its first
    row, which is parsed whole here, so a file we cannot read is an error naming it before any shard is
    written. Compressed files are read through fsspec (`compression="infer"`): a handle stays open per
    file and seeks, which is fast when the manifest is in the file's order and slow otherwise
    (decompress the file once to read it in any order).
    """

    def __init__(self, urls: list[str]) -> None:
        csv.field_size_limit(sys.maxsize)
        self.offsets: dict[str, tuple[str, int, int]] = {}  # image id -> (url, byte offset, line number)
        self.layouts: dict[str, str] = {}
        for url in urls:
            self._index(url)
        self._handles: dict[str, Any] = {}

    def _index(self, url: str) -> None:
        with fsspec.open(url, "rb", compression="infer") as handle:
            position = 0
            for line_number, line in enumerate(handle, 1):
                fields_start = line.split(b"\t", 1)[0]
                if url not in self.layouts:
                    if not line.strip():
                        position += len(line)
                        continue
                    if fields_start.strip().decode(errors="replace") in ("image_id", "img_id"):  # a header row
                        position += len(line)
                        continue
                    self._check_first_row(url, line, line_number)
                self.offsets.setdefault(fields_start.decode(errors="replace"), (url, position, line_number))
                position += len(line)
        self.layouts.setdefault(url, "empty")  # e.g. a region file all of whose images were unreadable

    def _check_first_row(self, url: str, line: bytes, line_number: int) -> None:
        try:
            fields = line.decode().rstrip("\r\n").split("\t")
        except UnicodeDecodeError as err:
            raise ValueError(f"--regions {url} row {line_number}: not a text TSV ({err}); compressed files need "
                             "a .gz/.bz2/.xz name") from err
        layout = tsv_layout(fields, f"--regions {url} row {line_number}")
        try:
            PARSERS[layout](fields)
        except SampleError as err:
            raise ValueError(f"--regions {url} row {line_number} ({layout} layout): {err}") from err
        self.layouts[url] = layout

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.offsets

    def get(self, image_id: str) -> Regions:
        if image_id not in self.offsets:
            raise SampleError("missing_regions", image_id)
        url, offset, line_number = self.offsets[image_id]
        handle = self._handles.get(url)
        if handle is None:
            handle = self._handles[url] = fsspec.open(url, "rb", compression="infer").open()
        handle.seek(offset)
        line = handle.readline().decode(errors="replace").rstrip("\r\n")
        try:
            return PARSERS[self.layouts[url]](line.split("\t"))[1]
        except SampleError as err:
            raise SampleError(err.reason, f"{url} row {line_number}: {err}") from err


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
    """A region source: region TSV file(s), comma-separated, of either layout; a folder of them (what
    `vlbert-prep regions` writes); or one folder of frcnn JSON."""
    return BuaTsvIndex(_region_tsvs(spec)) if _region_tsvs(spec) else FrcnnJsonFolder(spec.split(",")[0])


_TSV_NAME = re.compile(r"\.tsv(\.\d+)?(\.(gz|bz2|xz))?$")


def _region_tsvs(spec: str) -> list[str]:
    """The TSV files a --regions spec names ([] for one folder of per-image JSON)."""
    parts = [p for p in spec.split(",") if p]
    folders = [p for p in parts if _is_folder(p)]
    if not folders:
        return parts
    if len(parts) > 1:
        raise ValueError(f"--regions {spec!r}: give region TSV files, or one folder, not both")
    fs, path = fsspec.core.url_to_fs(parts[0])
    names = sorted(n for n in fs.ls(path, detail=False) if _TSV_NAME.search(n.rsplit("/", 1)[-1]))
    if not names:
        return []
    protocol = parts[0].split("://", 1)[0] + "://" if "://" in parts[0] else ""
    return [protocol + n if protocol and not n.startswith(protocol) else n for n in names]


def check_regions(spec: str) -> str:
    """Read just the first row of each region TSV (or nothing, for a folder of JSON) so that a file in a
    layout we cannot read is an error naming it before any shard is written. Returns a one-line description."""
    urls = _region_tsvs(spec)
    if not urls:
        return f"per-image frcnn JSON in {spec}"
    probe = BuaTsvIndex.__new__(BuaTsvIndex)
    probe.layouts = {}
    for url in urls:
        with fsspec.open(url, "rb", compression="infer") as handle:
            for line_number, line in enumerate(handle, 1):
                first = line.split(b"\t", 1)[0].strip().decode(errors="replace")
                if line.strip() and first not in ("image_id", "img_id"):
                    probe._check_first_row(url, line, line_number)
                    break
        if url not in probe.layouts:
            probe.layouts[url] = "empty"
    if all(layout == "empty" for layout in probe.layouts.values()):
        raise ValueError(f"--regions {spec}: no rows")
    if len(urls) > 3:
        return f"{len(urls)} TSV files ({', '.join(sorted(set(probe.layouts.values())))}) from {spec}"
    return ", ".join(f"{url} ({layout} TSV)" for url, layout in probe.layouts.items())


def _is_folder(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.isdir(path)
