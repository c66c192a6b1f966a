"""The streaming loader: shards over fsspec -> samples -> shuffle (bytes) -> decode -> mask -> mixed batches.

Every micro-batch holds `vl_per_batch` vision-language rows (the "master" stream: it defines the
epoch, as the official `MultiTaskDataLoader`) then `text_per_batch` text rows (cycled for ever), and
is made by one logical reader of `elastic`: the global order is the same on any number of ranks and
loader workers, and a position saved on one world size continues on another.

Modes
* `resampled` (default): each reader draws shards with replacement, by source weight, from a
  generator of (seed, epoch, reader). An epoch is `samples_per_epoch` vision-language samples over
  all ranks (rounded up to whole steps).
* `exact`: shards are shuffled with (seed + epoch), then split over the logical readers, balanced by
  sample count from `sizes.json`; with fewer shards than readers a shard is read by several, each
  keeping every k-th sample. Every sample is read exactly once per epoch; readers that run out
  before the epoch's last step make padding batches whose targets are removed (zero loss, counted).

Every reader yields its planned number of batches even when samples are corrupt (they are skipped
and counted by reason), so distributed training never sees uneven batch counts. Shards that fail to
open are retried with backoff, then skipped and counted.
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
from vlbert_ds.data.elastic import Layout, ReaderSamples, epoch_steps_exact
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
    read_indexed,
    read_piece,
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
    "feature_dim_mismatch": "the shards' region features have another width than the model's: set "
                            "model.overrides.precomputed_feature_dim to theirs (2048 for bottom-up-attention)",
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
    shuffle_buffer: int = 1000  # samples, per logical reader and stream
    readers: int = 0  # logical readers (0: 4 per micro-batch slot of a step); fixed for a run
    reset_position: bool = False  # a saved position of another data config: start the next epoch instead
    cache_dir: str | None = None  # node-local shard cache (`vlbert_ds.data.cache`); None = off
    cache_size_gb: float = 0.0  # its bound (0 = none)
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
    skipped: dict[str, int]  # samples and shards skipped since the previous batch of this reader, by reason
    reader: int = 0  # the logical reader that made it
    item: int = 0  # the rank's micro-batch index in the epoch
    vl_taken: int = 0  # shuffled vision-language samples the reader had taken after this batch
    text_taken: int = 0  # ... and text samples
    epoch: int = 0


class DataPositionMismatch(ValueError):
    """A saved data position belongs to another data configuration."""


# ----------------------------------------------------------------------------- planning
def plan_exact_epoch(urls: list[str], sizes: dict[str, int], readers: int, epoch: int,
                     seed: int) -> list[list[ShardPiece]]:
    """plan[reader] = its pieces: shards shuffled with (seed + epoch), then split over the logical readers,
    balanced by sample count (largest first to the least loaded); with fewer shards than readers a shard
    is split by sample stride. The same in every process, whatever the world size."""
    missing = [u for u in urls if u not in sizes]
    if missing:
        raise ValueError(f"exact mode needs sizes.json entries for every shard; missing e.g. {missing[:3]}")
    order = sorted(urls)
    random.Random(seed + epoch).shuffle(order)
    pieces = [ShardPiece(u, sizes[u]) for u in order if sizes[u] > 0]
    if not pieces:
        raise ValueError("exact mode: every shard is empty")
    if len(pieces) < readers:  # split shards by sample stride so that every reader gets data
        split = math.ceil(readers / len(pieces))
        pieces = [ShardPiece(p.url, len(range(o, p.count, split)), split, o) for p in pieces for o in range(split)]
        pieces = [p for p in pieces if p.count > 0]
    load = [0] * readers
    assigned: list[list[ShardPiece]] = [[] for _ in range(readers)]
    for piece in sorted(pieces, key=lambda p: -p.count):
        reader = min(range(readers), key=lambda r: (load[r], r))
        assigned[reader].append(piece)
        load[reader] += piece.count
    position = {p: i for i, p in enumerate(pieces)}  # within a reader keep the shuffled order
    return [sorted(pieces_of, key=position.__getitem__) for pieces_of in assigned]


def stream_fingerprint(config: LoaderConfig, layout: Layout) -> dict[str, Any]:
    """What the sample order depends on: a saved position is only valid for the same values."""
    return {"vl_sources": [[s.urls, s.weight] for s in config.vl_sources],
            "text_sources": [[s.urls, s.weight] for s in config.text_sources],
            "mode": config.mode, "samples_per_epoch": config.samples_per_epoch, "seed": config.seed,
            "vl_per_batch": config.vl_per_batch, "text_per_batch": config.text_per_batch,
            "shuffle_buffer": config.shuffle_buffer, "micro_batches_per_step": layout.slots,
            "readers": layout.readers, "max_elements": config.example.max_elements,
            "text_segment_len": config.example.text_segment_len,
            "visual_front_end": config.example.visual_front_end}


def fingerprint_difference(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"{key}: saved {saved.get(key)!r}, now {current.get(key)!r}" for key in current
            if key in saved and saved[key] != current[key]]


# ----------------------------------------------------------------------------- the dataset
class PretrainStream(ShardStream):
    """One rank's `LoaderBatch`es in the global order of `elastic` (iterate it with `ResumableLoader`).

    The position (`state_dict`) is global and world-size free: the epoch, the micro-batches all ranks
    consumed in it, and each logical reader's shuffled-sample counts. Loaded on any world size that
    divides the run's micro-batches per step, the stream continues at the next global micro-batch.
    """

    def __init__(self, config: LoaderConfig, rank: int = 0, world_size: int = 1, check_sources: bool = True,
                 grad_accum: int = 1, layout: Layout | None = None) -> None:
        super().__init__(rank, world_size, config.num_workers)
        config.validate()
        self.config = config
        self.layout = layout or Layout.for_run(world_size, grad_accum, config.readers)
        self.grad_accum = self.layout.grad_accum(world_size)
        self.loader_workers = self.layout.loader_workers(world_size, config.num_workers)
        if self.loader_workers < config.num_workers and rank == 0:
            log.info("data: %d of the %d loader workers per rank used (a divisor of the rank's %d readers)",
                     self.loader_workers, config.num_workers, self.grad_accum * self.layout.per_slot)
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
        self.sizes = self._read_sizes()
        self.fingerprint = stream_fingerprint(config, self.layout)
        self.epoch = 0
        self.start_item, self.start_readers = 0, {}  # where the workers begin (a resume, an epoch start)
        self.items, self.readers = 0, {}  # after the last micro-batch handed to the trainer
        self.dropped_on_resume = 0
        self._plan_epoch()
        if check_sources:  # a training loop that already checked them skips this at every epoch
            self.check_sources()

    def _read_sizes(self) -> dict[str, int]:
        """Samples per shard (`sizes.json`): exact mode needs them for its vision-language shards; other
        shards without an entry are counted here (a resumed reader replays its shuffle by these counts)."""
        sizes: dict[str, int] = {}
        for urls in self.vl_urls + self.text_urls:
            sizes.update(storage.read_sizes(urls))
        exact_vl = set(self.vl_urls[0]) if self.config.mode == "exact" else set()
        unknown = [u for urls in self.vl_urls + self.text_urls for u in urls if u not in sizes and u not in exact_vl]
        if unknown:
            log.warning("%d shard(s) have no sizes.json entry (e.g. %s): counting their samples now; write sizes.json "
                        "(vlbert-prep does) to skip this", len(unknown), unknown[0])
            for url in unknown:
                sizes[url] = sum(1 for _ in read_indexed(ShardPiece(url, -1), self.config, SkipCounter()))
        for spec, urls in zip(self.config.vl_sources + self.config.text_sources, self.vl_urls + self.text_urls,
                              strict=True):
            if all(u in sizes for u in urls) and not any(sizes[u] for u in urls):
                raise ValueError(f"data source {spec.urls!r}: every shard is empty (sizes.json)")
        return sizes

    def _plan_epoch(self) -> None:
        config, layout = self.config, self.layout
        if config.mode == "exact":
            self.plan = plan_exact_epoch(self.vl_urls[0], self.sizes, layout.readers, self.epoch, config.seed)
            self.steps = epoch_steps_exact([sum(p.count for p in pieces) for pieces in self.plan],
                                           config.vl_per_batch, layout)
        else:
            self.plan = []
            self.steps = math.ceil(config.samples_per_epoch / (layout.slots * config.vl_per_batch))
        self._filler: VLExample | None = None

    def set_epoch(self, epoch: int, micro_batches: int = 0) -> None:
        """Start at `micro_batches` global micro-batches into `epoch` (readers from their beginning)."""
        self.epoch = epoch
        self._plan_epoch()
        self.start_item, self.start_readers = micro_batches // self.world_size, {}
        self.items, self.readers = self.start_item, {}

    def items_per_epoch(self) -> int:
        return self.steps * self.grad_accum

    # --- the position (ShardStream)
    def next_epoch(self) -> None:
        self.dropped_on_resume = 0
        self.set_epoch(self.epoch + 1)

    def advance(self, item: LoaderBatch) -> None:
        self.items = item.item + 1
        self.readers[item.reader] = (item.vl_taken, item.text_taken)

    def local_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "items": self.items, "readers": dict(self.readers)}

    def merge_states(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        if len({(s["epoch"], s["items"]) for s in states}) != 1:
            raise RuntimeError(f"ranks disagree on the data position: {[(s['epoch'], s['items']) for s in states]}")
        readers: dict[str, list[int]] = {}
        for rank_state in states:
            readers.update({str(r): list(t) for r, t in rank_state["readers"].items()})
        return {"format": 2, "epoch": states[0]["epoch"], "micro_batches": states[0]["items"] * self.world_size,
                "readers": dict(sorted(readers.items(), key=lambda kv: int(kv[0]))), "layout": self.layout.to_dict(),
                "world_size": self.world_size, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("format") != 2:
            epoch = int(state.get("epoch", 0)) + 1
            log.warning("data position in the format of an older vlbert_ds (%s): starting epoch %d", state, epoch)
            self.set_epoch(epoch)
            return
        differences = fingerprint_difference(state.get("fingerprint", {}), self.fingerprint)
        if differences:
            if not self.config.reset_position:
                raise DataPositionMismatch(
                    "the checkpoint's data position belongs to another data configuration ("
                    + "; ".join(differences) + "). Restore those values, or set data.reset_position=true to start "
                    "the data at the next epoch")
            log.warning("data.reset_position: the data configuration changed (%s); starting epoch %d afresh",
                        "; ".join(differences), int(state["epoch"]) + 1)
            self.set_epoch(int(state["epoch"]) + 1)
            return
        micro_batches = int(state["micro_batches"])
        if micro_batches % self.world_size:  # mid-step (a dropped non-finite micro-batch): the next whole step
            aligned = math.ceil(micro_batches / self.layout.slots) * self.layout.slots
            self.dropped_on_resume = aligned - micro_batches
            log.warning("data position %d micro-batches into the epoch cannot be split over %d ranks: continuing at "
                        "the next step (%d micro-batches skipped)", micro_batches, self.world_size,
                        self.dropped_on_resume)
            micro_batches = aligned
        self.set_epoch(int(state["epoch"]), micro_batches)
        if self.start_item > self.items_per_epoch():
            raise ValueError(f"data position {micro_batches} is past the end of epoch {self.epoch} "
                             f"({self.items_per_epoch() * self.world_size} micro-batches)")
        self.start_readers = {int(r): tuple(t) for r, t in state.get("readers", {}).items()}
        self.readers = dict(self.start_readers)

    def __len__(self) -> int:
        return self.items_per_epoch() - self.start_item

    # --- what one reader reads
    def _rng_name(self, reader: int, stream: str) -> str:
        return f"{self.config.seed}/{self.epoch}/reader{reader}/{stream}"

    def _drawn_pieces(self, url_lists: list[list[str]], weights: list[float], name: str) -> Iterator[ShardPiece]:
        rng = random.Random(name + "/shards")
        choices = [[u for u in urls if self.sizes.get(u, 0) > 0] for urls in url_lists]
        while True:
            urls = rng.choices(choices, weights=weights)[0]
            url = rng.choice(urls)
            yield ShardPiece(url, self.sizes[url])

    def reader_samples(self, reader: int, stream: str, taken: int, skipped: SkipCounter) -> ReaderSamples:
        config = self.config
        name = self._rng_name(reader, stream)
        if stream == "vl" and config.mode == "exact":
            def pieces() -> Iterator[ShardPiece]:
                return iter(self.plan[reader])
        elif stream == "vl":
            def pieces() -> Iterator[ShardPiece]:
                return self._drawn_pieces(self.vl_urls, [s.weight for s in config.vl_sources], name)
        else:
            def pieces() -> Iterator[ShardPiece]:
                return self._drawn_pieces(self.text_urls, [s.weight for s in config.text_sources], name)
        return ReaderSamples(pieces, config.shuffle_buffer, name, config, skipped, taken)

    def _examples(self, samples: ReaderSamples, make, decode, skipped: SkipCounter, tools) -> Iterator:
        """Usable examples of a reader's samples; rejected ones counted by reason (a source whose samples are
        all rejected is refused, naming the reason)."""
        config = self.config.example
        usable, rejected, first_error = 0, Counter(), ""
        for sample in samples:
            if sample is None:  # promised by sizes.json, not in the shard (counted per shard)
                continue
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

    def filler(self, tools: TokenizerTools) -> VLExample:
        """The rows of padding batches (targets removed): the epoch's first usable sample, the same everywhere."""
        if self._filler is None:
            decode = self._vl_decoder()
            pieces = [p for pieces in self.plan for p in pieces] or [ShardPiece(u, -1) for u in self.vl_urls[0][:3]]
            for piece in pieces:
                for _, sample in read_indexed(piece, self.config, SkipCounter()):
                    try:
                        self._filler = make_vl_example(decode(sample), tools, self.config.example,
                                                       sample_rng(self.config.seed, self.epoch, sample["__key__"]))
                        return self._filler
                    except SampleError:
                        continue
            raise RuntimeError("no readable vision-language sample to fill padding batches with")
        return self._filler

    def _vl_decoder(self):
        front_end = self.config.example.visual_front_end
        return partial(decode_vl, need_features=front_end == "precomputed", need_image=front_end == "end_to_end")

    # --- the start-up check
    def check_sources(self) -> None:
        """Decode up to `PROBE_SAMPLES` samples of each source (from its first shards), in this process.

        A source none of whose probed samples is usable is refused here, before training starts,
        with the reason counts and what to change (`UnusableDataError`).
        """
        tools = TokenizerTools(self.config.tokenizer)
        checks = [(spec, urls, self._vl_decoder(), make_vl_example)
                  for spec, urls in zip(self.config.vl_sources, self.vl_urls, strict=True)]
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

    # --- the rank's micro-batches
    def __iter__(self) -> Iterator[LoaderBatch]:
        """This worker's share of the rank's micro-batches of the epoch: every W-th from the start."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if info is not None and workers != self.loader_workers:
            raise RuntimeError(f"the stream plans for {self.loader_workers} loader workers but the DataLoader has "
                               f"{workers}")
        tools = TokenizerTools(self.config.tokenizer)
        makers: dict[int, _ReaderBatches] = {}
        for item in range(self.start_item + worker, self.items_per_epoch(), workers):
            reader = self.layout.item_reader(item, self.rank, self.world_size)
            if reader not in makers:
                makers[reader] = _ReaderBatches(self, reader, *self.start_readers.get(reader, (0, 0)), tools)
            batch = makers[reader].next_batch(item)
            if item == self.start_item and self.rank == 0 and self.dropped_on_resume:  # counted once, all ranks
                batch.skipped["micro_batches_realigned_on_resume"] = self.dropped_on_resume
            yield batch


class _ReaderBatches:
    """One logical reader's micro-batches: `vl_per_batch` usable vision-language rows + `text_per_batch`
    text rows each; padding batches (targets removed) once an exact epoch's samples of the reader ran out."""

    def __init__(self, stream: PretrainStream, reader: int, vl_taken: int, text_taken: int,
                 tools: TokenizerTools) -> None:
        self.stream, self.reader, self.tools = stream, reader, tools
        self.skipped = SkipCounter()
        self.vl_samples = stream.reader_samples(reader, "vl", vl_taken, self.skipped)
        self.vl = stream._examples(self.vl_samples, make_vl_example, stream._vl_decoder(), self.skipped, tools)
        config = stream.config
        self.text_samples = stream.reader_samples(reader, "text", text_taken, self.skipped) \
            if config.text_per_batch else None
        self.text = stream._examples(self.text_samples, make_text_example, decode_text, self.skipped, tools) \
            if self.text_samples is not None else iter(())

    def next_batch(self, item: int) -> LoaderBatch:
        config = self.stream.config
        vl: list[VLExample] = []
        for example in self.vl:
            vl.append(example)
            if len(vl) == config.vl_per_batch:
                break
        text: list[TextExample] = [next(self.text) for _ in range(config.text_per_batch)]
        padding = not vl
        rows = vl if vl else [self.stream.filler(self.tools)]
        batch = collate(rows, text, drop_labels=padding, num_region_classes=config.example.num_region_classes)
        return LoaderBatch(batch=batch, keys=[e.key for e in vl],
                           shards=[e.shard for e in vl], padding=padding, skipped=self.skipped.take(),
                           reader=self.reader, item=item, vl_taken=self.vl_samples.taken,
                           text_taken=self.text_samples.taken if self.text_samples is not None else 0,
                           epoch=self.stream.epoch)


def build_loader(config: LoaderConfig, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 check_sources: bool = True, grad_accum: int = 1) -> tuple[PretrainStream, DataLoader]:
    """One epoch of this rank's stream from its start, through a worker DataLoader (workers batch and collate)."""
    stream = PretrainStream(config, rank, world_size, check_sources, grad_accum)
    stream.set_epoch(epoch)
    return stream, worker_loader(stream, stream.loader_workers)


def pretrain_loader(config: LoaderConfig, rank: int = 0, world_size: int = 1, check_sources: bool = True,
                    grad_accum: int = 1, layout: Layout | None = None) -> ResumableLoader:
    """What the trainer iterates: epoch after epoch, its global position in `state_dict()`."""
    return ResumableLoader(PretrainStream(config, rank, world_size, check_sources, grad_accum, layout))
