"""Training-state checkpoints without pickle.

A checkpoint is a folder `step-NNNNNNN/` holding the model in the `save_pretrained` layout plus
`training_state.safetensors` (optimizer moments, extra tensors, RNG states) and `training_state.json`
(step, optimizer hyper-parameters, scheduler state, anything JSON-able). Each process adds its own RNG
file. The folder is written under a temporary name and renamed into place when complete, so a run killed
mid-write leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqim.checkpoint import load_tensors, read_json, save_tensors, write_json

STEP_DIR = re.compile(r"^step-(\d+)$")


def optimizer_to_flat(
    opt: torch.optim.Optimizer | dict[str, Any], prefix: str
) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state dict (or such a dict) into tensors (for safetensors) and JSON-able metadata."""
    sd = opt if isinstance(opt, dict) else opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for name, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{prefix}.state.{pid}.{name}"] = val
            else:
                scalars.setdefault(str(pid), {})[name] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, prefix: str, tensors: dict, meta: dict) -> None:
    opt.load_state_dict(optimizer_state_from_flat(prefix, tensors, meta))


def optimizer_state_from_flat(prefix: str, tensors: dict, meta: dict) -> dict[str, Any]:
    """The optimizer state dict that `optimizer_to_flat` split."""
    state: dict[int, dict[str, Any]] = {}
    head = f"{prefix}.state."
    for key, val in tensors.items():
        if key.startswith(head):
            pid, name = key[len(head) :].split(".", 1)
            state.setdefault(int(pid), {})[name] = val
    for pid, sc in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(sc)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"].cpu())
    if torch.cuda.is_available():
        cuda = [tensors[k].cpu() for k in sorted(k for k in tensors if k.startswith("cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step-{step:07d}"


def tmp_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f".step-{step:07d}.partial"


def write_process_state(directory: Path, rank: int, tensors: dict, meta: dict) -> None:
    save_tensors(directory / f"training_state.rank{rank}.safetensors", tensors)
    write_json(directory / f"training_state.rank{rank}.json", meta)


def read_process_state(directory: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    f = directory / f"training_state.rank{rank}.safetensors"
    if not f.is_file():  # resumed with more processes than saved: take rank 0's RNG (documented)
        rank = 0
    return (
        load_tensors(directory / f"training_state.rank{rank}.safetensors"),
        read_json(directory / f"training_state.rank{rank}.json", "training state"),
    )


def write_shared_state(directory: Path, tensors: dict, meta: dict) -> None:
    save_tensors(directory / "training_state.safetensors", tensors)
    write_json(directory / "training_state.json", meta)


def read_shared_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return (
        load_tensors(directory / "training_state.safetensors"),
        read_json(directory / "training_state.json", "training state"),
    )


def _remove(path: Path) -> None:
    """Delete a checkpoint folder: renamed aside first, so a kill mid-delete leaves no half step folder."""
    aside = path.with_name(f".{path.name}.deleting")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def run_id_of(directory: Path) -> str:
    """The id of the run that wrote a checkpoint ("" for checkpoints written before runs had ids)."""
    try:
        return str(read_json(directory / "training_state.json", "training state").get("run_id", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def commit(root: str | os.PathLike, step: int, keep: int, run_id: str = "") -> Path:
    """Rename the finished temporary folder into place and prune this run's checkpoints beyond `keep`.

    Only checkpoints of the same run (`run_id`) are pruned: a checkpoint of another run is never deleted for
    this one's, whatever their step numbers.
    """
    final, tmp = step_dir(root, step), tmp_dir(root, step)
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    write_json(Path(root) / "latest.json", {"step": step, "path": final.name, "run_id": run_id})
    mine = [p for p in list_checkpoints(root) if run_id_of(p) == run_id]
    for old in mine[:-keep] if keep > 0 else []:
        if old != final:
            _remove(old)
    return final


# A checkpoint folder is complete when it holds all of these (it is renamed into place only then).
COMPLETE = ("training_state.json", "training_state.safetensors", "model.safetensors")


def is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in COMPLETE)


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if is_complete(p)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint `latest.json` names (the last one committed) when complete, else the highest complete."""
    latest = Path(root) / "latest.json"
    if latest.is_file():
        try:
            named = Path(root) / str(read_json(latest, "latest checkpoint")["path"])
        except (ValueError, KeyError, TypeError):
            named = None
        if named is not None and STEP_DIR.match(named.name) and named.is_dir() and is_complete(named):
            return named
    done = list_checkpoints(root)
    return done[-1] if done else None
