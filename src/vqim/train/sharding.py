"""Fully sharded data-parallel training (PyTorch FSDP2, `fully_shard`) for the trainers.

Under `--fsdp` (or an Accelerate FSDP configuration) every process holds 1/N of the weights, gradients and
Adam moments: one FSDP unit per Transformer `Block` (its weights are gathered just for its forward and
backward) plus the root for the rest (embeddings, heads). The same code runs on GPUs (NCCL) and on CPU
processes (gloo), so it is tested here on CPU.

Checkpoints stay in the one layout every run writes: the main process saves the gathered full weights (the
`save_pretrained` layout) and the full optimizer state numbered like `Optimizer.state_dict()`, so a sharded
run resumes unsharded, on another process count, or the other way round.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


def shard_model(model: nn.Module, reshard_after_forward: bool = True) -> nn.Module:
    """Shard model in place over the default process group: one FSDP unit per Transformer block, then the root.

    Args:
        model: the model, already on this process's device, before any optimizer is built on it.
        reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3; gathers them again
            for the backward) rather than keeping them until the backward (ZeRO-2: more memory, less traffic).
    """
    from torch.distributed.fsdp import fully_shard

    from vqim.nn.transformer import Block

    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    # The prior returns its logits as a slice of a larger tensor; FSDP warns that an in-place change of such a view
    # would skip its backward hook. The trainers never change model outputs in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (a collective: every process calls it); other tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of a whole tensor, laid out like the sharded tensor `like` (every process calls it)."""
    if not hasattr(like, "device_mesh"):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements).to_local()


def reshard(model: nn.Module) -> None:
    """Free every FSDP unit's gathered weights, leaving each process its shards (a no-op where they are freed).

    With reshard_after_forward=False a forward without backward (validation) leaves whole weights on the modules;
    the state-dict helpers find parameters through the modules, so they must see the shards again first.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the main process ({} elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state dict on the main process, numbered like `Optimizer.state_dict()` ({} elsewhere).

    Every process must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    reshard(model)
    sd = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not sd:
        return {}
    order = [name for group in sd["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {
        "state": {index[name]: s for name, s in sd["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]],
    }


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a whole optimizer state dict numbered like `Optimizer.state_dict()` into a sharded model's optimizer
    (every process, each with the whole dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name_of = {id(p): n for n, p in model.named_parameters()}
    order = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = [len(g["params"]) for g in sd["param_groups"]]
    mine = [len(g["params"]) for g in optimizer.param_groups]
    if saved != mine:  # as Optimizer.load_state_dict: the same parameters in each group (decayed or not)
        raise ValueError(f"the checkpoint's optimizer groups hold {saved} parameters, the model's {mine}")
    by_name = {
        "state": {order[int(i)]: s for i, s in sd["state"].items()},
        "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in sd["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def total_grad_norm(parameters) -> torch.Tensor:
    """Global l2 norm of sharded gradients, the same on every process (a collective)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return full_tensor(torch.nn.utils.get_total_norm(grads, norm_type=2.0))
