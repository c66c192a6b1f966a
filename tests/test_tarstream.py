"""The lean tar reader returns exactly what tarfile does, for the formats shard writers produce."""

from __future__ import annotations

import io
import tarfile

import pytest

from vlbert_ds.data.tarstream import iter_members


def _archive(fmt, members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        directory = tarfile.TarInfo("somedir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1234.5  # a float mtime forces PAX headers in PAX format
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


MEMBERS = [("a.json", b"{}"), ("a.features.npy", bytes(range(256)) * 9), ("b.json", b""),
           ("x" * 150 + "/long-name-sample.boxes.npy", b"0123456789" * 100),
           ("unicode-é.json", "é".encode())]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_members_as_tarfile(fmt):
    members = [m for m in MEMBERS if fmt != tarfile.USTAR_FORMAT or len(m[0]) < 100]
    data = _archive(fmt, members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]
    assert list(iter_members(io.BytesIO(data))) == expected == members


def test_truncated_archive_raises_after_complete_members():
    data = _archive(tarfile.PAX_FORMAT, MEMBERS)
    cut = io.BytesIO(data[: len(data) // 2])
    seen = []
    with pytest.raises(tarfile.ReadError):
        for name, _ in iter_members(cut):
            seen.append(name)
    assert seen and seen == [m[0] for m in MEMBERS][: len(seen)]


def test_garbage_is_rejected():
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(iter_members(io.BytesIO(b"<html>" + b"x" * 600)))
