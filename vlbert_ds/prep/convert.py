"""`vlbert-prep convert`: rewrite existing shards (format 1 or 2) as format 2 with other storage settings.

Each source shard becomes the shard of the same number in the output folder, sample keys and
provenance fields unchanged; the writer makes it resumable and atomic like every prep command
(a re-run skips shards done, and refuses an output made with other settings). Features already
compact are widened back before being re-quantised, so int8 -> float16 gives back int8's values.
"""

from __future__ import annotations

import json
import re
from typing import Any

from vlbert_ds.data import storage
from vlbert_ds.data.schema import (
    TASK_KINDS,
    TEXT_KIND,
    VL_KIND,
    Compaction,
    SampleError,
    TextRecord,
    decode_task,
    decode_text,
    decode_vl,
    encode_task,
    encode_text,
    encode_vl,
)
from vlbert_ds.data.streams import ReadSettings, ShardPiece, SkipCounter, read_indexed
from vlbert_ds.prep.parts import WHOLE, Part
from vlbert_ds.prep.writer import PrepSummary, ShardJob, write_dataset

_SHARD_NUMBER = re.compile(r"shard-(\d+)\.tar$")
# Fields the decoders own; everything else of a sample's JSON (source, objects, ...) is carried over.
_OWN_FIELDS = {"format", "kind", "caption", "image_width", "image_height", "num_boxes", "num_classes",
               "class_topk", "feature_dtype"}


def convert_sample(sample: dict[str, Any], compaction: Compaction) -> dict[str, Any]:
    """One raw sample (tar members by suffix) -> its format-2 members."""
    try:
        meta = json.loads(sample.get("json", b"{}"))
    except ValueError as err:
        raise SampleError("bad_json", str(err)) from err
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind == TEXT_KIND:
        record = decode_text(sample)
        return encode_text(TextRecord(key=record.key, tokens=record.tokens))
    if kind == VL_KIND:
        record = decode_vl(sample, need_features="features.npy" in sample, need_image=False)
        record.jpeg = sample.get("jpg")
        out = encode_vl(record, compaction)
    elif kind in TASK_KINDS:
        out = encode_task(decode_task(sample, kind, need_features="features.npy" in sample), compaction)
    else:
        raise SampleError("wrong_kind", f"unknown sample kind {kind!r}")
    extra = {k: v for k, v in meta.items() if k not in _OWN_FIELDS}
    if extra:
        out["json"] = json.dumps({**json.loads(out["json"]), **extra}).encode()
    return out


class ShardConverter:
    """Row = (source shard URL, sample index); reads each source shard once per process, in order."""

    def __init__(self, compaction: Compaction) -> None:
        self.compaction = compaction
        self._url: str | None = None
        self._samples: dict[int, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"compaction": self.compaction}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["compaction"])

    def __call__(self, row: tuple[str, int], shard: int, position: int) -> list[dict[str, Any]]:
        url, index = row
        if url != self._url:
            skipped = SkipCounter()
            self._samples = dict(read_indexed(ShardPiece(url, 0), ReadSettings(), skipped))
            self._url = url
            if skipped.get("shard_unreadable"):
                raise OSError(f"{url}: cannot be read")
        sample = self._samples.pop(index, None)
        if sample is None:
            raise SampleError("missing_in_source", f"{url} has no sample {index}")
        return [convert_sample({k: v for k, v in sample.items() if k != "__url__"}, self.compaction)]


def source_jobs(source: str) -> tuple[list[ShardJob], str]:
    """One job per source shard (numbered as the source numbers it), one row per sample; and the kind."""
    urls = storage.expand_urls(source)
    if not urls:
        raise ValueError(f"{source}: no shards (shard-NNNNNN.tar) found")
    sizes = storage.read_sizes(urls)
    jobs, kinds, used = [], set(), set()
    for number, url in enumerate(urls):
        match = _SHARD_NUMBER.search(url)
        index = int(match.group(1)) if match else number
        if index in used:
            raise ValueError(f"{source}: two shards would both become shard {index}")
        used.add(index)
        stats = storage.read_json(re.sub(r"\.tar$", "_stats.json", url)) or {}
        if stats.get("kind"):
            kinds.add(stats["kind"])
        count = sizes.get(url)
        if count is None:  # no sizes.json entry: count the samples
            count = sum(1 for _ in read_indexed(ShardPiece(url, 0), ReadSettings(), SkipCounter()))
        jobs.append(ShardJob(index, [(url, i) for i in range(count)], sum(len(j.rows) for j in jobs)))
    if len(kinds) > 1:
        raise ValueError(f"{source}: shards of several kinds ({', '.join(sorted(kinds))}); convert one at a time")
    return jobs, (kinds.pop() if kinds else "vl")


def convert_dataset(source: str, out: str, compaction: Compaction, processes: int = 1, overwrite: bool = False,
                    skipped_log: str | None = None, part: Part = WHOLE) -> PrepSummary:
    if storage.join(source, "") == storage.join(out, ""):
        raise ValueError("--out must differ from the source folder (shards are rewritten, not changed in place)")
    jobs, kind = source_jobs(source)
    summary = write_dataset(out, jobs, ShardConverter(compaction), kind, processes, overwrite, skipped_log, part)
    folder = source if storage.exists(storage.join(source, storage.SIZES_NAME)) else None
    for name in ("classes.json", "answers.json"):  # side files the loaders read beside the shards
        if folder and storage.exists(storage.join(folder, name)):
            storage.write_json_atomic(storage.join(out, name), storage.read_json(storage.join(folder, name)))
    return summary
