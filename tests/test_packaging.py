"""`pip install .` (not editable) yields an importable package with every subpackage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_non_editable_install_imports(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, cwd=tmp_path)
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
