"""Checkpoint files: weights in safetensors, configuration in JSON, every write atomic.

A file is written beside its destination under a temporary name, flushed to disk, then moved into place
with `os.replace`, so a reader never sees half a file, even if the writer is killed. `PretrainedMixin` gives
a model with a config dataclass `save_pretrained` / `from_pretrained` in that layout (`config.json` +
`model.safetensors`) and a `fingerprint()` that identifies its weights and configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _proc_umask() -> int | None:
    """The process umask from /proc (no side effects), or None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return None


def _read_umask() -> int:
    """The process umask: from /proc, else by setting and restoring it."""
    mask = _proc_umask()
    if mask is None:
        mask = os.umask(0)
        os.umask(mask)
    return mask


_UMASK = _read_umask()  # fallback where /proc is missing: read once at import, before other threads write


def _file_mode(path: Path) -> int:
    """An existing file's permissions, else what open() would give a new file."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mask = _proc_umask()
        return 0o666 & ~(_UMASK if mask is None else mask)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), then move tmp_path onto path atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates the file owner-only; give it the permissions of the file it replaces, or those an
        # ordinary open() would (umask). Some network file systems refuse chmod: the write still counts.
        try:
            os.chmod(tmp, _file_mode(path))
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write obj as indented JSON, atomically."""

    def _w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, _w)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from e


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    """Save a flat dict of tensors as safetensors, atomically."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file (never unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    dev = torch.device(device)
    # safetensors accepts "cpu" but not "cpu:0" (what torch.device("cpu", 0) and Accelerate's CPU state print).
    return load_file(str(path), device="cpu" if dev.type == "cpu" else str(dev))


def save_model_dir(
    directory: str | os.PathLike, kind: str, config: dict, state: dict[str, torch.Tensor]
) -> None:
    """Write `config.json` and `model.safetensors` into directory (the `save_pretrained` layout)."""
    from vqim import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / WEIGHTS_NAME, state, metadata={"vqim_type": kind})
    write_json(directory / CONFIG_NAME, {"vqim_type": kind, "vqim_version": __version__, **config})


def load_model_dir(
    directory: str | os.PathLike, kind: str, device: str | torch.device = "cpu"
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a `save_pretrained` directory; returns (config dict without vqim_* keys, state dict)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{kind} directory not found: {directory} (expected a folder written by save_pretrained, "
            f"holding {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    cfg = read_json(directory / CONFIG_NAME, what=f"{kind} config")
    found = cfg.get("vqim_type")
    if found != kind:
        raise ValueError(f"{directory} holds a {found!r} checkpoint, not a {kind!r}")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("vqim_")}
    return cfg, load_tensors(directory / WEIGHTS_NAME, device)


def resolve_device(device: str | torch.device) -> torch.device:
    """torch.device(device), with "auto" meaning CUDA when available, else the CPU."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fingerprint(config: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """sha256 (hex) over the config as sorted JSON and every tensor's name, dtype, shape and bytes, by name.

    Two models hash equal only when they compute the same function from the same configuration: the same
    config with other weights (a retrained tokenizer) gives another fingerprint.
    """
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"\0{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


M = TypeVar("M", bound="PretrainedMixin")


class PretrainedMixin:
    """`save_pretrained` / `from_pretrained` / `fingerprint` for an `nn.Module` built from one config dataclass.

    The class sets `checkpoint_kind` (recorded as `vqim_type` in both files and checked on loading) and
    `config_class` (with `to_dict()` and `from_dict()`); the module keeps its config in `self.config` and is
    constructed as `cls(config)`. A loaded model remembers its folder in `pretrained_dir` (for messages).
    """

    checkpoint_kind: ClassVar[str]
    config_class: ClassVar[type]
    pretrained_dir: Path | None = None

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` into directory (atomically, file by file)."""
        save_model_dir(directory, self.checkpoint_kind, self.config.to_dict(), self.state_dict())
        self.pretrained_dir = Path(directory)

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike, device: str | torch.device = "cpu") -> M:
        """Load a model written by `save_pretrained` (safetensors + JSON; nothing is unpickled), in eval mode.

        Args:
            directory: the folder holding config.json and model.safetensors.
            device: where to put the weights ("auto": CUDA when available).
        """
        device = resolve_device(device)
        cfg, state = load_model_dir(directory, cls.checkpoint_kind, device)
        model = cls(cls.config_class.from_dict(cfg)).to(device)
        model.load_state_dict(state)
        model.pretrained_dir = Path(directory)
        return model.eval()

    def fingerprint(self) -> str:
        """sha256 of the config and the weights (see `vqim.checkpoint.fingerprint`): what identifies a model.

        Computed from the current weights on each call (one pass over them).
        """
        return fingerprint(self.config.to_dict(), self.state_dict())
