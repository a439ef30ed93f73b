"""The output folder of a training run: one run per folder, resumed only with its own settings.

- A folder that already holds a run is refused unless the user says `--resume` (continue it) or `--overwrite`
  (replace it). An overwriting run deletes nothing until its own first checkpoint is complete
  (`Replacement`): until then the old run is intact and resumable.
- `--resume` compares the settings given with those the run was started with (`train_config.json`) and
  refuses differences, listed, unless each differing setting is named in `--override` (recorded in
  `train_config.json`); settings that define the model's architecture cannot be overridden.
- Leftovers of a run killed while writing or pruning a checkpoint (`.step-N.partial`, `.step-N.deleting`, a
  step folder without its training state) are removed at the next start (`clean_leftovers`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vqim.errors import InputError
from vqim.train import state as st

log = logging.getLogger(__name__)

# Settings that may change freely when a run is resumed: how long it runs, how it reports and saves, how fast
# it runs. Everything else must match the saved run or be named in --override.
RESUMABLE = frozenset(
    {
        "out", "steps", "resume", "overwrite", "override", "progress", "num_workers", "log_every", "ckpt_every",
        "keep_checkpoints", "max_minutes", "compile", "max_nonfinite", "image_every", "eval_every",
        "mixed_precision", "checkpoint_activations", "fsdp",
    }
)  # fmt: skip


@dataclass
class Replacement:
    """What an `--overwrite` run replaces: the old run's entries (name, inode), deleted at its first checkpoint.

    Entries are identified by inode as well as name, so a file the new run has already written under an old
    name (a sample grid, a TensorBoard file) is not deleted with the old run's.
    """

    out: Path
    entries: list[tuple[Path, int]] = field(default_factory=list)

    def apply(self) -> None:
        """Delete the old run's entries (folders are first renamed aside, so a kill leaves no half folder)."""
        for path, inode in self.entries:
            try:
                if path.lstat().st_ino != inode:
                    continue
            except FileNotFoundError:
                continue
            if path.is_dir() and not path.is_symlink():
                aside = path.with_name(f".{path.name}.deleting")
                os.replace(path, aside)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                path.unlink()
        log.info("replaced the previous run in %s", self.out)


def run_entries(out: Path, outputs: tuple[str, ...]) -> list[Path]:
    """The entries of out that belong to a training run (existing ones among `outputs`)."""
    found = []
    for name in outputs:
        p = out / name
        if name == "checkpoints":
            if p.is_dir() and (st.list_checkpoints(p) or (p / "latest.json").exists()):
                found.append(p)
        elif p.exists():
            found.append(p)
    return found


def check_out(out: Path, outputs: tuple[str, ...], resume: bool, overwrite: bool) -> Replacement | None:
    """Refuse an output folder that cannot take this run; return what an --overwrite run will replace."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder: choose a folder for the run's outputs")
    if resume and overwrite:
        raise InputError("--resume and --overwrite contradict each other: give one")
    held = run_entries(out, outputs)
    if not held or resume:
        return None
    if not overwrite:
        names = ", ".join(p.name for p in held)
        raise InputError(
            f"--out {out} already holds a training run ({names}): pass --resume to continue it, --overwrite to "
            f"replace it (nothing is deleted before the new run's first checkpoint), or choose another --out"
        )
    entries: list[tuple[Path, int]] = []
    for p in held:
        items = list(p.iterdir()) if p.is_dir() and not p.is_symlink() else [p]  # checkpoints/, tb/: content
        for c in items:
            try:
                entries.append((c, c.lstat().st_ino))
            except FileNotFoundError:  # removed meanwhile (the main process cleans leftovers)
                pass
    return Replacement(out, entries)


def clean_leftovers(ckpt_root: Path) -> list[str]:
    """Remove what a killed checkpoint write or prune left under ckpt_root; returns the names removed."""
    if not ckpt_root.is_dir():
        return []
    removed = []
    for p in ckpt_root.iterdir():
        name = p.name
        partial = name.startswith(".step-") and (name.endswith(".partial") or name.endswith(".deleting"))
        incomplete = bool(st.STEP_DIR.match(name)) and p.is_dir() and not st.is_complete(p)
        if p.is_dir() and (partial or incomplete):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(name)
    if removed:
        log.warning(
            "removed incomplete checkpoint folders left by an interrupted run: %s", ", ".join(removed)
        )
    return removed


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def resume_differences(saved: dict[str, Any], given: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Settings given that differ from the saved run's: name → (saved, given). Missing in saved: not compared."""
    diffs = {}
    for k, v in given.items():
        if k in RESUMABLE or k not in saved:
            continue
        a, b = _canonical(saved[k]), _canonical(v)
        if a != b:
            diffs[k] = (a, b)
    return diffs


def check_resume(
    saved: dict[str, Any], given: dict[str, Any], override: list[str], fixed: tuple[str, ...], where: Path
) -> list[dict[str, Any]]:
    """Refuse settings that contradict the saved run unless named in override; return the override records."""
    diffs = resume_differences(saved, given)
    unknown = sorted(set(override) - set(given))
    if unknown:
        raise InputError(
            f"--override names unknown settings: {', '.join(unknown)} (give setting names, e.g. lr)"
        )
    blocked = sorted(k for k in diffs if k in fixed)
    if blocked:
        listed = "; ".join(f"{k}: saved {diffs[k][0]!r}, given {diffs[k][1]!r}" for k in blocked)
        raise InputError(
            f"--resume: {where} was trained with another model ({listed}); the checkpoint's weights have the "
            f"saved architecture, so these cannot be overridden: drop them or start a new run in another --out"
        )
    refused = sorted(k for k in diffs if k not in override)
    if refused:
        listed = "; ".join(
            f"--{k.replace('_', '-')}: saved {diffs[k][0]!r}, given {diffs[k][1]!r}" for k in refused
        )
        raise InputError(
            f"--resume: settings differ from the run in {where} ({listed}); give the saved values, or name the "
            f"settings to change in --override (e.g. --override {' '.join(refused)})"
        )
    return [{"setting": k, "saved": diffs[k][0], "given": diffs[k][1]} for k in sorted(diffs)]
