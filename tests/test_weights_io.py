"""save_pretrained / from_pretrained round trip."""

from __future__ import annotations

import json

import torch
from conftest import make_vl_batch

from vlbert_ds.model import VLBertConfig, VLBertForPretraining, VLBertModel


def test_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    config = VLBertConfig.preset("tiny", visual_ln_gain_init=1.0)
    model = VLBertForPretraining(config).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "vlbert_ds" and saved["hidden_size"] == 64
    loaded = VLBertForPretraining.from_pretrained(tmp_path).eval()
    # The MLM decoder is still tied after loading.
    assert loaded.mlm_head.decoder.weight is loaded.vlbert.embeddings.word_embeddings.weight
    batch = make_vl_batch(config)
    with torch.no_grad():
        a, b = model.vlbert(batch), loaded.vlbert(batch)
    assert torch.equal(a.sequence_output, b.sequence_output)


def test_encoder_loads_from_a_pretraining_folder_with_overrides(tmp_path):
    config = VLBertConfig.preset("tiny")
    VLBertModel(config).save_pretrained(tmp_path)
    model = VLBertModel.from_pretrained(tmp_path, with_pooler=False, hidden_dropout_prob=0.2)
    assert model.config.hidden_dropout_prob == 0.2


def test_from_pretrained_refuses_a_different_model_size(tmp_path):
    VLBertModel(VLBertConfig.preset("tiny")).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 128
    cfg["num_attention_heads"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    try:
        VLBertModel.from_pretrained(tmp_path)
    except (ValueError, RuntimeError) as err:
        assert "size mismatch" in str(err) or "does not match" in str(err)
    else:
        raise AssertionError("a checkpoint of another size must not load")
