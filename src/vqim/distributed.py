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


def launched() -> bool:
    """Whether this process is one of several started by `accelerate launch` / torchrun (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


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
    os._exit(status)
