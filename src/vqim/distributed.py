"""The processes of a run: one, or several under `accelerate launch` / torchrun (GPUs, or CPU with gloo)."""

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


# Where launchers put the process count and this process's rank (torchrun and `accelerate launch`; MPI's, which
# Accelerate copies to WORLD_SIZE / RANK only once it starts): the first that is set counts.
_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def _launcher_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def launched() -> bool:
    """Whether this process is one of several started by a launcher (`accelerate launch`, torchrun, mpirun)."""
    return _launcher_int(_SIZE_VARS, 1) > 1


def first_process() -> bool:
    """Whether this is the only process, or the first (rank 0) of a launch."""
    return _launcher_int(_RANK_VARS, 0) == 0


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
