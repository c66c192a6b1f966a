"""A node-local shard cache: from the second epoch on, each shard is read from local disk.

`data.cache_dir` names a folder on the node's local disk, shared by every rank and loader worker of
the node. A shard is fetched whole, once per node: the first process to want it takes an exclusive
`flock` on `<entry>.lock`, downloads to a temporary file in the same folder, checks the byte count
(and the SHA-256 when the shard's stats file has one), and publishes it with an atomic rename, so a
reader never opens a partial file; the others wait on the lock, then read the published file. Each
entry has a sidecar `<entry>.json` (URL, size, checksum); an entry whose file does not have the
recorded size (truncated, half-deleted) is fetched again. The folder is bounded by `cache_size_gb`:
publishing a shard evicts the least recently used entries first (deleting a file another process is
reading is safe on POSIX: its open handle stays valid).

Why not only fsspec's `filecache::` / `simplecache::` (which also work here, as any fsspec URL): they
are per process (eight ranks of a node would download a shard eight times, racing on one folder),
unbounded, and trust a cached file whatever its size.

Failures never stop training: a folder that cannot be written, a full disk, or a shard larger than
the whole cache fall back to reading from storage, with a warning (once per cause).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from vlbert_ds.data import storage

log = logging.getLogger(__name__)
_CHUNK = 8 << 20


@dataclass
class CacheCounters:
    """What this process's cache did (read by tests; not yet reported in the run's metrics)."""

    hits: int = 0
    fetches: int = 0
    refetched_corrupt: int = 0
    fallbacks: int = 0


def _entry_name(url: str) -> str:
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[-80:]
    return f"{digest}-{base}"


class ShardCache:
    """Local copies of shards in `folder`, at most `max_bytes` in all (0: no bound)."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int = 0) -> None:
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.counters = CacheCounters()
        self._warned: set[str] = set()
        self.usable = self._check_folder()

    # --------------------------------------------------------------- public
    def local_path(self, url: str) -> str | None:
        """A published local copy of `url` (fetched now if needed), or None: read from storage."""
        if not self.usable:
            self.counters.fallbacks += 1
            return None
        entry = self.folder / _entry_name(url)
        if self._valid(entry):
            self.counters.hits += 1
            self._touch(entry)
            return str(entry)
        try:
            with self._locked(entry):
                if self._valid(entry):  # another process of the node published it while we waited
                    self.counters.hits += 1
                    self._touch(entry)
                    return str(entry)
                if entry.exists() or entry.with_suffix(entry.suffix + ".json").exists():
                    self.counters.refetched_corrupt += 1
                    log.warning("cached shard %s does not match its recorded size: fetching %s again", entry, url)
                    self._remove(entry)
                if not self._fetch(url, entry):
                    self.counters.fallbacks += 1
                    return None
                self.counters.fetches += 1
                return str(entry)
        except OSError as err:
            self._warn_once(f"io:{err.errno}", f"shard cache {self.folder}: {type(err).__name__}: {err}; reading "
                            f"{url} from storage")
            self.counters.fallbacks += 1
            return None

    def size(self) -> int:
        return sum(p.stat().st_size for p in self._entries())

    # --------------------------------------------------------------- internals
    def _check_folder(self) -> bool:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".probe-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
            return True
        except OSError as err:
            self._warn_once("folder", f"data.cache_dir {self.folder} is not usable ({type(err).__name__}: {err}); "
                            f"shards are read from storage every epoch")
            return False

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    @staticmethod
    def _sidecar(entry: Path) -> Path:
        return entry.with_name(entry.name + ".json")

    def _valid(self, entry: Path) -> bool:
        try:
            recorded = json.loads(self._sidecar(entry).read_text())
            return entry.stat().st_size == int(recorded["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            return False

    @staticmethod
    def _touch(entry: Path) -> None:
        with contextlib.suppress(OSError):
            os.utime(entry)  # recency for eviction (mtime: atime is often not kept)

    @contextlib.contextmanager
    def _locked(self, entry: Path):
        with open(entry.with_name(entry.name + ".lock"), "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _remove(self, entry: Path) -> None:
        for path in (entry, self._sidecar(entry)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _entries(self) -> list[Path]:
        return [p for p in self.folder.iterdir() if p.is_file() and not p.name.startswith(".")
                and not p.name.endswith((".json", ".lock")) and ".tmp-" not in p.name]

    def _expected(self, url: str) -> tuple[int | None, str | None]:
        """(bytes, sha256) from the shard's stats file, when it has them."""
        stats = storage.read_json(re.sub(r"\.tar$", "_stats.json", url)) if url.endswith(".tar") else None
        if isinstance(stats, dict) and isinstance(stats.get("bytes"), int):
            return stats["bytes"], stats.get("sha256")
        return None, None

    def _make_room(self, needed: int) -> bool:
        if not self.max_bytes:
            return True
        if needed > self.max_bytes:
            return False
        entries = sorted(self._entries(), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        while entries and total + needed > self.max_bytes:
            victim = entries.pop(0)
            total -= victim.stat().st_size
            self._remove(victim)
        return total + needed <= self.max_bytes

    def _fetch(self, url: str, entry: Path) -> bool:
        expected, checksum = self._expected(url)
        if expected is None:
            fs, path = storage._fs_and_path(url)
            expected = int(fs.size(path))
        if not self._make_room(expected):
            self._warn_once("too_big", f"shard {url} ({expected / 1e9:.2f} GB) is larger than the whole shard cache "
                            f"({self.max_bytes / 1e9:.2f} GB, data.cache_size_gb): read from storage")
            return False
        temporary = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
        digest = hashlib.sha256()
        got = 0
        try:
            with storage.ResumableReader(url) as source, open(temporary, "wb") as sink:
                while chunk := source.read(_CHUNK):
                    sink.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                sink.flush()
                os.fsync(sink.fileno())
            if got != expected or (checksum and digest.hexdigest() != checksum):
                raise OSError(errno.EIO, f"fetched {got} bytes of {url}, expected {expected}"
                              + ("" if got != expected else " (checksum differs)"))
            self._sidecar(entry).write_text(json.dumps({"url": url, "bytes": got, "sha256": digest.hexdigest(),
                                                        "fetched": time.time()}))
            os.replace(temporary, entry)  # atomic publication: readers see the whole file or none
            return True
        except OSError as err:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            self._remove(entry)
            reason = "full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else f"io:{err.errno}"
            self._warn_once(reason, f"shard cache {self.folder}: could not store {url} ({err}); reading from "
                            f"storage" + (" (the cache's disk is full: lower data.cache_size_gb)"
                                          if reason == "full" else ""))
            return False


_CACHES: dict[tuple[str, int], ShardCache] = {}


def shard_cache(folder: str | None, max_bytes: int) -> ShardCache | None:
    """The process's cache for `folder` (one per process, reused by every reader)."""
    if not folder:
        return None
    key = (str(folder), int(max_bytes))
    if key not in _CACHES:
        _CACHES[key] = ShardCache(folder, max_bytes)
    return _CACHES[key]
