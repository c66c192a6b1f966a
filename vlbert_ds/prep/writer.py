"""Writing a dataset folder: shards in parallel, atomically, resumable; `sizes.json` and a summary.

A shard `shard-NNNNNN.tar` counts as done only when `shard-NNNNNN_stats.json` exists: the tar is
written first (atomically), the stats file last, so a crash mid-shard means the shard is redone
(the img2dataset "commit marker last" rule). `sizes.json` (shard name -> sample count) is rebuilt
from all stats files at the end, which is what the loader's exact-epoch mode reads.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import webdataset as wds
from tqdm import tqdm

from vlbert_ds.data import storage
from vlbert_ds.data.schema import FORMAT_VERSION, SampleError

log = logging.getLogger(__name__)


SHARD_MTIME = 1_700_000_000


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def stats_name(index: int) -> str:
    return f"shard-{index:06d}_stats.json"


@dataclass
class ShardJob:
    """One shard's worth of input rows; `make` turns a row into encoded samples or raises SampleError."""

    index: int
    rows: list[Any]


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

    def table(self) -> str:
        rows = [("output", self.out), ("kind", self.kind),
                ("shards", f"{self.shards_total} ({self.shards_written} written, "
                           f"{self.shards_already_done} already done)"),
                ("samples in dataset", f"{self.samples:,}"),
                ("samples written now", f"{self.samples_written:,}"),
                ("samples skipped", f"{sum(self.skipped.values()):,}"),
                *[(f"  {reason}", f"{count:,}") for reason, count in sorted(self.skipped.items())],
                ("bytes written", f"{self.bytes_written / 1e6:,.1f} MB"),
                ("time", f"{self.seconds:,.1f} s"),
                ("throughput", f"{self.samples_written / max(self.seconds, 1e-9):,.1f} samples/s")]
        width = max(len(k) for k, _ in rows)
        line = "-" * (width + 3 + max(len(v) for _, v in rows))
        return "\n".join([line, *(f"{k.ljust(width)} | {v}" for k, v in rows), line])


class _CountingWriter:
    def __init__(self, handle) -> None:
        self.handle, self.bytes = handle, 0

    def write(self, data: bytes) -> int:
        self.bytes += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def write_shard(out: str, job: ShardJob, make: Callable[[Any, int, int], Iterable[dict[str, Any]]],
                kind: str) -> dict[str, Any]:
    """Build one shard from its rows; return its stats (also written as the shard's commit marker)."""
    start = time.time()
    skipped: Counter = Counter()
    count = 0
    written = [0]

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
                    log.debug("shard %d row %d skipped: %s", job.index, position, err)
                    continue
                for sample in samples:
                    sink.write(sample)
                    count += 1
        written[0] = counter.bytes

    storage.write_atomic(storage.join(out, shard_name(job.index)), write)
    stats = {"format": FORMAT_VERSION, "kind": kind, "shard": shard_name(job.index), "rows": len(job.rows),
             "successes": count, "skipped": dict(skipped), "bytes": written[0], "start_time": start,
             "end_time": time.time(), "duration": time.time() - start}
    storage.write_json_atomic(storage.join(out, stats_name(job.index)), stats)
    return stats


def _write_shard_entry(args: tuple) -> dict[str, Any]:
    return write_shard(*args)


def chunk(rows: Iterable[Any], size: int) -> Iterator[ShardJob]:
    batch: list[Any] = []
    index = 0
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield ShardJob(index, batch)
            index, batch = index + 1, []
    if batch:
        yield ShardJob(index, batch)


def write_dataset(out: str, jobs: list[ShardJob], make: Callable[[Any, int, int], Iterable[dict[str, Any]]],
                  kind: str, processes: int = 1, overwrite: bool = False) -> PrepSummary:
    """Write every shard not already done, in `processes` processes, then `sizes.json`."""
    start = time.time()
    storage.makedirs(out)
    summary = PrepSummary(kind=kind, out=out, shards_total=len(jobs))
    todo = []
    for job in jobs:
        marker = storage.join(out, stats_name(job.index))
        if not overwrite and storage.exists(marker):
            summary.shards_already_done += 1
            continue
        todo.append(job)
    progress = tqdm(total=sum(len(j.rows) for j in todo), unit="row", desc=f"vlbert-prep {kind}", leave=False,
                    disable=None)

    def account(stats: dict[str, Any], rows: int) -> None:
        summary.shards_written += 1
        summary.bytes_written += stats["bytes"]
        summary.samples_written += stats["successes"]
        progress.update(rows)

    if processes <= 1 or len(todo) <= 1:
        for job in todo:
            account(write_shard(out, job, make, kind), len(job.rows))
    else:
        with ProcessPoolExecutor(max_workers=processes) as pool:
            futures = {pool.submit(_write_shard_entry, (out, job, make, kind)): job for job in todo}
            for future in as_completed(futures):
                account(future.result(), len(futures[future].rows))
    progress.close()

    sizes = {}
    for job in jobs:
        stats = storage.read_json(storage.join(out, stats_name(job.index)))
        if stats is None:
            continue
        sizes[stats["shard"]] = stats["successes"]
        summary.samples += stats["successes"]
        summary.skipped.update(stats["skipped"])
    storage.write_json_atomic(storage.join(out, storage.SIZES_NAME), sizes)
    summary.seconds = time.time() - start
    return summary
