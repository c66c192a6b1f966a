"""Elastic exact resume: a run stopped mid-epoch on 2 ranks continues on 1 (or 4) with the same global batches."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
from ranks import TINY, run_ranks
from test_train_engine import NO_DROPOUT

# A constant schedule: the stopped runs end at an earlier train.steps than the straight one.
BASE = [*TINY, "model.num_region_classes=25", "optimizer.lr=5.0e-4", "optimizer.warmup_steps=2",
        "optimizer.schedule=constant", "train.log_every=0", "tracking.enabled=false", "checkpoint.export=false",
        "data.vl_per_batch=4", "data.text_per_batch=4", "data.mode=exact", "data.shuffle_buffer=8",
        "train.precision=fp32",
        "data.log_keys=true", "train.watchdog=off", *NO_DROPOUT]


def _sources(data):
    return [f"data.vl_sources=[{data}/vl/train]", f"data.text_sources=[{data}/text/train]"]


def _losses(report, steps):
    return [report["step_losses"][str(s)] for s in steps]


def _keys(folder):
    rows = [json.loads(line) for path in sorted((folder / "data_keys").glob("rank*.jsonl"))
            for line in path.read_text().splitlines()]
    return Counter(k for row in rows if row["epoch"] == 0 for k in row["keys"])


@pytest.mark.slow
def test_stopped_on_two_ranks_resumed_on_one_sees_the_same_batches_and_every_sample_once(default_data, tmp_path):
    """2 ranks x accumulation 2 (4 micro-batches a step); the epoch is 12 steps (160 samples over 16 readers
    of 10, in micro-batches of 4, 3 each, staggered over 4 steps). Stopped at step 5, resumed on 1 rank
    (accumulation re-derived: 4) with another worker count: steps 6..12 equal, each sample once."""
    common = [*BASE, *_sources(default_data), "train.grad_accum=2", "checkpoint.every=5"]
    straight, _ = run_ranks({"overrides": [*common, "train.steps=12", "data.num_workers=1",
                                           f"train.output_dir={tmp_path / 'straight'}"]}, 2, tmp_path)
    out = tmp_path / "elastic"
    run_ranks({"overrides": [*common, "train.steps=5", "data.num_workers=1", f"train.output_dir={out}"]}, 2,
              tmp_path)
    position = json.loads((out / "checkpoints/step00000005/data_position.json").read_text())
    assert position["micro_batches"] == 20 and position["world_size"] == 2 and position["layout"]["slots"] == 4
    resumed, ranks = run_ranks({"overrides": [*common, "train.steps=12", "data.num_workers=0",
                                              f"train.output_dir={out}"]}, 1, tmp_path)
    log = ranks[0].stdout
    assert "gradient accumulation 4 keeps the global batch of 4 micro-batches" in log
    assert "converted to a universal checkpoint" in log and "resumed from step00000005_universal" in log
    steps = list(range(6, 13))
    for a, b in zip(_losses(straight, steps), _losses(resumed, steps), strict=True):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (_losses(straight, steps), _losses(resumed, steps))
    seen = _keys(out)
    assert len(seen) == 160 and set(seen.values()) == {1}  # every sample of the epoch exactly once
    assert _keys(tmp_path / "straight") == seen


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_each_zero_stage_resumes_on_another_world_size(stage, default_data, tmp_path):
    """ZeRO-1 and ZeRO-3 (ZeRO-2 above): 2 ranks -> 1 rank and -> 4 ranks, losses equal to the straight run."""
    common = [*BASE, *_sources(default_data), "train.grad_accum=2", "checkpoint.every=2", "data.num_workers=1",
              f"train.ds_config=ds_configs/zero{stage}.json"]
    straight, _ = run_ranks({"overrides": [*common, "train.steps=4", f"train.output_dir={tmp_path / 's'}"]}, 2,
                            tmp_path)
    stopped = tmp_path / "stopped"  # one 2-rank run stopped at step 2, copied for each resume
    run_ranks({"overrides": [*common, "train.steps=2", f"train.output_dir={stopped}"]}, 2, tmp_path)
    for world in (1, 4):
        out = tmp_path / f"to{world}"
        shutil.copytree(stopped, out)
        resumed, _ = run_ranks({"overrides": [*common, "train.steps=4", f"train.output_dir={out}"]}, world,
                               tmp_path)
        for a, b in zip(_losses(straight, [3, 4]), _losses(resumed, [3, 4]), strict=True):
            assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (world, _losses(straight, [3, 4]), _losses(resumed, [3, 4]))


@pytest.mark.slow
def test_a_world_size_that_cannot_keep_the_global_batch_is_refused_naming_the_valid_ones(default_data, tmp_path):
    """A global batch of 2 micro-batches (1 rank x accumulation 2): 1 or 2 ranks keep it, 3 cannot."""
    common = [*BASE, *_sources(default_data), "train.grad_accum=2", "checkpoint.every=1", "data.num_workers=0"]
    out = tmp_path / "odd"
    run_ranks({"overrides": [*common, "train.steps=1", f"train.output_dir={out}"]}, 1, tmp_path)
    _, ranks = run_ranks({"overrides": [*common, "train.steps=2", f"train.output_dir={out}"]}, 3, tmp_path,
                         expect_ok=False)
    assert ranks[0].returncode != 0
    assert "3 ranks cannot keep it. Valid world sizes: 1, 2" in ranks[0].stdout
