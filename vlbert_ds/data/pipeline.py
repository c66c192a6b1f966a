"""The streaming loader: shards over fsspec -> samples -> shuffle (bytes) -> decode -> mask -> mixed batches.

Per DataLoader worker, two streams are read: the vision-language sources (the "master": they
define the epoch, as the official `MultiTaskDataLoader`) and the text sources (cycled for ever). Each
batch holds `vl_per_batch` vision-language rows then `text_per_batch` text rows.

Modes
* `resampled` (default): each worker draws shards with replacement, by source weight, from a
  deterministic generator of (seed, epoch, rank, worker). An epoch is `samples_per_epoch` vision-language
  samples over all ranks, so every rank and worker yields a fixed number of batches by construction.
* `exact`: shards are shuffled with (seed + epoch) identically on every rank, *then* split into
  (rank, worker) slots, balanced by sample count from `sizes.json`; with fewer shards than slots a
  shard is read by several slots, each keeping every k-th sample, so no rank is ever left without
  data. Every sample is read exactly once per epoch. Ranks get the same number of batches: short
  ranks finish with padding batches whose targets are removed (zero loss, counted as padding).

Every worker yields exactly its planned number of batches even when samples are corrupt (they are
skipped and counted by reason; the shortfall is padded), so distributed training never sees uneven
batch counts. Shards that fail to open are retried with backoff, then skipped and counted.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch.utils.data import DataLoader, get_worker_info

from vlbert_ds.data import storage
from vlbert_ds.data.examples import (
    ExampleConfig,
    TextExample,
    TokenizerTools,
    VLExample,
    collate,
    make_text_example,
    make_vl_example,
    sample_rng,
)
from vlbert_ds.data.schema import SampleError, decode_text, decode_vl
from vlbert_ds.data.streams import (
    ResumableLoader,
    ShardPiece,
    ShardStream,
    SkipCounter,
    read_piece,
    shuffled,
    worker_loader,
)
from vlbert_ds.model.inputs import VLBatch

log = logging.getLogger(__name__)

# Start-up check: this many samples of each source are decoded before training; a worker that has
# rejected this many samples without one usable stops the run (a source whose samples are all rejected
# would otherwise be read for ever).
PROBE_SAMPLES = 32
MAX_REJECTED_BEFORE_FIRST = 200

# What to change when every sample of a source is rejected for a reason.
REJECTION_HINTS = {
    "too_many_classes": "the shards' class distributions are wider than model.num_region_classes: set it to "
                        "their class count (1601 for bottom-up-attention regions)",
    "missing_features": "the shards carry no region features: use model.visual_front_end=end_to_end (images), "
                        "or prepare the shards with vlbert-prep captions --regions ...",
    "missing_image": "the shards carry no images: use model.visual_front_end=precomputed (region features), "
                     "or prepare them without --no-images",
    "token_out_of_vocab": "the shards were tokenised with a larger vocabulary than data.tokenizer / the model's",
    "wrong_kind": "a text source is listed as a vision-language source or the reverse "
                  "(data.vl_sources / data.text_sources)",
    "format_version": "the shards were written by another version of vlbert-prep",
}


class UnusableDataError(ValueError):
    """Every sample read from a source was rejected: training on it cannot start (a configuration error)."""


def unusable_message(source: str, examined: int, skipped: Counter, first_error: str) -> str:
    reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.most_common())
    hints = [REJECTION_HINTS[r] for r, _ in skipped.most_common() if r in REJECTION_HINTS]
    return (f"data source {source}: none of the {examined} samples read is usable (skipped: {reasons}; first: "
            f"{first_error})" + (f". To fix: {hints[0]}" if hints else ""))


@dataclass
class SourceSpec:
    """One dataset: a shard spec (brace pattern, folder, glob, `::` list) and its sampling weight."""

    urls: str
    weight: float = 1.0


@dataclass
class LoaderConfig:
    vl_sources: list[SourceSpec]
    text_sources: list[SourceSpec]
    tokenizer: str
    mode: str = "resampled"  # or "exact"
    vl_per_batch: int = 8
    text_per_batch: int = 8
    samples_per_epoch: int | None = None  # resampled mode: vision-language samples per epoch, all ranks
    num_workers: int = 2
    seed: int = 12345
    shuffle_buffer: int = 1000
    shard_open_attempts: int = 5
    shard_retry_delay: float = 0.5
    example: ExampleConfig = field(default_factory=ExampleConfig)

    def validate(self) -> None:
        if self.mode not in ("resampled", "exact"):
            raise ValueError(f"data.mode must be 'resampled' or 'exact', got {self.mode!r}")
        if self.vl_per_batch < 1 or self.text_per_batch < 0:
            raise ValueError("data.vl_per_batch must be >= 1 and data.text_per_batch >= 0")
        if not self.vl_sources:
            raise ValueError("data.vl_sources is empty")
        if self.text_per_batch and not self.text_sources:
            raise ValueError("data.text_per_batch > 0 needs data.text_sources")
        if self.mode == "resampled" and not self.samples_per_epoch:
            raise ValueError("resampled mode needs data.samples_per_epoch (the virtual epoch length)")
        if self.mode == "exact" and len(self.vl_sources) != 1:
            raise ValueError("exact mode reads one vision-language source (weights need resampled mode)")


@dataclass
class LoaderBatch:
    batch: VLBatch
    keys: list[str]  # vision-language sample keys (empty for padding batches)
    shards: list[str]  # the shard URL of each key
    padding: bool  # True: targets removed, do not count its samples as seen
    skipped: dict[str, int]  # samples and shards skipped since the previous batch of this worker, by reason
    worker: int
    index: int  # batch index within the worker's epoch


# ----------------------------------------------------------------------------- planning
def plan_exact_epoch(urls: list[str], sizes: dict[str, int], world_size: int, num_workers: int, epoch: int,
                     seed: int) -> list[list[list[ShardPiece]]]:
    """plan[rank][worker] = pieces, identical in every process (no communication needed)."""
    missing = [u for u in urls if u not in sizes]
    if missing:
        raise ValueError(f"exact mode needs sizes.json entries for every shard; missing e.g. {missing[:3]}")
    order = sorted(urls)
    random.Random(seed + epoch).shuffle(order)  # before the node split, same on every rank
    slots = world_size * num_workers
    pieces = [ShardPiece(u, sizes[u]) for u in order if sizes[u] > 0]
    if not pieces:
        raise ValueError("exact mode: every shard is empty")
    if len(pieces) < slots:  # split shards by sample stride so that every slot gets data
        split = math.ceil(slots / len(pieces))
        pieces = [ShardPiece(p.url, len(range(o, p.count, split)), split, o) for p in pieces for o in range(split)]
        pieces = [p for p in pieces if p.count > 0]
    load = [0] * slots
    assigned: list[list[ShardPiece]] = [[] for _ in range(slots)]
    for piece in sorted(pieces, key=lambda p: -p.count):  # largest first to the least loaded slot
        slot = min(range(slots), key=lambda s: (load[s], s))
        assigned[slot].append(piece)
        load[slot] += piece.count
    # slot s = (rank, worker) with rank-major order; within a slot keep the shuffled order
    position = {p: i for i, p in enumerate(pieces)}
    return [[sorted(assigned[r * num_workers + w], key=position.__getitem__) for w in range(num_workers)]
            for r in range(world_size)]


def exact_batch_counts(plan: list[list[list[ShardPiece]]], per_batch: int) -> list[list[int]]:
    """Batches per (rank, worker), padded so that every rank has the same total."""
    counts = [[math.ceil(sum(p.count for p in pieces) / per_batch) for pieces in rank] for rank in plan]
    target = max(sum(rank) for rank in counts)
    for rank in counts:
        while sum(rank) < target:  # padding batches go to the worker with the fewest
            rank[rank.index(min(rank))] += 1
    return counts


def resampled_batch_counts(samples_per_epoch: int, world_size: int, num_workers: int, per_batch: int) -> list[int]:
    per_rank = math.ceil(samples_per_epoch / (world_size * per_batch))
    return [per_rank // num_workers + (1 if w < per_rank % num_workers else 0) for w in range(num_workers)]


def round_robin_position(worker_batches: list[int], consumed: int) -> tuple[list[int], int]:
    """After `consumed` batches: how many each worker delivered, and which worker delivers the next one.

    A DataLoader returns worker batches round-robin in worker order, skipping exhausted workers.
    """
    total = sum(worker_batches)
    if not 0 <= consumed <= total:
        raise ValueError(f"position {consumed} is past the end of the epoch ({total} batches)")
    taken = [0] * len(worker_batches)
    worker = 0
    for _ in range(consumed):
        while taken[worker] >= worker_batches[worker]:
            worker = (worker + 1) % len(worker_batches)
        taken[worker] += 1
        worker = (worker + 1) % len(worker_batches)
    if consumed < total:
        while taken[worker] >= worker_batches[worker]:
            worker = (worker + 1) % len(worker_batches)
    return taken, worker


def worker_skip_counts(worker_batches: list[int], consumed: int) -> list[int]:
    return round_robin_position(worker_batches, consumed)[0]


# ----------------------------------------------------------------------------- reading
# ----------------------------------------------------------------------------- the dataset
class PretrainStream(ShardStream):
    """Yields `LoaderBatch`es for one rank; iterate it with `ResumableLoader` (see `build_loader`).

    Its position is (epoch, batches of the epoch this rank has used). Resumed at another world size,
    the exact position does not carry over (the epoch's plan depends on the ranks): it starts the
    next epoch.
    """

    def __init__(self, config: LoaderConfig, rank: int = 0, world_size: int = 1, check_sources: bool = True) -> None:
        super().__init__(rank, world_size, config.num_workers)
        config.validate()
        self.config = config
        self.epoch = 0
        self.consumed = 0  # where the workers start: batches of this epoch already used (resume)
        self.position = (0, 0)  # (epoch, consumed) after the last batch handed to the trainer
        self.vl_urls = [storage.expand_urls(s.urls) for s in config.vl_sources]
        self.text_urls = [storage.expand_urls(s.urls) for s in config.text_sources]
        for spec, urls in zip(config.vl_sources + config.text_sources, self.vl_urls + self.text_urls, strict=True):
            if not urls:
                raise ValueError(f"data source {spec.urls!r} matches no shard")
            missing = storage.missing_urls(urls)  # every shard a pattern names, one listing per folder
            if len(missing) == len(urls):
                raise ValueError(f"data source {spec.urls!r} matches no shard ({urls[0]} does not exist)")
            if missing:
                raise ValueError(f"data source {spec.urls!r}: {len(missing)} of its {len(urls)} shards do not exist "
                                 f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        self.sizes = storage.read_sizes(self.vl_urls[0]) if config.mode == "exact" else {}
        self.worker_batches = self._worker_batches()
        if check_sources:  # a training loop that already checked them skips this at every epoch
            self.check_sources()

    def _worker_batches(self) -> list[int]:
        config = self.config
        if config.mode == "exact":
            plan = plan_exact_epoch(self.vl_urls[0], self.sizes, self.world_size, self.num_workers, self.epoch,
                                    config.seed)
            self._plan = plan
            return exact_batch_counts(plan, config.vl_per_batch)[self.rank]
        return resampled_batch_counts(config.samples_per_epoch, self.world_size, self.num_workers,
                                      config.vl_per_batch)

    def set_epoch(self, epoch: int, consumed_batches: int = 0) -> None:
        """Select the epoch and how many of its batches this rank already used (to resume mid-epoch)."""
        self.epoch = epoch
        self.worker_batches = self._worker_batches()
        worker_skip_counts(self.worker_batches, consumed_batches)  # validates the position
        self.consumed = consumed_batches
        self.position = (epoch, consumed_batches)

    # --- the position (ShardStream)
    def next_epoch(self) -> None:
        self.set_epoch(self.position[0] + 1, 0)

    def advance(self, item: LoaderBatch) -> None:
        self.position = (self.position[0], self.position[1] + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.position[0], "consumed": self.position[1], "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, consumed = int(state.get("epoch", 0)), int(state.get("consumed", 0))
        if state.get("world_size", self.world_size) != self.world_size:
            log.warning("data position saved with %s ranks, resumed with %d: starting epoch %d afresh",
                        state["world_size"], self.world_size, epoch + 1)
            epoch, consumed = epoch + 1, 0
        self.set_epoch(epoch, consumed)

    def __len__(self) -> int:
        return sum(self.worker_batches) - self.consumed

    # --- per-worker streams
    def _worker_rng(self, worker: int, stream: str) -> random.Random:
        return random.Random(f"{self.config.seed}/{self.epoch}/{self.rank}/{worker}/{stream}")

    def _vl_samples(self, worker: int, skipped: SkipCounter, read: Counter | None = None) -> Iterator[dict[str, Any]]:
        config = self.config
        rng = self._worker_rng(worker, "vl")
        if config.mode == "exact":
            pieces = self._plan[self.rank][worker]
            read = Counter() if read is None else read

            def counted(piece: ShardPiece) -> Iterator[dict[str, Any]]:
                for sample in read_piece(piece, config, skipped):
                    read[piece] += 1  # what the shard really holds, against what sizes.json says
                    yield sample

            source = (s for piece in pieces for s in counted(piece))
        else:
            source = self._resampled(self.vl_urls, [s.weight for s in config.vl_sources], rng, skipped)
        return shuffled(source, config.shuffle_buffer, rng)

    def _text_samples(self, worker: int, skipped: SkipCounter) -> Iterator[dict[str, Any]]:
        rng = self._worker_rng(worker, "text")
        source = self._resampled(self.text_urls, [s.weight for s in self.config.text_sources], rng, skipped)
        return shuffled(source, self.config.shuffle_buffer, rng)

    def _resampled(self, url_lists: list[list[str]], weights: list[float], rng: random.Random,
                   skipped: SkipCounter) -> Iterator[dict[str, Any]]:
        empty_draws = 0
        while True:
            urls = rng.choices(url_lists, weights=weights)[0]
            produced = False
            for sample in read_piece(ShardPiece(rng.choice(urls), -1), self.config, skipped):
                produced = True
                yield sample
            empty_draws = 0 if produced else empty_draws + 1
            if empty_draws >= 100:
                raise RuntimeError("100 shard draws in a row gave no sample: the sources are unreadable or empty")

    def _examples(self, samples: Iterator[dict[str, Any]], make, decode, skipped: SkipCounter, tools) -> Iterator:
        config = self.config.example
        usable, rejected, first_error = 0, Counter(), ""
        for sample in samples:
            try:
                record = decode(sample)
                example = make(record, tools, config, sample_rng(self.config.seed, self.epoch, record.key))
                example.shard = sample.get("__url__", "")
                usable += 1
                yield example
            except SampleError as err:
                skipped[err.reason] += 1
                if sum(skipped.values()) <= 3:
                    log.warning("skipping sample %s from %s: %s", sample.get("__key__"), sample.get("__url__"), err)
                if not usable:
                    rejected[err.reason] += 1
                    first_error = first_error or f"{sample.get('__url__')}: {err}"
                    if sum(rejected.values()) >= MAX_REJECTED_BEFORE_FIRST:
                        raise UnusableDataError(unusable_message(sample.get("__url__", "?"), sum(rejected.values()),
                                                                 rejected, first_error)) from None

    def _check_sizes(self, worker: int, rest: Iterator[VLExample], read: Counter, skipped: SkipCounter) -> None:
        """Exact mode plans by `sizes.json`; compare with what the worker's shards held. Samples beyond the
        plan cannot get a batch (every rank has the same count): they are counted, never dropped silently."""
        beyond = sum(1 for _ in rest)
        wrong = [(p, read[p]) for p in self._plan[self.rank][worker] if read[p] != p.count]
        if beyond:
            skipped["sizes_mismatch_dropped"] += beyond
        if wrong:
            skipped["sizes_mismatch"] += len(wrong)
            log.warning("exact mode: sizes.json is wrong for %d shard(s) of worker %d (e.g. %s); %d samples beyond "
                        "the plan were dropped this epoch, short shards were padded. Rewrite sizes.json (vlbert-prep "
                        "writes it) or use data.mode=resampled", len(wrong), worker,
                        ", ".join(f"{p.url}: planned {p.count}, holds {n}" for p, n in wrong[:3]), beyond)

    def check_sources(self) -> None:
        """Decode up to `PROBE_SAMPLES` samples of each source (from its first shards), in this process.

        A source none of whose probed samples is usable is refused here, before training starts,
        with the reason counts and what to change (`UnusableDataError`).
        """
        front_end = self.config.example.visual_front_end
        tools = TokenizerTools(self.config.tokenizer)
        vl_decode = partial(decode_vl, need_features=front_end == "precomputed", need_image=front_end == "end_to_end")
        checks = [(spec, urls, vl_decode, make_vl_example) for spec, urls in zip(self.config.vl_sources, self.vl_urls,
                                                                                 strict=True)]
        if self.config.text_per_batch:
            checks += [(spec, urls, decode_text, make_text_example)
                       for spec, urls in zip(self.config.text_sources, self.text_urls, strict=True)]
        for spec, urls, decode, make in checks:
            usable, examined, rejected, first_error = self._probe(urls, decode, make, tools)
            if not usable and examined:
                raise UnusableDataError(unusable_message(spec.urls, examined, rejected, first_error))

    def _probe(self, urls: list[str], decode, make, tools) -> tuple[bool, int, Counter, str]:
        """(a usable sample was found, samples examined, rejections by reason, the first rejection)."""
        examined, rejected, first_error = 0, Counter(), ""
        for url in urls[:3]:
            for sample in read_piece(ShardPiece(url, -1), self.config, SkipCounter()):
                examined += 1
                try:
                    record = decode(sample)
                    make(record, tools, self.config.example, sample_rng(self.config.seed, 0, record.key))
                    return True, examined, rejected, first_error
                except SampleError as err:
                    rejected[err.reason] += 1
                    first_error = first_error or f"{url}: {err}"
                if examined >= PROBE_SAMPLES:
                    return False, examined, rejected, first_error
        return False, examined, rejected, first_error

    def __iter__(self) -> Iterator[LoaderBatch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"LoaderConfig.num_workers={self.num_workers} but the DataLoader has {info.num_workers}")
        if info is None:  # no DataLoader workers: play every worker's part, in the DataLoader's order
            yield from self._round_robin()
        else:
            yield from self._worker_batches_iter(self._logical_worker(worker))

    def _logical_worker(self, physical: int) -> int:
        """A resumed DataLoader starts its cycle at worker 0 again: rotate roles so the stream continues."""
        _, next_worker = round_robin_position(self.worker_batches, self.consumed)
        return (physical + next_worker) % self.num_workers

    def _round_robin(self) -> Iterator[LoaderBatch]:
        iterators = [self._worker_batches_iter(self._logical_worker(w)) for w in range(self.num_workers)]
        active = list(range(self.num_workers))
        while active:
            for w in list(active):
                try:
                    yield next(iterators[w])
                except StopIteration:
                    active.remove(w)

    def _worker_batches_iter(self, worker: int) -> Iterator[LoaderBatch]:
        config = self.config
        front_end = config.example.visual_front_end
        tools = TokenizerTools(config.tokenizer)
        skipped = SkipCounter()
        total = self.worker_batches[worker]
        skip = worker_skip_counts(self.worker_batches, self.consumed)[worker]
        read: Counter = Counter()
        vl_examples = self._examples(
            self._vl_samples(worker, skipped, read), make_vl_example,
            lambda s: decode_vl(s, need_features=front_end == "precomputed", need_image=front_end == "end_to_end"),
            skipped, tools)
        text_examples = self._examples(self._text_samples(worker, skipped), make_text_example, decode_text,
                                       skipped, tools) if config.text_per_batch else iter(())
        filler: list[VLExample] = []
        for index in range(total):
            vl: list[VLExample] = []
            for example in vl_examples:
                vl.append(example)
                if len(vl) == config.vl_per_batch:
                    break
            text: list[TextExample] = [next(text_examples) for _ in range(config.text_per_batch)]
            padding = not vl
            if vl and not filler:
                filler = vl[:]
            if index == total - 1 and config.mode == "exact":  # the epoch's last batch carries the tally
                self._check_sizes(worker, vl_examples, read, skipped)
            if index < skip:  # resuming: these were delivered (and their skips reported) before the restart
                skipped.clear()
                continue
            rows = vl if vl else filler
            if not rows and not text:
                raise RuntimeError(f"worker {worker} has no readable sample to fill batch {index} with")
            yield LoaderBatch(batch=collate(rows, text, drop_labels=padding), keys=[e.key for e in vl],
                              shards=[e.shard for e in vl], padding=padding, skipped=skipped.take(), worker=worker,
                              index=index)


def build_loader(config: LoaderConfig, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 consumed_batches: int = 0, check_sources: bool = True) -> tuple[PretrainStream, DataLoader]:
    """One epoch of this rank's stream from a position, through a worker DataLoader (workers batch and collate)."""
    stream = PretrainStream(config, rank, world_size, check_sources)
    stream.set_epoch(epoch, consumed_batches)
    return stream, worker_loader(stream, config.num_workers)


def pretrain_loader(config: LoaderConfig, rank: int = 0, world_size: int = 1,
                    check_sources: bool = True) -> ResumableLoader:
    """What the trainer iterates: epoch after epoch, its position in `state_dict()`."""
    return ResumableLoader(PretrainStream(config, rank, world_size, check_sources))
