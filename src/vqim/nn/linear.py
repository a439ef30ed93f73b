"""`Linear`: `nn.Linear` with a faster product for the few-row inputs of cached decoding on CPU.

Decoding one token feeds one row per sequence through every linear layer. On CPU, PyTorch runs a one-row
`F.linear` as a single-threaded GEMV that streams the weight at one core's memory bandwidth, and a few-row
`F.linear` repacks the weight on every call. The same product computed as one batched GEMM over S row blocks of
the weight, (S, out/S, in) · (in, rows), keeps every thread streaming its own block of the weight
(`benchmarks/sampling_speed.py`: about 3× faster per decode step at batch 1, 1.3× at batch 8). The sums are
the same; only their rounding order differs.

`Linear` takes that path by itself when its input has at most `SPLIT_MAX_ROWS` rows, no gradient is being
recorded, and the weight is fp32 on the CPU; everything else (training, encoding, prefill over many
positions, GPUs) is the ordinary `F.linear`. Its parameters and state-dict keys are those of `nn.Linear`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

SPLIT_MAX_ROWS = 32
"""Inputs with more rows than this go through `F.linear`: by then the plain GEMM keeps every thread busy."""

SPLIT_MIN_WEIGHT = 1 << 16
"""Weights with fewer elements (256 KiB in fp32) use `F.linear`: they sit in cache, and the single-threaded
product is faster than the Python of the split one."""

_enabled = True


def split_count(out_features: int) -> int:
    """Row blocks for the split product: 16, 8, 4 or 2, whichever divides the output width (0: none does)."""
    return next((s for s in (16, 8, 4, 2) if out_features % s == 0), 0)


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x (..., in) as one batched GEMM over row blocks of the weight.

    Falls back to `F.linear` when no block count divides the output width.
    """
    out, d_in = weight.shape
    s = split_count(out)
    if not s:
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    rows = x.numel() // d_in
    ws = weight.contiguous().view(s, out // s, d_in)
    # x (rows, in) transposed to (in, rows) with strides (1, in): MKL takes it as a transposed operand and runs
    # the batched GEMM path; the same column made contiguous (strides (1, 1)) is 5× slower.
    xt = x.reshape(rows, d_in).t().expand(s, -1, -1)
    y = torch.bmm(ws, xt) if bias is None else torch.baddbmm(bias.view(s, -1, 1), ws, xt)
    return y.permute(2, 0, 1).reshape(*lead, out)  # (S, out/S, rows) → (..., out)


def _split_views(weight: torch.Tensor, bias: torch.Tensor | None, s: int) -> tuple:
    """The weight and bias as S row blocks, (S, out/S, in) and (S, out/S, 1), views of the same storage."""
    out, d_in = weight.shape
    with torch.no_grad():
        return weight.detach().view(s, out // s, d_in), None if bias is None else bias.detach().view(s, -1, 1)


def split_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `Linear` takes the split product for input x: few rows, no autograd, fp32 on the CPU."""
    return (
        _enabled
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and x.numel() <= SPLIT_MAX_ROWS * weight.shape[1]
        and weight.numel() >= SPLIT_MIN_WEIGHT
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


@contextlib.contextmanager
def plain_products() -> Iterator[None]:
    """Within this context every `Linear` uses `F.linear` (to compare the two paths, or to time them)."""
    global _enabled
    was, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = was


class Linear(nn.Linear):
    """`nn.Linear` that computes few-row inputs without autograd on CPU with `split_linear` (module docstring).

    The blocked views of the weight and bias are made on the first such call and kept: views share the
    parameters' storage, so in-place updates (optimizer steps, `load_state_dict`) show through, and moving
    the module (`.to()`, `.half()`, which may give the parameters new storage) or assigning a new weight
    drops them. A decode step runs some 30 of these products, so the per-call Python is kept to a few
    attribute reads.
    """

    # None: not looked at yet; False: this weight never takes the split product (small, not fp32 on the CPU, or
    # no block count divides it); else (weight Parameter, weight blocks, bias blocks, max input numel, the
    # weight's data pointer when the views were made, in_features, out_features).
    _blocks: tuple | bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self._blocks
        if blocks is None:
            blocks = self._blocks = self._make_blocks()
        if blocks is not False and _enabled and not torch.is_grad_enabled():
            w, ws, bs, most, ptr, d_in, out = blocks
            if x.numel() <= most and self._parameters["weight"] is w and w.data_ptr() == ptr:
                # split_linear with the views made once, inline: one Python frame per product.
                xt = x.reshape(-1, d_in).t().expand(ws.shape[0], -1, -1)  # see split_linear
                y = torch.bmm(ws, xt) if bs is None else torch.baddbmm(bs, ws, xt)
                return y.permute(2, 0, 1).reshape(x.shape[:-1] + (out,))
        return F.linear(x, self.weight, self.bias)

    def _make_blocks(self) -> tuple | bool:
        w, b = self.weight, self.bias
        s = split_count(self.out_features)
        eligible = w.device.type == "cpu" and w.dtype == torch.float32 and w.numel() >= SPLIT_MIN_WEIGHT
        if not s or not eligible or not w.is_contiguous():
            return False
        ws, bs = _split_views(w, b, s)
        # The Parameter itself and its data pointer: a new Parameter or new storage makes the views stale.
        return (
            w,
            ws,
            bs,
            SPLIT_MAX_ROWS * self.in_features,
            w.data_ptr(),
            self.in_features,
            self.out_features,
        )

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        self._blocks = None  # .to() / .half() / .cuda() may move the weights to new storage
        return super()._apply(fn, recurse)

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("weight", "bias"):
            self.__dict__["_blocks"] = None
        super().__setattr__(name, value)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_blocks", None)  # views of this instance's storage: never carried into a copy
        return state


__all__ = [
    "Linear",
    "SPLIT_MAX_ROWS",
    "SPLIT_MIN_WEIGHT",
    "plain_products",
    "split_applies",
    "split_count",
    "split_linear",
]
