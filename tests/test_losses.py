"""Pretraining losses: soft-label MRC by hand, MLM only at predicted positions, one loss per objective."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from conftest import make_vl_batch

from vlbert_ds.model import VLBertConfig, VLBertForPretraining, soft_cross_entropy


def test_soft_label_mrc_loss_equals_hand_computed_value():
    logits = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, 0.0, -1.0]]
    targets = [[0.2, 0.3, 0.5], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]  # row 1 sums to 0: not a valid label

    def row_loss(z, p):
        log_norm = math.log(sum(math.exp(v) for v in z))
        return -sum(pc * (zc - log_norm) for zc, pc in zip(z, p, strict=True))

    expected = (row_loss(logits[0], targets[0]) + row_loss(logits[2], targets[2])) / 2
    loss, valid = soft_cross_entropy(torch.tensor(logits), torch.tensor(targets))
    assert valid.tolist() == [True, False, True]
    assert abs(loss.item() - expected) < 1e-6
    # By hand: row 0 logsumexp = 3 + ln(1 + e^-1 + e^-2) = 3.4076, loss 3.4076 - 2.3 = 1.1076;
    # row 2 logsumexp = 2 + ln(1 + e^-2 + e^-3) = 2.1699, loss 0.1699; mean 0.6388.
    assert abs(expected - 0.6388) < 1e-3


def _pretraining_batch(config, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch = make_vl_batch(config, rows_vl=2, rows_text=2, regions=5, text_len=8, seed=seed)
    labels = torch.full_like(batch.input_ids, -1)
    pick = (torch.rand(batch.input_ids.shape, generator=gen) < 0.4) & batch.text_mask
    pick[:, 2] = True
    labels[pick] = batch.input_ids[pick]
    batch.mlm_labels = labels
    batch.mrc_select = batch.region_mask & (torch.rand(batch.region_mask.shape, generator=gen) < 0.5)
    batch.mrc_select[:, 0] = False  # the whole-image RoI is never a target
    batch.mrc_select[0, 1] = True
    batch.region_masked = batch.mrc_select.clone()
    n = int(batch.mrc_select.sum())
    batch.mrc_targets = torch.softmax(torch.randn(n, config.num_region_classes, generator=gen) * 3, -1)
    return batch


def test_losses_match_full_sequence_computation():
    torch.manual_seed(0)
    config = VLBertConfig.preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 visual_fusion_dropout=0.0)
    model = VLBertForPretraining(config).eval()
    batch = _pretraining_batch(config)
    out = model(batch)
    assert set(out.losses) == {"mlm_vl", "mlm_text", "mrc"}

    # Independent path: logits over every token and every RoI, then ignore_index / row selection.
    with torch.no_grad():
        encoded = model.vlbert(batch)
        all_logits = model.mlm_head(encoded.text_output)
        labels = batch.mlm_labels.masked_fill(~batch.text_mask, -1)
        vl_rows, text_rows = batch.has_image, ~batch.has_image
        mlm_vl = F.cross_entropy(all_logits[vl_rows].flatten(0, 1), labels[vl_rows].flatten(), ignore_index=-1)
        mlm_text = F.cross_entropy(all_logits[text_rows].flatten(0, 1), labels[text_rows].flatten(), ignore_index=-1)
        region_logits = model.mrc_head(encoded.region_output)[batch.mrc_select]
        mrc = -(batch.mrc_targets * F.log_softmax(region_logits, -1)).sum(-1).mean()
    assert abs(out.losses["mlm_vl"].item() - mlm_vl.item()) < 1e-4
    assert abs(out.losses["mlm_text"].item() - mlm_text.item()) < 1e-4
    assert abs(out.losses["mrc"].item() - mrc.item()) < 1e-4
    assert abs(out.loss.item() - (mlm_vl + mlm_text + mrc).item()) < 1e-4
    assert out.metrics["mlm_vl_count"].item() == int((labels[vl_rows] >= 0).sum())
    # At init the MRC loss is about log(1601) minus nothing learned: a sanity bound, not a target.
    assert 0 < out.losses["mrc"].item() < 2 * math.log(config.num_region_classes)


def test_backward_reaches_every_trainable_parameter():
    torch.manual_seed(0)
    config = VLBertConfig.preset("tiny", visual_ln_gain_init=1.0)
    model = VLBertForPretraining(config).train()
    model(_pretraining_batch(config)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_a_batch_without_text_only_rows_gives_a_zero_text_loss():
    config = VLBertConfig.preset("tiny")
    model = VLBertForPretraining(config)
    batch = _pretraining_batch(config)
    batch.mlm_labels[~batch.has_image] = -1
    out = model(batch)
    assert out.losses["mlm_text"].item() == 0.0 and out.metrics["mlm_text_count"].item() == 0
    out.loss.backward()  # still differentiable
