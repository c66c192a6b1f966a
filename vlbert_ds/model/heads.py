"""Pretraining heads and their losses (reference §1.6).

* MLM: BERT's `BertOnlyMLMHead` (dense -> GELU -> LayerNorm -> decoder tied to the word embeddings
  + bias), applied only at predicted positions: the vocabulary projection over every token is most
  of the head's cost, and only ~15% of tokens carry a label.
* MRC (masked RoI classification): dense -> GELU (no LayerNorm) -> Linear(H -> 1601), soft-label
  cross-entropy against the detector's class distribution (`soft_cross_entropy` in the official
  `common/utils/misc.py`): rows whose target sums to 1 ± 0.1 count, averaged over them.
  ⚠ The paper says "softmax cross-entropy over object categories"; the code trains on soft labels.
* SIRP (sentence-image relation): Linear(H -> 2) on the pooled [CLS]; off in every released config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlbert_ds.model.config import VLBertConfig
from vlbert_ds.model.encoder import activation


class MLMTransform(nn.Module):
    def __init__(self, config: VLBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.LayerNorm(self.act(self.dense(hidden)))


class MLMHead(nn.Module):
    """Vocabulary logits; the decoder shares its weight Parameter with the word embedding table.

    Sharing the Parameter object (as Hugging Face ties weights) keeps one tensor that every
    optimizer and ZeRO stage sees once. `TIED_KEYS` lists the alias that checkpoints leave out.
    """

    TIED_KEYS = ("decoder.weight",)

    def __init__(self, config: VLBertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = MLMTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden)) + self.bias


class MRCTransform(nn.Module):
    def __init__(self, config: VLBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.act(self.dense(hidden))


class MRCHead(nn.Module):
    def __init__(self, config: VLBertConfig) -> None:
        super().__init__()
        self.transform = MRCTransform(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_region_classes)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.classifier(self.transform(hidden))


def soft_cross_entropy(logits: Tensor, targets: Tensor, tolerance: float = 0.1) -> tuple[Tensor, Tensor]:
    """Mean of -Σ_c p_c log softmax(z)_c over rows whose target sums to 1 ± tolerance.

    Returns (loss, valid_rows). With no valid row the loss is a graph-connected zero, so every
    parameter still receives a (zero) gradient, which distributed optimizers expect.
    """
    valid = (targets.sum(-1) - 1.0).abs() < tolerance
    per_row = -(targets.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    count = valid.sum()
    loss = torch.where(valid, per_row, torch.zeros_like(per_row)).sum() / count.clamp(min=1)
    return loss, valid


def masked_token_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over the given predicted positions and their accuracy (graph-connected zero if none)."""
    if labels.numel() == 0:
        return logits.sum() * 0.0, logits.new_zeros(())
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return loss, accuracy
