"""Run integrity (issue 15): the records of a run (MLflow, metrics.jsonl, its folder) stay true
through kills at every point of a checkpoint save, and two runs never share one folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ranks import TINY, run_ranks

pytestmark = pytest.mark.slow

COMMON = [*TINY, "model.num_region_classes=25", "optimizer.lr=5.0e-4", "optimizer.warmup_steps=2",
          "train.log_every=0", "checkpoint.export=false", "data.vl_per_batch=4", "data.text_per_batch=4",
          "train.precision=fp32", "data.mode=resampled", "data.samples_per_epoch=16", "data.num_workers=1",
          "data.shuffle_buffer=8", "train.steps=8", "checkpoint.every=3"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from services import start_mlflow

    server = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_kills_at_each_point_of_a_save_lose_no_metric_and_log_none_twice(default_data, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    spec = {"overrides": [*COMMON, f"data.vl_sources=[{default_data}/vl/train]",
                          f"data.text_sources=[{default_data}/text/train]", f"train.output_dir={out}",
                          "tracking.enabled=true", f"tracking.uri={mlflow_server.uri}",
                          "tracking.experiment=kills-in-saves"]}
    # 1: killed right after the checkpoint of step 3 is committed, before its metrics reach MLflow
    _, ranks = run_ranks(spec, 1, tmp_path, expect_ok=False, env_extra={"VLBERT_FAULT_CRASH_AFTER_COMMIT": "3"})
    assert ranks[0].returncode == 19 and (out / "checkpoints/latest").read_text() == "step00000003"
    # 2: resumed from 3, killed inside the save of step 6 (DeepSpeed's files written, not COMPLETE)
    _, ranks = run_ranks(spec, 1, tmp_path, expect_ok=False, env_extra={"VLBERT_FAULT_CRASH_IN_CHECKPOINT": "6"})
    assert ranks[0].returncode == 18 and (out / "checkpoints/latest").read_text() == "step00000003"
    # 3: resumed from 3 again, killed after step 7 (its metrics are not committed by any checkpoint)
    _, ranks = run_ranks(spec, 1, tmp_path, expect_ok=False, env_extra={"VLBERT_FAULT_EXIT_AFTER_STEP": "7"})
    assert ranks[0].returncode == 17 and (out / "checkpoints/latest").read_text() == "step00000006"
    report, _ = run_ranks(spec, 1, tmp_path)  # 4: resumed from 6, to the end

    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("kills-in-saves").experiment_id])
    assert [r.info.run_id for r in runs] == [report["run_id"]]
    for key in ("loss", "mlm_vl", "mlm_text_acc", "lr", "samples_per_s"):
        history = client.get_metric_history(report["run_id"], key)
        assert sorted(m.step for m in history) == list(range(1, 9)), key  # each step once, none lost
        by_step = {m.step: m.value for m in history}
        assert all(abs(by_step[r["step"]] - r[key]) < 1e-9 for r in rows), key  # the same values as the file


def _start(spec: dict, tmp: Path, name: str, pause_s: float = 0.0) -> tuple[subprocess.Popen, Path]:
    """One rank of a run in its own process group (so that a SIGKILL can take the whole group); `pause_s`
    paces its steps so that it is still running when the test acts on it."""
    from ranks import WORKER
    from services import free_port

    spec_file = tmp / f"{name}.json"
    spec_file.write_text(json.dumps({**spec, "out": str(tmp / f"{name}-report.json")}))
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "VLBERT_FAULT_STEP_PAUSE_S": str(pause_s)}
    log = tmp / f"{name}.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, str(WORKER), str(spec_file)], env=env, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return process, log


def test_a_second_run_into_a_busy_folder_is_refused_and_a_dead_runs_lock_is_taken_over(default_data, tmp_path,
                                                                                        mlflow_server):
    """Also the real-SIGKILL case of the metrics records: the whole process group killed mid-run."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    spec = {"overrides": [*COMMON, f"data.vl_sources=[{default_data}/vl/train]", "train.steps=40",
                          f"data.text_sources=[{default_data}/text/train]", f"train.output_dir={out}",
                          "checkpoint.every=4", "tracking.enabled=true", f"tracking.uri={mlflow_server.uri}",
                          "tracking.experiment=busy-folder"]}
    first, first_log = _start(spec, tmp_path, "first", pause_s=1.0)
    try:
        deadline = time.time() + 600
        while not ((out / "checkpoints/latest").exists() and (out / ".vlbert_ds.lock").exists()):
            assert first.poll() is None and time.time() < deadline, first_log.read_text()[-3000:]
            time.sleep(0.5)
        holder = json.loads((out / ".vlbert_ds.lock").read_text())
        assert holder["pid"] == first.pid
        second = _pretrain_cli(spec["overrides"])  # as a user would start it
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by another run (host {holder['host']} pid {first.pid}" in second.stderr
        assert "weights from" not in second.stdout  # refused before the model was built
        assert first.poll() is None  # the first run goes on, untouched
        os.killpg(first.pid, signal.SIGKILL)  # dies holding the lock
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert (out / ".vlbert_ds.lock").exists()
    report, ranks = run_ranks(spec, 1, tmp_path)  # takes the dead run's lock over and resumes
    assert f"taking over the lock of host {holder['host']} pid {first.pid} (process {first.pid} no longer exists)" \
        in ranks[0].stdout
    assert "resumed from step" in ranks[0].stdout and sorted(int(s) for s in report["step_losses"])[-1] == 40
    assert not (out / ".vlbert_ds.lock").exists()  # released at the end
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 41))
    history = MlflowClient(mlflow_server.uri).get_metric_history(report["run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(1, 41))  # the SIGKILL lost no metric, doubled none
    assert all(abs({m.step: m.value for m in history}[r["step"]] - r["loss"]) < 1e-9 for r in rows)


def _pretrain_cli(overrides: list[str]) -> subprocess.CompletedProcess:
    """`vlbert-pretrain` as a user runs it (its exit codes are the launcher's)."""
    from services import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "MASTER_PORT": str(free_port())}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "vlbert_ds.cli.pretrain", *overrides], env=env, capture_output=True,
                          text=True, timeout=900)


def test_a_full_disk_says_so_removes_the_partial_save_and_prune_before_save_fits(default_data, tmp_path,
                                                                                  small_disk):
    base = [*COMMON, f"data.vl_sources=[{default_data}/vl/train]", f"data.text_sources=[{default_data}/text/train]",
            "tracking.enabled=false", "checkpoint.every=2", "checkpoint.keep=1"]
    sizing = tmp_path / "sizing"
    run_ranks({"overrides": [*base, "train.steps=2", f"train.output_dir={sizing}"]}, 1, tmp_path)
    one = sum(f.stat().st_size for f in (sizing / "checkpoints/step00000002").rglob("*") if f.is_file())
    disk = small_disk(int(one * 1.6 / 2**20) + 8)  # room for one checkpoint, not for two

    out = disk / "run"
    overrides = [*base, "train.steps=6", f"train.output_dir={out}"]
    done = _pretrain_cli(overrides)
    assert done.returncode == 4, done.stdout[-3000:] + done.stderr[-3000:]
    text = done.stderr
    assert f"no space left on {out / 'checkpoints'} for the checkpoint of step 4" in text
    assert f"a checkpoint of this run takes {one / 2**20:.0f} MiB" in text and "Traceback" not in text
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step")) == ["step00000002"]
    assert (out / "checkpoints/latest").read_text() == "step00000002"

    done = _pretrain_cli([*overrides, "checkpoint.prune_before_save=true"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from step00000002" in done.stdout
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step")) == ["step00000006"]


def test_a_resume_applies_and_records_a_new_lr_and_refuses_a_new_batch(default_data, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    from vlbert_ds.train.engine import lr_lambda

    out = tmp_path / "run"
    base = [*COMMON, f"data.vl_sources=[{default_data}/vl/train]", f"data.text_sources=[{default_data}/text/train]",
            f"train.output_dir={out}", "tracking.enabled=true", f"tracking.uri={mlflow_server.uri}",
            "tracking.experiment=changed-resume", "checkpoint.every=2"]
    run_ranks({"overrides": [*base, "train.steps=4"]}, 1, tmp_path)
    refused = _pretrain_cli([*base, "train.steps=6", "data.vl_per_batch=2"])
    assert refused.returncode == 2
    assert "data.vl_per_batch: 4 -> 2" in refused.stderr and "checkpoint.force_resume=true" in refused.stderr
    assert "weights from" not in refused.stdout  # refused before the model was built

    report, ranks = run_ranks({"overrides": [*base, "train.steps=6", "optimizer.lr=1.0e-4"]}, 1, tmp_path)
    assert "changed since that checkpoint: optimizer.lr 0.0005 -> 0.0001 (from step 5)" in ranks[0].stdout
    rows = _rows(out)
    first, second = lr_lambda(2, 4, "linear"), lr_lambda(2, 6, "linear")
    assert [r["lr"] for r in rows[:4]] == pytest.approx([5e-4 * first(s) for s in range(1, 5)], rel=1e-9)
    assert [r["lr"] for r in rows[4:]] == pytest.approx([1e-4 * second(s) for s in (5, 6)], rel=1e-9)
    tags = MlflowClient(mlflow_server.uri).get_run(report["run_id"]).data.tags
    assert tags["vlbert_ds.changed_at_step_5.optimizer.lr"] == "0.0005 -> 0.0001"
    assert tags["vlbert_ds.changed_at_step_5.train.steps"] == "4 -> 6"

    forced = _pretrain_cli([*base, "train.steps=8", "optimizer.lr=1.0e-4", "data.shuffle_buffer=4",
                            "checkpoint.force_resume=true"])
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "changed since that checkpoint: data.shuffle_buffer 8 -> 4 (from step 7)" in forced.stdout


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(default_data, tmp_path):
    import os

    out = tmp_path / "run"
    base = [*COMMON, f"data.vl_sources=[{default_data}/vl/train]", f"data.text_sources=[{default_data}/text/train]",
            f"train.output_dir={out}", "tracking.enabled=false", "checkpoint.every=2", "checkpoint.keep=4"]
    run_ranks({"overrides": [*base, "train.steps=6"]}, 1, tmp_path)
    states = next((out / "checkpoints/step00000006").glob("*optim_states.pt"))
    with open(states, "r+b") as handle:  # 64 KiB of other bytes inside the optimizer state, size unchanged
        handle.seek(states.stat().st_size // 2)
        handle.write(os.urandom(64 * 1024))
    report, ranks = run_ranks({"overrides": [*base, "train.steps=8"]}, 1, tmp_path)
    text = ranks[0].stdout
    assert f"checkpoint step00000006 cannot be used: {states.name} changed since it was written" in text
    assert "resumed from step00000004" in text
    assert sorted(int(s) for s in report["step_losses"]) == [5, 6, 7, 8]
    assert [r["step"] for r in _rows(out)] == list(range(1, 9))

    for tag in ("step00000004", "step00000006", "step00000008"):  # every checkpoint damaged: a clear refusal
        (out / "checkpoints" / tag / "rng_rank0.pt").unlink()
    (out / "checkpoints/step00000002/mp_rank_00_model_states.pt").write_bytes(b"\0" * 100)
    done = _pretrain_cli([*base, "train.steps=10"])
    assert done.returncode == 2, done.stderr[-3000:]
    assert "no usable checkpoint in" in done.stderr and "rng_rank0.pt is missing" in done.stderr
    assert "mp_rank_00_model_states.pt is 100 bytes" in done.stderr


def test_a_frozen_single_process_run_is_found_by_the_watchdog(default_data, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    spec = {"overrides": [*COMMON, f"data.vl_sources=[{default_data}/vl/train]", "train.steps=400",
                          f"data.text_sources=[{default_data}/text/train]", f"train.output_dir={out}",
                          "checkpoint.every=1000", "tracking.enabled=true", f"tracking.uri={mlflow_server.uri}",
                          "tracking.experiment=watchdog", "train.watchdog=on", "train.watchdog_min_s=5",
                          "train.watchdog_factor=5"]}
    run, log = _start(spec, tmp_path, "frozen")
    try:
        deadline = time.time() + 600
        while not ((out / "metrics.jsonl").exists() and len(_rows(out)) >= 5):
            assert run.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        os.kill(run.pid, signal.SIGSTOP)  # frozen: no exception, no exit, no step
        stopped = time.time()
        code = run.wait(timeout=120)
        detected = time.time() - stopped
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == -signal.SIGKILL and detected < 60, (code, detected)
    assert "watchdog (rank 0): no step for" in text and "at least 5 s" in text
    assert "most recent call first" in text  # faulthandler's dump of the trainer's threads
    runs = MlflowClient(mlflow_server.uri).search_runs(
        [MlflowClient(mlflow_server.uri).get_experiment_by_name("watchdog").experiment_id])
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["vlbert_ds.error"].startswith("watchdog: no step")
    deadline = time.time() + 60  # the watcher ends too, and leaves no heartbeat file behind
    while time.time() < deadline and _watchers_of(run.pid):
        time.sleep(0.5)
    assert _watchers_of(run.pid) == []
    assert not list(Path("/dev/shm").glob(f"vlbert_ds-heartbeat-{run.pid}-*"))


def _watchers_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vlbert_ds.train.watchdog" in command and str(pid).encode() in command:
            found.append(int(entry.name))
    return found
