"""Converters from the official VQA v2, VCR and RefCOCO+ formats into our task shards.

Region features come from `--regions` (bottom-up-attention TSV or a folder of per-image frcnn JSON,
as for captions), keyed by image id. VQA uses the detector's own boxes (10-100, as pretraining).
VCR and RefCOCO+ ("gt boxes" setting) predict over the task's own boxes (VCR metadata, COCO
instances), so their region file must hold features for exactly those boxes, in that order; a
mismatch is an error naming the item. Bad items are errors naming them, found before any shard is
written: a VCR item with other than 4 choices or a tag outside its objects, a RefCOCO+ reference to
an annotation the instances file lacks.

RefCOCO+'s refer toolkit ships `refs(unc).p`, a pickle. We never unpickle: convert it once with
`python -c "import pickle, json; json.dump(pickle.load(open('refs(unc).p','rb')), open('refs.json','w'))"`
on a machine you trust and pass the JSON.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from vlbert_ds.data.schema import Compaction, SampleError, TaskRecord, encode_task
from vlbert_ds.prep.regions import Regions, open_regions, select_boxes

_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$:~|]")
_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


PICKLE_TO_JSON = ("python -c \"import pickle, json; json.dump(pickle.load(open('refs(unc).p', 'rb')), "
                  "open('refs.json', 'w'))\"")


def read_json(url: str) -> Any:
    """A JSON file; a pickle is refused (never unpickled) with the conversion to run, bad JSON names its line."""
    with fsspec.open(url, "rb", compression="infer") as handle:
        data = handle.read()
    if data[:1] == b"\x80" or url.lower().endswith((".p", ".pkl", ".pickle")):
        raise ValueError(f"{url} is a Python pickle (like the refer toolkit's refs(unc).p). Pickles can run code "
                         "when loaded, so vlbert-prep refuses them; convert it once, on a machine you trust, with "
                         f"{PICKLE_TO_JSON} and pass the JSON")
    try:
        return json.loads(data)
    except UnicodeDecodeError as err:
        raise ValueError(f"{url}: not a UTF-8 JSON file ({err})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{url}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's normalisation, in short: lower case, punctuation, number words, articles."""
    text = _PUNCTUATION.sub(" ", answer.lower().replace("\n", " ").replace("\t", " ")).replace(".", " ")
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_soft_scores(answers: list[str]) -> dict[str, float]:
    """VQA accuracy of each given answer: min(1, matches/3), averaged over the 10 leave-one-out subsets."""
    normalized = [normalize_answer(a) for a in answers]
    scores = {}
    for candidate in set(normalized):
        subsets = []
        for left_out in range(len(normalized)):
            others = normalized[:left_out] + normalized[left_out + 1:]
            subsets.append(min(1.0, others.count(candidate) / 3.0))
        scores[candidate] = sum(subsets) / len(subsets)
    return scores


def build_answer_vocabulary(annotations: list[dict[str, Any]], min_count: int = 9,
                            max_answers: int = 3129) -> list[str]:
    """Answers given as `multiple_choice_answer` at least `min_count` times, most frequent first."""
    counts = Counter(normalize_answer(a["multiple_choice_answer"]) for a in annotations)
    return [a for a, n in sorted(counts.items(), key=lambda x: (-x[1], x[0])) if n >= min_count][:max_answers]


def most_common_answer(annotations: list[dict[str, Any]]) -> tuple[str, int] | None:
    counts = Counter(normalize_answer(a["multiple_choice_answer"]) for a in annotations)
    return counts.most_common(1)[0] if counts else None


@dataclass
class TaskRow:
    item_id: str
    image_id: str
    fields: dict[str, Any]
    boxes: np.ndarray | None = None  # the task's own boxes (VCR, RefCOCO+); None = the detector's
    width: int = 0
    height: int = 0


class TaskRowMaker:
    """TaskRow -> one task sample, with features from the region source (opened lazily per worker)."""

    def __init__(self, kind: str, regions: str, compaction: Compaction | None = None) -> None:
        self.kind, self.regions_spec, self._regions = kind, regions, None
        self.compaction = compaction or Compaction()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_regions": None}

    def __call__(self, row: TaskRow, shard: int, position: int) -> list[dict[str, Any]]:
        if self._regions is None:
            self._regions = open_regions(self.regions_spec)
        regions: Regions = self._regions.get(row.image_id)
        if row.boxes is None:
            regions = select_boxes(regions)
            boxes, width, height = regions.boxes, regions.image_width, regions.image_height
        else:
            if regions.boxes.shape[0] != row.boxes.shape[0]:
                raise SampleError("box_count_mismatch", f"{row.item_id}: {row.boxes.shape[0]} task boxes, "
                                                        f"{regions.boxes.shape[0]} in the region file")
            boxes, width, height = row.boxes, row.width or regions.image_width, row.height or regions.image_height
        if regions.features is None:
            raise SampleError("missing_features", row.image_id)
        record = TaskRecord(key=f"{shard:06d}_{position:06d}", kind=self.kind,
                            meta={**row.fields, "item_id": row.item_id, "image_id": row.image_id},
                            image_width=int(width), image_height=int(height), boxes=boxes.astype(np.float32),
                            features=regions.features)
        return [encode_task(record, self.compaction)]


def vqa_rows(questions_url: str, annotations_url: str | None) -> list[TaskRow]:
    questions = read_json(questions_url)["questions"]
    by_question = {}
    if annotations_url:
        by_question = {a["question_id"]: a for a in read_json(annotations_url)["annotations"]}
    rows = []
    for q in questions:
        fields: dict[str, Any] = {"question": q["question"], "question_id": q["question_id"]}
        annotation = by_question.get(q["question_id"])
        if annotation is not None:
            fields["answers"] = vqa_soft_scores([a["answer"] for a in annotation["answers"]])
        rows.append(TaskRow(str(q["question_id"]), str(q["image_id"]), fields))
    return rows


def vcr_rows(annotations_url: str, metadata_root: str) -> list[TaskRow]:
    rows = []
    with fsspec.open(annotations_url, "rt") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{annotations_url} line {line_number}: invalid JSON ({err.msg}, column "
                                 f"{err.colno})") from err
            item_id = str(item.get("annot_id", f"line {line_number}"))
            objects = item.get("objects") or []
            for field in ("answer_choices", "rationale_choices"):
                if field in item and len(item[field]) != 4:
                    raise ValueError(f"VCR item {item_id}: {field} has {len(item[field])} choices, expected 4")
            for field in ("question", "answer_choices", "rationale_choices"):
                for tag in _tags(item.get(field, [])):
                    if not isinstance(tag, int) or not 0 <= tag < len(objects):
                        raise ValueError(f"VCR item {item_id}: {field} tags object {tag}, but it has "
                                         f"{len(objects)} objects")
            meta = read_json(f"{metadata_root.rstrip('/')}/{item['metadata_fn']}")
            boxes = np.asarray(meta["boxes"], dtype=np.float32)[:, :4]
            if boxes.shape[0] != len(objects):
                raise ValueError(f"VCR item {item_id}: {len(objects)} objects but {boxes.shape[0]} boxes in "
                                 f"{item['metadata_fn']}")
            fields = {k: item[k] for k in ("question", "answer_choices", "rationale_choices", "answer_label",
                                           "rationale_label") if k in item}
            fields["object_names"] = objects
            image_id = item["metadata_fn"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
            rows.append(TaskRow(item_id, image_id, fields, boxes, int(meta["width"]), int(meta["height"])))
    return rows


def _tags(value: Any):
    """Every object index in a VCR token list (nested: a choice list holds token lists)."""
    for token in value:
        if isinstance(token, list):
            if token and all(isinstance(t, int) for t in token):
                yield from token
            else:
                yield from _tags(token)


def refcoco_rows(refs_url: str, instances_url: str, split: str) -> list[TaskRow]:
    refs = read_json(refs_url)
    instances = read_json(instances_url)
    images = {img["id"]: img for img in instances["images"]}
    annotations = {ann["id"]: ann for ann in instances["annotations"]}
    per_image: dict[int, list[dict[str, Any]]] = {}
    for ann in instances["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    rows = []
    for ref in refs:
        if ref.get("split") != split:
            continue
        ann = annotations.get(ref["ann_id"])
        if ann is None:
            raise ValueError(f"RefCOCO+ ref {ref['ref_id']}: annotation {ref['ann_id']} is not in {instances_url}")
        image = images.get(ref["image_id"])
        if image is None:
            raise ValueError(f"RefCOCO+ ref {ref['ref_id']}: image {ref['image_id']} is not in {instances_url}")
        boxes = np.array([_xyxy(a["bbox"]) for a in per_image[ref["image_id"]]], dtype=np.float32)
        for n, sentence in enumerate(ref.get("sentences", [])):
            fields = {"expression": sentence["sent"], "target_box": _xyxy(ann["bbox"]), "ref_id": ref["ref_id"],
                      "ann_id": ref["ann_id"], "category_id": ann.get("category_id")}
            rows.append(TaskRow(f"{ref['ref_id']}-{n}", str(ref["image_id"]), fields, boxes, int(image["width"]),
                                int(image["height"])))
    return rows


def _xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [float(x), float(y), float(x + w - 1), float(y + h - 1)]
