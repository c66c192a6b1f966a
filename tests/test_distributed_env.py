"""Rank discovery from launcher and Slurm variables, and the stop-signal flag (no processes started)."""

from __future__ import annotations

import os
import signal

from vlbert_ds.train.distributed import discover
from vlbert_ds.train.preemption import StopRequests, requeue_slurm_job, requeue_wanted


def test_launcher_variables_win_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.5",
           "MASTER_PORT": "29501", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    dist = discover(env)
    assert (dist.rank, dist.world_size, dist.local_rank, dist.local_world_size) == (3, 8, 1, 4)
    assert (dist.master_addr, dist.master_port, dist.source) == ("10.0.0.5", 29501, "launcher")


def test_slurm_variables_map_to_ranks_and_a_job_derived_port():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242424",
           "SLURM_JOB_NODELIST": "gpu-a[07-08,11]", "SLURM_TASKS_PER_NODE": "8(x2)", "PATH": "/nonexistent"}
    dist = discover(env)  # no scontrol on PATH here: the node list is parsed
    assert (dist.rank, dist.world_size, dist.local_rank, dist.local_world_size) == (5, 16, 1, 8)
    assert dist.master_addr == "gpu-a07"
    assert dist.master_port == 20000 + 4242424 % 20000
    assert dist.source == "slurm"


def test_slurm_master_from_the_job_script_is_kept():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "23456"}
    dist = discover(env)
    assert (dist.master_addr, dist.master_port, dist.local_world_size) == ("127.0.0.1", 23456, 1)


def test_no_variables_means_one_process_on_a_free_port():
    import socket

    dist = discover({})
    assert (dist.rank, dist.world_size, dist.source) == (0, 1, "single")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", dist.master_port))  # free (two single-process runs must not collide)
    assert discover({"MASTER_PORT": "29555"}).master_port == 29555


def test_a_stop_signal_sets_the_flag_and_close_restores_the_handler():
    previous = signal.getsignal(signal.SIGUSR1)
    stop = StopRequests()
    try:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop() and stop.received == signal.SIGUSR1
        assert stop.seconds_since_signal() is not None
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_requeue_only_on_the_warning_signal_when_the_launcher_opted_in():
    opted = {"VLBERT_REQUEUE_ON_STOP": "1", "SLURM_JOB_ID": "7"}
    assert requeue_wanted(signal.SIGUSR1, opted)
    assert not requeue_wanted(signal.SIGTERM, opted)  # scancel sends SIGTERM: a cancel stays a cancel
    assert requeue_wanted(signal.SIGTERM, {**opted, "VLBERT_REQUEUE_SIGNALS": "USR1,SIGTERM"})
    assert not requeue_wanted(signal.SIGUSR1, {"SLURM_JOB_ID": "7"})  # not opted in
    assert not requeue_wanted(signal.SIGUSR1, {"VLBERT_REQUEUE_ON_STOP": "1"})  # not a Slurm job
    assert not requeue_wanted(None, opted)


def test_no_requeue_past_the_restart_limit():
    assert requeue_slurm_job({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "3", "VLBERT_MAX_REQUEUES": "3"}) is None
    assert requeue_slurm_job({}) is None
