"""Bad input gives a ValueError that names the field and the limit, before any compute."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import make_vl_batch

from vlbert_ds.model import VLBatch, VLBertConfig, VLBertModel


@pytest.fixture(scope="module")
def model():
    return VLBertModel(VLBertConfig.preset("tiny", max_regions=6)).eval()


@pytest.fixture()
def batch(model):
    return make_vl_batch(model.config, rows_vl=2, rows_text=1, regions=5)


def _raises(model, batch, *fragments):
    with pytest.raises(ValueError) as err:
        model(batch)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_wrong_shapes(model, batch):
    _raises(model, replace(batch, text_mask=batch.text_mask[:, :-1]), "VLBatch.text_mask", "expected shape")
    _raises(model, replace(batch, boxes=batch.boxes[..., :3]), "VLBatch.boxes", "(3, 5, 4)")
    _raises(model, replace(batch, region_features=batch.region_features[..., :100]), "VLBatch.region_features",
            "2048")
    _raises(model, replace(batch, input_ids=batch.input_ids[0]), "VLBatch.input_ids", "2 dims")


def test_boxes_outside_the_image(model, batch):
    boxes = batch.boxes.clone()
    boxes[0, 1] = torch.tensor([10.0, 10.0, 500.0, 20.0])  # x2 far past W=128
    _raises(model, replace(batch, boxes=boxes), "VLBatch.boxes", "inside the image")
    boxes = batch.boxes.clone()
    boxes[1, 1] = torch.tensor([-5.0, 0.0, 10.0, 10.0])
    _raises(model, replace(batch, boxes=boxes), "VLBatch.boxes", "below 0")
    boxes = batch.boxes.clone()
    boxes[0, 2] = torch.tensor([50.0, 10.0, 20.0, 30.0])
    _raises(model, replace(batch, boxes=boxes), "x2 >= x1")


def test_empty_text(model, batch):
    mask = batch.text_mask.clone()
    mask[1] = False
    _raises(model, replace(batch, text_mask=mask), "VLBatch.text_mask", "row 1 has empty text")


def test_more_regions_than_the_configured_maximum(model):
    batch = make_vl_batch(model.config, rows_vl=1, rows_text=0, regions=9)
    _raises(model, batch, "VLBatch.region_mask", "9 region slots", "max_regions=6")


def test_text_longer_than_positions(model):
    ids = torch.ones(1, 127, dtype=torch.long) * 1000
    _raises(model, VLBatch.text_only(ids), "VLBatch.input_ids", "max_position_embeddings - 2 = 126")


def test_nan_features_and_missing_whole_image_roi(model, batch):
    feats = batch.region_features.clone()
    feats[0, 1, 3] = float("nan")
    _raises(model, replace(batch, region_features=feats), "VLBatch.region_features", "NaN")
    mask = batch.region_mask.clone()
    mask[0] = False
    _raises(model, replace(batch, region_mask=mask), "RoI 0")


def test_segment_c_is_reserved_and_ids_in_vocab(model, batch):
    types = batch.token_type_ids.clone()
    types[0, 0] = 2
    _raises(model, replace(batch, token_type_ids=types), "VLBatch.token_type_ids")
    ids = batch.input_ids.clone()
    ids[0, 0] = 40000
    _raises(model, replace(batch, input_ids=ids), "VLBatch.input_ids", "vocab_size=30522")


def test_bad_config_values():
    with pytest.raises(ValueError, match="divisible"):
        VLBertConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        VLBertConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown keys"):
        VLBertConfig.from_dict({"hiden_size": 3})
