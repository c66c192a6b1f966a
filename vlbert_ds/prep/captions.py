"""`vlbert-prep captions`: image-caption manifests (+ optional region files) -> vision-language shards.

Manifest rows (JSONL, TSV/CSV with a header, or parquet) have `caption` and either `image` (a path
relative to `--image-root` or an fsspec URL such as `s3://bucket/x.jpg`) or, with `--no-images`, only
an `image_id` whose regions come from `--regions`. Optional: `boxes` ([[x1, y1, x2, y2], ...] in
pixels of the image as displayed, i.e. after its EXIF orientation) and `image_id` (the join key into
`--regions`).

A manifest must not be able to read arbitrary files of the machine that runs the tool: absolute
paths, `~`, `..` and every URL that reaches the local filesystem (`file://`, `local://`, and chains such
as `simplecache::file://...` or `zip://...`) are refused and counted as `unsafe_path`, unless the user
passes `--allow-local-urls`. Remote URLs (s3, gs, http(s), az, ...) are allowed, also behind fsspec's
caching wrappers (`simplecache::s3://...`).

Rows that cannot be parsed (a broken JSON line, a TSV/CSV row with too many or too few fields) are
counted as `malformed_row`; a TSV/CSV without a header row naming `caption` is refused as a whole.
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

from vlbert_ds.data.schema import Compaction, SampleError, VLRecord, encode_vl
from vlbert_ds.prep.images import check_boxes, open_image, read_bytes, resize_and_encode
from vlbert_ds.prep.img2dataset import Img2DatasetFiles, Img2DatasetRow
from vlbert_ds.prep.lazy import LazyTools
from vlbert_ds.prep.regions import BuaTsvIndex, Regions, open_regions, regions_name, select_boxes

# Protocols that reach other machines; every other one (file, local, memory, zip, tar, dir, ...) can read
# this machine's files and needs --allow-local-urls.
REMOTE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "http", "https", "az", "abfs", "abfss", "adl", "oss",
                              "hf", "webhdfs", "ftp", "sftp", "ssh", "oci", "wandb"})
CACHE_WRAPPERS = frozenset({"simplecache", "filecache", "blockcache"})
MANIFEST_COLUMNS = ("caption", "image", "image_id", "boxes")


@dataclass
class CaptionRow:
    caption: str
    image: str | None = None
    image_id: str | None = None
    boxes: Any = None
    malformed: str | None = None  # why the row could not be parsed (counted as malformed_row)


def _records(url: str) -> list[dict[str, Any] | str]:
    """The manifest's records; a string stands for a row that could not be parsed (and says why)."""
    lower = url.lower().removesuffix(".gz").removesuffix(".bz2").removesuffix(".xz").removesuffix(".zst")
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fsspec.open(url, "rb") as handle:
            return pq.read_table(handle).to_pylist()
    try:
        with fsspec.open(url, "rt", encoding="utf-8", compression="infer") as handle:
            text = handle.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"--manifest {url}: not UTF-8 text ({err}); expected JSONL, TSV/CSV or parquet") from err
    if lower.endswith((".tsv", ".csv")):
        delimiter = "\t" if lower.endswith(".tsv") else ","
        reader = csv.reader(io.StringIO(text), delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return []
        if "caption" not in header:
            raise ValueError(f"--manifest {url}: the first row {header[:4]} is not a header naming a 'caption' "
                             f"column; a {lower.rsplit('.', 1)[1].upper()} manifest needs a header row with the "
                             f"columns it has, of {', '.join(MANIFEST_COLUMNS)}")
        records: list[dict[str, Any] | str] = []
        for line_number, fields in enumerate(reader, 2):
            if not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                records.append(f"line {line_number}: {len(fields)} fields, the header has {len(header)}")
            else:
                records.append(dict(zip(header, fields, strict=True)))
        return records
    records = []
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            records.append(f"line {line_number}: invalid JSON ({err})")
            continue
        records.append(record if isinstance(record, dict) else f"line {line_number}: not a JSON object")
    return records


def read_manifest(url: str) -> list[CaptionRow]:
    """Parse a manifest; rows that cannot be parsed are kept as `malformed` rows (counted when processed)."""
    rows = []
    for record in _records(url):
        if isinstance(record, str):
            rows.append(CaptionRow(caption="", malformed=record))
            continue
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


def is_remote_url(reference: str) -> bool:
    """A URL whose target is another machine: remote protocol, optionally behind fsspec cache wrappers."""
    *wrappers, target = reference.split("::")
    if any(w.split("://", 1)[0].lower() not in CACHE_WRAPPERS for w in wrappers):
        return False
    return "://" in target and target.split("://", 1)[0].lower() in REMOTE_PROTOCOLS


def resolve_image(reference: str, image_root: str, allow_local: bool = False) -> str:
    """Where to read a manifest's image reference; local-filesystem escapes need `allow_local`."""
    if "://" in reference or "::" in reference:
        if not allow_local and not is_remote_url(reference):
            raise SampleError("unsafe_path", f"{reference}: reads this machine's files (--allow-local-urls permits it)")
        return reference
    if not allow_local and (reference.startswith(("/", "~", "\\")) or ".." in reference.replace("\\", "/").split("/")
                            or (len(reference) > 1 and reference[1] == ":")):
        raise SampleError("unsafe_path", f"{reference}: outside --image-root (--allow-local-urls permits it)")
    if reference.startswith("/"):
        return reference
    return posixpath.join(image_root.rstrip("/"), reference) if image_root else reference


def image_bytes_and_caption(row: CaptionRow | Img2DatasetRow, image_root: str, allow_local: bool,
                            files: Img2DatasetFiles, caption_field: str | None = None,
                            need_image: bool = True) -> tuple[bytes | None, str, str | None]:
    """(the image's bytes, the caption, the region key) of a manifest or img2dataset row; a manifest row's
    bytes are None unless `need_image`. SampleError for a row that cannot give them."""
    if isinstance(row, Img2DatasetRow):  # the bytes come with the caption, out of the same tar
        data, caption = files.read(row, caption_field)
        return data, caption, row.key
    if row.malformed:
        raise SampleError("malformed_row", row.malformed)
    key = row.image_id if row.image_id is not None else row.image  # as `vlbert-prep regions` keys them
    if not need_image:
        return None, row.caption or "", key
    if not row.image:
        raise SampleError("missing_image")
    return read_bytes(resolve_image(row.image, image_root, allow_local)), row.caption or "", key


class CaptionSampleMaker(LazyTools):
    """Turns one manifest (or img2dataset) row into one encoded sample; picklable, loads its tools lazily
    per process. With `regions_by_shard`, shard N's regions are read from `regions-NNNNNN.tsv` of the
    regions folder alone (what `--detector` writes, one region file per shard), not from an index of all."""

    LAZY = ("_tokenizer", "_regions", "_files", "_shard_regions")

    def __init__(self, image_root: str, regions: str | None, tokenizer: str, with_images: bool = True,
                 short_side: int = 600, max_long_side: int = 1000, quality: int = 90,
                 allow_local_urls: bool = False, compaction: Compaction | None = None,
                 caption_field: str | None = None, regions_by_shard: bool = False) -> None:
        self.compaction = compaction or Compaction()
        self.image_root, self.regions_spec, self.tokenizer_folder = image_root, regions, tokenizer
        self.allow_local_urls = allow_local_urls
        self.with_images, self.short_side, self.max_long_side, self.quality = (
            with_images, short_side, max_long_side, quality)
        self.caption_field, self.regions_by_shard = caption_field, regions_by_shard
        self._regions = self._tokenizer = self._files = self._shard_regions = None

    @property
    def regions(self):
        if self._regions is None and self.regions_spec:
            self._regions = open_regions(self.regions_spec)
        return self._regions

    def regions_of(self, shard: int):
        if not self.regions_spec:
            return None
        if not self.regions_by_shard:
            return self.regions
        if self._shard_regions is None or self._shard_regions[0] != shard:
            url = self.regions_spec.rstrip("/") + "/" + regions_name(shard)
            self._shard_regions = (shard, BuaTsvIndex([url]))
        return self._shard_regions[1]

    @property
    def files(self) -> Img2DatasetFiles:
        if self._files is None:
            self._files = Img2DatasetFiles()
        return self._files

    def __call__(self, row: CaptionRow | Img2DatasetRow, shard: int, position: int) -> list[dict[str, Any]]:
        data, caption, key = image_bytes_and_caption(row, self.image_root, self.allow_local_urls, self.files,
                                                     self.caption_field, need_image=False)
        caption = " ".join(caption.split())
        if not caption or not self.tokenizer(caption, add_special_tokens=False)["input_ids"]:
            raise SampleError("empty_caption")
        regions: Regions | None = None
        source_regions = self.regions_of(shard)
        if source_regions is not None:
            if key is None:
                raise SampleError("missing_image_id")
            regions = select_boxes(source_regions.get(key))
        features = scores = None
        jpeg = None
        if self.with_images:
            if data is None:  # a manifest row: its image is read only now, after the cheaper checks
                data, _, _ = image_bytes_and_caption(row, self.image_root, self.allow_local_urls, self.files,
                                                     self.caption_field)
            image = open_image(data)
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
        elif getattr(row, "boxes", None) is not None and len(row.boxes) > 0:
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
        sample = encode_vl(record, self.compaction)
        meta = json.loads(sample["json"])
        meta["source"] = ({"img2dataset_key": row.key, "url": row.url} if isinstance(row, Img2DatasetRow)
                          else {"image": row.image, "image_id": row.image_id})
        sample["json"] = json.dumps(meta).encode()
        return [sample]
