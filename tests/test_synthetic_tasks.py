"""The synthetic VQA / VCR / RefCOCO+ items are true of their scenes, and the ablation command reports.

Truth is re-derived here from the scene generator's objects (colour, shape, box), with the spatial
relation written out independently of `prep/default.py`.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import webdataset as wds
from services import free_port

from vlbert_ds.data.schema import decode_task
from vlbert_ds.prep.default import COLOUR_NAMES, SHAPES, make_scene


def _items(folder, task: str):
    for url in sorted(glob.glob(f"{folder}/{task}/*/*.tar")):
        for sample in wds.WebDataset(url, shardshuffle=False):
            record = decode_task(sample, task)
            _, objects, _ = make_scene(0, record.meta["scene_index"], record.image_width, record.image_height)
            yield record, objects


def _where(a, b) -> str:
    """a relative to b: the axis with the larger centre distance decides (ties go horizontal)."""
    dx = (a.box[0] + a.box[2]) / 2 - (b.box[0] + b.box[2]) / 2
    dy = (a.box[1] + a.box[3]) / 2 - (b.box[1] + b.box[3]) / 2
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _name(obj) -> str:
    return f"{COLOUR_NAMES[obj.colour]} {SHAPES[obj.shape]}"


def test_vqa_answers_are_true_of_the_scene(synthetic_tasks):
    seen = set()
    for record, objects in _items(synthetic_tasks, "vqa"):
        question, (answer,) = record.meta["question"], list(record.meta["answers"])
        kind = record.meta["question_type"]
        seen.add(kind)
        if kind == "count":
            assert answer == {2: "two", 3: "three"}[len(objects)]
        elif kind == "colour":
            shape = question.split()[-2]
            (match,) = [o for o in objects if SHAPES[o.shape] == shape]  # asked only when unique
            assert answer == COLOUR_NAMES[match.colour]
        elif kind == "shape":
            colour = question.split()[-3]
            (match,) = [o for o in objects if COLOUR_NAMES[o.colour] == colour]
            assert answer == SHAPES[match.shape]
        else:
            asked = " ".join(question.split()[3:5])
            assert answer == ("yes" if asked in {_name(o) for o in objects} else "no")
    assert seen == {"count", "colour", "shape", "exists"}


def test_vcr_has_exactly_one_true_answer_and_one_true_rationale(synthetic_tasks):
    count = 0
    for record, objects in _items(synthetic_tasks, "vcr"):
        meta = record.meta
        (target,) = meta["question"][3]
        answers = [choice[2] for choice in meta["answer_choices"]]
        assert len(set(answers)) == 4 and answers[meta["answer_label"]] == COLOUR_NAMES[objects[target].colour]
        true_rationales = []
        for choice in meta["rationale_choices"]:
            assert choice[0] == [target] and choice[1] == "is"
            relation, described = " ".join(choice[2:-4]), choice[-3:-1]
            others = [o for i, o in enumerate(objects) if i != target and SHAPES[o.shape] == described[1]]
            true_rationales.append(any(_where(objects[target], o) == relation and COLOUR_NAMES[o.colour] == described[0]
                                       for o in others))
        assert true_rationales.count(True) == 1 and true_rationales[meta["rationale_label"]]
        count += 1
    assert count > 100


def test_refcoco_expressions_pick_out_the_target(synthetic_tasks):
    by_attributes = 0
    for record, objects in _items(synthetic_tasks, "refcoco"):
        target = objects[record.meta["target_index"]]
        assert list(record.meta["target_box"]) == list(target.box)
        words = record.meta["expression"].split()
        if len(words) == 3:  # "the <colour> <shape>": unique, and a distractor shares one attribute
            assert [_name(o) for o in objects].count(" ".join(words[1:])) == 1 and " ".join(words[1:]) == _name(target)
            assert any(o is not target and (o.colour == target.colour or o.shape == target.shape) for o in objects)
            by_attributes += 1
        else:  # "the <shape> <relation> the <colour> <shape>"
            assert words[1] == SHAPES[target.shape]
            (anchor,) = [o for o in objects if _name(o) == " ".join(words[-2:])]
            fits = [o for o in objects if o is not anchor and SHAPES[o.shape] == words[1]
                    and _where(o, anchor) == " ".join(words[2:-3])]
            assert fits == [target]
    assert by_attributes > 0


@pytest.mark.slow
def test_ablation_command_writes_the_table_plot_and_json(tmp_path):
    """`--task all` end to end at a toy budget: every task and init runs and lands in the report. MiniLM as the
    command uses it; small batches (overrides reach the pretraining and every fine-tuning run alike), since
    what is checked is that each run lands in the report, not what it learns."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "MASTER_PORT": str(free_port())}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    budget = ["--pretrain-steps", "4", "--finetune-steps", "3", "--train-scenes", "40", "--val-scenes", "16"]
    head = [sys.executable, "-m", "vlbert_ds.cli.finetune", "--task", "all", "--output", str(tmp_path)]
    overrides = ["data.num_workers=0", "tracking.enabled=false", "train.precision=fp32",
                 "data.vl_per_batch=4", "data.text_per_batch=2", "grounding.samples=16", "task.batch_size=4"]
    command = [*head, *budget, *overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "ablation.json").read_text())
    assert set(report["results"]) == {"VQA", "VCR Q->A", "VCR QA->R", "VCR Q->AR", "RefCOCO+"}
    for scores in report["results"].values():
        assert set(scores) == {"pretrained", "bert_only"} and all(0 <= v <= 1 for v in scores.values())
    assert report["budget"] == {"pretrain_steps": 4, "finetune_steps": 3, "train_scenes": 40, "val_scenes": 16}
    table = (tmp_path / "ablation.md").read_text()
    assert table.count("| VCR") == 3 and "| RefCOCO+ |" in table
    for name, scores in report["results"].items():  # the table shows the JSON's numbers, in %
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:3] == [f"{100 * scores['pretrained']:.1f}", f"{100 * scores['bert_only']:.1f}"]
        assert cells[3] == f"{100 * (scores['pretrained'] - scores['bert_only']):+.1f}"
    for init in ("pretrained", "bert_only"):  # Q->AR needs both right: within the Frechet bounds of the two
        qa, qar, joint = (report["results"][n][init] for n in ("VCR Q->A", "VCR QA->R", "VCR Q->AR"))
        assert max(0.0, qa + qar - 1.0) - 1e-9 <= joint <= min(qa, qar) + 1e-9
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same folder with another pretraining budget is refused instead of silently reusing the run.
    budget[1] = "5"
    again = subprocess.run([*head, *budget, *overrides], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "holds a pretraining of 4 steps, not 5" in again.stdout + again.stderr
