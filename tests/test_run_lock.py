"""The run-folder lock on its own (the two-runs and killed-run cases with real runs are in
test_run_integrity.py): who counts as dead, torn lock files, heartbeats, release."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from vlbert_ds.train.run_lock import LOCK_NAME, RunFolderBusy, RunLock


def _write(folder, **holder):
    (folder / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "slurm_job": None,
                                                "started": time.time(), "heartbeat": time.time(), **holder}))


def test_a_live_holder_refuses_and_release_frees_the_folder(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunFolderBusy, match=rf"in use by another run \(host .* pid {os.getpid()}"):
        RunLock(tmp_path).acquire()  # same host, this (live) process
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    again = RunLock(tmp_path)
    again.acquire()
    again.release()


def test_dead_holders_are_taken_over_and_live_ones_on_other_hosts_are_not(tmp_path, monkeypatch, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    _write(tmp_path, host=socket.gethostname(), pid=dead.pid)  # this host, no such process
    lock = RunLock(tmp_path)
    lock.acquire()
    assert f"process {dead.pid} no longer exists" in capsys.readouterr().out
    lock.release()

    _write(tmp_path, heartbeat=time.time() - 5)  # another host, beating
    with pytest.raises(RunFolderBusy, match="heartbeat 5 s ago"):
        RunLock(tmp_path, stale_after_s=120).acquire()
    _write(tmp_path, heartbeat=time.time() - 300)  # another host, silent for 5 minutes
    lock = RunLock(tmp_path, stale_after_s=120)
    lock.acquire()
    assert "no heartbeat for 300 s" in capsys.readouterr().out
    lock.release()

    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a requeued Slurm job restarting on another node
    _write(tmp_path, slurm_job="4242")
    lock = RunLock(tmp_path)
    lock.acquire()
    assert "the same Slurm job 4242, restarted" in capsys.readouterr().out
    lock.release()


def test_a_torn_lock_file_is_judged_by_its_age(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text('{"host": "elsewhere", "pi')  # the owner died while writing it
    with pytest.raises(RunFolderBusy):
        RunLock(tmp_path, stale_after_s=60).acquire()
    old = time.time() - 600
    os.utime(path, (old, old))
    lock = RunLock(tmp_path, stale_after_s=60)
    lock.acquire()
    lock.release()


def test_the_heartbeat_moves_while_held(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.2)
    lock.acquire()
    first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
    deadline = time.time() + 30
    while json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.1)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first
    lock.release()
