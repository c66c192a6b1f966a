"""`vlbert-finetune` end to end on the DeepSpeed engine (CPU), on the synthetic tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from services import free_port

pytestmark = pytest.mark.slow
COMMON = ["model.num_region_classes=25", "train.steps=12", "optimizer.warmup_steps=2", "optimizer.lr=3e-4",
          "optimizer.fresh_lr_multiplier=10", "data.num_workers=1", "checkpoint.every=6", "tracking.enabled=false",
          "train.log_every=0", "task.batch_size=8", "train.precision=fp32", "checkpoint.export=true"]


def _finetune(task: str, out: Path, extra: list[str], data: Path, init: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "MASTER_PORT": str(free_port())}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    command = [sys.executable, "-m", "vlbert_ds.cli.finetune", "--task", task, f"task.train={data / task / 'train'}",
               f"task.val={data / task / 'val'}", f"train.output_dir={out}", f"task.init={init}", *COMMON, *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("task,extra", [("vqa", []), ("vcr", ["task.vcr_mode=qa2r", "task.batch_size=4"]),
                                        ("refcoco", ["checkpoint.export=true"])])
def test_finetune_runs_evaluates_and_checkpoints(task, extra, synthetic_tasks, tiny_pretrained, tmp_path):
    out = tmp_path / task
    done = _finetune(task, out, extra, synthetic_tasks, tiny_pretrained)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 13))
    assert all(s["loss"] == s["loss"] for s in steps)  # finite (NaN != NaN)
    val = json.loads((out / "val_metrics.json").read_text())["val"]
    metric = {"vqa": "vqa_accuracy", "vcr": "accuracy", "refcoco": "accuracy_iou50"}[task]
    assert (out / "checkpoints" / "latest").read_text() == "step00000012"
    expected, items = _recomputed_metric(task, out / "finetuned", synthetic_tasks / task / "val", extra)
    assert val["val_items"] == items == _val_items(synthetic_tasks / task / "val")
    assert abs(val[metric] - expected) < 1e-6, (val, expected)


def _val_items(folder: Path) -> int:
    return sum(json.loads((folder / "sizes.json").read_text()).values())


def _recomputed_metric(task: str, weights: Path, val: Path, extra: list[str]) -> tuple[float, int]:
    """The task metric of the exported weights, computed here from the raw shard JSON (VQA scores, VCR
    labels, RefCOCO+ target boxes with pixel-inclusive IoU) rather than by the trainer's evaluation."""
    import numpy as np
    import torch

    from vlbert_ds.bundled import default_bert
    from vlbert_ds.data.task_batches import TaskDataConfig, TaskStream
    from vlbert_ds.model.task_heads import TASK_MODELS

    model = TASK_MODELS[task].from_pretrained(weights).eval()
    assert model.config.num_region_classes == 25
    answers = json.loads((val.parent / "train" / "answers.json").read_text()) if task == "vqa" else []
    mode = "qa2r" if "task.vcr_mode=qa2r" in extra else "q2a"
    config = TaskDataConfig(task=task, tokenizer=default_bert(), answers=answers, vcr_mode=mode, batch_size=8,
                            num_workers=0, train=False)
    raw = {}
    for shard in sorted(val.glob("*.tar")):
        import tarfile

        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    raw[member.name.rsplit(".", 1)[0]] = json.loads(tar.extractfile(member).read())
    total, items = 0.0, 0
    with torch.no_grad():
        for item in TaskStream(str(val), config, loop=False):
            logits = model(item.task).logits
            for row, key in enumerate(item.task.keys):
                meta = raw[key]
                top = int(logits[row].argmax())
                if task == "vqa":
                    total += float(meta.get("answers", {}).get(answers[top], 0.0))
                elif task == "vcr":
                    total += float(top == int(meta["answer_label" if mode == "q2a" else "rationale_label"]))
                else:
                    box, target = item.task.batch.boxes[row, top].numpy(), np.asarray(meta["target_box"])
                    inter = np.prod(np.clip(np.minimum(box[2:], target[2:]) - np.maximum(box[:2], target[:2]) + 1,
                                            0, None))
                    union = np.prod(box[2:] - box[:2] + 1) + np.prod(target[2:] - target[:2] + 1) - inter
                    total += float(inter / union >= 0.5)
                items += 1
    return total / items, items


def test_vqa_answers_outside_the_vocabulary_are_counted_and_dropped(synthetic_tasks, tiny_pretrained, tmp_path):
    vocabulary = tmp_path / "answers.json"
    vocabulary.write_text(json.dumps(["red", "green", "blue", "yes", "no"]))  # no shapes, no counts
    out = tmp_path / "vqa"
    done = _finetune("vqa", out, [f"task.answers={vocabulary}", "train.steps=4"], synthetic_tasks,
                     tiny_pretrained)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    skipped = json.loads((out / "val_metrics.json").read_text())["skipped"]
    assert skipped.get("answer_out_of_vocab", 0) > 0


def test_bad_task_config_is_refused_with_a_message(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vlbert_ds.cli.finetune", "--task", "vqa", "task.train="],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 2 and "task.train" in done.stderr
