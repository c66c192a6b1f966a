"""Fine-tuning on the shared trainer: exact resume after a kill, the non-finite-loss guard, and any
loss or metric the model returns reaching MLflow (pretraining has had these since the start)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ranks import TINY, run_ranks
from services import free_port

pytestmark = pytest.mark.slow
COMMON = ["model.num_region_classes=25", "train.steps=8", "optimizer.warmup_steps=2", "optimizer.lr=3e-4",
          "optimizer.fresh_lr_multiplier=10", "data.num_workers=1", "data.shuffle_buffer=16", "checkpoint.every=3",
          "tracking.enabled=false", "train.log_every=0", "task.batch_size=8", "train.precision=fp32",
          "checkpoint.export=false"]


def _finetune(out: Path, data: Path, init: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "MASTER_PORT": str(free_port()),
           **(env_extra or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    command = [sys.executable, "-m", "vlbert_ds.cli.finetune", "--task", "vqa", f"task.train={data / 'vqa/train'}",
               f"train.output_dir={out}", f"task.init={init}", *COMMON]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_killed_finetune_resumes_with_the_same_losses_and_a_nan_loss_is_dropped(synthetic_tasks, tiny_pretrained,
                                                                                   tmp_path):
    """Both runs meet a NaN loss at step 2 (dropped as in pretraining); one is then killed after step 5."""
    nan = {"VLBERT_FAULT_NAN_LOSS_AT_STEP": "2"}
    straight = _finetune(tmp_path / "straight", synthetic_tasks, tiny_pretrained, nan)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    crashed = _finetune(tmp_path / "crashed", synthetic_tasks, tiny_pretrained,
                        {**nan, "VLBERT_FAULT_EXIT_AFTER_STEP": "5"})
    assert crashed.returncode == 17  # killed after step 5, without cleanup; the last checkpoint is step 3
    assert [r["step"] for r in _rows(tmp_path / "crashed")] == [1, 2, 3, 4, 5]
    resumed = _finetune(tmp_path / "crashed", synthetic_tasks, tiny_pretrained, nan)  # step 2 is behind it: no NaN now
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from step00000003" in resumed.stdout

    a, b = _rows(tmp_path / "straight"), _rows(tmp_path / "crashed")
    assert "step 2: non-finite loss nan on some rank" in straight.stdout + straight.stderr
    assert all(math.isfinite(r["loss"]) for r in a)
    assert [r.get("skipped/nonfinite_loss", 0) for r in a] == [0, 1.0, 0, 0, 0, 0, 0, 0]  # per step
    assert [r["step"] for r in b] == list(range(1, 9))  # steps 4 and 5 once, not twice
    for x, y in zip(a, b, strict=True):  # same batches (the data position was in the checkpoint), same dropout
        assert abs(x["loss"] - y["loss"]) <= 1e-4 * max(1.0, abs(x["loss"])), (x, y)
        assert x["vqa_accuracy"] == y["vqa_accuracy"]


def test_a_new_loss_and_metric_of_the_model_reach_mlflow_unchanged_trainer(default_data, tmp_path):
    from mlflow.tracking import MlflowClient
    from services import start_mlflow

    server = start_mlflow(tmp_path / "mlflow")
    try:
        overrides = [*TINY, "model.num_region_classes=25", f"data.vl_sources=[{default_data}/vl/train]",
                     "train.steps=3", "train.log_every=0", "train.precision=fp32", "checkpoint.every=3",
                     "checkpoint.export=false", f"train.output_dir={tmp_path / 'run'}", "tracking.enabled=true",
                     f"tracking.uri={server.uri}", "tracking.experiment=new-keys", "data.vl_per_batch=4",
                     "data.text_per_batch=4"]
        report, _ = run_ranks({"overrides": overrides, "batches": str(default_data), "num_batches": 6,
                               "extra_outputs": True}, 2, tmp_path)
        client = MlflowClient(server.uri)
        part = client.get_metric_history(report["run_id"], "demo_part")
        accuracy = client.get_metric_history(report["run_id"], "demo_acc")
    finally:
        server.stop()
    assert sorted(m.step for m in part) == [1, 2, 3] and all(m.value == 0.5 for m in part)
    # weighted by count over ranks: (1.0 x 3 + 0.0 x 1) / 4
    assert sorted(m.step for m in accuracy) == [1, 2, 3] and all(abs(m.value - 0.75) < 1e-12 for m in accuracy)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["demo_part"] == 0.5 and abs(r["demo_acc"] - 0.75) < 1e-12 for r in rows)
