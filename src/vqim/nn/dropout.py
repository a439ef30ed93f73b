"""Dropout whose mask is cheap on the CPU.

PyTorch's CPU dropout draws one Bernoulli sample per element from its serial generator: about 6.5 ns per element
on a 2-core machine, which made dropout the largest single cost of the vim-tiny training step that `make demo`
runs (31% of the step, above the matrix products). Here the mask comes from 64-bit words drawn over the whole
int64 range (one generator call per four elements), each read as four uniform 16-bit integers; an element is
dropped when its integer falls in the lowest p·65536 values. That is five times faster per mask
(`benchmarks/prior_speed.py` times the prior's training step, which uses it).

The drop rate is p rounded to a multiple of 1/65536 (within 7.7e-6 of p) and kept elements are scaled by
1 / (1 − that rate), so the expected output equals the input exactly, as with `F.dropout`. Masks come from
torch's default CPU generator, so `torch.manual_seed` reproduces them. Off the CPU, `F.dropout` runs (GPUs have
fused dropout kernels with their own generators).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16  # 16-bit integers per draw
_cheap = True


@contextlib.contextmanager
def torch_dropout() -> Iterator[None]:
    """Within this context `dropout` is `F.dropout` and attention dropout runs inside
    `F.scaled_dot_product_attention`, both with PyTorch's own masks (to compare the two, or to reproduce a run
    made with them)."""
    global _cheap
    was, _cheap = _cheap, False
    try:
        yield
    finally:
        _cheap = was


def cheap_masks() -> bool:
    """Whether CPU dropout uses this module's masks (False inside `torch_dropout`)."""
    return _cheap


def keep_mask(
    shape: tuple[int, ...] | torch.Size,
    p: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dropout's multiplier of `shape`: 0 where an element is dropped (probability q = round(p·65536)/65536, drawn
    independently per element), else 1 / (1 − q).

    Args:
        shape: the mask's shape.
        p: drop probability in [0, 1).
        device: where the mask is made (the words are drawn by that device's default generator).
        dtype: the mask's dtype (the comparison itself runs in fp32, where every 16-bit integer is exact).
    """
    n = 1
    for s in shape:
        n *= int(s)
    threshold = round(p * _LEVELS)
    # Four int16 per int64 word; random_(from, to) over the full range draws all 64 bits of each word.
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    # In fp32 rather than as a boolean: PyTorch's CPU kernels convert booleans element by element, several times
    # slower than this.
    mask = (
        words.view(torch.int16)[:n]
        .float()
        .ge_(threshold - _LEVELS // 2)
        .mul_(_LEVELS / (_LEVELS - threshold))
    )
    return mask.view(shape).to(dtype)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout of x with drop probability p (module docstring); the identity when not training or p is 0.

    Args:
        x: input of any shape.
        p: drop probability in [0, 1].
        training: apply dropout (False: return x).
    """
    if not training or p <= 0.0:
        return x
    if p > 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if x.device.type != "cpu" or not _cheap:
        return F.dropout(x, p, True)
    threshold = round(p * _LEVELS)
    if threshold == 0:
        return x
    if threshold == _LEVELS:
        return x * 0.0
    # The mask carries no gradient; autograd keeps it for the backward product.
    return x * keep_mask(x.shape, p, x.device, x.dtype)


class Dropout(nn.Module):
    """`nn.Dropout` with `dropout`'s mask.

    Args:
        p: drop probability.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
