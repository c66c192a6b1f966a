"""Every process we start ends: helper processes die with their parent, and exit never waits on them.

Two gaps in the standard library make a finished or crashed job hang or leak:

* A child forked by `multiprocessing` (DataLoader workers, `ProcessPoolExecutor` workers) does not
  die when its parent is SIGKILLed: it is re-parented to init and lives on (PPID 1). Linux's
  `prctl(PR_SET_PDEATHSIG)` makes the kernel send it SIGKILL the moment its parent dies, however the
  parent dies; `die_with_parent()` sets it from inside the child (a worker initialiser).
* At interpreter exit `multiprocessing` sends SIGTERM to its daemonic children and then joins them
  without a timeout. Our DataLoader workers ignore SIGTERM on purpose (Slurm signals every process of
  a task, and the training process decides when to stop), so that join never returns.
  `stop_children_at_exit()` registers an exit handler, run before multiprocessing's, that gives live
  children a moment to finish and then SIGKILLs them.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_registered = False


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux; False elsewhere).

    Call it first thing in a child. If the parent already died before the call, exit at once.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent == 1 or os.getppid() != parent:  # the parent died before the call took effect
        os._exit(1)
    return True


def kill_children(grace_s: float = 2.0) -> list[int]:
    """SIGKILL every live `multiprocessing` child of this process after `grace_s`; returns their PIDs."""
    children = [c for c in multiprocessing.active_children() if c.pid is not None]
    deadline = time.monotonic() + grace_s
    for child in children:
        child.join(timeout=max(0.0, deadline - time.monotonic()))
    killed = []
    for child in children:
        if child.is_alive():
            child.kill()
            child.join(timeout=5)
            killed.append(child.pid)
    if killed:
        log.debug("killed %d helper processes at exit: %s", len(killed), killed)
    return killed


def stop_children_at_exit() -> None:
    """Register `kill_children` to run at interpreter exit, before multiprocessing's own unbounded join.

    atexit handlers run last-registered first, and multiprocessing registers its handler when it is
    imported (above), so ours always comes first. Idempotent.
    """
    global _registered
    if not _registered:
        atexit.register(kill_children)
        _registered = True
