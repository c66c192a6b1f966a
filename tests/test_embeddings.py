"""The packed sequence: element sums, RoI 0 as the text tokens' visual part, shared RoI position."""

from __future__ import annotations

import torch
from conftest import make_vl_batch

from vlbert_ds.model import VLBertConfig, VLBertModel, box_geometry_embedding


def _model(seed: int = 0) -> VLBertModel:
    torch.manual_seed(seed)
    model = VLBertModel(VLBertConfig.preset("tiny")).eval()
    with torch.no_grad():  # give vision a non-zero gain so that the visual parts show
        for norm in (model.embeddings.visual_ln_text, model.embeddings.visual_ln_object):
            norm.weight.normal_()
            norm.bias.normal_()
        model.appearance.masked_region_feature.normal_()
    return model


def test_elements_are_built_exactly_as_the_reference_describes():
    model = _model()
    batch = make_vl_batch(model.config, rows_vl=1, rows_text=1, regions=4, text_len=6)
    batch.region_masked = torch.zeros_like(batch.region_mask)
    batch.region_masked[0, 2] = True
    emb = model.embeddings
    with torch.no_grad():
        vectors = model.region_vectors(batch)
        got, layout = emb(batch.input_ids, batch.text_mask, batch.token_type_ids, batch.has_image, vectors,
                          batch.region_mask, batch.region_masked, None)

        # Fused RoI vectors: ReLU(W [geometry ; appearance] + b), masked RoI -> learned feature.
        feats = batch.region_features[0].clone()
        feats[2] = model.appearance.masked_region_feature
        geometry = box_geometry_embedding(batch.boxes[0], batch.image_size[0].expand(4, 2))
        fusion = model.region_fusion.linear
        expected_vectors = torch.relu(torch.cat((geometry, feats), -1) @ fusion.weight.T + fusion.bias)
        assert torch.allclose(vectors[0], expected_vectors, atol=1e-5)

        # Row 0: 4 tokens (2 padding slots), 4 RoIs, [END] -> 9 elements.
        text_len, n_roi = int(batch.text_mask[0].sum()), 4
        assert text_len == 4
        pos, seg = emb.position_embeddings.weight, emb.token_type_embeddings.weight
        rows = []
        for t in range(text_len):
            rows.append(emb.word_embeddings.weight[batch.input_ids[0, t]] + emb.visual_ln_text(vectors[0, 0])
                        + pos[t] + seg[0])
        for r in range(n_roi):
            token = emb.masked_image_token_embedding if r == 2 else emb.image_token_embedding
            rows.append(token + emb.visual_ln_object(vectors[0, r]) + pos[text_len] + seg[2])
        rows.append(emb.end_embedding + pos[text_len + 1] + seg[2])
        expected = emb.LayerNorm(torch.stack(rows))
        assert torch.allclose(got[0, : text_len + n_roi + 1], expected, atol=1e-5)
        assert layout.element_mask[0].sum() == text_len + n_roi + 1

        # Row 1 (text-only): 6 tokens + [END], visual part = the shared learned vector.
        rows = [emb.word_embeddings.weight[batch.input_ids[1, t]] + emb.visual_ln_text(emb.text_only_visual_embedding)
                + pos[t] + seg[0] for t in range(6)]
        rows.append(emb.end_embedding + pos[6 + 1] + seg[2])
        assert torch.allclose(got[1, :7], emb.LayerNorm(torch.stack(rows)), atol=1e-5)
        assert layout.element_mask[1].sum() == 7


def test_text_tokens_take_their_visual_part_from_roi_0():
    model = _model()
    batch = make_vl_batch(model.config, rows_vl=1, rows_text=0, regions=4, text_len=6)
    with torch.no_grad():
        base = model(batch).text_output
        changed_other = batch.region_features.clone()
        changed_other[0, 2] += 5.0
        batch_other = make_vl_batch(model.config, rows_vl=1, rows_text=0, regions=4, text_len=6)
        batch_other.region_features = changed_other
        embed = model.embeddings
        args = (batch.input_ids, batch.text_mask, batch.token_type_ids, batch.has_image)
        e0, _ = embed(*args, model.region_vectors(batch), batch.region_mask, None, None)
        e2, _ = embed(*args, model.region_vectors(batch_other), batch.region_mask, None, None)
        n_text = int(batch.text_mask[0].sum())
        # RoI 2 changes its own element only, never the text elements.
        assert torch.equal(e0[0, :n_text], e2[0, :n_text])
        assert not torch.allclose(e0[0, n_text + 2], e2[0, n_text + 2])
        changed_zero = batch.region_features.clone()
        changed_zero[0, 0] += 5.0
        batch_zero = make_vl_batch(model.config, rows_vl=1, rows_text=0, regions=4, text_len=6)
        batch_zero.region_features = changed_zero
        ez, _ = embed(*args, model.region_vectors(batch_zero), batch.region_mask, None, None)
        assert (ez[0, :n_text] - e0[0, :n_text]).abs().amax(-1).min() > 0  # every text token moved
        assert not torch.allclose(model(batch_zero).text_output[0, :n_text], base[0, :n_text])


def test_rois_share_one_position_so_their_order_does_not_matter():
    model = _model()
    batch = make_vl_batch(model.config, rows_vl=1, rows_text=0, regions=5, text_len=6)
    order = torch.tensor([0, 3, 1, 4, 2])  # RoI 0 stays first; shuffle the rest
    shuffled = make_vl_batch(model.config, rows_vl=1, rows_text=0, regions=5, text_len=6)
    shuffled.boxes = batch.boxes[:, order]
    shuffled.region_features = batch.region_features[:, order]
    with torch.no_grad():
        a, b = model(batch), model(shuffled)
    n_text = int(batch.text_mask[0].sum())
    assert torch.allclose(a.text_output[:, :n_text], b.text_output[:, :n_text], atol=1e-5)
    assert torch.allclose(a.region_output[:, order], b.region_output, atol=1e-5)


def test_mixed_batch_outputs_do_not_depend_on_other_rows():
    """Packing and padding are per row: a row's outputs are the same alone or in a batch."""
    model = _model()
    batch = make_vl_batch(model.config, rows_vl=2, rows_text=1, regions=5, text_len=7)
    with torch.no_grad():
        together = model(batch)
        for row in range(3):
            alone = make_vl_batch(model.config, rows_vl=2, rows_text=1, regions=5, text_len=7)
            for name in ("input_ids", "text_mask", "token_type_ids", "has_image", "boxes", "region_mask",
                         "image_size", "region_features"):
                setattr(alone, name, getattr(batch, name)[row : row + 1])
            single = model(alone)
            n_text = int(batch.text_mask[row].sum())
            n_roi = int(batch.region_mask[row].sum())
            assert torch.allclose(single.text_output[0, :n_text], together.text_output[row, :n_text], atol=1e-5)
            assert torch.allclose(single.region_output[0, :n_roi], together.region_output[row, :n_roi], atol=1e-5)


def test_modality_buckets_give_the_same_outputs_as_one_padded_pass():
    model = _model()
    batch = make_vl_batch(model.config, rows_vl=2, rows_text=2, regions=5, text_len=9)
    batch.text_mask[2, 5:] = False  # a short text-only row
    batch.input_ids[2, 5:] = 0
    with torch.no_grad():
        bucketed = model(batch)
        model.config.bucket_by_modality = False
        single = model(batch)
        model.config.bucket_by_modality = True
    assert torch.allclose(bucketed.text_output[batch.text_mask], single.text_output[batch.text_mask], atol=1e-5)
    assert torch.allclose(bucketed.region_output[batch.region_mask], single.region_output[batch.region_mask],
                          atol=1e-5)
