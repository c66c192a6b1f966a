"""Synthetic VQA, VCR and RefCOCO+ built from the default scenes, to measure what pretraining buys.

Each task reuses the embedded default's scene generator and feature extractor (prep/default.py), on
scene indices the pretraining data never used (from 1,000,000 on), and writes task shards in our
format (`kind` vqa | vcr | refcoco):

- VQA: "what colour is the circle ?" / "what shape is the red object ?" / "is there a blue square ?" /
  "how many shapes are there ?", one answer per question (all ten "annotators" agree: score 1.0).
- VCR: "what colour is [obj] ?" where the tag is rendered as the shape's name and grounded on that
  object's RoI; four answers "it is <colour> ." (one right); rationales "[obj] is <relation> the
  <colour> <shape> ." about another object, wrong in the relation, that object's colour, or both.
- RefCOCO+: scenes where two objects share a shape or a colour; the expression names the target by
  the attribute that tells it apart ("the red square" when another square is there), or by its
  relation to another object; candidate boxes are all objects (the "gt boxes" setting).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlbert_ds.data import storage
from vlbert_ds.data.schema import TaskRecord, encode_task
from vlbert_ds.prep.default import COLOUR_NAMES, SHAPES, PixelFeatures, SceneObject, _relation, make_scene
from vlbert_ds.prep.writer import PrepSummary, chunk, write_dataset

FIRST_SCENE = 1_000_000  # far from the pretraining scenes (0 .. a few thousand)
NUMBERS = {2: "two", 3: "three"}
VQA_ANSWERS = [*COLOUR_NAMES, *SHAPES, "two", "three", "yes", "no"]
RELATIONS = ("to the left of", "to the right of", "above", "below")


def _describe(obj: SceneObject) -> str:
    return f"{COLOUR_NAMES[obj.colour]} {SHAPES[obj.shape]}"


def _vqa(objects: list[SceneObject], rng: random.Random) -> dict[str, Any] | None:
    kind = rng.choice(("colour", "shape", "exists", "count"))
    shapes = [o.shape for o in objects]
    colours = [o.colour for o in objects]
    if kind == "colour":
        unique = [o for o in objects if shapes.count(o.shape) == 1]
        if not unique:
            return None
        obj = rng.choice(unique)
        question, answer = f"what colour is the {SHAPES[obj.shape]} ?", COLOUR_NAMES[obj.colour]
    elif kind == "shape":
        unique = [o for o in objects if colours.count(o.colour) == 1]
        if not unique:
            return None
        obj = rng.choice(unique)
        question, answer = f"what shape is the {COLOUR_NAMES[obj.colour]} object ?", SHAPES[obj.shape]
    elif kind == "exists":
        if rng.random() < 0.5:
            obj = rng.choice(objects)
            colour, shape, answer = obj.colour, obj.shape, "yes"
        else:
            present = {(o.colour, o.shape) for o in objects}
            absent = [(c, s) for c in range(len(COLOUR_NAMES)) for s in range(len(SHAPES)) if (c, s) not in present]
            colour, shape = rng.choice(absent)
            answer = "no"
        question = f"is there a {COLOUR_NAMES[colour]} {SHAPES[shape]} ?"
    else:
        question, answer = "how many shapes are there ?", NUMBERS[len(objects)]
    return {"question": question, "answers": {answer: 1.0}, "question_type": kind}


def _vcr(objects: list[SceneObject], rng: random.Random) -> dict[str, Any]:
    target = rng.randrange(len(objects))
    other = rng.choice([i for i in range(len(objects)) if i != target])
    right_colour = COLOUR_NAMES[objects[target].colour]
    wrong_colours = rng.sample([c for c in COLOUR_NAMES if c != right_colour], 3)
    answers = [["it", "is", c, "."] for c in [right_colour, *wrong_colours]]
    # Rationale: "[obj] is <relation> the <colour> <shape> ." about another object; a wrong one has the
    # wrong relation, the wrong colour of that object, or both, and is false of every object in the scene.
    relation = _relation(objects[target], objects[other])
    other_colour, other_shape = COLOUR_NAMES[objects[other].colour], objects[other].shape

    def true_of_scene(rel: str, colour: str) -> bool:
        return any(i != target and o.shape == other_shape and COLOUR_NAMES[o.colour] == colour
                   and _relation(objects[target], o) == rel for i, o in enumerate(objects))

    wrong_relation = rng.choice([r for r in RELATIONS if r != relation])
    wrong_colour = rng.choice([c for c in COLOUR_NAMES if c != other_colour and not true_of_scene(relation, c)
                               and not true_of_scene(wrong_relation, c)])
    pairs = [(relation, other_colour), (wrong_relation, other_colour), (relation, wrong_colour),
             (wrong_relation, wrong_colour)]
    if true_of_scene(wrong_relation, other_colour):  # a same-looking object on that side: pick another side
        wrong_relation = rng.choice([r for r in RELATIONS if not true_of_scene(r, other_colour)
                                     and not true_of_scene(r, wrong_colour)])
        pairs = [(relation, other_colour), (wrong_relation, other_colour), (relation, wrong_colour),
                 (wrong_relation, wrong_colour)]
    rationales = [[[target], "is", *r.split(), "the", c, SHAPES[other_shape], "."] for r, c in pairs]
    answer_order, rationale_order = list(range(4)), list(range(4))
    rng.shuffle(answer_order)
    rng.shuffle(rationale_order)
    return {"question": ["what", "colour", "is", [target], "?"],
            "answer_choices": [answers[i] for i in answer_order], "answer_label": answer_order.index(0),
            "rationale_choices": [rationales[i] for i in rationale_order],
            "rationale_label": rationale_order.index(0),
            "object_names": [SHAPES[o.shape] for o in objects]}


def _refcoco(objects: list[SceneObject], rng: random.Random) -> dict[str, Any] | None:
    pairs = [(a, b) for a in range(len(objects)) for b in range(len(objects))
             if a != b and (objects[a].shape == objects[b].shape or objects[a].colour == objects[b].colour)]
    if not pairs:
        return None
    target, _ = rng.choice(pairs)
    t = objects[target]
    descriptions = [_describe(o) for o in objects]
    # "the <shape> <relation> the <anchor>": only with an anchor described uniquely, and only when no
    # other object of the target's shape stands in that relation to it.
    relational = [f"the {SHAPES[t.shape]} {_relation(t, objects[a])} the {descriptions[a]}"
                  for a in range(len(objects)) if a != target and descriptions.count(descriptions[a]) == 1
                  and not any(o.shape == t.shape and _relation(o, objects[a]) == _relation(t, objects[a])
                              for i, o in enumerate(objects) if i not in (target, a))]
    unique = descriptions.count(descriptions[target]) == 1
    if unique and (rng.random() < 0.6 or not relational):
        expression = f"the {descriptions[target]}"  # colour and shape: the distractor shares one of them
    elif relational:
        expression = rng.choice(relational)
    else:
        return None
    return {"expression": expression, "target_box": list(t.box), "target_index": target}


MAKERS = {"vqa": _vqa, "vcr": _vcr, "refcoco": _refcoco}


class SyntheticTaskMaker:
    """Row = scene index -> one task item (or none when the scene does not fit the task)."""

    def __init__(self, task: str, seed: int, width: int, height: int) -> None:
        self.task, self.seed, self.width, self.height = task, seed, width, height
        self.features = PixelFeatures(seed=0)

    def __call__(self, index: int, shard: int, position: int) -> list[dict[str, Any]]:
        image, objects, _ = make_scene(self.seed, index, self.width, self.height)
        rng = random.Random(f"vlbert_ds-task/{self.task}/{self.seed}/{index}")
        fields = MAKERS[self.task](objects, rng)
        if fields is None:
            return []
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        pixels = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        boxes = np.array([o.box for o in objects], dtype=np.float32)
        features = np.stack([self.features(pixels, o.box) for o in objects])
        fields = {**fields, "scene_index": index, "item_id": f"{self.task}-{index}"}
        record = TaskRecord(key=f"{shard:06d}_{position:06d}", kind=self.task, meta=fields,
                            image_width=self.width, image_height=self.height, boxes=boxes, features=features)
        return [encode_task(record)]


def prepare_synthetic_tasks(out: str, tasks: tuple[str, ...] = ("vqa", "vcr", "refcoco"), train_scenes: int = 2000,
                            val_scenes: int = 400, seed: int = 0, width: int = 320, height: int = 240,
                            samples_per_shard: int = 500, processes: int = 2,
                            overwrite: bool = False) -> list[PrepSummary]:
    """Write `out/<task>/train`, `out/<task>/val`, `out/vqa/train/answers.json` and
    `out/vcr/train/object_classes.json` (beside the training shards, as `vlbert-prep vqa` does)."""
    summaries = []
    for task in tasks:
        maker = SyntheticTaskMaker(task, seed, width, height)
        start = FIRST_SCENE
        for split, count in (("train", train_scenes), ("val", val_scenes)):
            rows = list(chunk(range(start, start + count), samples_per_shard))
            summaries.append(write_dataset(storage.join(out, f"{task}/{split}"), rows, maker, task, processes,
                                           overwrite))
            start += count
    if "vqa" in tasks:
        storage.write_json_atomic(storage.join(out, "vqa/train/answers.json"), VQA_ANSWERS)
    if "vcr" in tasks:  # the synthetic "detector" categories: the VCR tags name shapes
        storage.write_json_atomic(storage.join(out, "vcr/train/object_classes.json"), ["__background__", *SHAPES])
    return summaries


def synthetic_ready(out: str, tasks: tuple[str, ...]) -> bool:
    return all(Path(out, task, split, "sizes.json").is_file() for task in tasks for split in ("train", "val")) and \
        ("vqa" not in tasks or Path(out, "vqa", "train", "answers.json").is_file()) and \
        ("vcr" not in tasks or Path(out, "vcr", "train", "object_classes.json").is_file())


def answers_file(folder: str) -> list[str]:
    return json.loads(Path(folder).read_text())
