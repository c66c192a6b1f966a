"""Fine-tuning data: task shards (VQA, VCR, RefCOCO+) -> `TaskBatch`es, streamed per rank.

Task samples are our shard format with `kind` = vqa | vcr | refcoco (docs/shard-format.md): the
image's boxes and precomputed features, and the task's fields in the JSON. Sequences follow the
reference §3: `[CLS] Q [SEP] [MASK] [SEP]` (VQA), `[CLS] Q [SEP] A_i [SEP]` per choice (VCR, with
object tags rendered as words whose visual part is that object's RoI), `[CLS] expression [SEP]`
(RefCOCO+); then the whole-image RoI 0 and the boxes. Fine-tuning reads the precomputed front end.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from vlbert_ds.data import storage
from vlbert_ds.data.boxes import with_image_roi
from vlbert_ds.data.elastic import DEFAULT_READERS_PER_SLOT, Layout, ReaderSamples
from vlbert_ds.data.examples import FEATURE_TENSOR_DTYPES, TokenizerTools
from vlbert_ds.data.schema import TASK_KINDS, SampleError, TaskRecord, decode_task, dequantize_features
from vlbert_ds.data.streams import (
    ReadSettings,
    ResumableLoader,
    ShardPiece,
    ShardStream,
    SkipCounter,
    read_indexed,
    read_piece,
)
from vlbert_ds.model.geometry import box_iou_pixels
from vlbert_ds.model.inputs import VLBatch
from vlbert_ds.model.task_heads import TaskBatch

log = logging.getLogger(__name__)

# VCR renders person tags as gender-neutral names, as the official code does.
NEUTRAL_NAMES = ("Casey", "Riley", "Jessie", "Jackie", "Avery", "Jaime", "Peyton", "Kerry", "Jody", "Kendall",
                 "Frankie", "Pat", "Quinn")


@dataclass
class TaskDataConfig:
    task: str  # vqa | vcr | refcoco
    tokenizer: str
    answers: list[str] = field(default_factory=list)  # VQA answer vocabulary (index = class)
    object_classes: list[str] = field(default_factory=list)  # VCR auxiliary RoI classes (0 = background); [] = off
    vcr_mode: str = "q2a"  # q2a | qa2r
    max_text: int = 64  # text tokens incl. [CLS]/[SEP]s
    max_regions: int = 100  # boxes kept (RoI 0 not counted)
    batch_size: int = 16  # items per rank per micro-batch (VCR: items, each num_choices rows)
    num_workers: int = 1
    shuffle_buffer: int = 256
    seed: int = 12345
    train: bool = True  # training drops VQA items with no answer in the vocabulary
    readers: int = 0  # logical readers (0: 4 per micro-batch slot of a step); fixed for a run
    reset_position: bool = False  # a saved position of another data config: start a fresh pass instead
    cache_dir: str | None = None  # node-local shard cache (`vlbert_ds.data.cache`); None = off
    cache_size_gb: float = 0.0  # its bound (0 = none)

    def validate(self) -> None:
        if self.task not in TASK_KINDS:
            raise ValueError(f"task must be one of {', '.join(TASK_KINDS)}, got {self.task!r}")
        if self.task == "vqa" and not self.answers:
            raise ValueError("VQA needs an answer vocabulary (task.answers: a JSON list file)")
        if self.vcr_mode not in ("q2a", "qa2r"):
            raise ValueError(f"vcr_mode must be q2a or qa2r, got {self.vcr_mode!r}")


# The 80 COCO categories after background: the official VCR auxiliary RoI classes (81-way).
COCO_CLASSES = ("__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
                "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
                "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag",
                "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
                "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
                "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
                "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv",
                "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
                "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")


@dataclass
class TaskExample:
    key: str
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per sequence: ids, segment ids, visual RoI index
    boxes: np.ndarray  # [R, 4], RoI 0 = whole image
    features: np.ndarray  # [R, D] float32, row 0 = mean of the box features; compact: [R-1, D] codes
    image_size: tuple[float, float]
    answer_position: int = 0
    answer_target: np.ndarray | None = None
    choice_label: int = -1
    region_label: np.ndarray | None = None
    object_labels: np.ndarray | None = None  # VCR [R] long: detector category per RoI, -1 = not a known class
    target_box: np.ndarray | None = None
    feature_scale: np.ndarray | None = None  # format-2 compact codes (RoI 0 is made on the device)
    feature_dtype: str = "float16"


class TaskExampleMaker:
    """TaskRecord -> TaskExample for one task (a worker builds one; it holds the tokenizer)."""

    def __init__(self, config: TaskDataConfig) -> None:
        config.validate()
        self.config = config
        self.tools = TokenizerTools(config.tokenizer)
        self.answer_index = {a: i for i, a in enumerate(config.answers)}
        self.object_index = {name: i for i, name in enumerate(config.object_classes)}

    def _pieces(self, text: str) -> list[int]:
        return self.tools.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _visual(self, record: TaskRecord) -> tuple[np.ndarray, np.ndarray]:
        width, height = float(record.image_width), float(record.image_height)
        boxes = with_image_roi(record.boxes[: self.config.max_regions], width, height)
        if record.feature_scale is not None:  # compact codes travel as they are; no RoI-0 row
            return boxes, record.features[: self.config.max_regions]
        features = record.features[: self.config.max_regions].astype(np.float32)
        whole = features.mean(0, keepdims=True) if len(features) else np.zeros((1, features.shape[1]), np.float32)
        return boxes, np.concatenate((whole, features))

    def __call__(self, record: TaskRecord) -> TaskExample:
        example = self._example(record)
        if record.feature_scale is not None:
            example.feature_scale = record.feature_scale[: self.config.max_regions]
            example.feature_dtype = record.feature_dtype
        return example

    def _example(self, record: TaskRecord) -> TaskExample:
        boxes, features = self._visual(record)
        size = (float(record.image_width), float(record.image_height))
        meta, tools, limit = record.meta, self.tools, self.config.max_text
        if record.kind == "vqa":
            question = self._pieces(str(meta.get("question", "")))[: limit - 4]
            ids = np.array([tools.cls_id, *question, tools.sep_id, tools.mask_id, tools.sep_id])
            target = np.zeros(len(self.config.answers), dtype=np.float32)
            for answer, score in (meta.get("answers") or {}).items():
                if answer in self.answer_index:
                    target[self.answer_index[answer]] = float(score)
            if self.config.train and not target.any():
                raise SampleError("answer_out_of_vocab", f"{record.key}: no answer in the vocabulary")
            segments = np.zeros_like(ids)
            return TaskExample(record.key, [(ids, segments, np.zeros_like(ids))], boxes, features, size,
                               answer_position=len(question) + 2, answer_target=target)
        if record.kind == "refcoco":
            expression = self._pieces(str(meta.get("expression", "")))[: limit - 2]
            if not expression:
                raise SampleError("empty_expression", record.key)
            ids = np.array([tools.cls_id, *expression, tools.sep_id])
            target = np.asarray(meta["target_box"], dtype=np.float32)
            labels = (box_iou_pixels(torch.from_numpy(boxes), torch.from_numpy(target)[None]).squeeze(1) > 0.5).numpy(
                ).astype(np.float32)
            labels[0] = 0.0
            return TaskExample(record.key, [(ids, np.zeros_like(ids), np.zeros_like(ids))], boxes, features, size,
                               region_label=labels, target_box=target)
        return self._vcr(record, boxes, features, size)

    def _vcr(self, record: TaskRecord, boxes, features, size) -> TaskExample:
        meta, tools = record.meta, self.tools
        names = list(meta.get("object_names") or [])
        person_names, seen_people = {}, 0
        for i, name in enumerate(names):
            if name == "person":
                person_names[i] = NEUTRAL_NAMES[seen_people % len(NEUTRAL_NAMES)]
                seen_people += 1
        kept = boxes.shape[0] - 1

        def render(tokens: list) -> tuple[list[int], list[int]]:
            ids, visual = [], []
            for token in tokens:
                if isinstance(token, list):  # an object tag: one or more detection indices
                    for n, obj in enumerate(token):
                        if not isinstance(obj, int) or not 0 <= obj < len(names):
                            raise SampleError("bad_object_tag", f"{record.key}: tag {obj} of {len(names)} objects")
                        if n:
                            ids.append(self._pieces("and")[0])
                            visual.append(0)
                        pieces = self._pieces(person_names.get(obj, names[obj]))
                        ids += pieces
                        visual += [obj + 1 if obj < kept else 0] * len(pieces)
                else:
                    pieces = self._pieces(str(token))
                    ids += pieces
                    visual += [0] * len(pieces)
            return ids, visual

        question = render(meta["question"])
        if self.config.vcr_mode == "q2a":
            context, choices, label = question, meta["answer_choices"], meta.get("answer_label", -1)
        else:
            answer = render(meta["answer_choices"][meta["answer_label"]])
            context = (question[0] + answer[0], question[1] + answer[1])
            choices, label = meta["rationale_choices"], meta.get("rationale_label", -1)
        rows = []
        for choice in choices:
            first, second = list(context[0]), list(context[1])
            ids_b, vis_b = render(choice)
            # Trim the longer part until [CLS] A [SEP] B [SEP] fits (QA->R trims the context first).
            while len(first) + len(ids_b) + 3 > self.config.max_text:
                if len(first) >= len(ids_b):
                    first, second = first[:-1], second[:-1]
                else:
                    ids_b, vis_b = ids_b[:-1], vis_b[:-1]
            ids = np.array([tools.cls_id, *first, tools.sep_id, *ids_b, tools.sep_id])
            segments = np.array([0] * (len(first) + 2) + [1] * (len(ids_b) + 1))
            visual = np.array([0, *second, 0, *vis_b, 0])
            rows.append((ids, segments, visual))
        object_labels = None
        if self.object_index:  # RoI 0 (the whole image) is the background class, as the official code
            object_labels = np.array([0] + [self.object_index.get(name, -1) for name in names[:kept]], dtype=np.int64)
        return TaskExample(record.key, rows, boxes, features, size, choice_label=int(label),
                           object_labels=object_labels)


def _widened_on_host(example: TaskExample) -> TaskExample:
    if example.feature_scale is None:
        return example
    values = dequantize_features(example.features, example.feature_scale, example.feature_dtype)
    whole = values.mean(0, keepdims=True) if len(values) else np.zeros((1, values.shape[1]), np.float32)
    return dataclasses.replace(example, features=np.concatenate((whole, values)), feature_scale=None,
                               feature_dtype="float16")


def collate_task(examples: list[TaskExample], task: str) -> TaskBatch:
    rows = [row for example in examples for row in example.rows]
    count = len(rows)
    text_slots = max(ids.size for ids, _, _ in rows)
    region_slots = max(e.boxes.shape[0] for e in examples)
    dim = examples[0].features.shape[1]
    input_ids = torch.zeros(count, text_slots, dtype=torch.long)
    text_mask = torch.zeros(count, text_slots, dtype=torch.bool)
    segments = torch.zeros(count, text_slots, dtype=torch.long)
    visual_index = torch.zeros(count, text_slots, dtype=torch.long)
    boxes = torch.zeros(count, region_slots, 4)
    region_mask = torch.zeros(count, region_slots, dtype=torch.bool)
    compact = all(e.feature_scale is not None and e.feature_dtype == examples[0].feature_dtype for e in examples)
    if not compact and any(e.feature_scale is not None for e in examples):  # mixed formats: widen here
        examples = [_widened_on_host(e) for e in examples]
    feature_scale = torch.zeros(count, region_slots) if compact else None
    code_dtype = FEATURE_TENSOR_DTYPES[examples[0].feature_dtype] if compact else torch.float32
    features = torch.zeros(count, region_slots, dim, dtype=code_dtype)
    image_size = torch.zeros(count, 2)
    row = 0
    for example in examples:
        k = example.boxes.shape[0]
        for ids, segs, visual in example.rows:
            n = ids.size
            input_ids[row, :n] = torch.from_numpy(ids)
            text_mask[row, :n] = True
            segments[row, :n] = torch.from_numpy(segs)
            visual_index[row, :n] = torch.from_numpy(visual)
            boxes[row, :k] = torch.from_numpy(example.boxes)
            region_mask[row, :k] = True
            if feature_scale is not None:  # RoI 0 stays zero: `VLBatch.widened` fills it on the device
                features[row, 1:k] = torch.from_numpy(example.features).view(code_dtype)
                feature_scale[row, 1:k] = torch.from_numpy(example.feature_scale)
            else:
                features[row, :k] = torch.from_numpy(example.features)
            image_size[row] = torch.tensor(example.image_size)
            row += 1
    batch = VLBatch(input_ids=input_ids, text_mask=text_mask, token_type_ids=segments,
                    has_image=torch.ones(count, dtype=torch.bool), boxes=boxes, region_mask=region_mask,
                    image_size=image_size, region_features=features, region_feature_scale=feature_scale,
                    text_visual_index=visual_index if task == "vcr" else None)
    out = TaskBatch(batch=batch, keys=[e.key for e in examples])
    if task == "vqa":
        out.answer_positions = torch.tensor([e.answer_position for e in examples])
        out.answer_targets = torch.from_numpy(np.stack([e.answer_target for e in examples]))
    elif task == "vcr":
        out.num_choices = len(examples[0].rows)
        out.choice_labels = torch.tensor([e.choice_label for e in examples])
        if examples[0].object_labels is not None:
            out.object_labels = torch.full((count, region_slots), -1, dtype=torch.long)
            for i, e in enumerate(examples):
                rows_of_item = slice(i * out.num_choices, (i + 1) * out.num_choices)
                out.object_labels[rows_of_item, : e.object_labels.size] = torch.from_numpy(e.object_labels)
    else:
        labels = torch.zeros(count, region_slots)
        for i, e in enumerate(examples):
            labels[i, : e.region_label.size] = torch.from_numpy(e.region_label)
        out.region_labels = labels
        out.target_boxes = torch.from_numpy(np.stack([e.target_box for e in examples]))
    return out


class TaskStream(ShardStream):
    """Micro-batches of one rank, in the global order of `elastic` (training), or one ordered pass (evaluation).

    Training: each logical reader runs epoch after epoch on its own: its share of the shards (shuffled
    with seed + epoch, split over the readers, by sample stride when shards are few) through its own
    shuffle buffer, `batch_size` usable items a batch, a batch never spanning two of its epochs. The
    position is the global micro-batch count and each reader's (epoch, shuffled samples taken); it
    continues on any world size dividing the run's micro-batches per step.
    """

    def __init__(self, spec: str, config: TaskDataConfig, rank: int = 0, world_size: int = 1,
                 loop: bool = True, grad_accum: int = 1, layout: Layout | None = None) -> None:
        super().__init__(rank, world_size, config.num_workers)
        config.validate()
        self.urls = storage.expand_urls(spec)
        if not self.urls:
            raise FileNotFoundError(f"no shards at {spec}")
        self.config, self.loop = config, loop
        self.sizes: dict[str, int] = {}
        if loop:
            self.sizes = storage.read_sizes(self.urls)
            for url in (u for u in self.urls if u not in self.sizes):
                log.warning("no sizes.json entry for %s: counting its samples", url)
                self.sizes[url] = sum(1 for _ in read_indexed(ShardPiece(url, -1), _READ, SkipCounter()))
        self.layout = layout or self._fresh_layout(world_size, grad_accum)
        self.grad_accum = self.layout.grad_accum(world_size)
        self.loader_workers = self.layout.loader_workers(world_size, config.num_workers) if loop else 0
        if loop and sum(self.sizes.values()) < self.layout.readers * config.batch_size:
            raise ValueError(f"{spec}: {sum(self.sizes.values())} items cannot give each of the "
                             f"{self.layout.readers} logical readers a batch of {config.batch_size}: lower "
                             "data.readers or task.batch_size")
        self.fingerprint = {"shards": spec, "task": config.task, "vcr_mode": config.vcr_mode,
                            "max_text": config.max_text, "batch_size": config.batch_size, "seed": config.seed,
                            "shuffle_buffer": config.shuffle_buffer, "micro_batches_per_step": self.layout.slots,
                            "readers": self.layout.readers}
        self.start_item, self.start_readers = 0, {}  # where the workers begin
        self.items, self.readers = 0, {}  # after the last batch handed to the trainer

    def _fresh_layout(self, world_size: int, grad_accum: int) -> Layout:
        """`data.readers`, or up to 4 readers per micro-batch slot, fewer for a small task set (each reader
        needs a batch an epoch): it depends on the data and the global batch, not on the world size."""
        if self.config.readers:
            return Layout.for_run(world_size, grad_accum, self.config.readers)
        slots = world_size * grad_accum
        per_slot = max(1, min(DEFAULT_READERS_PER_SLOT, sum(self.sizes.values()) // (self.config.batch_size * slots)))
        return Layout(slots, slots * per_slot)

    def reader_pieces(self, reader: int, epoch: int) -> list[ShardPiece]:
        urls = [u for u in sorted(self.urls) if self.sizes.get(u, 0) > 0]
        random.Random(self.config.seed + epoch).shuffle(urls)
        readers = self.layout.readers
        if len(urls) >= readers:
            return [ShardPiece(url, self.sizes[url]) for url in urls[reader::readers]]
        return [ShardPiece(url, len(range(reader, self.sizes[url], readers)), readers, reader) for url in urls]

    def __iter__(self) -> Iterator[TaskLoaderBatch]:
        if not self.loop:
            yield from self._one_pass()
            return
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        maker = TaskExampleMaker(self.config)
        readers: dict[int, _TaskReader] = {}
        item = self.start_item + worker
        while True:
            reader = self.layout.item_reader(item, self.rank, self.world_size)
            if reader not in readers:
                readers[reader] = _TaskReader(self, reader, *self.start_readers.get(reader, (0, 0)), maker)
            yield readers[reader].next_batch(item)
            item += workers

    def _one_pass(self) -> Iterator[TaskLoaderBatch]:
        """Every item once, in shard order (evaluation)."""
        maker, skipped, pending = TaskExampleMaker(self.config), SkipCounter(), []
        for url in self.urls:
            for sample in read_piece(ShardPiece(url, -1), _READ, skipped):
                try:
                    pending.append(maker(decode_task(sample, self.config.task)))
                except SampleError as err:
                    skipped[err.reason] += 1
                    log.warning("skipping %s: %s", sample.get("__key__"), err)
                    continue
                if len(pending) == self.config.batch_size:
                    yield TaskLoaderBatch(collate_task(pending, self.config.task), skipped.take())
                    pending = []
        if pending:
            yield TaskLoaderBatch(collate_task(pending, self.config.task), skipped.take())

    # --- the position (ShardStream)
    def next_epoch(self) -> None:
        raise RuntimeError("a training TaskStream never ends")

    def advance(self, item: TaskLoaderBatch) -> None:
        self.items = item.item + 1
        self.readers[item.reader] = (item.epoch, item.taken)

    def local_state(self) -> dict[str, Any]:
        return {"items": self.items, "readers": dict(self.readers)}

    def merge_states(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        if len({s["items"] for s in states}) != 1:
            raise RuntimeError(f"ranks disagree on the task data position: {[s['items'] for s in states]}")
        readers: dict[str, list[int]] = {}
        for rank_state in states:
            readers.update({str(r): list(t) for r, t in rank_state["readers"].items()})
        return {"format": 2, "micro_batches": states[0]["items"] * self.world_size,
                "readers": dict(sorted(readers.items(), key=lambda kv: int(kv[0]))),
                "layout": self.layout.to_dict(), "world_size": self.world_size, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        saved = state.get("fingerprint", {})
        differences = [f"{k}: saved {saved[k]!r}, now {v!r}" for k, v in self.fingerprint.items()
                       if k in saved and saved[k] != v]
        if state.get("format") != 2 or differences:
            if state.get("format") == 2 and not self.config.reset_position:
                raise ValueError("the checkpoint's task data position belongs to another data configuration ("
                                 + "; ".join(differences) + "). Restore those values, or set "
                                 "data.reset_position=true to start a fresh pass")
            log.warning("task data position %s: starting a fresh pass", "of an older vlbert_ds" if
                        state.get("format") != 2 else "reset (" + "; ".join(differences) + ")")
            epoch = 1 + max((int(t[0]) for t in state.get("readers", {}).values()), default=0) \
                if state.get("format") == 2 else 1
            self.start_item, self.start_readers = 0, {r: (epoch, 0) for r in range(self.layout.readers)}
        else:
            micro_batches = int(state["micro_batches"])
            if micro_batches % self.world_size:
                micro_batches = math.ceil(micro_batches / self.layout.slots) * self.layout.slots
                log.warning("task data position cannot be split over %d ranks: continuing at the next step",
                            self.world_size)
            self.start_item = micro_batches // self.world_size
            self.start_readers = {int(r): (int(t[0]), int(t[1])) for r, t in state.get("readers", {}).items()}
        self.items, self.readers = self.start_item, dict(self.start_readers)


class _TaskReader:
    """One logical reader's training batches, epoch after epoch of its own."""

    def __init__(self, stream: TaskStream, reader: int, epoch: int, taken: int, maker: TaskExampleMaker) -> None:
        self.stream, self.reader, self.maker = stream, reader, maker
        self.skipped = SkipCounter()
        self.epoch = epoch
        self.samples = self._open(epoch, taken)

    def _open(self, epoch: int, taken: int) -> ReaderSamples:
        config = self.stream.config
        return ReaderSamples(lambda: iter(self.stream.reader_pieces(self.reader, epoch)), config.shuffle_buffer,
                             f"{config.seed}/{epoch}/reader{self.reader}/task",
                             ReadSettings(cache_dir=config.cache_dir, cache_size_gb=config.cache_size_gb),
                             self.skipped, taken)

    def next_batch(self, item: int) -> TaskLoaderBatch:
        config = self.stream.config
        for _ in range(2):  # this epoch's rest, then (if it cannot fill a batch) the next epoch
            pending: list[TaskExample] = []
            for sample in self.samples:
                if sample is None:
                    continue
                try:
                    pending.append(self.maker(decode_task(sample, config.task)))
                except SampleError as err:
                    self.skipped[err.reason] += 1
                    if err.reason != "answer_out_of_vocab":
                        log.warning("skipping %s: %s", sample.get("__key__"), err)
                    continue
                if len(pending) == config.batch_size:
                    return TaskLoaderBatch(collate_task(pending, config.task), self.skipped.take(), self.reader,
                                           self.epoch, self.samples.taken, item)
            self.epoch += 1  # a batch never spans two epochs: the epoch's last partial batch is left out
            self.samples = self._open(self.epoch, 0)
        raise ValueError(f"logical reader {self.reader} found fewer than {config.batch_size} usable items in a whole "
                         "epoch of its shards: lower data.readers or task.batch_size")


@dataclass
class TaskLoaderBatch:
    task: TaskBatch
    skipped: dict[str, int]  # items dropped since the previous batch of its reader, by reason
    reader: int = 0  # the logical reader that made it
    epoch: int = 0  # that reader's epoch
    taken: int = 0  # shuffled samples of the epoch that reader had taken after this batch
    item: int = 0  # the rank's micro-batch index


_READ = ReadSettings()


def task_loader(spec: str, config: TaskDataConfig, rank: int = 0, world_size: int = 1, grad_accum: int = 1,
                layout: Layout | None = None) -> ResumableLoader:
    """What the trainer iterates: the rank's endless training stream, its global position in `state_dict()`."""
    return ResumableLoader(TaskStream(spec, config, rank, world_size, True, grad_accum, layout))
