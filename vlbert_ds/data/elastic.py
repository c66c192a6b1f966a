"""A global sample order that does not depend on the number of ranks or loader workers.

The design (after mosaicml/streaming's canonical nodes and Megatron-Energon's logical workers, but
fixed by the global batch rather than by the first run's ranks x workers):

* A step holds `slots` micro-batches (ranks x gradient accumulation; fixed for the run, since the
  micro-batch size is). Each slot is fed by `per_slot` *logical readers* in turn: reader
  `slot * per_slot + step % per_slot` makes slot `slot`'s micro-batch of `step`. A reader reads its
  own shards sequentially through its own shuffle buffer, with generators seeded by (seed, epoch,
  reader): what it yields depends on nothing but the data config.
* Ranks take slots strided: rank r owns slots r, r + R, r + 2R, ..., so rank r's micro-batch `a` of
  a step is slot `a * R + r`. Any world size dividing `slots` works; its gradient accumulation is
  `slots / R`, and DeepSpeed's average over ranks and micro-batches is the same average.
* A rank's DataLoader workers split the rank's readers so that worker w makes every W-th micro-batch
  of the rank (W divides accumulation x per_slot, so each reader belongs to one worker and the
  DataLoader's round robin returns them in order).
* The position is global: micro-batches consumed by all ranks this epoch and, per reader, how many
  shuffled samples it has taken. A reader resumes without reading what it took: its shuffle is
  replayed over sample *references* (shard, member index, from `sizes.json`), then only the samples
  still in its buffer are read back.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from vlbert_ds.data.streams import ReadSettings, ShardPiece, SkipCounter, read_indexed

log = logging.getLogger(__name__)
T = TypeVar("T")
Ref = tuple[str, int]  # (shard URL, sample index in the shard)

# Readers per slot when data.readers is 0 (auto). It bounds the DataLoader workers a rank can use
# (a divisor of accumulation x readers per slot), and the shuffle buffers a rank holds.
DEFAULT_READERS_PER_SLOT = 4


class LayoutError(ValueError):
    """The world size cannot keep the run's global batch."""


@dataclass(frozen=True)
class Layout:
    """Micro-batches per step (`slots`) and logical readers (`readers`), fixed for a run."""

    slots: int
    readers: int

    def __post_init__(self) -> None:
        if self.slots < 1 or self.readers < self.slots or self.readers % self.slots:
            raise ValueError(f"data layout: readers ({self.readers}) must be a positive multiple of the micro-batches "
                             f"per step ({self.slots})")

    @classmethod
    def for_run(cls, world_size: int, grad_accum: int, readers: int = 0) -> Layout:
        slots = world_size * grad_accum
        if readers and readers % slots:
            raise ValueError(f"data.readers={readers} must be a multiple of the micro-batches per step "
                             f"(world size {world_size} x grad_accum {grad_accum} = {slots})")
        return cls(slots, readers or slots * DEFAULT_READERS_PER_SLOT)

    @property
    def per_slot(self) -> int:
        return self.readers // self.slots

    def valid_world_sizes(self) -> list[int]:
        return [n for n in range(1, self.slots + 1) if self.slots % n == 0]

    def grad_accum(self, world_size: int) -> int:
        """The accumulation that keeps the global batch on `world_size` ranks (refused if none does)."""
        if self.slots % world_size:
            raise LayoutError(f"the run's global batch is {self.slots} micro-batches per step; {world_size} ranks "
                              f"cannot keep it. Valid world sizes: {', '.join(map(str, self.valid_world_sizes()))} "
                              "(or start the data afresh with data.reset_position=true and a new global batch)")
        return self.slots // world_size

    def reader_of(self, slot: int, step: int) -> int:
        return slot * self.per_slot + step % self.per_slot

    def item_reader(self, item: int, rank: int, world_size: int) -> int:
        """The reader of rank `rank`'s `item`-th micro-batch of the epoch."""
        accum = self.slots // world_size
        return self.reader_of((item % accum) * world_size + rank, item // accum)

    def loader_workers(self, world_size: int, wanted: int) -> int:
        """The most DataLoader workers (<= wanted) that split the rank's readers evenly (0 stays 0)."""
        if wanted <= 0:
            return 0
        per_rank = (self.slots // world_size) * self.per_slot
        return max(w for w in range(1, min(wanted, per_rank) + 1) if per_rank % w == 0)

    def to_dict(self) -> dict[str, int]:
        return {"slots": self.slots, "readers": self.readers}


def epoch_steps_exact(reader_counts: list[int], per_batch: int, layout: Layout) -> int:
    """Steps of an exact epoch: until the reader with the most batches has made its last one."""
    steps = 0
    for reader, count in enumerate(reader_counts):
        batches = math.ceil(count / per_batch)
        if batches:
            steps = max(steps, reader % layout.per_slot + (batches - 1) * layout.per_slot + 1)
    return steps


def reader_batches_before(reader: int, steps: int, layout: Layout) -> int:
    """Micro-batches `reader` makes in the first `steps` steps of an epoch."""
    phase = reader % layout.per_slot
    return 0 if steps <= phase else (steps - phase - 1) // layout.per_slot + 1


# ----------------------------------------------------------------------------- the shuffle buffer
class ShuffleBuffer(Iterator[T]):
    """A shuffle buffer (webdataset's kind) as an object whose state can be inspected and set.

    Each item goes in; once `size` are held, a random one comes out (swapped to the end and popped).
    When the input ends, the rest come out in a shuffled order.
    """

    def __init__(self, source: Iterator[T], size: int, rng: random.Random, buffer: list[T] | None = None,
                 flushing: bool = False) -> None:
        self.source, self.size, self.rng = source, size, rng
        self.buffer: list[T] = buffer if buffer is not None else []
        self.flushing = flushing
        self.entered = 0  # items taken from `source` by this object

    def __next__(self) -> T:
        if not self.flushing:
            for item in self.source:
                self.entered += 1
                if self.size <= 1:
                    return item
                self.buffer.append(item)
                if len(self.buffer) >= self.size:
                    index = self.rng.randrange(len(self.buffer))
                    self.buffer[index], self.buffer[-1] = self.buffer[-1], self.buffer[index]
                    return self.buffer.pop()
            self.flushing = True
            self.rng.shuffle(self.buffer)
            self.buffer.reverse()  # popped from the end: the shuffled order
        if not self.buffer:
            raise StopIteration
        return self.buffer.pop()


# ----------------------------------------------------------------------------- one reader's samples
Pieces = Callable[[], Iterator[ShardPiece]]  # a fresh, deterministic iterator of the reader's pieces


def piece_refs(piece: ShardPiece) -> Iterator[Ref]:
    for j in range(piece.count):
        yield piece.url, piece.offset + j * piece.stride


class ReaderSamples(Iterator[dict[str, Any] | None]):
    """One logical reader's shuffled samples, from `taken` on, reading nothing it already took.

    Yields raw samples (undecoded tar members) or None where `sizes.json` promised a sample the shard
    does not hold (counted as `sizes_mismatch` for the shard). `taken` counts what was yielded.
    """

    def __init__(self, pieces: Pieces, buffer_size: int, rng_seed: str, settings: ReadSettings,
                 skipped: SkipCounter, taken: int = 0) -> None:
        self.settings, self.skipped = settings, skipped
        rng = random.Random(rng_seed)
        pieces_iter = pieces()
        if taken:  # replay the shuffle over references: which samples are still buffered, where reading resumes
            refs = (ref for piece in pieces() for ref in piece_refs(piece))
            replay = ShuffleBuffer(refs, buffer_size, rng)
            for done in range(taken):
                try:
                    next(replay)
                except StopIteration:
                    raise ValueError(f"data position: reader {rng_seed} took {taken} samples but its shards hold "
                                     f"{done}") from None
            buffer = self._fetch(replay.buffer)
            self.shuffle = ShuffleBuffer(self._read(pieces_iter, replay.entered), buffer_size, rng, buffer,
                                         replay.flushing)
        else:
            self.shuffle = ShuffleBuffer(self._read(pieces_iter, 0), buffer_size, rng)
        self.taken = taken

    def __next__(self) -> dict[str, Any] | None:
        sample = next(self.shuffle)[1]
        self.taken += 1
        return sample

    def _read(self, pieces: Iterator[ShardPiece], skip: int) -> Iterator[tuple[Ref, dict[str, Any] | None]]:
        """(ref, sample) in reading order, from the `skip`-th reference on; whole pieces skipped unread."""
        for piece in pieces:
            if skip >= piece.count:
                skip -= piece.count
                continue
            members = read_indexed(piece, self.settings, self.skipped)
            wanted = piece_refs(piece)
            held = 0
            current = next(members, None)
            for position, ref in enumerate(wanted):
                while current is not None and current[0] < ref[1]:
                    current = next(members, None)
                found = current is not None and current[0] == ref[1]
                held += found
                if position >= skip:
                    yield ref, current[1] if found else None
                if found:
                    current = next(members, None)
            extra = (current is not None) + sum(1 for _ in members)
            if held < piece.count or extra:
                self.skipped["sizes_mismatch"] += 1
                if extra:
                    self.skipped["sizes_mismatch_dropped"] += extra
                log.warning("sizes.json is wrong for %s: it lists %d samples of this reader, the shard holds %d%s; "
                            "missing ones are skipped, extra ones dropped (rewrite sizes.json: vlbert-prep writes it)",
                            piece.url, piece.count, held, f" and {extra} more" if extra else "")
            skip = 0

    def _fetch(self, refs: list[Ref]) -> list[tuple[Ref, dict[str, Any] | None]]:
        """The samples of buffered references, reading only the shards they are in (and only up to them)."""
        by_url: dict[str, set[int]] = {}
        for url, index in refs:
            by_url.setdefault(url, set()).add(index)
        found: dict[Ref, dict[str, Any]] = {}
        for url, indices in by_url.items():
            last = max(indices)
            for index, sample in read_indexed(ShardPiece(url, -1), self.settings, SkipCounter()):
                if index in indices:
                    found[(url, index)] = sample
                if index >= last:
                    break
        return [(ref, found.get(ref)) for ref in refs]
