"""Writing a dataset folder: shards in parallel, atomically, resumable; `sizes.json` and a summary.

A shard `shard-NNNNNN.tar` counts as done only when `shard-NNNNNN_stats.json` exists: the tar is
written first (atomically), the stats file last, so a crash mid-shard means the shard is redone
(the img2dataset "commit marker last" rule). `sizes.json` (shard name -> sample count) is rebuilt
from all stats files at the end, which is what the loader's exact-epoch mode reads.

Resuming trusts a finished shard only if it was made from the same input: its stats file records a
digest of its input rows and of the options that shape the output (`input_digest`). A re-run whose
rows or options differ for a finished shard (rows inserted into a manifest, another tokenizer, ...)
is refused before anything is written, naming the shards; `--overwrite` redoes them. Shards left from
a previous run with more input are refused (or, with `--overwrite`, removed) the same way. Temporary
files of a killed run (`*.tmp-XXXXXXXX`) are removed when the next run starts.

Worker processes die with the tool (`die_with_parent`), report every row to the progress bar, and
record each skipped row (reason, detail, what the row was) in the shard's stats, from which
`--skipped-log FILE` writes one JSON line per skipped row of the whole dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import webdataset as wds
from tqdm import tqdm

from vlbert_ds.data import storage
from vlbert_ds.data.schema import FORMAT_VERSION, SampleError
from vlbert_ds.lifecycle import die_with_parent

log = logging.getLogger(__name__)


SHARD_MTIME = 1_700_000_000
_SHARD_FILE = re.compile(r"^shard-(\d{6})(\.tar|_stats\.json)$")
_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{8}$")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def stats_name(index: int) -> str:
    return f"shard-{index:06d}_stats.json"


@dataclass
class ShardJob:
    """One shard's worth of input rows; `make` turns a row into encoded samples or raises SampleError.

    `first_row` is the input row number of `rows[0]` (for the skipped-rows log)."""

    index: int
    rows: list[Any]
    first_row: int = 0


@dataclass
class PrepSummary:
    kind: str
    out: str
    shards_total: int = 0
    shards_written: int = 0
    shards_already_done: int = 0
    samples: int = 0  # in the whole dataset
    samples_written: int = 0  # by this run
    skipped: Counter = field(default_factory=Counter)
    bytes_written: int = 0
    seconds: float = 0.0
    skipped_log: str | None = None

    def table(self) -> str:
        rows = [("output", self.out), ("kind", self.kind),
                ("shards", f"{self.shards_total} ({self.shards_written} written, "
                           f"{self.shards_already_done} already done)"),
                ("samples in dataset", f"{self.samples:,}"),
                ("samples written now", f"{self.samples_written:,}"),
                ("samples skipped", f"{sum(self.skipped.values()):,}"),
                *[(f"  {reason}", f"{count:,}") for reason, count in sorted(self.skipped.items())],
                *([("skipped rows listed in", self.skipped_log)] if self.skipped_log else []),
                ("bytes written", f"{self.bytes_written / 1e6:,.1f} MB"),
                ("time", f"{self.seconds:,.1f} s"),
                ("throughput", f"{self.samples_written / max(self.seconds, 1e-9):,.1f} samples/s")]
        return key_value_table(rows)


def key_value_table(rows: list[tuple[str, str]]) -> str:
    """A two-column text table between rules (the summaries prep prints at the end)."""
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k.ljust(width)} | {v}" for k, v in rows), line])


class _CountingWriter:
    def __init__(self, handle) -> None:
        self.handle, self.bytes, self.digest = handle, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.bytes += len(data)
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


# ----------------------------------------------------------------------------- what a shard is made from
def canonical(value: Any) -> Any:
    """A JSON-able, order-stable form of rows and maker options (arrays by content digest)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__type__": type(value).__name__,
                **{f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value)
        return {"__array__": str(data.dtype), "shape": list(data.shape),
                "sha256": hashlib.sha256(data.tobytes()).hexdigest()}
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple | range):
        return [canonical(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if hasattr(value, "__dict__"):  # a helper object of a maker (e.g. a feature projection)
        return {"__type__": type(value).__name__, **canonical(vars(value))}
    return repr(value)


def maker_options(make: Any) -> Any:
    """The options that shape a maker's output: its `fingerprint()` if it has one, else its state."""
    if hasattr(make, "fingerprint"):
        return canonical(make.fingerprint())
    state = make.__getstate__() if hasattr(make, "__getstate__") else getattr(make, "__dict__", {})
    return {"__type__": type(make).__name__, **canonical(state or {})}


def job_digest(job: ShardJob, kind: str, options: Any) -> str:
    payload = json.dumps({"format": FORMAT_VERSION, "kind": kind, "options": options, "first_row": job.first_row,
                          "rows": canonical(job.rows)}, sort_keys=True, default=repr)
    return hashlib.sha256(payload.encode()).hexdigest()


def describe_row(row: Any, limit: int = 300) -> Any:
    """What a skipped row was, for the skipped-rows log: its fields, long values shortened, arrays by shape."""
    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        return {f.name: describe_row(getattr(row, f.name), limit) for f in dataclasses.fields(row)}
    if isinstance(row, np.ndarray):
        return f"array{list(row.shape)}"
    if isinstance(row, str):
        return row if len(row) <= limit else row[:limit] + "..."
    if isinstance(row, dict):
        return {str(k): describe_row(v, limit) for k, v in row.items()}
    if isinstance(row, list | tuple):
        text = json.dumps(row, default=str)
        return row if len(text) <= limit else text[:limit] + "..."
    return row if isinstance(row, int | float | bool) or row is None else str(row)[:limit]


# ----------------------------------------------------------------------------- one shard
_row_counter = None  # a shared multiprocessing.Value in pool workers: rows processed, for the progress bar


def _init_pool_worker(counter) -> None:
    global _row_counter
    die_with_parent()
    _row_counter = counter


def _count_row() -> None:
    if _row_counter is not None:
        with _row_counter.get_lock():
            _row_counter.value += 1


def write_shard(out: str, job: ShardJob, make: Callable[[Any, int, int], Iterable[dict[str, Any]]],
                kind: str, digest: str = "", on_row: Callable[[], None] | None = None) -> dict[str, Any]:
    """Build one shard from its rows; return its stats (also written as the shard's commit marker)."""
    start = time.time()
    skipped: Counter = Counter()
    skipped_rows: list[dict[str, Any]] = []
    count = 0
    written = [0]
    checksum = [""]
    tick = on_row or _count_row

    def write(handle) -> None:
        nonlocal count
        counter = _CountingWriter(handle)
        # A fixed integer mtime: reproducible shards, and no per-member PAX header to parse when reading.
        with wds.TarWriter(counter, encoder=False, mtime=SHARD_MTIME) as sink:
            for position, row in enumerate(job.rows):
                try:
                    samples = list(make(row, job.index, position))
                except SampleError as err:
                    skipped[err.reason] += 1
                    skipped_rows.append({"row": job.first_row + position, "shard": shard_name(job.index),
                                         "reason": err.reason, "detail": str(err)[:500],
                                         "input": describe_row(row)})
                    log.debug("shard %d row %d skipped: %s", job.index, position, err)
                    tick()
                    continue
                for sample in samples:
                    sink.write(sample)
                    count += 1
                tick()
        written[0] = counter.bytes
        checksum[0] = counter.digest.hexdigest()

    storage.write_atomic(storage.join(out, shard_name(job.index)), write)
    stats = {"format": FORMAT_VERSION, "kind": kind, "shard": shard_name(job.index), "rows": len(job.rows),
             "first_row": job.first_row, "input_digest": digest, "successes": count, "skipped": dict(skipped),
             "skipped_rows": skipped_rows, "bytes": written[0], "sha256": checksum[0], "start_time": start,
             "end_time": time.time(),
             "duration": time.time() - start}
    storage.write_json_atomic(storage.join(out, stats_name(job.index)), stats)
    return stats


def _write_shard_entry(args: tuple) -> dict[str, Any]:
    return write_shard(*args)


def chunk(rows: Iterable[Any], size: int) -> Iterator[ShardJob]:
    batch: list[Any] = []
    index = first = 0
    for number, row in enumerate(rows):
        if not batch:
            first = number
        batch.append(row)
        if len(batch) == size:
            yield ShardJob(index, batch, first)
            index, batch = index + 1, []
    if batch:
        yield ShardJob(index, batch, first)


# ----------------------------------------------------------------------------- the folder
def existing_files(out: str, pattern: re.Pattern[str] | str = _SHARD_FILE) -> tuple[dict[int, list[str]], list[str]]:
    """Files in `out` whose names match `pattern` (group 1: the file index), by index, and the temporary
    files a killed run left behind."""
    pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
    fs, path = fsspec.core.url_to_fs(out)
    by_index: dict[int, list[str]] = {}
    temporary = []
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return {}, []
    for name in names:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if _TEMPORARY.search(base):
            temporary.append(name)
            continue
        match = pattern.match(base)
        if match:
            by_index.setdefault(int(match.group(1)), []).append(name)
    return by_index, temporary


def remove_files(out: str, names: list[str]) -> None:
    fs, _ = fsspec.core.url_to_fs(out)
    for name in names:
        fs.rm(name)


def plan_resume(out: str, digests: dict[int, str], overwrite: bool, name: Callable[[int], str],
                stats: Callable[[int], str], pattern: re.Pattern[str] | str = _SHARD_FILE) -> tuple[list[int], int]:
    """Which output files (by index) still to write, and how many are done already, for a resumable run.

    Temporary files of a killed run are removed. A finished file (its stats marker exists) is reused
    only when its recorded `input_digest` equals this run's; finished files made from other input, and
    files beyond this input's count, are refused (ValueError naming them) before anything is written,
    unless `overwrite` (then they are redone, or removed).
    """
    existing, temporary = existing_files(out, pattern)
    if temporary:
        log.warning("removing %d temporary files left by an interrupted run in %s", len(temporary), out)
        remove_files(out, temporary)
    extra = sorted(i for i in existing if i not in digests)
    todo, changed, done = [], [], 0
    for index, digest in digests.items():
        recorded = storage.read_json(storage.join(out, stats(index))) if index in existing else None
        if recorded is None or overwrite:
            todo.append(index)
        elif recorded.get("input_digest") != digest:
            changed.append(index)
        else:
            done += 1
    if (changed or extra) and not overwrite:
        def names(indices: list[int]) -> str:
            return ", ".join(name(i) for i in indices[:5]) + (", ..." if len(indices) > 5 else "")

        parts = []
        if changed:
            parts.append(f"{len(changed)} finished file(s) were made from other input rows or options than this "
                         f"run's ({names(changed)})")
        if extra:
            parts.append(f"{len(extra)} file(s) beyond this input's {len(digests)} are left from an earlier run "
                         f"({names(extra)})")
        raise ValueError(f"{out}: " + "; ".join(parts) + ". Mixing them would duplicate or lose rows: re-run with "
                         "--overwrite to redo the folder from this input, or write to a new --out")
    if extra:  # overwrite: the folder must hold exactly this input's files
        remove_files(out, [file for index in extra for file in existing[index]])
    return todo, done


def write_dataset(out: str, jobs: list[ShardJob], make: Callable[[Any, int, int], Iterable[dict[str, Any]]],
                  kind: str, processes: int = 1, overwrite: bool = False,
                  skipped_log: str | None = None) -> PrepSummary:
    """Write every shard not already done, in `processes` processes, then `sizes.json`."""
    start = time.time()
    storage.makedirs(out)
    summary = PrepSummary(kind=kind, out=out, shards_total=len(jobs), skipped_log=skipped_log)
    options = maker_options(make)
    digests = {job.index: job_digest(job, kind, options) for job in jobs}
    indices, summary.shards_already_done = plan_resume(out, digests, overwrite, shard_name, stats_name)
    todo = [job for job in jobs if job.index in set(indices)]
    progress = tqdm(total=sum(len(j.rows) for j in todo), unit="row", desc=f"vlbert-prep {kind}", leave=False,
                    disable=None)

    def account(stats: dict[str, Any]) -> None:
        summary.shards_written += 1
        summary.bytes_written += stats["bytes"]
        summary.samples_written += stats["successes"]

    if processes <= 1 or len(todo) <= 1:
        for job in todo:
            account(write_shard(out, job, make, kind, digests[job.index], on_row=lambda: progress.update(1)))
    else:
        counter = multiprocessing.get_context().Value("q", 0)
        with ProcessPoolExecutor(max_workers=min(processes, len(todo)), initializer=_init_pool_worker,
                                 initargs=(counter,)) as pool:
            pending = {pool.submit(_write_shard_entry, (out, job, make, kind, digests[job.index])) for job in todo}
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                for future in done:
                    account(future.result())
                progress.update(counter.value - progress.n)
    progress.close()

    sizes = {}
    skipped_rows: list[dict[str, Any]] = []
    for job in jobs:
        stats = storage.read_json(storage.join(out, stats_name(job.index)))
        if stats is None:
            continue
        sizes[stats["shard"]] = stats["successes"]
        summary.samples += stats["successes"]
        summary.skipped.update(stats["skipped"])
        skipped_rows += stats.get("skipped_rows", [])
    storage.write_json_atomic(storage.join(out, storage.SIZES_NAME), sizes)
    if skipped_log:
        lines = "".join(json.dumps(row, default=str) + "\n" for row in sorted(skipped_rows, key=lambda r: r["row"]))
        storage.write_atomic(skipped_log, lambda handle: handle.write(lines.encode()))
    summary.seconds = time.time() - start
    return summary
