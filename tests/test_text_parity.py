"""At initialisation a text-only sequence through VL-BERT is exactly BERT (zero-gain visual LayerNorms)."""

from __future__ import annotations

import torch
from transformers import BertForMaskedLM, BertModel

from vlbert_ds.model import VLBatch, VLBertConfig, VLBertForPretraining, VLBertModel


def test_text_alone_equals_hf_bert_on_minilm(minilm_folder, tokenizer):
    captions = ["a red ball to the left of a blue cube", "hello world", "the green triangle is above the circle ."]
    encoded = tokenizer(captions, padding=True, return_tensors="pt")
    ours = VLBertModel.from_bert(minilm_folder).eval()
    reference = BertModel.from_pretrained(str(minilm_folder)).eval()
    with torch.no_grad():
        expected = reference(**encoded).last_hidden_state
        got = ours(VLBatch.text_only(encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"]),
                   append_end=False).text_output
    valid = encoded["attention_mask"].bool()
    assert (expected[valid] - got[valid]).abs().max().item() < 1e-5
    # The report says what was loaded and what started fresh.
    report = ours.load_report
    assert "embeddings.word_embeddings.weight" in report.loaded
    assert "encoder.layer.5.output.LayerNorm.weight" in report.loaded
    assert "embeddings.token_type_embeddings.weight[2:]" in report.fresh
    assert "embeddings.end_embedding" in report.fresh
    assert "pooler.dense.weight" in report.unused  # our pooler is off for pretraining


def _tiny_bert_folder(tmp_path, safe: bool):
    from transformers import BertConfig

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():  # make the MLM head non-trivial so a wrong mapping shows
        model.cls.predictions.bias.normal_()
        model.cls.predictions.transform.dense.weight.normal_(std=0.2)
    model.save_pretrained(tmp_path)
    if not safe:  # the legacy pickle-free-loadable .bin layout of older checkpoints
        (tmp_path / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    return model


def test_mlm_head_from_bert_for_masked_lm_matches_hf(tmp_path, tokenizer):
    for safe in (True, False):
        folder = tmp_path / ("safe" if safe else "bin")
        reference = _tiny_bert_folder(folder, safe)
        assert (folder / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
        ours = VLBertForPretraining.from_bert(folder).eval()
        assert "mlm_head.bias" in ours.load_report.loaded
        assert "mlm_head.transform.dense.weight" in ours.load_report.loaded
        encoded = tokenizer(["a small red square", "two"], padding=True, return_tensors="pt")
        with torch.no_grad():
            expected = reference(**encoded).logits
            hidden = ours.vlbert(VLBatch.text_only(encoded["input_ids"], encoded["attention_mask"]),
                                 append_end=False).text_output
            got = ours.mlm_head(hidden)
        valid = encoded["attention_mask"].bool()
        assert (expected[valid] - got[valid]).abs().max().item() < 1e-4


def test_from_bert_takes_dims_from_config_json(minilm_folder):
    model = VLBertModel.from_bert(minilm_folder)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_attention_heads) == (384, 6, 12)
    assert model.config == VLBertConfig.preset("mini")
