"""The processes of a run: one, or several under `accelerate launch` / torchrun (GPUs, or CPU with gloo), or
mpirun (CPU, as Accelerate supports it)."""

from __future__ import annotations

import logging
import os
import sys

import torch


def process_state():
    """Accelerate's `PartialState` for this process. Without a GPU it is created with cpu=True, so that the
    processes of a CPU launch join one gloo process group instead of each running alone."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


# Where launchers put the process count and this process's rank: torchrun and `accelerate launch`, then MPI's
# (Accelerate copies those to WORLD_SIZE / RANK only once it starts). The first launcher whose count is set counts.
LAUNCHER_VARS = (
    ("WORLD_SIZE", "RANK"),
    ("PMI_SIZE", "PMI_RANK"),
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"),
)


def _count(name: str) -> int | None:
    """The environment variable `name` as a count or rank; None where unset, negative or not an integer (as
    Accelerate, which reads a negative value as unset; a launch that needs it fails there with its own error)."""
    try:
        value = int(os.environ.get(name, "").strip())
    except ValueError:
        return None
    return value if value >= 0 else None


def _launch() -> tuple[int, int]:
    """(processes, this process's rank) as the launcher set them; (1, 0) when not launched."""
    for size_var, rank_var in LAUNCHER_VARS:
        size = _count(size_var)
        if size is not None:
            return size, _count(rank_var) or 0
    return 1, 0


def launched() -> bool:
    """Whether this process is one of several started by a launcher (`accelerate launch`, torchrun; mpirun)."""
    return _launch()[0] > 1


def first_process() -> bool:
    """Whether this process is the only one, or the first (rank 0) of a launch."""
    size, rank = _launch()
    return size <= 1 or rank == 0


def leave(status: int = 0) -> None:
    """End this process now with `status`, without Python's teardown; for the end of a script run under a
    multi-process launch, once everything it makes is written and closed (the `vqim` commands end this way).

    Once DDP or FSDP has used the process group, PyTorch keeps it alive after `destroy_process_group` (its
    worker threads keep running), and releasing it while the interpreter is being torn down can abort the
    process (`terminate called without an active exception`) after every result was written, which the
    launcher reports as a failed run. The logs and the standard streams are flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:  # C stdio buffers too (native libraries' own output)
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):
        pass
    os._exit(status)
