"""Reading the tensors of a pickled checkpoint (Lightning `.ckpt`, PyTorch `.pt`/`.pth`) without running its code.

A pickle can name any Python callable and have it called while loading (`os.system`, ...). vqim reads such files
in two ways, neither of which calls anything from the file:

1. `torch.load(weights_only=True)`: PyTorch's restricted unpickler, which allows tensors and plain containers.
2. Where (1) refuses the file (released Lightning checkpoints hold hyper-parameter objects, e.g. an
   `argparse.Namespace` or OmegaConf containers, beside the weights), a restricted unpickler that rebuilds
   tensors and plain containers and turns every other global into an inert `Placeholder` recording its name:
   calling, constructing or setting the state of a placeholder only stores the arguments.

What cannot be read this way (a damaged file, a legacy non-zip pickle with storages it cannot rebuild) is refused
with an `InputError` naming the file.
"""

from __future__ import annotations

import functools
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from vqim.errors import InputError

# Globals a checkpoint's tensors and containers need; everything else becomes a Placeholder.
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "dtype"),
}


class Placeholder:
    """An object of a class the checkpoint names but vqim does not load: it records, never runs."""

    _vqim_global = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:
        return type(self)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<not loaded: {self._vqim_global}>"


def _placeholder(module: str, name: str) -> type:
    return type(f"Placeholder[{module}.{name}]", (Placeholder,), {"_vqim_global": f"{module}.{name}"})


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if "." in name or (module, name) not in _ALLOWED:  # dotted names reach attributes: never resolved
            return _placeholder(module, name)
        real = super().find_class(module, name)
        # A fresh wrapper per lookup: pickle's BUILD opcode sets attributes on what find_class returns, and must
        # not reach torch's own functions and classes (their attributes persist in the process).
        return functools.partial(real)


class _RestrictedPickle:
    """A `pickle_module` for torch.load whose Unpickler never imports or calls what the file names."""

    Unpickler = _Unpickler
    load = staticmethod(lambda f, **kw: _Unpickler(f, **kw).load())
    __name__ = "vqim_restricted_pickle"


def _torch_legacy(path: Path) -> bool:
    """Whether a non-zip file starts with the pickled magic number of torch.save's legacy format."""
    try:
        with open(path, "rb") as f:
            return _Unpickler(f).load() == 0x1950A86A20F9469CFC6C
    except Exception:  # noqa: BLE001 - not that format
        return False


def load_checkpoint(path: str | os.PathLike, flag: str = "--checkpoint") -> Any:
    """The contents of a pickled checkpoint, with tensors as tensors and unknown objects as placeholders."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: file not found")
    torch_format = zipfile.is_zipfile(path) or _torch_legacy(path)
    try:
        if not torch_format:  # a bare pickle, not torch.save's format
            with open(path, "rb") as f:
                return _Unpickler(f).load()
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            pass  # objects beside the tensors: read again with placeholders for them
        if not zipfile.is_zipfile(path):  # torch's legacy loader acts on what the file names
            raise InputError(
                f"{flag} {path}: a legacy (pre-1.6) PyTorch file holding objects besides tensors; vqim reads such "
                f"files only when they hold tensors alone: re-save it with a current PyTorch"
            )
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickle)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - anything the restricted reader cannot rebuild is refused
        raise InputError(
            f"{flag} {path}: cannot be read without running code from it, or is damaged ({type(e).__name__}: "
            f"{e}); export its tensors to .safetensors with the software that wrote it"
        ) from None


def state_dict_of(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat name → tensor dict of a loaded checkpoint: Lightning's "state_dict", LlamaGen's "model", or the
    object itself."""
    sd = None
    if isinstance(obj, dict):
        sd = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), obj)
    if not isinstance(sd, dict):
        raise InputError(
            f"{path}: no state dict found (expected a dict of tensors, or one under 'state_dict')"
        )
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError(f"{path}: the state dict holds no tensors")
    return tensors
