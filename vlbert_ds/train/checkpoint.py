"""Checkpoints that never leave `latest` pointing at a partial save, and carry everything to resume.

Layout of `<dir>`: one folder per tag (`step00000200/`) with DeepSpeed's files (all ranks call
`save_checkpoint`), our `rng_rank{r}.pt` per rank, `model_config.json`, and `COMPLETE` written by
rank 0 after a barrier once every rank has finished. Only then is `latest` replaced (temporary file
+ rename), and old tags beyond `keep` are deleted. DeepSpeed's own `latest` write (open + write)
could be cut in half by a crash; ours cannot. A tag without `COMPLETE` is ignored.

The DeepSpeed `client_state` carries the data position (epoch, micro-batches consumed in it), the
global step, samples seen, the MLflow run id and the loss history for the final plot.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

COMPLETE = "COMPLETE"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    with open(tmp) as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, directory: str, keep: int, rank: int,
                 before_commit: Callable[[int], None] | None = None) -> None:
        self.directory = Path(directory)
        self.keep, self.rank = keep, rank
        self.before_commit = before_commit

    # ------------------------------------------------------------------ reading
    def complete_tags(self) -> list[str]:
        """Complete regular tags, oldest first (universal conversions are not tags of their own)."""
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir()
                      if p.is_dir() and (p / COMPLETE).is_file() and not p.name.endswith("_universal"))

    def latest_tag(self) -> str | None:
        """The tag `latest` names if that save is complete, else the newest complete tag."""
        pointer = self.directory / LATEST
        if pointer.is_file():
            tag = pointer.read_text().strip()
            if tag and (self.directory / tag / COMPLETE).is_file():
                return tag
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def model_config(self, tag: str) -> dict[str, Any] | None:
        path = self.directory / tag / "model_config.json"
        return json.loads(path.read_text()) if path.is_file() else None

    # ------------------------------------------------------------------ writing
    def save(self, engine, step: int, client_state: dict[str, Any], model_config: dict[str, Any]) -> str:
        import torch.distributed as dist

        if not weights_finite(engine):
            raise FloatingPointError(f"step {step}: the weights hold NaN or Inf; refusing to write a checkpoint "
                                     f"(latest stays {self.latest_tag()})")
        tag = tag_for(step)
        self.directory.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        folder = self.directory / tag
        torch.save(rng_state(), folder / f"rng_rank{self.rank}.pt")
        if self.before_commit is not None:  # fault injection: a crash between the files and COMPLETE
            self.before_commit(step)
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            (folder / "model_config.json").write_text(json.dumps(model_config, indent=1, sort_keys=True))
            _write_atomic(folder / COMPLETE, json.dumps({"step": step}))
            _write_atomic(self.directory / LATEST, tag)
            self._prune(keep_tag=tag)
        if dist.is_initialized():
            dist.barrier()
        return tag

    def _prune(self, keep_tag: str) -> None:
        tags = self.complete_tags()
        for tag in tags[: max(0, len(tags) - self.keep)]:
            if tag != keep_tag:
                shutil.rmtree(self.directory / tag, ignore_errors=True)
                shutil.rmtree(self.directory / f"{tag}_universal", ignore_errors=True)
        for path in self.directory.iterdir():  # partial saves from a crash: no COMPLETE, older than latest
            if path.is_dir() and not (path / COMPLETE).is_file() and path.name < keep_tag \
                    and not path.name.endswith("_universal"):
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ resuming
    def universal_tag(self, tag: str) -> str:
        """Convert `tag` to a DeepSpeed universal checkpoint (once, on rank 0) and return the new tag.

        A universal checkpoint stores each parameter's fp32 weights and optimizer state unpartitioned,
        so it loads on any number of ranks (`deepspeed.checkpoint.ds_to_universal`).
        """
        import argparse

        import torch.distributed as dist

        target = self.directory / f"{tag}_universal"
        if self.rank == 0 and not (target / COMPLETE).is_file():
            from deepspeed.checkpoint import ds_to_universal

            shutil.rmtree(target, ignore_errors=True)
            ds_to_universal.main(argparse.Namespace(
                input_folder=str(self.directory / tag), output_folder=str(target), num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
            shutil.copy2(self.directory / tag / "model_config.json", target / "model_config.json")
            _write_atomic(target / COMPLETE, json.dumps({"universal_of": tag}))
        if dist.is_initialized():
            dist.barrier()
        return target.name

    def load(self, engine, tag: str, load_universal: bool = False, verify: bool = True) -> dict[str, Any]:
        if verify:
            verify_safe_to_load(self.directory / tag)
        path, client_state = engine.load_checkpoint(str(self.directory), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.directory / tag}")
        rng_file = self.directory / tag / f"rng_rank{self.rank}.pt"
        if rng_file.is_file() and not load_universal:
            set_rng_state(torch.load(rng_file, weights_only=True))
        return client_state or {}


# Plain-data DeepSpeed classes its checkpoints pickle (the loss scaler of the optimizer state);
# allowed by name for the weights-only check below. Anything else is refused.
SAFE_DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                          "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                          "deepspeed.runtime.zero.config.ZeroStageEnum",
                          "deepspeed.utils.tensor_fragment.fragment_address")


def verify_safe_to_load(folder: Path) -> None:
    """Open every `.pt` of a checkpoint with `weights_only=True` before DeepSpeed unpickles it fully.

    DeepSpeed's loader calls `torch.load(weights_only=False)`, which runs whatever a pickle names; a
    checkpoint folder from someone else could run code on resume. The weights-only unpickler allows
    tensors, containers and the few DeepSpeed data classes above, and raises on anything else, so a
    crafted file is refused here without being executed.
    """
    import importlib
    import pickle

    allowed = []
    for dotted in SAFE_DEEPSPEED_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    with torch.serialization.safe_globals(allowed):
        for path in sorted(Path(folder).glob("*.pt")):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except (pickle.UnpicklingError, RuntimeError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                detail = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line),
                              first)
                raise ValueError(f"refusing to resume from {path}: it is not loadable as plain weights ({detail}); "
                                 "resume only from checkpoints you wrote") from err


def weights_finite(engine) -> bool:
    """Whether every rank's weights are finite (ZeRO-3 checks each rank's own partition)."""
    import torch.distributed as dist

    bad = 0.0
    with torch.no_grad():
        for param in engine.module.parameters():
            local = getattr(param, "ds_tensor", None)  # ZeRO-3 partition
            tensor = local if local is not None and param.numel() == 0 else param
            if tensor.numel() and not bool(torch.isfinite(tensor).all()):
                bad = 1.0
                break
    flag = torch.tensor([bad], device=engine.device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() == 0)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_same_model(saved: dict[str, Any] | None, current: dict[str, Any], where: str) -> None:
    """Refuse to resume a checkpoint of another model size before DeepSpeed meets mismatched shapes."""
    if saved is None:
        return
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
            "visual_front_end", "num_region_classes", "backbone", "precomputed_feature_dim")
    diff = {k: (saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {where} is of another model ({shown}); point checkpoint.dir elsewhere "
                         f"or set checkpoint.resume=false")


def export_pretrained(checkpoint_dir: str, tag: str, model_class, model_config, out: str) -> None:
    """Consolidate ZeRO shards into fp32 weights and write our `save_pretrained` format (rank 0)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    model = model_class(model_config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in model.tied_keys]
    if missing or unexpected:
        raise RuntimeError(f"export: state dict does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.save_pretrained(out)
