"""Reading weight files without running any code in them.

* `.safetensors`: read as is.
* `.pth` / `.pt` / `.bin` / `.model` (torch pickles): `torch.load(weights_only=True)`, which admits
  only tensors and plain containers.
* `.pkl` / `.pickle` (detectron2-style model-zoo files, as the public bottom-up-attention ports ship:
  `{"model": {name: numpy array}, "__author__": ...}`): a restricted unpickler that admits only what
  numpy arrays and plain containers are made of. Anything else a pickle names (`os.system`,
  `builtins.eval`, ...) is refused before it is looked up, so it never runs.

A truncated or corrupt file is reported as such, not as unsafe; a file that names a forbidden
global is reported as unsafe, naming it.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

# (module, name) pairs a numpy-array pickle needs; nothing here can run arbitrary code.
NUMPY_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 2 era pickles carry array bytes (latin-1 text -> bytes)
    ("collections", "OrderedDict"),
})
PICKLE_SUFFIXES = (".pkl", ".pickle")


class UnsafeWeightsError(ValueError):
    """The file asks to run code (a global outside the allowed set) when loaded; it was not run."""


class CorruptWeightsError(ValueError):
    """The file is truncated or not a weights file of its kind."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def __init__(self, handle, source: str) -> None:
        super().__init__(handle)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in NUMPY_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeWeightsError(f"{self.source}: refusing to load: the pickle calls {module}.{name}, which is not "
                                 "part of a numpy array or a plain container (a weights file never needs it)")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeWeightsError(f"{self.source}: refusing to load: the pickle uses persistent ids (a torch file? "
                                 "give it a .pth name)")


def load_numpy_pickle(path: str | Path) -> Any:
    """Unpickle a file that may hold only numpy arrays, numbers, strings and dicts/lists/tuples."""
    data = Path(path).read_bytes()
    try:
        return _ArraysOnlyUnpickler(io.BytesIO(data), str(path)).load()
    except UnsafeWeightsError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError) as err:
        raise CorruptWeightsError(f"{path}: truncated or not a pickle of arrays ({type(err).__name__}: {err})") from err


def _state_from(obj: Any, source: str) -> dict[str, Tensor]:
    """The tensor dict inside a loaded file: itself, or its "model" / "state_dict" entry."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CorruptWeightsError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    state: dict[str, Tensor] = {}
    for name, value in obj.items():
        if isinstance(value, np.ndarray):
            state[str(name)] = torch.from_numpy(np.ascontiguousarray(value).copy())
        elif isinstance(value, Tensor):
            state[str(name)] = value
    if not state:
        raise CorruptWeightsError(f"{source}: holds no tensors")
    return state


def read_weight_file(path: str | Path) -> dict[str, Tensor]:
    """A name -> tensor dict from a safetensors, torch or numpy-pickle file, never running code in it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CorruptWeightsError(f"{path}: truncated or not a safetensors file ({err})") from err
    if suffix in PICKLE_SUFFIXES:
        return _state_from(load_numpy_pickle(path), str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err) or "weights_only" in str(err).lower():
            raise UnsafeWeightsError(f"{path}: refusing to load: it holds objects other than tensors "
                                     f"({str(err).splitlines()[0]})") from err
        raise CorruptWeightsError(f"{path}: truncated or not a torch file ({err})") from err
    except (EOFError, RuntimeError, ValueError, OSError) as err:
        raise CorruptWeightsError(f"{path}: truncated or not a torch file ({type(err).__name__}: {err})") from err
    return _state_from(obj, str(path))


def convert_to_safetensors(source: str | Path, target: str | Path) -> dict[str, Tensor]:
    """Write a weights file's tensors, names unchanged, as safetensors (a one-time, code-free conversion)."""
    from safetensors.torch import save_file

    state = {name: t.detach().contiguous() for name, t in read_weight_file(source).items()}
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target), metadata={"converted_from": Path(source).name})
    return state
