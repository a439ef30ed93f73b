"""Loop helpers shared by the tokenizer and prior trainers: Accelerate setup, parameter groups, checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vqim.train import state as st

log = logging.getLogger(__name__)


def make_accelerator(mixed_precision: str = "auto"):
    """An Accelerator for CPU, one GPU, or a multi-process launch; bf16 autocast on GPU under "auto"."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    return Accelerator(
        # Without a GPU, cpu=True makes Accelerate join a multi-process launch (torchrun or
        # `accelerate launch --multi_gpu`) as a gloo process group instead of running alone.
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


# Layers whose `weight` is a matrix that weight decay should shrink; every other parameter (embeddings,
# position tables, norms, biases, the codebook) is left alone, as in GPT-2/minGPT and the papers' setups.
_DECAYED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)


def param_groups(
    model: nn.Module, weight_decay: float, no_decay: Callable[[str, nn.Parameter], bool] | None = None
) -> list[dict[str, Any]]:
    """Two AdamW groups: the weights of linear and convolution layers (decayed), and everything else.

    Args:
        model: the module to optimise.
        weight_decay: decoupled weight decay of the first group.
        no_decay: optional extra rule keeping named matrices out of decay.
    """
    decayed = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, _DECAYED) and isinstance(m.weight, nn.Parameter)
    }
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            extra = no_decay is not None and no_decay(name, p)
            (decay if id(p) in decayed and not extra else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def save_checkpoint(
    acc,
    root: Path,
    step: int,
    model,
    optimizer: torch.optim.Optimizer | dict[str, Any],
    scheduler,
    extra_tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    keep: int,
    after_commit: Callable[[], None] | None = None,
    before_commit: Callable[[], None] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write model (save_pretrained layout) + training state into root/step-N, atomically, on all processes.

    The main process writes the model, optimizer, scheduler and `meta`; every process writes its RNG state;
    the folder is renamed into place once complete (then the main process calls `after_commit`). Pruning keeps
    the `keep` newest checkpoints of the run named by `meta["run_id"]`. A sharded run passes its gathered
    `model_state` and optimizer state dict (see `vqim.train.sharding`).
    """
    tmp = st.tmp_dir(root, step)
    if acc.is_main_process:
        if model_state is None:
            model.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, state_dict=model_state)
        tensors, ometa = st.optimizer_to_flat(optimizer, "opt")
        tensors.update(extra_tensors)
        full = {"step": step, "optimizer": ometa, "scheduler": scheduler.state_dict(), **meta}
        full["world_size"] = acc.num_processes
        st.write_shared_state(tmp, tensors, full)
    acc.wait_for_everyone()
    rt, rm = st.rng_state()
    st.write_process_state(tmp, acc.process_index, rt, rm)
    acc.wait_for_everyone()
    if acc.is_main_process:
        if before_commit is not None:
            before_commit()
        st.commit(root, step, keep, str(meta.get("run_id", "")))
        if after_commit is not None:
            after_commit()
    acc.wait_for_everyone()


def restore_checkpoint(
    directory: Path,
    rank: int,
    optimizer: torch.optim.Optimizer,
    scheduler,
    sharded_model: nn.Module | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load optimizer, scheduler and this process's RNG state; returns the shared (tensors, meta).

    With `sharded_model` (an FSDP run), each process loads its shard of the saved whole optimizer state.
    """
    tensors, meta = st.read_shared_state(directory)
    if sharded_model is not None:
        from vqim.train import sharding

        sharding.load_optimizer_state(
            sharded_model, optimizer, st.optimizer_state_from_flat("opt", tensors, meta["optimizer"])
        )
    else:
        st.optimizer_from_flat(optimizer, "opt", tensors, meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    rt, rm = st.read_process_state(directory, rank)
    st.set_rng_state(rt, rm)
    log.info("resumed from %s at step %d", directory, int(meta["step"]))
    return tensors, meta


def gather_names(acc, names: set[str]) -> list[str]:
    """Union of a set of strings over processes (e.g. skipped files)."""
    if acc.num_processes == 1:
        return sorted(names)
    from accelerate.utils import gather_object

    return sorted(set().union(*gather_object([sorted(names)])))


def tensorboard(out: Path, main: bool):
    if not main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tb"))
