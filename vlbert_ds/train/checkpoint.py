"""Checkpoints that never leave `latest` pointing at a partial or damaged save, and carry everything to resume.

Layout of `<dir>`: one folder per tag (`step00000200/`) with DeepSpeed's files (all ranks call
`save_checkpoint`), our `rng_rank{r}.pt` per rank, `model_config.json`, `run_config.json` (the run
config it was written under, credentials masked), and `COMPLETE` written by rank 0 once every rank
has finished, holding the size and SHA-256 of every file (the ranks hash it in shares). Only then is
`latest` replaced (temporary file + rename), and old tags beyond `keep` are deleted (their `COMPLETE`
first). DeepSpeed's own `latest` write (open + write) could be cut in half by a crash; ours cannot.
A tag without `COMPLETE` is ignored; on resume a tag whose files do not match their checksums, or
whose weights are not finite, is passed over for the newest older one that is whole. A save that does
not fit on the disk is removed and reported as such (`CheckpointDiskFull`).

The DeepSpeed `client_state` carries the data stream's position (its `state_dict()`), the global step,
samples seen, the MLflow run id and the loss history for the final plot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
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


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder, its COMPLETE marker first: a deletion cut short never leaves a folder
    that claims to be complete."""
    (folder / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


class CorruptCheckpoint(ValueError):
    """A checkpoint's files are not what was written (missing, truncated, changed)."""


class CheckpointDiskFull(OSError):
    """A checkpoint did not fit on its filesystem (the partial save was removed)."""


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _looks_like_no_space(err: BaseException, folder: Path) -> bool:
    """torch.save reports ENOSPC as 'basic_ios::clear: iostream error' or 'file write failed'."""
    if isinstance(err, OSError) and err.errno == 28:
        return True
    text = str(err)
    if "No space left" in text or "iostream error" in text or "file write failed" in text:
        return True
    try:
        return shutil.disk_usage(folder if folder.exists() else folder.parent).free < 16 * 2**20
    except OSError:
        return False


class CheckpointManager:
    def __init__(self, directory: str, keep: int, rank: int,
                 before_commit: Callable[[int], None] | None = None, prune_before_save: bool = False) -> None:
        self.directory = Path(directory)
        self.keep, self.rank = keep, rank
        self.before_commit = before_commit
        self.prune_before_save = prune_before_save

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

    def run_config(self, tag: str) -> dict[str, Any] | None:
        """The run config the checkpoint was written under (credentials masked); None before it was saved."""
        path = self.directory / tag / "run_config.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def data_position(self, tag: str) -> dict[str, Any] | None:
        """The global data position saved with the checkpoint (readable before any engine is built)."""
        path = self.directory / tag / "data_position.json"
        return json.loads(path.read_text()) if path.is_file() else None

    # ------------------------------------------------------------------ writing
    def save(self, engine, step: int, client_state: dict[str, Any], model_config: dict[str, Any],
             run_config: dict[str, Any] | None = None, data_position: dict[str, Any] | None = None) -> str:
        import torch.distributed as dist

        if not weights_finite(engine):
            raise FloatingPointError(f"step {step}: the weights hold NaN or Inf; refusing to write a checkpoint "
                                     f"(latest stays {self.latest_tag()})")
        tag = tag_for(step)
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.prune_before_save:  # room for the new save first: only keep - 1 old ones stay during it
            if self.rank == 0:
                self._prune(keep_tag=tag, keep=self.keep - 1)
            if dist.is_initialized():
                dist.barrier()
        folder = self.directory / tag
        if self.rank == 0:  # saving over a folder of the same tag (a resume after a damaged one): not complete now
            (folder / COMPLETE).unlink(missing_ok=True)
        failure = None
        try:
            engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
            torch.save(rng_state(), folder / f"rng_rank{self.rank}.pt")
        except (RuntimeError, OSError) as err:
            failure = err
        self._agree_on_save(step, folder, failure)
        if self.before_commit is not None:  # fault injection: a crash between the files and COMPLETE
            self.before_commit(step)
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            (folder / "model_config.json").write_text(json.dumps(model_config, indent=1, sort_keys=True))
            if run_config is not None:
                (folder / "run_config.json").write_text(json.dumps(run_config, indent=1))
            if data_position is not None:
                (folder / "data_position.json").write_text(json.dumps(data_position, indent=1))
        files = self._checksums(folder)  # every rank hashes a share of the files
        if self.rank == 0:
            _write_atomic(folder / COMPLETE, json.dumps({"step": step, "files": files}, indent=1))
            _write_atomic(self.directory / LATEST, tag)
            self._prune(keep_tag=tag)
        if dist.is_initialized():
            dist.barrier()
        return tag

    def _checksums(self, folder: Path) -> dict[str, dict[str, Any]]:
        """{file name: {size, sha256}} of the folder, hashed in shares over the ranks (one all_gather)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # every file is written
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != COMPLETE)
        world = dist.get_world_size() if dist.is_initialized() else 1
        mine = {}
        for name in names[self.rank :: world]:
            with open(folder / name, "rb") as handle:
                mine[name] = {"size": (folder / name).stat().st_size,
                              "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}
        if not dist.is_initialized():
            return mine
        shares: list[dict[str, Any]] = [{} for _ in range(world)]
        dist.all_gather_object(shares, mine)
        return {k: v for share in shares for k, v in sorted(share.items())}

    def verify(self, tag: str) -> str | None:
        """Why the checkpoint cannot be used (a file missing, truncated or changed since it was written),
        or None. Every rank checks a share and every rank gets the same answer."""
        import torch.distributed as dist

        folder = self.directory / tag
        try:
            recorded = json.loads((folder / COMPLETE).read_text()).get("files")
        except (OSError, ValueError) as err:
            return f"its {COMPLETE} marker is unreadable ({err})"
        problems: list[str] = []
        if recorded is not None:  # (checkpoints of earlier versions carry no checksums)
            world = dist.get_world_size() if dist.is_initialized() else 1
            for name in sorted(recorded)[self.rank :: world]:
                path, want = folder / name, recorded[name]
                if not path.is_file():
                    problems.append(f"{name} is missing")
                elif path.stat().st_size != want["size"]:
                    problems.append(f"{name} is {path.stat().st_size} bytes, {want['size']} when written (truncated?)")
                else:
                    with open(path, "rb") as handle:
                        if hashlib.file_digest(handle, "sha256").hexdigest() != want["sha256"]:
                            problems.append(f"{name} changed since it was written (checksum mismatch)")
        if dist.is_initialized():
            every: list[list[str]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(every, problems)
            problems = [p for share in every for p in share]
        return "; ".join(problems) if problems else None

    def _agree_on_save(self, step: int, folder: Path, failure: BaseException | None) -> None:
        """Every rank learns whether every rank wrote its files; if one did not, the partial folder goes and
        every rank raises (a full disk says so, with what a checkpoint needs)."""
        import torch.distributed as dist

        flags = torch.tensor([1.0 if failure else 0.0, 1.0 if failure and _looks_like_no_space(failure, folder)
                              else 0.0], device=torch.device("cuda") if torch.cuda.is_available() else "cpu")
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0].item() == 0:
            return
        if self.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        previous = self.latest_tag()
        if flags[1].item() == 0:
            raise RuntimeError(f"step {step}: saving the checkpoint failed"
                               + (f" on this rank: {failure}" if failure else " on another rank")
                               + f"; the partial save was removed, latest stays {previous}")
        usage = shutil.disk_usage(self.directory)
        need = _folder_bytes(self.directory / previous) if previous else None
        raise CheckpointDiskFull(
            28, f"no space left on {self.directory} for the checkpoint of step {step} ({usage.free / 2**20:.0f} MiB "
                f"free of {usage.total / 2**20:.0f} MiB"
                + (f"; a checkpoint of this run takes {need / 2**20:.0f} MiB" if need else "")
                + f"). The partial save was removed; latest stays {previous}. Free space, move checkpoint.dir, "
                  "lower checkpoint.keep, or set checkpoint.prune_before_save=true")

    def _prune(self, keep_tag: str, keep: int | None = None) -> None:
        keep = self.keep if keep is None else keep
        tags = self.complete_tags()
        for tag in tags[: max(0, len(tags) - keep)]:
            if tag != keep_tag:
                _remove(self.directory / tag)
                _remove(self.directory / f"{tag}_universal")
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

    def load_newest_usable(self, engine, model_config: dict[str, Any],
                           load_universal: bool = False) -> tuple[str, dict[str, Any]]:
        """Load `latest`, or, when it is damaged (a file missing, truncated or changed; weights not finite),
        the newest older complete checkpoint that is not, with a warning. Returns (tag, client state)."""
        latest = self.latest_tag()
        candidates = [latest, *reversed([t for t in self.complete_tags() if t < latest])]
        reasons = []
        for tag in candidates:
            problem = self.verify(tag)
            if problem is None:
                check_same_model(self.model_config(tag), model_config, str(self.directory / tag))
                loaded = self.universal_tag(tag) if load_universal else tag
                try:
                    client_state = self.load(engine, loaded, load_universal)
                    if weights_finite(engine):
                        return loaded, client_state
                    problem = "its weights hold NaN or Inf"
                except CorruptCheckpoint as err:
                    problem = str(err)
            reasons.append(f"{tag}: {problem}")
            log.warning("checkpoint %s cannot be used (%s); trying an older one", tag, problem)
            if self.rank == 0:
                print(f"checkpoint {tag} cannot be used: {problem}; trying an older one", flush=True)
        raise ValueError(f"no usable checkpoint in {self.directory} ({'; '.join(reasons)}); move the folder away "
                         "to start afresh, or set checkpoint.resume=false")

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
    import zipfile

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
            except (EOFError, OSError, zipfile.BadZipFile) as err:
                raise CorruptCheckpoint(f"{path} is damaged ({type(err).__name__}: {err})") from err
            except (pickle.UnpicklingError, RuntimeError) as err:
                if "Unsupported global" not in str(err) and "weights_only" not in str(err).lower():
                    raise CorruptCheckpoint(f"{path} is damaged or truncated ({str(err).strip().splitlines()[0]})"
                                            ) from err
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
