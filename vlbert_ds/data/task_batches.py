"""Fine-tuning data: task shards (VQA, VCR, RefCOCO+) -> `TaskBatch`es, streamed per rank.

Task samples are our shard format with `kind` = vqa | vcr | refcoco (docs/shard-format.md): the
image's boxes and precomputed features, and the task's fields in the JSON. Sequences follow the
reference §3: `[CLS] Q [SEP] [MASK] [SEP]` (VQA), `[CLS] Q [SEP] A_i [SEP]` per choice (VCR, with
object tags rendered as words whose visual part is that object's RoI), `[CLS] expression [SEP]`
(RefCOCO+); then the whole-image RoI 0 and the boxes. Fine-tuning reads the precomputed front end.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlbert_ds.data import storage
from vlbert_ds.data.boxes import with_image_roi
from vlbert_ds.data.examples import TokenizerTools
from vlbert_ds.data.schema import TASK_KINDS, SampleError, TaskRecord, decode_task
from vlbert_ds.data.streams import (
    ReadSettings,
    ResumableLoader,
    ShardPiece,
    ShardStream,
    SkipCounter,
    read_piece,
    shuffled,
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
    features: np.ndarray  # [R, D] float32, row 0 = mean of the box features
    image_size: tuple[float, float]
    answer_position: int = 0
    answer_target: np.ndarray | None = None
    choice_label: int = -1
    region_label: np.ndarray | None = None
    object_labels: np.ndarray | None = None  # VCR [R] long: detector category per RoI, -1 = not a known class
    target_box: np.ndarray | None = None


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
        features = record.features[: self.config.max_regions].astype(np.float32)
        whole = features.mean(0, keepdims=True) if len(features) else np.zeros((1, features.shape[1]), np.float32)
        return with_image_roi(record.boxes[: self.config.max_regions], width, height), np.concatenate((whole, features))

    def __call__(self, record: TaskRecord) -> TaskExample:
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
    features = torch.zeros(count, region_slots, dim)
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
            features[row, :k] = torch.from_numpy(example.features)
            image_size[row] = torch.tensor(example.image_size)
            row += 1
    batch = VLBatch(input_ids=input_ids, text_mask=text_mask, token_type_ids=segments,
                    has_image=torch.ones(count, dtype=torch.bool), boxes=boxes, region_mask=region_mask,
                    image_size=image_size, region_features=features,
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
    """Micro-batches of one rank: shards split over ranks and workers (samples when shards are few).

    Training streams run for ever, each worker from epoch to epoch on its own, and a DataLoader takes
    their batches in turn, so batch i of a rank is worker i % W's batch i // W. The position is how
    many batches the rank has used and, per worker, the epoch and how many shuffled samples of it
    that worker has consumed; a resumed worker re-reads those samples without decoding them.
    """

    def __init__(self, spec: str, config: TaskDataConfig, rank: int = 0, world_size: int = 1,
                 loop: bool = True) -> None:
        super().__init__(rank, world_size, config.num_workers)
        config.validate()
        self.urls = storage.expand_urls(spec)
        if not self.urls:
            raise FileNotFoundError(f"no shards at {spec}")
        self.config, self.loop = config, loop
        self.skipped = SkipCounter()
        self.delivered = 0  # batches handed to the trainer, all epochs
        self.workers: list[tuple[int, int]] = [(0, 0)] * self.num_workers  # per worker: (epoch, samples taken)
        self._start = (self.delivered, list(self.workers))  # where the workers begin

    def _pieces(self, worker: int, workers: int, epoch: int) -> list[ShardPiece]:
        readers, reader = self.world_size * workers, self.rank * workers + worker
        urls = list(self.urls)
        if self.config.train:
            random.Random(self.config.seed + epoch).shuffle(urls)
        if len(urls) >= readers:
            return [ShardPiece(url, 0) for url in urls[reader::readers]]
        return [ShardPiece(url, 0, readers, reader) for url in urls]  # every `readers`-th sample of each

    def _samples(self, worker: int, epoch: int) -> Iterator[dict[str, Any]]:
        samples: Iterator[dict[str, Any]] = (s for piece in self._pieces(worker, self.num_workers, epoch)
                                             for s in read_piece(piece, _READ, self.skipped))
        if self.config.train:
            samples = shuffled(samples, self.config.shuffle_buffer, random.Random(
                f"{self.config.seed}/{epoch}/{self.rank}/{worker}"))
        return samples

    def __iter__(self) -> Iterator[TaskLoaderBatch]:
        delivered, positions = self._start
        physical = self.worker_id()
        worker = (physical + delivered) % self.num_workers  # a restarted DataLoader begins at worker 0
        epoch, skip = positions[worker] if self.loop else (0, 0)
        maker = TaskExampleMaker(self.config)
        pending: list[TaskExample] = []
        while True:
            taken = 0
            for sample in self._samples(worker, epoch):
                taken += 1
                if taken <= skip:  # delivered before the restart (and its skips reported then)
                    continue
                if skip and taken == skip + 1:
                    self.skipped.clear()
                try:
                    pending.append(maker(decode_task(sample, self.config.task)))
                except SampleError as err:
                    self.skipped[err.reason] += 1
                    if err.reason != "answer_out_of_vocab":
                        log.warning("skipping %s: %s", sample.get("__key__"), err)
                    continue
                if len(pending) == self.config.batch_size:
                    yield TaskLoaderBatch(collate_task(pending, self.config.task), self.skipped.take(), worker,
                                          epoch, taken)
                    pending = []
            skip = 0
            if not self.loop:
                break
            epoch, pending = epoch + 1, []  # a batch never spans two epochs, so a position is (epoch, taken)
        if pending:
            yield TaskLoaderBatch(collate_task(pending, self.config.task), self.skipped.take(), worker, epoch, taken)

    # --- the position (ShardStream)
    def next_epoch(self) -> None:
        raise RuntimeError("a training TaskStream never ends")

    def advance(self, item: TaskLoaderBatch) -> None:
        self.delivered += 1
        self.workers[item.worker] = (item.epoch, item.taken)

    def state_dict(self) -> dict[str, Any]:
        return {"delivered": self.delivered, "workers": [list(p) for p in self.workers],
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        workers = [tuple(p) for p in state.get("workers", [])]
        if state.get("world_size") != self.world_size or len(workers) != self.num_workers:
            log.warning("task data position saved with %s ranks x %d workers, resumed with %d x %d: starting a "
                        "fresh pass", state.get("world_size"), len(workers), self.world_size, self.num_workers)
            epoch = max((p[0] for p in workers), default=0) + 1
            self.delivered, self.workers = 0, [(epoch, 0)] * self.num_workers
        else:
            self.delivered, self.workers = int(state["delivered"]), workers
        self._start = (self.delivered, list(self.workers))


@dataclass
class TaskLoaderBatch:
    task: TaskBatch
    skipped: dict[str, int]  # items dropped since the previous batch, by reason (answer_out_of_vocab, ...)
    worker: int = 0  # the (logical) worker that made it
    epoch: int = 0  # that worker's epoch
    taken: int = 0  # shuffled samples of the epoch that worker had consumed after this batch


_READ = ReadSettings()


def task_loader(spec: str, config: TaskDataConfig, rank: int = 0, world_size: int = 1) -> ResumableLoader:
    """What the trainer iterates: the rank's endless training stream, its position in `state_dict()`."""
    return ResumableLoader(TaskStream(spec, config, rank, world_size, loop=True))
