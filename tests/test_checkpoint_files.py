"""Checkpoint files on their own: checksums in COMPLETE and what verification says about damaged files
(the fallback to an older checkpoint with real runs is in test_run_integrity.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vlbert_ds.train.checkpoint import COMPLETE, CheckpointManager, CorruptCheckpoint, verify_safe_to_load


def _checkpoint(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep=2, rank=0)
    folder = tmp_path / "step00000002"
    folder.mkdir()
    torch.save({"w": torch.arange(10000.0)}, folder / "mp_rank_00_model_states.pt")
    torch.save({"state": torch.ones(5000)}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (folder / "model_config.json").write_text("{}")
    (folder / COMPLETE).write_text(json.dumps({"step": 2, "files": manager._checksums(folder)}))
    return manager, folder


def test_checksums_cover_every_file_and_verification_names_the_damage(tmp_path):
    manager, folder = _checkpoint(tmp_path)
    recorded = json.loads((folder / COMPLETE).read_text())["files"]
    assert sorted(recorded) == ["model_config.json", "mp_rank_00_model_states.pt",
                                "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert manager.verify("step00000002") is None
    states = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(states.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = os.urandom(64)  # same size, other bytes
    states.write_bytes(bytes(data))
    assert manager.verify("step00000002") == f"{states.name} changed since it was written (checksum mismatch)"
    states.write_bytes(bytes(data[:1000]))
    assert f"{states.name} is 1000 bytes, {len(data)} when written (truncated?)" in manager.verify("step00000002")
    (folder / "mp_rank_00_model_states.pt").unlink()
    assert "mp_rank_00_model_states.pt is missing" in manager.verify("step00000002")


def test_a_truncated_weights_file_is_reported_as_damaged_not_as_unsafe(tmp_path):
    _, folder = _checkpoint(tmp_path)
    path = folder / "mp_rank_00_model_states.pt"
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CorruptCheckpoint, match="is damaged"):
        verify_safe_to_load(folder)
