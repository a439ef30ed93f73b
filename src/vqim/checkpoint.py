"""Checkpoint files: weights in safetensors, configuration in JSON, every write atomic.

A file is written beside its destination under a temporary name, flushed to disk, then moved into place
with `os.replace`, so a reader never sees half a file, even if the writer is killed. `PretrainedMixin` gives
a model with a config dataclass `save_pretrained` / `from_pretrained` in that layout (`config.json` +
`model.safetensors`) and a `fingerprint()` that identifies its weights and configuration.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file, save_file

from vqim.errors import InputError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"  # the training run's average of the weights (`--ema-decay`), when it kept one


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


def json_safe(obj: Any) -> Any:
    """obj with every non-finite float replaced by null, so that it is valid JSON (which has no NaN).

    In a dict, a key whose value was NaN or ±inf also gets `<key>_not_finite` saying which ("nan", "inf",
    "-inf"), so a reader sees why the value is missing.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        out: dict[Any, Any] = {}
        for k, v in obj.items():
            out[k] = json_safe(v)
            if isinstance(v, float) and not math.isfinite(v):
                out[f"{k}_not_finite"] = str(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of obj (non-finite floats become null, see `json_safe`), keys sorted."""
    return json.dumps(json_safe(obj), indent=indent, sort_keys=True, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write obj as indented, strict JSON (non-finite floats as null plus a reason), atomically."""
    text = dumps(obj) + "\n"

    def _w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, _w)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path} is not valid JSON: {e}") from e


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """read_json, refusing anything but a JSON object."""
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise InputError(f"{what} {path} is not a JSON object (found a {type(obj).__name__})")
    return obj


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    """Save a flat dict of tensors as safetensors, atomically."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file (never unpickles); a damaged file is an `InputError` naming it."""
    from safetensors import SafetensorError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    dev = torch.device(device)
    try:
        # safetensors accepts "cpu" but not "cpu:0" (what torch.device("cpu", 0) and Accelerate's CPU state print).
        return load_file(str(path), device="cpu" if dev.type == "cpu" else str(dev))
    except (SafetensorError, OSError, ValueError) as e:
        size = path.stat().st_size
        raise InputError(
            f"{path} is not a readable safetensors file ({size} bytes; {e}): it is damaged or incomplete, "
            f"write it again (save_pretrained) or copy it again"
        ) from e


def load_weights(path: str | os.PathLike, flag: str) -> dict[str, torch.Tensor]:
    """A flat dict of tensors from a .safetensors file or a PyTorch .pth/.pt file of tensors only.

    A .pth is read with `torch.load(weights_only=True)`: nothing in the file is executed. A file holding other
    objects (a pickled model, an optimizer) or a damaged one is an `InputError` naming the flag and the file.
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: file not found")
    if path.suffix == ".safetensors":
        return load_tensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise InputError(
            f"{flag} {path}: not a file of tensors that can be read safely ({type(e).__name__}); vqim never "
            f"runs code from a weight file: save the tensors alone (torch.save(model.state_dict(), F)) or as "
            f".safetensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(
            f"{flag} {path}: expected a dict of named tensors (a state dict), found {type(state).__name__}"
        )
    return state


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
    cfg = read_json_object(directory / CONFIG_NAME, what=f"{kind} config")
    found = cfg.get("vqim_type")
    if found != kind:
        raise InputError(f"{directory / CONFIG_NAME} describes a {found!r} checkpoint, not a {kind!r}")
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

    def save_pretrained(
        self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write `config.json` and `model.safetensors` into directory (atomically, file by file); a weight average
        left there by an earlier model is removed, so it cannot be loaded in place of these weights.

        Args:
            directory: the folder to write.
            state_dict: the weights to write (default: this module's `state_dict()`); a sharded model passes its
                gathered full state dict.
        """
        weights = self.state_dict() if state_dict is None else state_dict
        save_model_dir(directory, self.checkpoint_kind, self.config.to_dict(), weights)
        (Path(directory) / EMA_NAME).unlink(missing_ok=True)
        self.pretrained_dir = Path(directory)

    @classmethod
    def from_pretrained(
        cls: type[M],
        directory: str | os.PathLike,
        device: str | torch.device = "cpu",
        ema: bool | None = None,
    ) -> M:
        """Load a model written by `save_pretrained` (safetensors + JSON; nothing is unpickled), in eval mode.

        Args:
            directory: the folder holding config.json and model.safetensors.
            device: where to put the weights ("auto": CUDA when available).
            ema: load the weight average `ema.safetensors` a training run with `--ema-decay` wrote beside the
                weights: None (default) when it is there, True (required), False (the raw weights).
        """
        device = resolve_device(device)
        cfg, state = load_model_dir(directory, cls.checkpoint_kind, device)
        ema_file = Path(directory) / EMA_NAME
        if ema is True and not ema_file.is_file():
            raise FileNotFoundError(
                f"no weight average in {directory}: {EMA_NAME} is missing (train with --ema-decay)"
            )
        if ema is not False and ema_file.is_file():
            state = load_tensors(ema_file, device)
        model = cls.build_checked(cls.config_from_file(cfg, Path(directory) / CONFIG_NAME), state, directory)
        model = model.to(device)
        model.load_state_dict(state)
        model.pretrained_dir = Path(directory)
        return model.eval()

    @classmethod
    def config_from_file(cls, d: dict[str, Any], path: Path) -> Any:
        """The config dataclass from a config file's dict; a wrong key, type or value names the file."""
        try:
            return cls.config_class.from_dict(d)
        except (TypeError, ValueError, AttributeError) as e:
            raise InputError(f"{path}: {' '.join(str(e).split())}") from e

    @classmethod
    def build_checked(
        cls: type[M], config: Any, state: dict[str, torch.Tensor], directory: Any, source: str | None = None
    ) -> M:
        """The model of config, after checking on the meta device (no memory) that its parameters have the
        names and shapes of the weights in state: a config that does not match its weights, or asks for an
        absurd size, is refused before anything is allocated. `source` names where config and state came from
        when they are not a model folder's two files (a conversion)."""
        with torch.device("meta"):
            try:
                shell = cls(config)
            except (TypeError, ValueError, RuntimeError) as e:
                raise InputError(f"{Path(directory) / CONFIG_NAME}: cannot build the model: {e}") from e
        expected = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        problems = [f"{k} has shape {list(found[k])}, the config needs {list(s)}"
                    for k, s in expected.items() if k in found and found[k] != s]  # fmt: skip
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        if missing:
            problems.append(f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}")
        if extra:
            problems.append(f"unexpected {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}")
        if problems:
            if source is not None:
                raise InputError(f"{source} ({'; '.join(problems[:3])})")
            raise InputError(
                f"{Path(directory) / CONFIG_NAME} does not match the weights in {Path(directory) / WEIGHTS_NAME} "
                f"({'; '.join(problems[:3])}): the two files belong to different models"
            )
        return cls(config)

    def fingerprint(self) -> str:
        """sha256 of the config and the weights (see `vqim.checkpoint.fingerprint`): what identifies a model.

        Computed from the current weights on each call (one pass over them).
        """
        return fingerprint(self.config.to_dict(), self.state_dict())
