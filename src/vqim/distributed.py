"""The processes of a run: one, or several under `accelerate launch` / torchrun (GPUs, or CPU with gloo)."""

from __future__ import annotations

import torch


def process_state():
    """Accelerate's `PartialState` for this process. Without a GPU it is created with cpu=True, so that the
    processes of a CPU launch join one gloo process group instead of each running alone."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
