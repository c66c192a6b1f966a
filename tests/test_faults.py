"""Fault injection: non-finite losses, a crash inside a checkpoint save, a rank killed mid-run.

Each test injects one fault into a real multi-process run (vlbert_ds/train/faults.py) and checks
what the run does about it. docs/reliability.md tabulates the results.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ranks import TINY, WORKER, run_ranks
from services import free_port

pytestmark = pytest.mark.slow

COMMON = [*TINY, "model.num_region_classes=25", "optimizer.lr=5.0e-4", "optimizer.warmup_steps=2",
          "train.log_every=0", "tracking.enabled=false", "checkpoint.export=false", "data.vl_per_batch=4",
          "data.text_per_batch=4", "train.precision=fp32"]


def _loader(default_data: Path, out: Path, steps: int, every: int) -> list[str]:
    return [*COMMON, f"data.vl_sources=[{default_data}/vl/train]", f"data.text_sources=[{default_data}/text/train]",
            "data.mode=resampled", "data.samples_per_epoch=64", "data.num_workers=1", "data.shuffle_buffer=8",
            f"train.steps={steps}", f"checkpoint.every={every}", f"train.output_dir={out}"]


def test_a_nan_loss_on_one_rank_drops_that_micro_batch_on_every_rank(default_data, tmp_path):
    out = tmp_path / "nan"
    report, ranks = run_ranks({"overrides": _loader(default_data, out, steps=4, every=4)}, 2, tmp_path,
                              env_extra={"VLBERT_FAULT_NAN_LOSS_AT_STEP": "2"})
    assert sorted(int(s) for s in report["step_losses"]) == [1, 2, 3, 4]
    assert all(math.isfinite(v) for v in report["step_losses"].values())
    assert "step 2: non-finite loss nan on some rank" in ranks[0].stdout
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[1].get("skipped/nonfinite_loss") == 1.0 and "skipped/nonfinite_loss" not in lines[0]
    # Both ranks dropped the micro-batch (else the gradient all-reduce would have hung or NaN'd the
    # weights): the saved weights are finite.
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step00000004")
    assert all(bool(torch.isfinite(v).all()) for v in state.values())


def test_a_crash_while_writing_a_checkpoint_leaves_latest_on_the_previous_one(default_data, tmp_path):
    out = tmp_path / "crash"
    overrides = _loader(default_data, out, steps=6, every=2)
    report, ranks = run_ranks({"overrides": overrides}, 1, tmp_path, expect_ok=False,
                              env_extra={"VLBERT_FAULT_CRASH_IN_CHECKPOINT": "4"})
    assert report is None and ranks[0].returncode == 18
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step00000002"
    assert (checkpoints / "step00000004").is_dir() and not (checkpoints / "step00000004" / "COMPLETE").exists()
    resumed, ranks = run_ranks({"overrides": overrides}, 1, tmp_path)
    assert "resumed from step00000002: step 2" in ranks[0].stdout
    assert sorted(int(s) for s in resumed["step_losses"]) == [3, 4, 5, 6]
    assert (checkpoints / "latest").read_text() == "step00000006"
    assert (checkpoints / "step00000004" / "COMPLETE").is_file()  # written again, whole


def test_a_killed_rank_fails_the_job_fast_and_the_restart_resumes(default_data, tmp_path):
    out = tmp_path / "kill"
    overrides = [*_loader(default_data, out, steps=10, every=2), "train.dist_timeout_s=300"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"overrides": overrides, "out": str(tmp_path / "report.json")}))
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
               "VLBERT_FAULT_STEP_PAUSE_S": "0.5"}  # paced: the kill must land mid-run
        log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(spec)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    procs[0].wait(timeout=420)  # bounded by the 300 s collective timeout; the peer's reset ends it in seconds
    detect = time.time() - killed_at
    procs[1].wait(timeout=60)
    assert procs[0].returncode != 0
    print(f"time to detect the dead rank: {detect:.1f}s")
    assert detect < 60
    latest = (out / "checkpoints" / "latest").read_text()
    report, ranks = run_ranks({"overrides": overrides}, 2, tmp_path)
    assert f"resumed from {latest}" in ranks[0].stdout
    # The same continuation as a run that was never interrupted: same data, dropout and optimizer state.
    straight_overrides = [*_loader(default_data, tmp_path / "straight", steps=10, every=2), "train.dist_timeout_s=300"]
    straight, _ = run_ranks({"overrides": straight_overrides}, 2, tmp_path)
    resumed_steps = sorted(int(s) for s in report["step_losses"])
    assert resumed_steps[-1] == 10 and resumed_steps[0] == int(latest.removeprefix("step")) + 1
    for step in resumed_steps:
        a, b = report["step_losses"][str(step)], straight["step_losses"][str(step)]
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (step, a, b)


class _Exploit:
    """A pickle that would create a file when unpickled by a full (unsafe) loader."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_with_a_code_running_pickle_is_refused_without_running_it(tmp_path):
    import torch

    from vlbert_ds.train.checkpoint import verify_safe_to_load

    folder = tmp_path / "step00000002"
    folder.mkdir()
    torch.save({"module": {"w": torch.ones(2)}}, folder / "mp_rank_00_model_states.pt")
    verify_safe_to_load(folder)  # plain weights pass
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": _Exploit(str(marker))}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError, match="refusing to resume"):
        verify_safe_to_load(folder)
    assert not marker.exists()
