"""`vlbert-pretrain` refuses bad input with a clear message and exit code 2, before any step runs."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlbert_ds.train.pretrain", *args], capture_output=True, text=True,
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
