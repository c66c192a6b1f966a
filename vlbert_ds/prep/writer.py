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
from vlbert_ds.prep.parts import (
    SUMMARY_NAME,
    WHOLE,
    Part,
    build_plan,
    check_against_other_parts,
    check_complete,
    is_done,
    mark_done,
    record_plan,
    unmark_done,
)

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

    `first_row` is the input row number of `rows[0]` (for the skipped-rows log); `group` decides which
    part writes it (`parts.Part.owns`): the input shard it reads, or by default its own index."""

    index: int
    rows: list[Any]
    first_row: int = 0
    group: int | None = None

    @property
    def part_group(self) -> int:
        return self.index if self.group is None else self.group


# A list of jobs, or a callable that yields them afresh each time (read twice: planned, then written), so
# that an input larger than memory (a text corpus) is streamed.
JobSource = list[ShardJob] | Callable[[], Iterable[ShardJob]]


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
    part: Part = WHOLE
    rows_in: int = 0  # input rows of the whole dataset (this part's, for a part)
    inputs: dict[str, int] = field(default_factory=dict)  # what was read (e.g. documents, empty ones)

    def table(self) -> str:
        scope = "" if self.part.count == 1 else f" (part {self.part})"
        rows = [("output", self.out), ("kind", self.kind),
                *([("part", f"{self.part} (run vlbert-prep finalize when every part is done)")]
                  if self.part.count > 1 else []),
                *[(f"input {name}", f"{count:,}") for name, count in self.inputs.items()],
                (f"rows in{scope}", f"{self.rows_in:,}"),
                ("shards", f"{self.shards_total} ({self.shards_written} written, "
                           f"{self.shards_already_done} already done)"),
                (f"samples in dataset{scope}", f"{self.samples:,}"),
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
    """sha256 of the JSON of what a shard is made from, hashed as it is encoded (never one string of it all)."""
    payload = {"format": FORMAT_VERSION, "kind": kind, "options": options, "first_row": job.first_row,
               "rows": canonical(job.rows)}
    digest = hashlib.sha256()
    for piece in json.JSONEncoder(sort_keys=True, default=repr).iterencode(payload):
        digest.update(piece.encode())
    return digest.hexdigest()


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
                stats: Callable[[int], str], pattern: re.Pattern[str] | str = _SHARD_FILE,
                others: set[int] | frozenset[int] = frozenset()) -> tuple[list[int], int]:
    """Which output files (by index) still to write, and how many are done already, for a resumable run.

    Temporary files of a killed run are removed. A finished file (its stats marker exists) is reused
    only when its recorded `input_digest` equals this run's; finished files made from other input, and
    files beyond this input's count (`others`: files other parts own), are refused (ValueError naming them)
    before anything is written, unless `overwrite` (then they are redone, or removed). Temporary files of
    other parts' files are theirs: they may be being written right now.
    """
    existing, temporary = existing_files(out, pattern)
    compiled = re.compile(pattern) if isinstance(pattern, str) else pattern

    def owner(name: str) -> int | None:
        match = compiled.match(_TEMPORARY.sub("", name.rstrip("/").rsplit("/", 1)[-1]))
        return int(match.group(1)) if match else None

    temporary = [name for name in temporary if (owner(name) in digests) or (owner(name) is None and not others)]
    if temporary:
        log.warning("removing %d temporary files left by an interrupted run in %s", len(temporary), out)
        remove_files(out, temporary)
    extra = sorted(i for i in existing if i not in digests and i not in others)
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
            parts.append(f"{len(extra)} file(s) beyond this input's {len(digests) + len(others)} are left from an "
                         "earlier run "
                         f"({names(extra)})")
        raise ValueError(f"{out}: " + "; ".join(parts) + ". Mixing them would duplicate or lose rows: re-run with "
                         "--overwrite to redo the folder from this input, or write to a new --out")
    if extra:  # overwrite: the folder must hold exactly this input's files
        remove_files(out, [file for index in extra for file in existing[index]])
    return todo, done


def write_dataset(out: str, jobs: JobSource, make: Callable[[Any, int, int], Iterable[dict[str, Any]]],
                  kind: str, processes: int = 1, overwrite: bool = False, skipped_log: str | None = None,
                  part: Part = WHOLE, provenance: dict[str, Any] | None = None,
                  inputs: dict[str, int] | None = None) -> PrepSummary:
    """Write every shard of `part` not already done, in `processes` processes; a whole run then finalizes
    (`sizes.json`, the summary), a part marks itself done (`parts`).

    The jobs are gone through twice: to plan (every shard's digest, also the shards of other parts), and
    to write this part's shards, at most `processes` + 1 jobs in memory at a time. `inputs`: counts of
    what was read, for the summary (a job source may carry them as its `inputs`)."""
    start = time.time()
    storage.makedirs(out)
    source = jobs if callable(jobs) else (lambda: iter(jobs))
    options = maker_options(make)
    planned: dict[int, tuple[int, str, int]] = {}
    for job in source():
        planned[job.index] = (job.part_group, job_digest(job, kind, options), len(job.rows))
    plan = build_plan("shards", kind, options, planned, part.count, provenance)
    plan["inputs"] = dict(getattr(source, "inputs", None) or inputs or {})
    own = {index: digest for index, (group, digest, _) in planned.items() if part.owns(group)}
    check_against_other_parts(out, part, plan, overwrite)
    indices, already_done = plan_resume(out, own, overwrite, shard_name, stats_name,
                                        others=set(planned) - set(own))
    record_plan(out, part, plan)
    todo = set(indices)
    if todo:
        unmark_done(out, part)
    summary = PrepSummary(kind=kind, out=out, shards_total=len(own), shards_already_done=already_done,
                          skipped_log=skipped_log, part=part, inputs=plan["inputs"])
    progress = tqdm(total=sum(planned[i][2] for i in todo), unit="row", desc=f"vlbert-prep {kind}", leave=False,
                    disable=None)

    def account(stats: dict[str, Any]) -> None:
        summary.shards_written += 1
        summary.bytes_written += stats["bytes"]
        summary.samples_written += stats["successes"]

    to_write = (job for job in source() if job.index in todo)
    if processes <= 1 or len(todo) <= 1:
        for job in to_write:
            account(write_shard(out, job, make, kind, own[job.index], on_row=lambda: progress.update(1)))
    else:
        counter = multiprocessing.get_context().Value("q", 0)
        workers = min(processes, len(todo))
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_pool_worker, initargs=(counter,)) as pool:
            pending: set = set()

            def drain(limit: int) -> None:
                nonlocal pending
                while len(pending) > limit:
                    done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                    for future in done:
                        account(future.result())
                    progress.update(counter.value - progress.n)

            for job in to_write:
                drain(workers - 1)  # a job per worker in flight: memory is bounded by the pool, not the input
                pending.add(pool.submit(_write_shard_entry, (out, job, make, kind, own[job.index])))
            drain(0)
    progress.close()

    own_stats = [storage.read_json(storage.join(out, stats_name(index))) for index in sorted(own)]
    finished_before = not todo and is_done(out, part)  # a re-run with nothing to do changes no file
    if not finished_before:
        mark_done(out, part, sorted(own), {"rows": sum(s["rows"] for s in own_stats if s),
                                           "successes": sum(s["successes"] for s in own_stats if s)})
    if part.count == 1 and not (finished_before and storage.exists(storage.join(out, storage.SIZES_NAME))):
        finalize_shards(out)
    if skipped_log:
        write_skipped_log(skipped_log, [s for s in own_stats if s])
    for stats in own_stats:
        summary.rows_in += stats["rows"]
        summary.samples += stats["successes"]
        summary.skipped.update(stats["skipped"])
    summary.seconds = time.time() - start
    return summary


def write_skipped_log(url: str, stats: Iterable[dict[str, Any]]) -> None:
    rows = sorted((row for s in stats for row in s.get("skipped_rows", [])), key=lambda r: r["row"])
    lines = "".join(json.dumps(row, default=str) + "\n" for row in rows)
    storage.write_atomic(url, lambda handle: handle.write(lines.encode()))


def finalize_shards(out: str, skipped_log: str | None = None) -> dict[str, Any]:
    """Check a folder of shards whose parts are all done; write `sizes.json` and `prep-summary.json`."""
    def outside_plan(planned: set[int]) -> list[str]:
        existing, _ = existing_files(out)
        return sorted(name for index, names in existing.items() if index not in planned for name in names)

    finished = check_complete(out, stats_name, shard_name, outside_plan)
    sizes = {stats["shard"]: stats["successes"] for _, stats in sorted(finished.stats.items())}
    if skipped_log:
        write_skipped_log(skipped_log, finished.stats.values())
    summary = {**finished.summary, "shards": len(sizes), "inputs": finished.plan.get("inputs", {})}
    storage.write_json_atomic(storage.join(out, SUMMARY_NAME), summary)
    storage.write_json_atomic(storage.join(out, storage.SIZES_NAME), sizes)  # last: it marks the folder readable
    return summary
