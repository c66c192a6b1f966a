"""The real sbatch file on a real Slurm (slurmctld + two slurmd "nodes" on this host), CPU/gloo ranks.

CI installs Debian's slurm-wlm (scripts/test.sh); elsewhere these tests skip with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ranks import TINY
from services import slurm_missing_reason, start_mlflow, start_slurm

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm" / "pretrain.sbatch"
# The sbatch file asks for GPUs; the test cluster has none, so the CPU shape is given on the command line.
CPU_SHAPE = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=15"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = slurm_missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = start_slurm(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


def _overrides(default_data: Path, out: Path, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [*TINY, "model.num_region_classes=25", f"data.vl_sources=[{default_data}/vl/train]",
            f"data.text_sources=[{default_data}/text/train]", "data.prepare_default=", "data.mode=resampled",
            "data.samples_per_epoch=64", "data.num_workers=1", "data.shuffle_buffer=8", "data.vl_per_batch=4",
            "data.text_per_batch=4", "train.precision=fp32", f"train.steps={steps}", "train.log_every=1",
            "optimizer.warmup_steps=2", "checkpoint.export=false", f"train.output_dir={out}", *extra]


def _submit(slurm, job_name: str, log: Path, overrides: list[str], nodes: int = 2) -> subprocess.Popen:
    # Paced: the tiny model's steps take milliseconds, and the tests signal a job mid-run.
    env = {**slurm.env(), "VLBERT_PYTHON": sys.executable, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
           "VLBERT_FAULT_STEP_PAUSE_S": "0.5"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    shape = [f"--nodes={nodes}" if arg.startswith("--nodes=") else arg for arg in CPU_SHAPE]
    command = ["sbatch", "--wait", f"--job-name={job_name}", f"--output={log}", f"--chdir={REPO}", *shape,
               str(SBATCH), str(REPO / "configs" / "default.yaml"), *overrides]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(process: subprocess.Popen, slurm, log: Path, timeout: float = 600) -> int:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        slurm.run("scancel", "--full", "-n", "vlbert-slurm-test", check=False)
        process.kill()
        pytest.fail(f"sbatch --wait did not return in {timeout}s\n{log.read_text()[-4000:] if log.exists() else ''}")
    return process.returncode


def _steps(metrics_log: Path) -> list[int]:
    if not metrics_log.exists():
        return []
    return [json.loads(line)["step"] for line in metrics_log.read_text().splitlines() if line.strip()]


def test_two_node_sbatch_job_pretrains_on_both_ranks(slurm, default_data, tmp_path):
    log = tmp_path / "job.out"
    out = tmp_path / "run"
    process = _submit(slurm, "vlbert-slurm-test", log, _overrides(default_data, out, steps=3,
                                                                   extra=("tracking.enabled=false",)))
    rc = _wait(process, slurm, log)
    text = log.read_text()
    assert rc == 0, f"{process.stdout.read()}\n{text[-4000:]}\n{slurm.logs()}"
    assert "2 nodes (n[1-2]), 2 tasks, master 127.0.0.1:" in text
    assert "rank 0/2 (local 0)" in text and "rank 1/2 (local 0)" in text  # one task on each node
    assert "ranks from slurm" in text
    assert _steps(out / "metrics.jsonl") == [1, 2, 3]
    assert (out / "checkpoints" / "latest").read_text() == "step00000003"
    assert "finished at step 3" in text


def test_warning_signal_checkpoints_requeues_and_resumes_in_the_same_mlflow_run(slurm, default_data, tmp_path,
                                                                                 mlflow_server):
    from mlflow.tracking import MlflowClient

    log = tmp_path / "job.out"
    out = tmp_path / "run"
    steps = 12
    # No periodic checkpoint before the end: the only one to resume from is the one the signal causes.
    extra = ("checkpoint.every=1000", "tracking.enabled=true", f"tracking.uri={mlflow_server.uri}",
             "tracking.experiment=slurm-requeue")
    process = _submit(slurm, "vlbert-slurm-test", log, _overrides(default_data, out, steps=steps, extra=extra))
    deadline = time.time() + 300
    while not _steps(out / "metrics.jsonl") or _steps(out / "metrics.jsonl")[-1] < 2:
        assert process.poll() is None, log.read_text()[-4000:]
        assert time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    job_id = slurm.run("squeue", "-h", "-n", "vlbert-slurm-test", "-o", "%i").stdout.split()[0]
    signalled = slurm.run("scancel", "--signal=USR1", job_id, check=False)  # what --signal=USR1@300 sends
    assert signalled.returncode == 0, signalled.stderr
    rc = _wait(process, slurm, log)
    text = log.read_text()
    assert rc == 0, f"{text[-6000:]}\n{slurm.logs()}"

    stopped = [int(line.split("stopping at step ")[1].split()[0]) for line in text.splitlines()
               if "stopping at step" in line]
    assert len(stopped) == 2 and stopped[0] == stopped[1], text[-4000:]  # both ranks, at the same step
    stop_step = stopped[0]
    assert 2 <= stop_step < steps
    assert f"requeueing job {job_id}" in text
    assert "restart 1:" in text
    assert f"resumed from step{stop_step:08d}: step {stop_step}" in text
    assert f"finished at step {steps}" in text
    assert _steps(out / "metrics.jsonl") == list(range(1, steps + 1))  # each step once, none lost or repeated

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("slurm-requeue")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the requeued job re-attached to the same run
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2"
    assert run.data.tags["vlbert_ds.stopped_at_step"] == str(stop_step)
    history = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert history == list(range(1, steps + 1))


def test_scancel_saves_a_checkpoint_and_does_not_requeue(slurm, default_data, tmp_path):
    log = tmp_path / "job.out"
    out = tmp_path / "run"
    process = _submit(slurm, "vlbert-slurm-test", log, _overrides(default_data, out, steps=500, extra=(
        "checkpoint.every=1000", "tracking.enabled=false")))
    deadline = time.time() + 300
    while not _steps(out / "metrics.jsonl") or _steps(out / "metrics.jsonl")[-1] < 2:
        assert process.poll() is None and time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    job_id = slurm.run("squeue", "-h", "-n", "vlbert-slurm-test", "-o", "%i").stdout.split()[0]
    slurm.run("scancel", job_id)  # SIGTERM to the script and the tasks, SIGKILL after KillWait
    _wait(process, slurm, log)  # returns once the job is CANCELLED, while its tasks may still be saving
    deadline = time.time() + 60
    while state := slurm.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip():
        assert state in ("COMPLETING", "CANCELLED", "COMPLETED"), state  # never PENDING/RUNNING again
        assert time.time() < deadline
        time.sleep(0.5)
    text = log.read_text()
    stopped = [line for line in text.splitlines() if "stopping at step" in line]
    assert stopped, text[-4000:]
    step = int(stopped[0].split("stopping at step ")[1].split()[0])
    assert (out / "checkpoints" / "latest").read_text() == f"step{step:08d}"  # saved before the SIGKILL
    assert "requeueing" not in text
    time.sleep(6)  # a requeued job would be pending again by now (cred_expire=5)
    assert slurm.run("squeue", "-h", "-j", job_id, check=False).stdout.strip() == ""
    assert "restart 1" not in log.read_text()


def test_a_two_node_job_stopped_mid_epoch_continues_as_a_one_node_job(slurm, default_data, tmp_path):
    """What a requeue onto fewer nodes does: the 2-node job is cancelled (it checkpoints on the signal), the
    same run folder is submitted again on 1 node: accumulation 2 keeps the global batch of 2 micro-batches,
    the exact epoch (160 samples, 8 readers of 20, 5 micro-batches each: 20 steps) ends with every sample
    seen once and every step logged once."""
    out = tmp_path / "run"
    steps = 20
    overrides = _overrides(default_data, out, steps=steps, extra=(
        "checkpoint.every=1000", "tracking.enabled=false", "data.mode=exact", "data.log_keys=true",
        "optimizer.schedule=constant"))
    first_log = tmp_path / "two-nodes.out"
    process = _submit(slurm, "vlbert-slurm-test", first_log, overrides)
    deadline = time.time() + 300
    while not _steps(out / "metrics.jsonl") or _steps(out / "metrics.jsonl")[-1] < 3:
        assert process.poll() is None and time.time() < deadline, first_log.read_text()[-4000:]
        time.sleep(0.2)
    job_id = slurm.run("squeue", "-h", "-n", "vlbert-slurm-test", "-o", "%i").stdout.split()[0]
    slurm.run("scancel", job_id)
    _wait(process, slurm, first_log)
    deadline = time.time() + 120
    while slurm.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip():
        assert time.time() < deadline
        time.sleep(0.5)
    text = first_log.read_text()
    stop_step = int(next(line for line in text.splitlines() if "stopping at step" in line)
                    .split("stopping at step ")[1].split()[0])
    assert 3 <= stop_step < steps
    second_log = tmp_path / "one-node.out"
    rc = _wait(_submit(slurm, "vlbert-slurm-test", second_log, overrides, nodes=1), slurm, second_log)
    text = second_log.read_text()
    assert rc == 0, f"{text[-6000:]}\n{slurm.logs()}"
    assert "1 nodes" in text or "1 node" in text
    assert "gradient accumulation 2 keeps the global batch of 2 micro-batches" in text
    assert f"resumed from step{stop_step:08d}_universal: step {stop_step}" in text
    assert f"finished at step {steps}" in text
    assert _steps(out / "metrics.jsonl") == list(range(1, steps + 1))
    keys = [k for path in (out / "data_keys").glob("rank*.jsonl") for line in path.read_text().splitlines()
            for k in json.loads(line)["keys"]]
    assert len(keys) == 160 and len(set(keys)) == 160  # every sample of the epoch once, across the change


def test_finetune_sbatch_runs_the_same_way(slurm, synthetic_tasks, tiny_pretrained, tmp_path):
    log = tmp_path / "job.out"
    out = tmp_path / "run"
    env = {**slurm.env(), "VLBERT_PYTHON": sys.executable, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    overrides = [f"task.train={synthetic_tasks}/refcoco/train", f"task.val={synthetic_tasks}/refcoco/val",
                 f"task.init={tiny_pretrained}", "model.num_region_classes=25",
                 "task.batch_size=4", "train.steps=3", "optimizer.warmup_steps=1",
                 "data.num_workers=1", "tracking.enabled=false", "checkpoint.export=false", "train.log_every=0",
                 f"train.output_dir={out}"]
    done = subprocess.run(["sbatch", "--wait", "--job-name=vlbert-slurm-test", f"--output={log}", f"--chdir={REPO}",
                           *CPU_SHAPE, str(REPO / "launch" / "slurm" / "finetune.sbatch"), "refcoco",
                           str(REPO / "configs" / "finetune_vqa.yaml"), *overrides],  # a fine-tuning config
                          env=env, capture_output=True, text=True, timeout=600)
    text = log.read_text()
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{text[-4000:]}"
    assert "rank 0/2" in text and "rank 1/2" in text
    assert _steps(out / "metrics.jsonl") == [1, 2, 3]
    assert "refcoco validation: accuracy_iou50=" in text


def test_sbatch_file_without_a_config_says_how_to_use_it(slurm, tmp_path):
    log = tmp_path / "job.out"
    env = {**slurm.env(), "VLBERT_PYTHON": sys.executable}
    done = subprocess.run(["sbatch", "--wait", f"--output={log}", f"--chdir={REPO}", *CPU_SHAPE[:1],
                           "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=2", str(SBATCH)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "usage: sbatch launch/slurm/pretrain.sbatch CONFIG" in log.read_text()


def test_sbatch_file_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    assert os.access(SBATCH, os.R_OK)


def test_prep_as_a_job_array_of_parts_then_a_dependent_finalize(slurm, tmp_path):
    """launch/slurm/prep.sh: a text corpus in 3 parts as a real job array, finalize after them; the folder
    equals a one-part run's, and every job left the queue."""
    from pydoc_data.topics import topics

    from vlbert_ds.prep.cli import main as prep_main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(" ".join(p.split()) + "\n" for text in list(topics.values())[:40]
                              for p in text.split("\n\n") if len(p.split()) > 3))
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    command = ["text", str(corpus), "--samples-per-shard", "50", "--processes", "1"]
    assert prep_main([*command, "--out", str(whole)]) == 0
    env = {**slurm.env(), "VLBERT_PYTHON": sys.executable,
           "VLBERT_SBATCH_ARGS": f"--gres=none --cpus-per-task=1 --time=15 --chdir={tmp_path} "
                                 f"--output={tmp_path}/part-%a.out",
           "VLBERT_FINALIZE_ARGS": f"--time=15 --chdir={tmp_path} --output={tmp_path}/finalize.out"}
    submitted = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "prep.sh"), "3", *command, "--out",
                                str(parted)], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    assert "3 tasks" in submitted.stdout
    deadline = time.time() + 600
    while slurm.run("squeue", "-h", "-o", "%i %T").stdout.strip():
        assert time.time() < deadline, slurm.run("squeue").stdout + slurm.logs()
        time.sleep(0.5)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
    assert (parted / "sizes.json").exists(), logs + slurm.logs()
    for i in range(3):
        assert f"vlbert-prep part {i}/3" in (tmp_path / f"part-{i}.out").read_text()
    assert "parts           | 3" in (tmp_path / "finalize.out").read_text()
    shards = sorted(p.name for p in whole.glob("shard-*.tar"))
    assert len(shards) >= 3
    assert [(parted / s).read_bytes() for s in shards] == [(whole / s).read_bytes() for s in shards]
    assert (parted / "sizes.json").read_text() == (whole / "sizes.json").read_text()
