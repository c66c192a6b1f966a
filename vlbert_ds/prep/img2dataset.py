"""Reading img2dataset output (rom1504/img2dataset) as prep input, where users' downloads already are.

img2dataset writes, per shard `NNNNN`, a `NNNNN.parquet` with every input row (`key`, `status`,
`error_message`, `url`, the caption, ...), a `NNNNN_stats.json` last (its commit marker), and the
downloaded images either in `NNNNN.tar` (`--output_format webdataset`: `KEY.jpg|png|webp`, `KEY.txt`,
`KEY.json`) or in a folder `NNNNN/` of the same files (`--output_format files`). The layout is told by
what the folder holds; a brace pattern of tars is read as the webdataset layout.

Every parquet row becomes one input row, in key order (the url list's order, whatever order the downloads
finished in), so that written + skipped = the rows img2dataset was given:
rows img2dataset could not fetch are skipped under its own status (`img2dataset_failed_to_download`,
`img2dataset_failed_to_resize`, with its `error_message` in the skipped-rows log). For the others the
image bytes and caption are read straight out of the tar (or folder) by the worker that makes the
sample: a tar is opened once per worker and its members are read by offset, nothing is extracted to disk.
The img2dataset `key` is the image id (region files are keyed by it).
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
from braceexpand import braceexpand

from vlbert_ds.data.schema import SampleError
from vlbert_ds.prep.writer import ShardJob

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_SHARD = re.compile(r"^(\d+)(\.tar|\.parquet|_stats\.json)?$")

Layout = Literal["webdataset", "files"]


@dataclass(slots=True)
class Img2DatasetRow:
    """One row img2dataset was given. `shard` is its shard's URL without suffix (`.../00012`);
    `shard_bytes` the size of that shard's tar (0 in the files layout), so that a shard downloaded again
    is not taken for the one already prepared. Slots: planning holds every row (~200 bytes each)."""

    key: str
    shard: str
    layout: Layout
    status: str
    error: str | None = None
    url: str | None = None
    shard_bytes: int = 0


@dataclass
class Img2DatasetShard:
    base: str
    layout: Layout
    rows: list[Img2DatasetRow]


def _listing(fs: fsspec.AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    try:
        return fs.ls(path, detail=True)
    except FileNotFoundError as err:
        raise ValueError(f"--img2dataset {path}: no such folder") from err


def _url(source: str, path: str) -> str:
    protocol = source.split("://", 1)[0] + "://" if "://" in source else ""
    return path if not protocol or path.startswith(protocol) else protocol + path


def find_shards(source: str) -> tuple[Layout, list[str]]:
    """(layout, shard base URLs) of an img2dataset output folder or a brace pattern / list of its tars."""
    if source.endswith(".tar") or "{" in source:
        bases = []
        for url in braceexpand(source):
            if not url.endswith(".tar"):
                raise ValueError(f"--img2dataset {source}: {url} is not a .tar (give a folder, or a pattern of tars)")
            fs, path = fsspec.core.url_to_fs(url)
            if not fs.exists(path):
                raise ValueError(f"--img2dataset {source}: {url} does not exist")
            bases.append(url[: -len(".tar")])
        return "webdataset", bases
    fs, path = fsspec.core.url_to_fs(source)
    if not fs.isdir(path):
        raise ValueError(f"--img2dataset {source}: not a folder (give img2dataset's output folder, or a brace "
                         "pattern of its tars)")
    tars, folders, parquets = set(), set(), set()
    for entry in _listing(fs, path):
        name = posixpath.basename(str(entry["name"]).rstrip("/"))
        match = _SHARD.match(name)
        if not match:
            continue
        if entry.get("type") == "directory" and match.group(2) is None:
            folders.add(match.group(1))
        elif match.group(2) == ".tar":
            tars.add(match.group(1))
        elif match.group(2) == ".parquet":
            parquets.add(match.group(1))
    root = source.rstrip("/")
    if tars:
        return "webdataset", [f"{root}/{n}" for n in sorted(tars)]
    if folders & parquets:
        return "files", [f"{root}/{n}" for n in sorted(folders & parquets)]
    if parquets:
        raise ValueError(f"--img2dataset {source}: only parquet files, no tars or shard folders: img2dataset's "
                         "'parquet' output format is not read; download with --output_format webdataset or files")
    raise ValueError(f"--img2dataset {source}: not img2dataset output (no NNNNN.tar, and no NNNNN/ folder beside a "
                     "NNNNN.parquet)")


def read_shard(base: str, layout: Layout) -> Img2DatasetShard:
    """The rows of one img2dataset shard from its parquet; refused when img2dataset did not finish it."""
    import pyarrow.parquet as pq

    stats_url, parquet_url = base + "_stats.json", base + ".parquet"
    fs, _ = fsspec.core.url_to_fs(base)
    if not fs.exists(fsspec.core.url_to_fs(stats_url)[1]):
        raise ValueError(f"--img2dataset: {stats_url} is missing: img2dataset did not finish shard "
                         f"{posixpath.basename(base)} (re-run img2dataset, which finishes it, or remove the shard)")
    if not fs.exists(fsspec.core.url_to_fs(parquet_url)[1]):
        raise ValueError(f"--img2dataset: {parquet_url} is missing: the row statuses of shard "
                         f"{posixpath.basename(base)} are needed to account for every row")
    with fsspec.open(parquet_url, "rb") as handle:
        table = pq.ParquetFile(handle)
        names = table.schema_arrow.names
        if "key" not in names or "status" not in names:
            raise ValueError(f"--img2dataset: {parquet_url} has no key/status columns (it has "
                             f"{', '.join(names[:10])}): not img2dataset output")
        wanted = [c for c in ("key", "status", "error_message", "url") if c in names]
        columns = table.read(columns=wanted).to_pydict()
    shard_bytes = 0
    if layout == "webdataset":
        tar_fs, tar_path = fsspec.core.url_to_fs(base + ".tar")
        if not tar_fs.exists(tar_path):
            raise ValueError(f"--img2dataset: {base}.tar is missing beside {parquet_url}")
        shard_bytes = int(tar_fs.size(tar_path))
    count = len(columns["key"])
    # In img2dataset's key order (the url list's order): it writes rows as downloads complete, so the
    # parquet's order differs from one download to the next, and the shards made from it would too.
    rows = [Img2DatasetRow(key=str(columns["key"][i]), shard=base, layout=layout, status=str(columns["status"][i]),
                           error=(columns.get("error_message") or [None] * count)[i],
                           url=(columns.get("url") or [None] * count)[i], shard_bytes=shard_bytes)
            for i in sorted(range(count), key=lambda i: str(columns["key"][i]))]
    return Img2DatasetShard(base, layout, rows)


def read_img2dataset(source: str) -> list[Img2DatasetShard]:
    layout, bases = find_shards(source)
    if not bases:
        raise ValueError(f"--img2dataset {source}: no shards")
    return [read_shard(base, layout) for base in bases]


def jobs_of(shards: list[Img2DatasetShard], rows_per_job: int) -> list[ShardJob]:
    """Output files of at most `rows_per_job` rows, none spanning two img2dataset shards; each job's part
    group is its shard's position, so that one part reads each tar."""
    jobs: list[ShardJob] = []
    first = 0
    for position, shard in enumerate(shards):
        for start in range(0, len(shard.rows), rows_per_job):
            jobs.append(ShardJob(len(jobs), shard.rows[start : start + rows_per_job], first + start, group=position))
        first += len(shard.rows)
    return jobs


def summary_inputs(shards: list[Img2DatasetShard]) -> dict[str, int]:
    return {"img2dataset shards": len(shards), "img2dataset rows": sum(len(s.rows) for s in shards)}


class Img2DatasetFiles:
    """A worker's reader of rows' files: the current shard's tar stays open, its member index is read
    once and each member by offset, or the shard folder's listing is kept."""

    def __init__(self) -> None:
        self._base: str | None = None
        self._handle = None
        self._members: dict[str, dict[str, Any]] = {}  # key -> extension -> TarInfo or file URL

    def __getstate__(self) -> dict[str, Any]:
        return {"_base": None, "_handle": None, "_members": {}}

    def _open(self, row: Img2DatasetRow) -> None:
        if self._base == row.shard:
            return
        self.close()
        members: dict[str, dict[str, Any]] = {}
        try:
            if row.layout == "webdataset":
                self._handle = fsspec.open(row.shard + ".tar", "rb").open()
                with tarfile.open(fileobj=self._handle, mode="r:") as archive:  # (leaves the handle open)
                    infos = archive.getmembers()
                for info in infos:
                    if info.isfile():
                        key, _, extension = posixpath.basename(info.name).partition(".")
                        members.setdefault(key, {})[extension.lower()] = info
            else:
                fs, path = fsspec.core.url_to_fs(row.shard)
                for name in fs.ls(path, detail=False):
                    key, _, extension = posixpath.basename(str(name)).partition(".")
                    members.setdefault(key, {})[extension.lower()] = _url(row.shard, str(name))
        except (OSError, tarfile.TarError) as err:
            raise SampleError("unreadable_file", f"{row.shard}: {type(err).__name__}: {err}") from err
        self._base, self._members = row.shard, members

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._base, self._handle, self._members = None, None, {}

    def _read(self, entry: Any) -> bytes:
        if isinstance(entry, str):
            with fsspec.open(entry, "rb") as handle:
                return handle.read()
        self._handle.seek(entry.offset_data)
        return self._handle.read(entry.size)

    def read(self, row: Img2DatasetRow, caption_field: str | None = None) -> tuple[bytes, str]:
        """(image bytes, caption) of a row img2dataset fetched."""
        if row.status != "success":
            raise SampleError(f"img2dataset_{row.status}", row.error or "")
        self._open(row)
        files = self._members.get(row.key)
        if not files:
            raise SampleError("missing_file", f"{row.key} is not in {row.shard}")
        image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
        if image is None:
            raise SampleError("missing_image", f"{row.key} in {row.shard} has no image ({', '.join(files)})")
        if caption_field is None:
            caption = self._read(files["txt"]).decode("utf-8", errors="replace") if "txt" in files else ""
        else:
            try:
                meta = json.loads(self._read(files["json"])) if "json" in files else {}
            except ValueError as err:
                raise SampleError("malformed_row", f"{row.key}.json: {err}") from err
            value = meta.get(caption_field)
            caption = value if isinstance(value, str) else ""
        return self._read(image), caption
