"""The DeepSpeed engine on CPU (gloo): rank/accumulation equivalence, exact resume, MLflow, model checks."""

from __future__ import annotations

import math

import pytest
from ranks import TINY, run_ranks

pytestmark = pytest.mark.slow

COMMON = [*TINY, "model.num_region_classes=25", "data.vl_sources=[unused]",
          "data.text_sources=[unused]", "optimizer.lr=5.0e-4", "optimizer.warmup_steps=2", "train.log_every=0",
          "tracking.enabled=false", "checkpoint.export=false", "data.vl_per_batch=4", "data.text_per_batch=4"]
NO_DROPOUT = ['model.overrides={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, '
              '"visual_fusion_dropout": 0.0}']


def _losses(report):
    return [report["step_losses"][str(s)] for s in sorted(int(k) for k in report["step_losses"])]


@pytest.mark.parametrize("stage", [1, 2])
def test_two_ranks_equal_one_rank_with_accumulation(stage, default_data, tmp_path):
    """Same losses on 2 ranks and on 1 rank with accumulation 2; and the 2-rank run's consolidated
    save_pretrained export (ZeRO-1, ZeRO-2: each rank holds part of the optimizer state) gives the engine's
    outputs."""
    steps = 4
    base = {"batches": str(default_data), "num_batches": 2 * steps}
    # lr 5e-3: a from-scratch tiny model learns the word frequencies within these 4 steps ("it trains")
    common = [*COMMON, *NO_DROPOUT, "train.precision=fp32", f"train.steps={steps}", "checkpoint.every=100",
              f"train.ds_config=ds_configs/zero{stage}.json", "optimizer.lr=5.0e-3"]
    two, _ = run_ranks({**base, "compare_export": str(default_data),
                        "overrides": [*common, "train.grad_accum=1", "checkpoint.export=true",
                                      f"train.output_dir={tmp_path / 'two'}"]}, 2, tmp_path)
    one, _ = run_ranks({**base, "overrides": [*common, "train.grad_accum=2",
                                              f"train.output_dir={tmp_path / 'one'}"]}, 1, tmp_path)
    a, b = _losses(two), _losses(one)
    assert len(a) == len(b) == steps
    assert a[-1] < a[0]  # it trains
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-4 * max(1.0, abs(y)), (a, b)
    assert two["export_dir"] and two["export_max_abs_diff"] < 1e-5, two


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from services import start_mlflow

    server = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


def _loader_run(default_data, out, extra=()):
    return [*COMMON, f"data.vl_sources=[{default_data}/vl/train]", f"data.text_sources=[{default_data}/text/train]",
            "data.mode=resampled", "data.samples_per_epoch=16", "data.num_workers=1", "data.shuffle_buffer=8",
            "train.steps=8", "checkpoint.every=3", f"train.output_dir={out}", *extra]


def test_killed_run_resumes_with_the_same_losses_and_the_same_mlflow_run(default_data, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    tracking = ["tracking.enabled=true", f"tracking.uri={mlflow_server.uri}"]
    straight, _ = run_ranks({"overrides": _loader_run(default_data, tmp_path / "straight",
                                                      [*tracking, "tracking.experiment=straight"])}, 1, tmp_path)
    crashed_args = _loader_run(default_data, tmp_path / "crashed", [*tracking, "tracking.experiment=crashed"])
    report, ranks = run_ranks({"overrides": crashed_args}, 1, tmp_path, expect_ok=False,
                              env_extra={"VLBERT_FAULT_EXIT_AFTER_STEP": "5"})
    assert report is None and ranks[0].returncode == 17  # killed after step 5; the last checkpoint is step 3
    assert (tmp_path / "crashed/checkpoints/latest").read_text() == "step00000003"
    resumed, _ = run_ranks({"overrides": crashed_args}, 1, tmp_path)
    assert "resumed from step00000003" in _[0].stdout
    a, b = _losses(straight), _losses(resumed)
    assert sorted(int(k) for k in resumed["step_losses"]) == [4, 5, 6, 7, 8]
    for x, y in zip(a[3:], b, strict=True):  # steps 4..8: same data, same dropout, same optimizer state
        assert abs(x - y) <= 1e-3 * max(1.0, abs(x)), (a, b)

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("crashed")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [resumed["run_id"]]  # one run, re-attached
    history = client.get_metric_history(resumed["run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))  # every step exactly once
    by_step = {m.step: m.value for m in history}
    assert abs(by_step[8] - b[-1]) < 1e-6
    run = client.get_run(resumed["run_id"])
    assert run.data.params["train.steps"] == "8" and run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(resumed["run_id"])}
    assert {"config", "plots"} <= artifacts


def test_checkpoint_of_another_model_size_is_refused_before_any_step(default_data, tmp_path):
    out = tmp_path / "size"
    base = [*COMMON, "train.precision=fp32", "train.steps=1", "checkpoint.every=1", f"train.output_dir={out}"]
    run_ranks({"overrides": base, "batches": str(default_data), "num_batches": 1}, 1, tmp_path)
    _, ranks = run_ranks({"overrides": [*base, "model.preset=mini", "train.steps=2"],
                          "batches": str(default_data), "num_batches": 2}, 1, tmp_path, expect_ok=False)
    assert ranks[0].returncode != 0 and "is of another model" in ranks[0].stdout
    assert "hidden_size: checkpoint 64 vs config 384" in ranks[0].stdout


def test_resume_on_another_number_of_ranks_through_a_universal_checkpoint(default_data, tmp_path):
    out = tmp_path / "universal"
    base = [*COMMON, "train.precision=fp32", "checkpoint.every=2", f"train.output_dir={out}"]
    run_ranks({"overrides": [*base, "train.steps=2"], "batches": str(default_data), "num_batches": 4}, 2, tmp_path)
    report, ranks = run_ranks({"overrides": [*base, "train.steps=4", "checkpoint.load_universal=true"],
                               "batches": str(default_data), "num_batches": 2}, 1, tmp_path)
    assert "resumed from step00000002_universal: step 2" in ranks[0].stdout
    assert sorted(int(k) for k in report["step_losses"]) == [3, 4]
    # finite, and no worse than guessing: a from-scratch model starts near the uniform loss,
    # 2 x ln(30522) (both MLMs) + ln(25) (RoI classes) = 23.8
    assert all(v == v and v < 2 * math.log(30522) + math.log(25) + 1 for v in report["step_losses"].values())
    assert (out / "checkpoints/step00000004/COMPLETE").is_file()


