"""`pip install .` (not editable) yields an importable package with every subpackage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """One non-editable `pip install` for the module's tests (they only read it)."""
    tmp = tmp_path_factory.mktemp("install")
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, cwd=tmp)
    return target


def test_non_editable_install_imports(installed, tmp_path):
    target = installed
    code = ("import vlbert_ds, vlbert_ds.model, vlbert_ds.data, vlbert_ds.prep.cli, vlbert_ds.train.config; "
            "from vlbert_ds.model import VLBertForPretraining, VLBertConfig; "
            "print(vlbert_ds.__file__); VLBertForPretraining(VLBertConfig.preset('tiny'))")
    result = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert result.stdout.strip().startswith(str(target))
    # the model library imports nothing of the training stack
    code = ("import sys, vlbert_ds.model; "
            "bad = [m for m in ('deepspeed', 'webdataset', 'mlflow', 'fsspec') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path,
                   env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_an_installed_package_pretrains_from_outside_the_repo_with_its_shipped_deepspeed_json(installed, tmp_path):
    """Non-editable install, run from a folder with no ds_configs/: the default `train.ds_config`
    (ds_configs/zero2.json) is found inside the package."""
    target = installed
    shipped = target / "vlbert_ds" / "train" / "ds_configs"
    assert sorted(p.name for p in shipped.glob("*.json")) == ["zero1.json", "zero2.json", "zero2_offload.json",
                                                              "zero3.json"]
    assert (shipped / "zero2.json").read_text() == (ROOT / "ds_configs" / "zero2.json").read_text()
    run = tmp_path / "elsewhere"
    run.mkdir()
    (run / "run.yaml").write_text(
        "model: {bert: default, num_region_classes: 25}\n"
        "data: {prepare_default: data, vl_per_batch: 4, text_per_batch: 4, num_workers: 0, samples_per_epoch: 64}\n"
        "train: {steps: 2, precision: fp32, output_dir: out, log_every: 1}\n"
        "grounding: {samples: 8}\n"
        "checkpoint: {every: 100, export: false}\ntracking: {enabled: false}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)} | {
        "PYTHONPATH": str(target), "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "-m", "vlbert_ds.cli.pretrain", "--config", "run.yaml"], cwd=run,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "finished at step 2" in done.stdout
    assert f"{target}/vlbert_ds" in subprocess.run(
        [sys.executable, "-c", "import vlbert_ds; print(vlbert_ds.__file__)"], cwd=run, env=env,
        capture_output=True, text=True, check=True).stdout
