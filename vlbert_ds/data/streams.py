"""What every shard stream shares: reading shard pieces, the shuffle buffer, worker DataLoaders, and a
resumable position.

`ShardStream` is the base of `PretrainStream` (pipeline.py) and `TaskStream` (task_batches.py): one
rank's batches in the global order of `elastic.py`, produced by DataLoader workers, whose position is
a small world-size free dict saved in checkpoints (`state_dict()` / `load_state_dict()`, torchdata's
`StatefulDataLoader` convention; each rank knows its part, `merge_states` joins them).
`ResumableLoader` is what a training loop iterates: it runs epoch after epoch, records every batch it
hands out into the stream's position, and starts DataLoader workers without moving torch's global RNG.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import re
import signal
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from vlbert_ds.data import storage
from vlbert_ds.data.cache import shard_cache
from vlbert_ds.data.tarstream import iter_members
from vlbert_ds.lifecycle import die_with_parent, stop_children_at_exit

log = logging.getLogger(__name__)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-/]+$")


@dataclass(frozen=True)
class ReadSettings:
    """How hard `read_piece` tries before skipping a shard (a `LoaderConfig` has the same fields)."""

    shard_open_attempts: int = 5
    shard_retry_delay: float = 0.5
    cache_dir: str | None = None  # node-local shard cache; None = read storage every time
    cache_size_gb: float = 0.0


@dataclass(frozen=True)
class ShardPiece:
    """A shard, or every `stride`-th sample of it starting at `offset`."""

    url: str
    count: int
    stride: int = 1
    offset: int = 0


class SkipCounter(Counter):
    def take(self) -> dict[str, int]:
        out = dict(self)
        self.clear()
        return out


def _group_samples(stream, url: str, skipped: SkipCounter) -> Iterator[dict[str, Any]]:
    """Tar members -> samples grouped by key; unsafe names refused; a broken tar ends the shard."""
    current: dict[str, Any] | None = None
    try:
        for name, data in iter_members(stream):
            if name.startswith("/") or ".." in name.split("/") or not _SAFE_NAME.match(name):
                skipped["unsafe_member_name"] += 1
                continue
            prefix, suffix = base_plus_ext(name)
            if prefix is None:
                continue
            if current is not None and current["__key__"] != prefix:
                yield current
                current = None
            if current is None:
                current = {"__key__": prefix, "__url__": url}
            if suffix in current:
                skipped["duplicate_member"] += 1
                continue
            current[suffix] = data
    except Exception as err:  # truncated or corrupt tar: keep what was read, drop the partial sample
        skipped["broken_shard"] += 1
        log.warning("shard %s broke off (%s: %s); continuing with the next", url, type(err).__name__, err)
        current = None
    if current is not None:
        yield current


def read_indexed(piece: ShardPiece, config: ReadSettings, skipped: SkipCounter) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index in the shard, sample) of the piece's samples, in shard order; an unreadable shard yields none.

    With `config.cache_dir` the shard is read from the node's local copy (fetched on first use)."""
    cache = shard_cache(config.cache_dir, int(config.cache_size_gb * 1e9))
    stream = None
    local = cache.local_path(piece.url) if cache is not None else None
    if local is not None:
        with contextlib.suppress(FileNotFoundError):  # evicted by another process since: read storage
            stream = open(local, "rb", buffering=1 << 20)  # noqa: SIM115 (closed by the `with` below)
    try:
        if stream is None:
            stream = storage.ResumableReader(piece.url, config.shard_open_attempts, config.shard_retry_delay,
                                             on_retry=lambda url, err: skipped.update(["shard_read_retry"]))
    except Exception as err:
        skipped["shard_unreadable"] += 1
        log.error("skipping shard %s after %d attempts: %s", piece.url, config.shard_open_attempts, err)
        return
    with stream:
        for index, sample in enumerate(_group_samples(stream, piece.url, skipped)):
            if index % piece.stride == piece.offset:
                yield index, sample


def read_piece(piece: ShardPiece, config: ReadSettings, skipped: SkipCounter) -> Iterator[dict[str, Any]]:
    for _, sample in read_indexed(piece, config, skipped):
        yield sample


# ----------------------------------------------------------------------------- the resumable stream
class ShardStream(IterableDataset, abc.ABC):
    """One rank's batches from shards, made by `num_workers` DataLoader workers, with a resumable position.

    Subclasses say where a worker starts (`__iter__`, reading the position set by `load_state_dict`
    or `next_epoch`), how a delivered batch moves the position (`advance`), and what the position
    is (`state_dict`). The position is kept in the process that iterates the loader: workers get a
    copy of the stream when they start and never report back except through the batches.
    """

    def __init__(self, rank: int, world_size: int, num_workers: int) -> None:
        super().__init__()
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.loader_workers = num_workers  # 0 = in the iterating process

    @staticmethod
    def worker_id() -> int:
        info = get_worker_info()
        return info.id if info is not None else 0

    @abc.abstractmethod
    def next_epoch(self) -> None:
        """Move to the beginning of the next epoch (this one ran out)."""

    def advance(self, item: Any) -> None:
        """Record that `item` was handed to the trainer."""

    @abc.abstractmethod
    def local_state(self) -> dict[str, Any]:
        """This rank's part of the position after the last batch handed to the trainer (`advance`)."""

    @abc.abstractmethod
    def merge_states(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """Every rank's `local_state()` -> the global, world-size free position saved in checkpoints."""

    def state_dict(self) -> dict[str, Any]:
        return self.merge_states([self.local_state()])

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the workers start at a saved global position (saved on any world size)."""


class ResumableLoader:
    """An endless iterator of a stream's batches through a worker DataLoader, epoch after epoch.

    `state_dict()` is the position after the last batch returned; a loader built the same way and
    given it with `load_state_dict()` returns exactly the batches that would have come next.
    """

    def __init__(self, stream: ShardStream) -> None:
        self.stream = stream
        self._iterator: Iterator[Any] | None = None

    def __iter__(self) -> ResumableLoader:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._start()
        try:
            item = next(self._iterator)
        except StopIteration:  # end of the epoch: every rank of an exact or resampled stream ends it together
            self.stream.next_epoch()
            self._iterator = self._start()
            item = next(self._iterator)
        self.stream.advance(item)
        return item

    def _start(self) -> Iterator[Any]:
        loader = worker_loader(self.stream, self.stream.loader_workers)
        # Starting DataLoader workers draws a seed from torch's global generator; keep that draw out of
        # the training RNG stream (dropout), or a resumed run would diverge from an uninterrupted one.
        rng = torch.get_rng_state()
        iterator = iter(loader)
        torch.set_rng_state(rng)
        return iterator

    def state_dict(self) -> dict[str, Any]:
        """The global position; with several ranks every rank must call it (one all-gather)."""
        import torch.distributed as dist

        local = self.stream.local_state()
        if dist.is_initialized() and dist.get_world_size() > 1:
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, local)
        else:
            states = [local]
        return self.stream.merge_states(states)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.stream.load_state_dict(state)  # workers restart from the loaded position at the next batch

    def close(self) -> None:
        """Stop the DataLoader workers now (not whenever the garbage collector gets to the iterator)."""
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._iterator = None


# ----------------------------------------------------------------------------- worker DataLoaders
def worker_loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    """A DataLoader over a stream that yields whole batches, with workers that end with the trainer."""
    if num_workers:
        stop_children_at_exit()
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None,
                      worker_init_fn=init_worker)


def _identity(item: Any) -> Any:
    return item


def init_worker(worker_id: int) -> None:
    """Workers die with the trainer and ignore SIGTERM/SIGUSR1: the training process decides when to stop.

    Slurm signals every process of a task. PyTorch's workers die on SIGTERM, and the training process
    then fails with "DataLoader worker is killed by signal" before it can save its checkpoint. Since a
    worker then cannot be ended with SIGTERM, it ends on the loader's shutdown sentinel, on the kernel's
    SIGKILL when the trainer dies (`die_with_parent`, however it dies), or on the trainer's exit handler
    (`stop_children_at_exit`), which SIGKILLs workers that are still running when the trainer exits.
    """
    die_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

