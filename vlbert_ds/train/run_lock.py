"""One run per output folder: an exclusive lock file with a heartbeat, for local and shared filesystems.

`<output_dir>/.vlbert_ds.lock` holds the owner (host, pid, Slurm job id, start time) and a heartbeat
the owner refreshes every `heartbeat_s`. A second run into the same folder is refused while the
owner lives. The lock of a dead owner is taken over, with a message saying whose it was: dead means
the same host and no such process, the same Slurm job (a requeued job restarting, on any node), or
no heartbeat for `stale_after_s` (a job on another host that died without releasing it).

Creation is `O_CREAT | O_EXCL` and a takeover first renames the stale file away, so two runs that
race for one folder cannot both win (both operations are atomic on local filesystems and NFSv3+).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
LOCK_NAME = ".vlbert_ds.lock"


class RunFolderBusy(ValueError):
    """Another live run owns the output folder (a configuration error: exit 2, like bad input)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock:
    def __init__(self, folder: str | Path, stale_after_s: float = 120.0, heartbeat_s: float = 15.0) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                      "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    # ----------------------------------------------------------------------------- taking and giving back
    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
                self._thread.start()
                return
            holder = self._read()
            why = self._dead(holder)
            if why is None:
                raise RunFolderBusy(self._busy_message(holder))
            stale = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}-{time.time_ns()}")
            try:
                os.rename(self.path, stale)  # only one of two racing runs gets to move it
            except FileNotFoundError:
                continue
            stale.unlink(missing_ok=True)
            log.warning("%s: taking over the lock of %s (%s)", self.path.parent, self._describe(holder), why)
            print(f"run folder {self.path.parent}: taking over the lock of {self._describe(holder)} ({why})",
                  flush=True)
        raise RunFolderBusy(f"{self.path}: could not take the lock (other runs keep taking it)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.held and self._read().get("pid") == self.owner["pid"] and \
                self._read().get("host") == self.owner["host"]:
            self.path.unlink(missing_ok=True)
        self.held = False

    # ----------------------------------------------------------------------------- the file
    def _record(self) -> bytes:
        return json.dumps({**self.owner, "heartbeat": time.time()}).encode()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(self._record())
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            tmp = self.path.with_name(f"{LOCK_NAME}.beat-{os.getpid()}")
            try:
                tmp.write_bytes(self._record())
                os.replace(tmp, self.path)
            except OSError as err:  # a full or vanished disk: the run itself will say so; keep beating
                log.warning("could not refresh %s: %s", self.path, err)

    def _read(self) -> dict[str, Any]:
        try:
            value = json.loads(self.path.read_text())
            return value if isinstance(value, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):  # torn (the owner died while writing it): judged by the file's age
            try:
                return {"heartbeat": self.path.stat().st_mtime}
            except FileNotFoundError:
                return {}

    def _dead(self, holder: dict[str, Any]) -> str | None:
        """Why the holder is gone, or None while it may be alive."""
        if not holder:
            return "the lock file vanished"
        job = self.owner["slurm_job"]
        if job and holder.get("slurm_job") == job:
            return f"the same Slurm job {job}, restarted"
        if holder.get("host") == self.owner["host"] and isinstance(holder.get("pid"), int) \
                and not _alive(holder["pid"]):
            return f"process {holder['pid']} no longer exists"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    @staticmethod
    def _describe(holder: dict[str, Any]) -> str:
        job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
        return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}{job}"

    def _busy_message(self, holder: dict[str, Any]) -> str:
        age = time.time() - float(holder.get("heartbeat", 0))
        return (f"train.output_dir {self.path.parent} is in use by another run ({self._describe(holder)}, heartbeat "
                f"{age:.0f} s ago); give this run its own train.output_dir, or wait for that one to end (a dead "
                f"run's lock is taken over once its heartbeat is {self.stale_after_s:.0f} s old)")
