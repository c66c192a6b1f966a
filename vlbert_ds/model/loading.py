"""Weights in and out: Hugging Face BERT folders, and our own `save_pretrained` format.

A BERT folder is any Hugging Face BERT checkpoint in the bert-base-uncased layout: `config.json`
plus `model.safetensors` or `pytorch_model.bin`, saved from `BertModel` (keys `embeddings.*`,
`encoder.*`, `pooler.*`) or `BertForMaskedLM` / `BertForPreTraining` (the same under `bert.`, plus
`cls.predictions.*`). Old TF-converted names (`gamma`/`beta`) are accepted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class WeightLoadReport:
    """What `from_bert` did: which of our parameters came from the checkpoint and which start fresh."""

    source: str
    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    # Tables loaded in part: BERT brings segment rows A and B, segment C starts fresh.
    fresh_rows: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def short(names: list[str]) -> str:
            return ", ".join(names[:8]) + (f", ... (+{len(names) - 8})" if len(names) > 8 else "")

        return (f"weights from {self.source}: {len(self.loaded)} tensors loaded; "
                f"{len(self.fresh)} start fresh [{short(self.fresh)}]; "
                f"{len(self.unused)} checkpoint tensors unused [{short(self.unused)}]")


def read_bert_folder(folder: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """Return (config.json as dict, state dict) of a Hugging Face BERT folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"BERT folder not found: {folder}")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}")
    config = json.loads(config_path.read_text())
    if config.get("model_type", "bert") != "bert":
        raise ValueError(f"{folder}: model_type {config.get('model_type')!r} is not a BERT checkpoint")
    safetensors_path, bin_path = folder / "model.safetensors", folder / "pytorch_model.bin"
    if safetensors_path.is_file():
        from safetensors.torch import load_file

        state = load_file(str(safetensors_path))
    elif bin_path.is_file():
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    return config, state


def _normalise_bert_key(key: str) -> str:
    key = key.removeprefix("bert.")
    return key.replace(".gamma", ".weight").replace(".beta", ".bias")


def bert_key_to_ours(key: str) -> str | None:
    """Map a (normalised) Hugging Face BERT key to our parameter name, or None if we have no use for it."""
    if key.startswith(("embeddings.word_embeddings.", "embeddings.position_embeddings.",
                       "embeddings.LayerNorm.", "embeddings.token_type_embeddings.", "encoder.", "pooler.")):
        return key
    if key.startswith("cls.predictions.transform."):
        return "mlm_head.transform." + key.removeprefix("cls.predictions.transform.")
    if key in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
        return "mlm_head.bias"
    return None


def load_bert_weights(model: nn.Module, state: dict[str, Tensor], prefix: str, source: str) -> WeightLoadReport:
    """Copy BERT tensors into `model` (whose BERT part lives under `prefix`, '' or 'vlbert.').

    BERT's segment table has 2 rows (A, B); ours has 3: rows 0-1 are copied, row C keeps its
    normal(0.02) init, as the official `load_language_pretrained_model` does.
    """
    ours = dict(model.named_parameters())
    report = WeightLoadReport(source=source)
    for raw_key, value in state.items():
        key = _normalise_bert_key(raw_key)
        if key == "embeddings.position_ids" or key == "cls.predictions.decoder.weight":
            continue  # a buffer, and the tied alias of the word embeddings
        target = bert_key_to_ours(key)
        name = None if target is None else (target if target.startswith("mlm_head.") else prefix + target)
        if name is None or name not in ours:
            report.unused.append(raw_key)
            continue
        param = ours[name]
        with torch.no_grad():
            if name.endswith("token_type_embeddings.weight") and value.shape[0] < param.shape[0]:
                param[: value.shape[0]].copy_(value)
                report.fresh_rows.append(f"{name}[{value.shape[0]}:]")
            elif value.shape != param.shape:
                raise ValueError(f"{source}: {raw_key} has shape {tuple(value.shape)}, our {name} has "
                                 f"{tuple(param.shape)}; the config does not match the checkpoint")
            else:
                param.copy_(value)
        report.loaded.append(name)
    loaded = set(report.loaded)
    report.fresh = report.fresh_rows + [n for n in ours if n not in loaded]
    log.info(report.summary())
    return report


def save_weights(model: nn.Module, folder: str | Path, skip: tuple[str, ...] = ()) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in skip}
    save_file(state, str(Path(folder) / WEIGHTS_NAME), metadata={"format": "pt", "producer": "vlbert_ds"})


def load_weights(model: nn.Module, folder: str | Path, allowed_missing: tuple[str, ...] = ()) -> None:
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}")
    result = model.load_state_dict(load_file(str(path)), strict=False)
    missing = [k for k in result.missing_keys if k not in allowed_missing]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path} does not match the model: missing {missing[:8]}, "
                         f"unexpected {result.unexpected_keys[:8]}")


def load_renamed_state(model: nn.Module, state: dict[str, Tensor], renames: list[tuple[str, str]],
                       source: str) -> WeightLoadReport:
    """Copy `state` tensors whose name starts with a checkpoint prefix into our `(ours, theirs)` prefix.

    Non-strict in the way fine-tuning needs (the official `smart_partial_load_model_state_dict`):
    heads the checkpoint lacks start fresh and are reported; a shape mismatch is an error.
    """
    ours = dict(model.named_parameters())
    report = WeightLoadReport(source=source)
    for key, value in state.items():
        name = next((mine + key[len(theirs):] for mine, theirs in renames if key.startswith(theirs)), None)
        if name is None or name not in ours:
            report.unused.append(key)
            continue
        if value.shape != ours[name].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, our {name} has "
                             f"{tuple(ours[name].shape)}; the config does not match the checkpoint")
        with torch.no_grad():
            ours[name].copy_(value)
        report.loaded.append(name)
    loaded = set(report.loaded)
    report.fresh = [n for n in ours if n not in loaded]
    log.info(report.summary())
    return report


def load_weights_state(model: nn.Module, folder: str | Path, renames: list[tuple[str, str]]) -> WeightLoadReport:
    """`load_renamed_state` from a save_pretrained folder's safetensors file."""
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}")
    return load_renamed_state(model, load_file(str(path)), renames, str(folder))
