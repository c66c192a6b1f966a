"""Object storage through fsspec: shard lists, retried reads, atomic writes.

Any fsspec URL works: local paths, `file://`, `s3://` (s3fs; endpoint and credentials from the usual
AWS variables, e.g. `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`), `gs://`, ... WebDataset 1.0.2 has no
s3 handler of its own, so we open streams here and hand them to its tar expander.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable
from typing import IO, Any

import fsspec
from braceexpand import braceexpand

log = logging.getLogger(__name__)

SIZES_NAME = "sizes.json"
# A folder prepared in parts (`vlbert-prep ... --part I/N`) keeps each part's plan and completion marker
# here; `vlbert-prep finalize` writes sizes.json once every part is done, and readers refuse it before.
PARTS_DIR = "_parts"
_PART_FILE = re.compile(r"^(plan|done)-(\d+)-of-(\d+)\.json$")


def _fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def _rejoin(fs: fsspec.AbstractFileSystem, url: str, path: str) -> str:
    """Give `path` (as the filesystem lists it) the protocol of `url`."""
    if "://" in url:
        protocol = url.split("://", 1)[0]
        return f"{protocol}://{path}"
    return path


def join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def expand_urls(spec: str) -> list[str]:
    """Shard URLs from a spec: `::`-separated parts, each a brace pattern, a glob, or a folder of `*.tar`."""
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        for item in braceexpand(part):
            if any(ch in item for ch in "*?["):
                fs, path = _fs_and_path(item)
                urls += sorted(_rejoin(fs, item, p) for p in fs.glob(path))
            elif item.endswith(".tar"):
                urls.append(item)
            else:
                fs, path = _fs_and_path(item)
                if not fs.isdir(path):
                    raise FileNotFoundError(f"no shard folder or .tar at {item}")
                urls += sorted(_rejoin(fs, item, p) for p in fs.glob(path.rstrip("/") + "/*.tar"))
    return urls


def missing_urls(urls: list[str]) -> list[str]:
    """The URLs that do not exist: one listing per folder (not one request per shard)."""
    folders: dict[str, list[str]] = {}
    for url in urls:
        folders.setdefault(url.rsplit("/", 1)[0] if "/" in url else ".", []).append(url)
    missing = []
    for folder, members in folders.items():
        fs, path = _fs_and_path(folder)
        try:
            listed = {posixpath.basename(str(p).rstrip("/")) for p in fs.ls(path, detail=False)}
        except FileNotFoundError:
            listed = set()
        missing += [u for u in members if posixpath.basename(u) not in listed]
    return missing


def part_markers(folder: str) -> dict[str, dict[int, int]]:
    """The part files of a folder prepared in parts: {"plan": {part: parts}, "done": {part: parts}}."""
    fs, path = _fs_and_path(join(folder, PARTS_DIR))
    found: dict[str, dict[int, int]] = {"plan": {}, "done": {}}
    try:
        names = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return found
    for name in names:
        match = _PART_FILE.match(posixpath.basename(str(name).rstrip("/")))
        if match:
            found[match.group(1)][int(match.group(2))] = int(match.group(3))
    return found


def unfinalized_reason(folder: str, marker: str = SIZES_NAME) -> str | None:
    """Why a folder prepared in parts cannot be read yet (None when it can, or was not made in parts):
    finalizing writes `marker` (sizes.json for shards) last."""
    if exists(join(folder, marker)):
        return None
    markers = part_markers(folder)
    if not markers["plan"]:
        return None
    count = max(markers["plan"].values())
    missing = [i for i in range(count) if i not in markers["done"]]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        state = f"part(s) {shown} of {count} have not finished"
    else:
        state = f"all {count} parts are done"
    return (f"{folder} was prepared in parts and is not finalized: {state}; run `vlbert-prep finalize {folder}` "
            "once every part is done")


def read_sizes(shard_urls: list[str]) -> dict[str, int]:
    """Sample count per shard URL from each folder's `sizes.json` (missing entries are absent).

    A folder prepared in parts whose parts are not all done and finalized is refused (ValueError)."""
    folders: dict[str, list[str]] = {}
    for url in shard_urls:
        folders.setdefault(url.rsplit("/", 1)[0] if "/" in url else ".", []).append(url)
    sizes: dict[str, int] = {}
    for folder, urls in folders.items():
        reason = unfinalized_reason(folder)
        if reason:
            raise ValueError(reason)
        table = read_json(join(folder, SIZES_NAME), default={})
        for url in urls:
            name = posixpath.basename(url)
            if name in table:
                sizes[url] = int(table[name])
    return sizes


def exists(url: str) -> bool:
    fs, path = _fs_and_path(url)
    return fs.exists(path)


def read_json(url: str, default: Any = None) -> Any:
    fs, path = _fs_and_path(url)
    if not fs.exists(path):
        return default
    with fs.open(path, "rb") as handle:
        text = handle.read()
    try:
        return json.loads(text)
    except ValueError as err:  # a damaged sizes.json / answers.json is named, with the place it breaks
        where = f"line {err.lineno}, column {err.colno}: " if isinstance(err, json.JSONDecodeError) else ""
        raise ValueError(f"{url}: not valid JSON ({where}{getattr(err, 'msg', err)})") from None


def makedirs(url: str) -> None:
    fs, path = _fs_and_path(url)
    if "://" in url and not url.startswith("file://"):
        protocol = url.split("://", 1)[0]
        if protocol in ("s3", "s3a", "gs", "gcs"):
            bucket = path.split("/", 1)[0]
            if not fs.exists(bucket):
                fs.mkdir(bucket)
            return
    fs.makedirs(path, exist_ok=True)


def write_atomic(url: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file so that readers never see it half-written.

    Local files go to a temporary name and are renamed into place. An object store makes an object
    visible only when its upload completes, so there we write the final key directly.
    """
    fs, path = _fs_and_path(url)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        with fs.open(path, "wb") as handle:
            write(handle)


def write_json_atomic(url: str, data: Any) -> None:
    payload = (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()
    write_atomic(url, lambda handle: handle.write(payload))


def open_with_retries(url: str, attempts: int = 5, base_delay: float = 0.5,
                      on_retry: Callable[[str, Exception], None] | None = None) -> IO[bytes]:
    """Open `url` for reading, retrying with exponential backoff and jitter (flaky object storage)."""
    for attempt in range(1, attempts + 1):
        try:
            fs, path = _fs_and_path(url)
            return fs.open(path, "rb")
        except FileNotFoundError:
            raise
        except Exception as err:
            if attempt == attempts:
                raise
            if on_retry is not None:
                on_retry(url, err)
            delay = base_delay * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning("opening %s failed (%s: %s); retry %d/%d in %.1fs", url, type(err).__name__, err,
                        attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class ResumableReader(io.RawIOBase):
    """A read-only stream that outlives a dropped connection: on a read error it reopens the object
    with backoff and seeks back to where it was, so an object-storage outage of a few seconds costs
    time, not samples. (fsspec retries a request; it does not resume a half-read file.)
    """

    def __init__(self, url: str, attempts: int = 5, base_delay: float = 0.5,
                 on_retry: Callable[[str, Exception], None] | None = None) -> None:
        super().__init__()
        self.url, self.attempts, self.base_delay, self.on_retry = url, attempts, base_delay, on_retry
        self.position = 0
        self.handle = open_with_retries(url, attempts, base_delay, on_retry)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        for attempt in range(1, self.attempts + 1):
            try:
                data = self.handle.read(len(buffer))
                buffer[: len(data)] = data
                self.position += len(data)
                return len(data)
            except FileNotFoundError:
                raise
            except Exception as err:
                if attempt == self.attempts:
                    raise
                if self.on_retry is not None:
                    self.on_retry(self.url, err)
                delay = self.base_delay * 2 ** (attempt - 1) * (0.5 + random.random())
                log.warning("reading %s at byte %d failed (%s: %s); reopening in %.1fs (%d/%d)", self.url,
                            self.position, type(err).__name__, err, delay, attempt, self.attempts - 1)
                time.sleep(delay)
                with contextlib.suppress(Exception):
                    self.handle.close()
                try:
                    fs, path = _fs_and_path(self.url)
                    self.handle = fs.open(path, "rb")
                    self.handle.seek(self.position)
                except FileNotFoundError:
                    raise
                except Exception as reopen_error:  # still down: the next attempt waits longer
                    log.warning("reopening %s failed: %s", self.url, reopen_error)
                    self.handle = _Broken(reopen_error)
        raise AssertionError("unreachable")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.handle.close()
        super().close()


class _Broken:
    """Stands in for a handle that could not be reopened; reading it raises the reopen error."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def read(self, size: int = -1) -> bytes:
        raise self.error

    def close(self) -> None:
        pass
