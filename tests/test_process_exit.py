"""Every exit path ends the process, and every process it started, within a bound: success, a crash, a
SIGKILL of the parent. Loader workers are on (`data.num_workers=1`), since they are what used to hang.

Each run is tagged with a unique environment variable; afterwards no process on the machine may carry it.
The bounds are minutes (generous on a loaded 2-core machine); the hang they guard against is for ever.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from ranks import TINY
from services import free_port

pytestmark = pytest.mark.slow

EXIT_BOUND_S = 240  # start-up (DeepSpeed, MiniLM) + a few steps + exit, on a busy 2-core machine


def tagged_processes(tag: str) -> list[int]:
    """PIDs of live processes whose environment holds VLBERT_TEST_TAG=tag (zombies excluded)."""
    found = []
    needle = f"VLBERT_TEST_TAG={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_gone(tag: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def overrides(default_data: Path, out: Path, steps: int) -> list[str]:
    return [*TINY, "model.num_region_classes=25", "train.precision=fp32", "train.log_every=0",
            "tracking.enabled=false", "checkpoint.export=false", "data.vl_per_batch=4", "data.text_per_batch=4",
            f"data.vl_sources=[{default_data}/vl/train]", f"data.text_sources=[{default_data}/text/train]",
            "data.mode=resampled", "data.samples_per_epoch=64", "data.num_workers=1", "data.shuffle_buffer=8",
            f"train.steps={steps}", "checkpoint.every=100", f"train.output_dir={out}", "train.dist_timeout_s=300"]


def start_ranks(world: int, args: list[str], tag: str, log_dir: Path, extra_env: dict | None = None):
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "VLBERT_TEST_TAG": tag, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
               **(extra_env or {})}
        if world > 1:
            env.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                        "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        log = open(log_dir / f"rank{rank}.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen([sys.executable, "-m", "vlbert_ds.cli.pretrain", *args], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def finish(procs, tag: str, log_dir: Path) -> list[int]:
    """Wait for every rank (bounded); on a hang kill the groups and fail with the log."""
    deadline = time.monotonic() + EXIT_BOUND_S
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        logs = "\n".join((log_dir / f"rank{r}.log").read_text()[-2000:] for r in range(len(procs)))
        pytest.fail(f"a rank did not exit within {EXIT_BOUND_S} s:\n{logs}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in tagged_processes(tag):
            os.kill(pid, signal.SIGKILL)
    return [p.returncode for p in procs]


@pytest.mark.parametrize("world", [1, 2])
def test_a_crash_with_loader_workers_exits_promptly_and_leaves_no_process(world, default_data, tmp_path):
    tag = uuid.uuid4().hex
    out = tmp_path / "out"
    procs = start_ranks(world, [*overrides(default_data, out, steps=6), "tracking.enabled=true"], tag, tmp_path,
                        {"VLBERT_FAULT_RAISE_AT_STEP": "2"})
    codes = finish(procs, tag, tmp_path)
    log = (tmp_path / "rank0.log").read_text()
    assert "injected fault: crash at step 2" in log, log[-3000:]
    assert all(code == 1 for code in codes), (codes, log[-3000:])
    assert wait_gone(tag, 30) == []
    # The MLflow run does not stay RUNNING: it is FAILED, with the error.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    assert "injected fault: crash at step 2" in run.data.tags["vlbert_ds.error"]


def test_a_finished_run_with_loader_workers_exits_and_leaves_no_process(default_data, tmp_path):
    tag = uuid.uuid4().hex
    procs = start_ranks(1, overrides(default_data, tmp_path / "out", steps=3), tag, tmp_path)
    codes = finish(procs, tag, tmp_path)
    assert codes == [0], (tmp_path / "rank0.log").read_text()[-3000:]
    assert "finished at step 3" in (tmp_path / "rank0.log").read_text()
    assert wait_gone(tag, 30) == []


def test_loader_workers_die_with_a_sigkilled_trainer(default_data, tmp_path):
    tag = uuid.uuid4().hex
    procs = start_ranks(1, overrides(default_data, tmp_path / "out", steps=10_000), tag, tmp_path)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + EXIT_BOUND_S
    try:
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert procs[0].poll() is None, (tmp_path / "rank0.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no step within the start-up bound"
            time.sleep(0.2)
        assert len(tagged_processes(tag)) >= 2  # the trainer and its loader worker
        procs[0].send_signal(signal.SIGKILL)  # the trainer alone, not its group: the worker must follow
        procs[0].wait(timeout=60)
        assert wait_gone(tag, 30) == []
    finally:
        finish(procs, tag, tmp_path)


def test_a_sigkilled_prep_leaves_no_worker_and_the_rerun_cleans_its_temporaries(tmp_path):
    """SIGKILL `vlbert-prep` (the parent alone) at a random moment while its 2 pool workers write shards."""
    import random

    tag = uuid.uuid4().hex
    out = tmp_path / "default"
    args = [sys.executable, "-m", "vlbert_ds.prep.cli", "default", "--out", str(out), "--num-images", "600",
            "--num-val-images", "20", "--num-text-segments", "40", "--samples-per-shard", "30", "--processes", "2"]
    env = {**os.environ, "VLBERT_TEST_TAG": tag, "TQDM_DISABLE": "1"}
    log = open(tmp_path / "prep.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + EXIT_BOUND_S
        while len(list((out / "vl/train").glob("*_stats.json"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "prep.log").read_text()
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.5))  # 18 of 20 shards are still to write: seconds of work
        workers = [pid for pid in tagged_processes(tag) if pid != proc.pid]
        assert workers, "the pool workers should be running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert wait_gone(tag, 30) == []  # the workers died with it
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in tagged_processes(tag):
            os.kill(pid, signal.SIGKILL)
        log.close()
    # A temporary file as a kill mid-write leaves it (the moment above may or may not have caught one).
    (out / "vl/train/shard-000019.tar.tmp-0123abcd").write_bytes(b"partial")
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=EXIT_BOUND_S * 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(out.rglob("*.tmp-*"))
    sizes = json.loads((out / "vl/train/sizes.json").read_text())
    assert len(sizes) == 20 and sum(sizes.values()) == 600
    assert wait_gone(tag, 30) == []


@pytest.mark.parametrize("world", [1, 2])
def test_sigterm_with_loader_workers_checkpoints_and_exits_with_the_preempted_code(world, default_data, tmp_path):
    """SIGTERM to every rank (what Slurm's preemption and scancel do) mid-run: each rank saves the same
    step, exits 75 (EX_TEMPFAIL), and no process is left."""
    tag = uuid.uuid4().hex
    out = tmp_path / "out"
    procs = start_ranks(world, overrides(default_data, out, steps=10_000), tag, tmp_path)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + EXIT_BOUND_S
    try:
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert all(p.poll() is None for p in procs), (tmp_path / "rank0.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no step within the start-up bound"
            time.sleep(0.2)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
    finally:
        codes = finish(procs, tag, tmp_path)
    log = (tmp_path / "rank0.log").read_text()
    assert codes == [75] * world, (codes, log[-3000:])
    assert "stopping at step" in log and (out / "checkpoints" / "latest").is_file()
    assert wait_gone(tag, 30) == []
