"""The node-local shard cache: one fetch per shard per node, atomic, bounded, self-healing, and never in
the way (an unusable folder or a full disk falls back to storage with a warning)."""

from __future__ import annotations

import json
import logging
import multiprocessing
from pathlib import Path

import pytest

from vlbert_ds.data.cache import ShardCache
from vlbert_ds.data.streams import ReadSettings, ShardPiece, SkipCounter, read_indexed


def shard_urls(default_data: Path, count: int) -> list[str]:
    return [str(default_data / f"vl/train/shard-{i:06d}.tar") for i in range(count)]


def read_keys(url: str, settings: ReadSettings) -> list[str]:
    return [s["__key__"] for _, s in read_indexed(ShardPiece(url, 0), settings, SkipCounter())]


def stats_of(url: str) -> dict:
    return json.loads(Path(url.replace(".tar", "_stats.json")).read_text())


def test_a_cached_shard_reads_the_same_samples_from_a_checked_local_copy(default_data, tmp_path):
    (url,) = shard_urls(default_data, 1)
    settings = ReadSettings(cache_dir=str(tmp_path / "cache"))
    direct = [s for _, s in read_indexed(ShardPiece(url, 0), ReadSettings(), SkipCounter())]
    cached = [s for _, s in read_indexed(ShardPiece(url, 0), settings, SkipCounter())]
    assert [s["__key__"] for s in cached] == [s["__key__"] for s in direct]
    assert all(a["features.npy"] == b["features.npy"] and a["__url__"] == url
               for a, b in zip(cached, direct, strict=True))
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tar")]
    sidecar = json.loads(entry.with_name(entry.name + ".json").read_text())
    stats = stats_of(url)
    assert entry.stat().st_size == stats["bytes"] == Path(url).stat().st_size
    assert sidecar == {**sidecar, "url": url, "bytes": stats["bytes"], "sha256": stats["sha256"]}
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


def test_a_truncated_cache_file_is_fetched_again(default_data, tmp_path, caplog):
    (url,) = shard_urls(default_data, 1)
    cache = ShardCache(tmp_path / "cache")
    entry = Path(cache.local_path(url))
    expected = read_keys(url, ReadSettings())
    with open(entry, "r+b") as handle:
        handle.truncate(entry.stat().st_size // 2)
    with caplog.at_level(logging.WARNING):
        again = Path(cache.local_path(url))
    assert again == entry and entry.stat().st_size == Path(url).stat().st_size
    assert cache.counters.refetched_corrupt == 1 and cache.counters.fetches == 2
    assert "does not match its recorded size" in caplog.text
    assert read_keys(str(entry), ReadSettings()) == expected


def test_the_cache_stays_within_its_bound_evicting_the_least_recently_used(default_data, tmp_path):
    urls = shard_urls(default_data, 3)
    sizes = [Path(u).stat().st_size for u in urls]
    cache = ShardCache(tmp_path / "cache", max_bytes=sizes[0] + sizes[1] + sizes[2] // 2)
    first = cache.local_path(urls[0])
    cache.local_path(urls[1])
    cache.local_path(urls[0])  # used again: now the most recent
    cache.local_path(urls[2])  # room for it: the least recently used (shard 1) goes
    assert cache.size() <= cache.max_bytes
    kept = {json.loads(p.read_text())["url"] for p in (tmp_path / "cache").glob("*.tar.json")}
    assert kept == {urls[0], urls[2]} and Path(first).exists()


def test_a_shard_larger_than_the_cache_is_read_from_storage(default_data, tmp_path, caplog):
    (url,) = shard_urls(default_data, 1)
    settings = ReadSettings(cache_dir=str(tmp_path / "tiny"), cache_size_gb=1e-6)  # 1 kB
    with caplog.at_level(logging.WARNING):
        keys = read_keys(url, settings)
    assert keys == read_keys(url, ReadSettings()) and "larger than the whole shard cache" in caplog.text


def test_an_unusable_cache_folder_falls_back_to_storage(default_data, tmp_path, caplog):
    (url,) = shard_urls(default_data, 1)
    (tmp_path / "a-file").write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        cache = ShardCache(tmp_path / "a-file" / "cache")
        assert cache.local_path(url) is None
    assert "is not usable" in caplog.text and cache.counters.fallbacks == 1
    settings = ReadSettings(cache_dir=str(tmp_path / "a-file" / "cache2"))
    assert read_keys(url, settings) == read_keys(url, ReadSettings())


def test_a_full_cache_disk_falls_back_to_storage_and_leaves_no_partial_file(default_data, small_disk, caplog):
    (url,) = shard_urls(default_data, 1)
    disk = small_disk(Path(url).stat().st_size / 2**20 / 2)  # half the shard fits
    cache = ShardCache(disk / "cache")
    with caplog.at_level(logging.WARNING):
        assert cache.local_path(url) is None
    assert "disk is full" in caplog.text
    assert not [p for p in (disk / "cache").iterdir() if p.name.endswith(".tar") or ".tmp-" in p.name]
    assert read_keys(url, ReadSettings(cache_dir=str(disk / "cache"))) == read_keys(url, ReadSettings())


def _fetch_in_a_process(args: tuple[str, str]) -> tuple[int, int, int, list[str]]:
    url, folder = args
    cache = ShardCache(folder)
    path = cache.local_path(url)
    return cache.counters.fetches, cache.counters.hits, Path(path).stat().st_size, read_keys(path, ReadSettings())


def test_processes_of_a_node_fetch_a_shard_once_and_never_see_a_partial_file(default_data, tmp_path):
    (url,) = shard_urls(default_data, 1)
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        results = pool.map(_fetch_in_a_process, [(url, str(tmp_path / "cache"))] * 4, chunksize=1)
    assert sum(r[0] for r in results) == 1 and sum(r[1] for r in results) == 3
    expected = read_keys(url, ReadSettings())
    assert all(r[2] == Path(url).stat().st_size and r[3] == expected for r in results)


@pytest.mark.parametrize("bad", ["-1", "nan"])
def test_a_negative_cache_bound_is_refused(bad):
    from vlbert_ds.train.config import PretrainConfig, load_config

    with pytest.raises(ValueError, match=r"data\.cache_size_gb must be >= 0"):
        load_config(None, [f"data.cache_size_gb={bad}", "data.vl_sources=[x]", "data.text_sources=[y]"], PretrainConfig)
