"""The error vqim raises for a user's mistake: bad input, a bad flag, a file that cannot be used.

`InputError` is a `ValueError`, so code that already catches `ValueError` keeps working. Its message names
the file or flag and says what to do; the CLI prints it as one line `error: ...` and exits with status 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """A user's input (file, folder, flag or value) that vqim cannot use; the message says why and what to do."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_settings(
    cfg: Any,
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    unit: tuple[str, ...] = (),
) -> None:
    """Refuse settings of a config dataclass outside their range, naming the flag: `positive` > 0,
    `non_negative` >= 0, `unit` in [0, 1]. None (not given) is allowed; NaN is outside every range."""
    rules = [(positive, lambda v: v > 0, "a positive number"), (non_negative, lambda v: v >= 0, ">= 0"),
             (unit, lambda v: 0 <= v <= 1, "in [0, 1]")]  # fmt: skip
    for names, ok, what in rules:
        for name in names:
            v = getattr(cfg, name)
            if v is not None and not ok(v):
                raise InputError(f"{_flag(name)} must be {what}, got {v}")


def check_output(path: str | os.PathLike | None, flag: str = "--out") -> None:
    """Refuse an output folder that is an existing file (checked before any work is done)."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise InputError(f"{flag} {path} is a file, not a folder: choose a folder for the outputs")


def output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """The output folder, created if needed; an existing file or an uncreatable path is an InputError."""
    check_output(path, flag)
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot create the folder ({e.strerror or e})") from e
    return p
