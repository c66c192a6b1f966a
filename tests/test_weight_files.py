"""Weight files are read without running code in them: detectron2-style numpy pickles (what the public
bottom-up-attention ports ship), torch files, safetensors; truncated files are corrupt, not unsafe."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from vlbert_ds.model.weight_files import (
    CorruptWeightsError,
    UnsafeWeightsError,
    load_numpy_pickle,
    read_weight_file,
)
from vlbert_ds.prep.cli import main as prep_main


def _detectron2_pkl(path: Path, protocol: int) -> dict[str, np.ndarray]:
    """A model-zoo style file: {"model": {name: float32 array}, "__author__": ..., "matching_heuristics": ...}."""
    rng = np.random.default_rng(0)
    model = {"backbone.res2.0.conv1.weight": rng.normal(size=(64, 64, 1, 1)).astype(np.float32),
             "backbone.res2.0.conv1.norm.running_var": rng.uniform(0.5, 2, 64).astype(np.float32),
             "roi_heads.box_predictor.cls_score.weight": rng.normal(size=(1601, 2048)).astype(np.float32),
             "proposal_generator.rpn_head.anchor_deltas.bias": np.zeros(48, np.float32)}
    with open(path, "wb") as handle:
        pickle.dump({"model": model, "__author__": "bottom-up-attention port", "matching_heuristics": True,
                     "step": np.int64(400000)}, handle, protocol=protocol)
    return model


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_detectron2_style_pickle_loads_and_converts_to_safetensors(tmp_path, protocol, capsys):
    expected = _detectron2_pkl(tmp_path / "bua.pkl", protocol)
    state = read_weight_file(tmp_path / "bua.pkl")
    assert sorted(state) == sorted(expected)
    for name, array in expected.items():
        assert state[name].dtype == torch.float32 and np.array_equal(state[name].numpy(), array)
    out = tmp_path / "bua.safetensors"
    assert prep_main(["convert-detector", str(tmp_path / "bua.pkl"), str(out)]) == 0
    assert "4 tensors" in capsys.readouterr().out
    from safetensors.torch import load_file

    converted = load_file(str(out))
    assert all(torch.equal(converted[n], torch.from_numpy(a)) for n, a in expected.items())


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_whose_reduce_calls_a_function_is_refused_without_calling_it(tmp_path, capsys):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pkl", "wb") as handle:
        pickle.dump({"model": {"w": np.ones(2, np.float32)}, "extra": _Payload(str(marker))}, handle, protocol=2)
    with pytest.raises(UnsafeWeightsError, match="refusing to load: the pickle calls"):
        load_numpy_pickle(tmp_path / "evil.pkl")
    assert not marker.exists()
    assert prep_main(["convert-detector", str(tmp_path / "evil.pkl"), str(tmp_path / "x.safetensors")]) == 2
    assert "refusing to load" in capsys.readouterr().err and not marker.exists()
    # os.system by name, the classic
    with open(tmp_path / "system.pkl", "wb") as handle:
        handle.write(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(UnsafeWeightsError, match=r"os\.system|posix\.system"):
        read_weight_file(tmp_path / "system.pkl")
    assert not marker.exists()
    # a torch file with a payload is refused by the weights-only loader
    torch.save({"model": {"w": torch.ones(2)}, "extra": _Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeWeightsError):
        read_weight_file(tmp_path / "evil.pth")
    assert not marker.exists()


def test_truncated_files_are_reported_as_corrupt_not_unsafe(tmp_path, capsys):
    _detectron2_pkl(tmp_path / "bua.pkl", 4)
    data = (tmp_path / "bua.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptWeightsError, match="truncated"):
        read_weight_file(tmp_path / "cut.pkl")
    torch.save({"w": torch.ones(1000)}, tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptWeightsError, match="truncated"):
        read_weight_file(tmp_path / "cut.pth")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1000)}, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptWeightsError, match="truncated"):
        read_weight_file(tmp_path / "cut.safetensors")
    assert prep_main(["convert-detector", str(tmp_path / "cut.pkl"), str(tmp_path / "y.safetensors")]) == 2
    assert "truncated" in capsys.readouterr().err
