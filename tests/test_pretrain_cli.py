"""`vlbert-pretrain` refuses bad input with a clear message and exit code 2, before any step runs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ranks import TINY


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlbert_ds.cli.pretrain", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu",
                                                     "HOME": "/tmp"})


def test_unknown_config_key(tmp_path):
    result = _cli("data.vl_sources=[x]", "train.stepz=3")
    assert result.returncode == 2 and "unknown key train.stepz" in result.stderr


@pytest.mark.slow
def test_data_url_that_matches_no_shard(tmp_path):
    result = _cli(f"data.vl_sources=[{tmp_path}/nothing-{{000..009}}.tar]", f"data.text_sources=[{tmp_path}]",
                  "data.samples_per_epoch=8", f"train.output_dir={tmp_path / 'out'}", "tracking.enabled=false")
    assert result.returncode == 2 and "matches no shard" in result.stderr, result.stderr[-3000:]
    assert "step 1" not in result.stdout


def _pretrain_on(vl: str, text: str, out, *extra):
    import time

    start = time.monotonic()
    result = _cli(*TINY, f"data.vl_sources=[{vl}]", f"data.text_sources=[{text}]",
                  "data.samples_per_epoch=64", "data.num_workers=1", f"train.output_dir={out}", "train.steps=5",
                  "tracking.enabled=false", *extra)
    return result, time.monotonic() - start


@pytest.mark.slow
def test_a_source_whose_samples_are_all_rejected_stops_before_step_one(default_data, tmp_path):
    """1601-way (here: 25-way) class scores against a smaller num_region_classes: every sample is rejected."""
    result, seconds = _pretrain_on(f"{default_data}/vl/train", f"{default_data}/text/train", tmp_path / "o",
                                   "model.num_region_classes=10")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "none of the 32 samples read is usable (skipped: too_many_classes 32" in result.stderr
    assert "model.num_region_classes" in result.stderr
    assert "step 1" not in result.stdout and seconds < 240


@pytest.mark.slow
def test_precomputed_mode_on_image_only_shards_names_the_front_end_key(default_data, tmp_path):
    from PIL import Image
    from skimage import data

    from vlbert_ds.prep.cli import main as prep_main

    Image.fromarray(data.chelsea()).save(tmp_path / "cat.jpg")
    (tmp_path / "m.jsonl").write_text("\n".join(f'{{"image": "cat.jpg", "caption": "a cat {i}"}}' for i in range(8)))
    assert prep_main(["captions", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "images"),
                      "--processes", "1", "--short-side", "100"]) == 0
    result, _ = _pretrain_on(str(tmp_path / "images"), f"{default_data}/text/train", tmp_path / "o",
                             "model.visual_front_end=precomputed")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "missing_features 8" in result.stderr and "model.visual_front_end=end_to_end" in result.stderr


def test_a_worker_that_rejects_every_sample_stops_instead_of_spinning(default_data, minilm_folder):
    from vlbert_ds.data import ExampleConfig, LoaderConfig, PretrainStream, SourceSpec, UnusableDataError
    from vlbert_ds.data.examples import make_vl_example
    from vlbert_ds.data.pipeline import MAX_REJECTED_BEFORE_FIRST
    from vlbert_ds.data.schema import decode_vl
    from vlbert_ds.data.storage import expand_urls
    from vlbert_ds.data.streams import ShardPiece, SkipCounter, read_piece

    config = LoaderConfig(vl_sources=[SourceSpec(f"{default_data}/vl/train")],
                          text_sources=[SourceSpec(f"{default_data}/text/train")], tokenizer=str(minilm_folder),
                          samples_per_epoch=64, example=ExampleConfig(num_region_classes=25))
    stream = PretrainStream(config)
    from dataclasses import replace
    from functools import partial

    stream.config = replace(config, example=replace(config.example, num_region_classes=10))  # all too many classes

    def endless():
        while True:
            for url in expand_urls(f"{default_data}/vl/train"):
                yield from read_piece(ShardPiece(url, -1), config, SkipCounter())

    skipped = SkipCounter()
    decode = partial(decode_vl, need_features=True, need_image=False)
    examples = stream._examples(endless(), make_vl_example, decode, skipped, stream_tools(minilm_folder))
    with pytest.raises(UnusableDataError, match="too_many_classes"):
        next(examples)
    assert skipped["too_many_classes"] == MAX_REJECTED_BEFORE_FIRST


def stream_tools(folder):
    from vlbert_ds.data import TokenizerTools

    return TokenizerTools(str(folder))
