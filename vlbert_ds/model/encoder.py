"""The BERT encoder, written out with `scaled_dot_product_attention`.

Why not `transformers.BertEncoder`: its internals (attention dispatch, mask conventions, cache
arguments) change between major versions, and we need to own the attention call to add packing and
fused kernels for speed. Parameter names match Hugging Face BERT (`encoder.layer.N.attention.self.query`,
...) so BERT checkpoints and the official VL-BERT checkpoints (same vendored BERT names) map 1:1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlbert_ds.model.config import VLBertConfig

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; choose from {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class SelfAttention(nn.Module):
    def __init__(self, config: VLBertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        q = self._split_heads(self.query(hidden))
        k = self._split_heads(self.key(hidden))
        v = self._split_heads(self.value(hidden))
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, dropout_p=self.dropout_p if self.training else 0.0
        )
        batch, _, length, _ = context.shape
        return context.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)


class DenseResidualNorm(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): BERT's `BertSelfOutput` and `BertOutput`."""

    def __init__(self, in_dim: int, config: VLBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_dim, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, config: VLBertConfig) -> None:
        super().__init__()
        self.self = SelfAttention(config)
        self.output = DenseResidualNorm(config.hidden_size, config)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.output(self.self(hidden, attention_mask), hidden)


class Intermediate(nn.Module):
    def __init__(self, config: VLBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.act(self.dense(hidden))


class Layer(nn.Module):
    def __init__(self, config: VLBertConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = DenseResidualNorm(config.intermediate_size, config)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        attended = self.attention(hidden, attention_mask)
        return self.output(self.intermediate(attended), attended)


class Encoder(nn.Module):
    def __init__(self, config: VLBertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """`key_padding_mask` [B, L] bool, True = a real element every query may attend to."""
        attention_mask = None
        if key_padding_mask is not None and not bool(key_padding_mask.all()):
            attention_mask = key_padding_mask[:, None, None, :]
        for layer in self.layer:
            hidden = layer(hidden, attention_mask)
        return hidden


class Pooler(nn.Module):
    """BERT's tanh pooler on the first element (used by VCR and the optional SIRP head)."""

    def __init__(self, config: VLBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, sequence: Tensor) -> Tensor:
        return torch.tanh(self.dense(sequence[:, 0]))
