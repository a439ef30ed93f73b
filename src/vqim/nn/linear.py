"""`Linear`: `nn.Linear` with faster CPU products: for the few-row inputs of cached decoding, and (on x86-64)
for the many-row inputs of training and encoding.

Decoding one token feeds one row per sequence through every linear layer. On CPU, PyTorch runs a one-row
`F.linear` as a single-threaded GEMV that streams the weight at one core's memory bandwidth, and a few-row
`F.linear` repacks the weight on every call. The same product computed as one batched GEMM over S row blocks of
the weight (block k: (out/S, in) · (in, 1) for one row, (rows, in) · (in, out/S) for several) keeps every
thread streaming its own block of the weight (`benchmarks/sampling_speed.py`: about 3× faster per decode
step at batch 1, 1.3× at batch 8). The sums are the same; only their rounding order differs.

`Linear` takes that path by itself when its input has at most `SPLIT_MAX_ROWS` rows, no gradient is being
recorded, and the weight is fp32 on the CPU with at least `SPLIT_MIN_WEIGHT` elements. Inputs with at least
`ONEDNN_MIN_ROWS` rows (training, encoding, prefill over many positions) in fp32 on an x86-64 CPU take
oneDNN's product (`linear`, below). Everything else (GPUs, other dtypes, autocast, torch.compile) is the
ordinary `F.linear`. Its parameters and state-dict keys are those of `nn.Linear`.

oneDNN: PyTorch's fp32 `F.linear` on the CPU is an MKL GEMM, and MKL takes a slower code path on non-Intel
x86-64 CPUs; oneDNN (in every x86-64 PyTorch build) picks its kernels by instruction set. On a 2-core AMD EPYC
(Zen 4) its square fp32 product ran at 1.2-1.5× MKL's, the tokenizer's training products at 1.1-1.2×
(2048 rows, 256 <-> 1024 features: 204 against 175 GFLOP/s), and it adds the bias inside the product instead
of writing it out first; a whole training step takes about 0.93× the time (`benchmarks/tokenizer_speed.py`,
`train_step_time_onednn_over_plain_linear`). `linear` is the product with its backward: the input gradient
through oneDNN too, the weight gradient through `torch.mm` (oneDNN is slower with the transposed operands that
product has). The sums are the same, in another rounding order. `plain_products()` turns both paths off.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad as _forward_ad
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

SPLIT_MAX_ROWS = 32
"""Inputs with more rows than this go through `F.linear`: by then the plain GEMM keeps every thread busy."""

SPLIT_MIN_WEIGHT = 1 << 16
"""Weights with fewer elements (256 KiB in fp32) use `F.linear`: they sit in cache, and the single-threaded
product is faster than the Python of the split one."""

ONEDNN_MIN_ROWS = 128
"""Inputs with fewer rows go through `F.linear`: oneDNN's per-call overhead outweighs its faster kernel (with
small weights it loses up to 128 rows)."""

_enabled = True
_onednn = (
    platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


_POST_OPS = {None: ("none", ""), "tanh": ("tanh", ""), "gelu": ("gelu", "none")}  # "none": exact (erf) GELU
_PLAIN_ACTS = {"tanh": torch.tanh, "gelu": F.gelu}
# A Parameter wrapping a tensor subclass (DTensor) has the subclass's type, so these are plain tensors only.
_PLAIN_TYPES = (torch.Tensor, nn.Parameter)


def _is_wrapped(t: torch.Tensor) -> bool:  # a torch.func (grad, jvp, vmap) tensor
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def _onednn_product(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None
) -> torch.Tensor:
    attr, algorithm = _POST_OPS[activation]
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)


class _OneDNNLinear(torch.autograd.Function):
    """x · weightᵀ + bias through oneDNN, then tanh if asked (inside the same kernel), differentiable (twice:
    the backward is made of differentiable operations, so a gradient penalty can differentiate through it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, tanh=False):  # noqa: ANN001, ANN205 (autograd.Function's signature)
        y = _onednn_product(x, weight, bias, "tanh" if tanh else None)
        ctx.save_for_backward(x, weight, y if tanh else None)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight, y = ctx.saved_tensors
        if y is not None:  # through tanh: its derivative from its output, 1 - y²
            grad = torch.ops.aten.tanh_backward(grad, y)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = _OneDNNLinear.apply(grad, weight.t(), None) if need_x else None
        gw = g2.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None
        gb = g2.sum(0) if need_b and ctx.has_bias else None
        return gx, gw, gb, None


def onednn_takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear` computes x · weightᵀ + bias through oneDNN: plain fp32 CPU tensors (no subclass, no
    torch.func transform, no forward-mode AD), a 2-D weight, at least `ONEDNN_MIN_ROWS` rows, outside autocast
    and torch.compile, with oneDNN enabled (`torch.backends.mkldnn`) and `plain_products` off."""
    return (
        _enabled
        and _onednn
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and x.dim() >= 2
        and 0 < x.shape[-1] == weight.shape[-1]
        and x.numel() >= ONEDNN_MIN_ROWS * x.shape[-1]
        and type(x) is torch.Tensor
        and type(weight) in _PLAIN_TYPES
        and (bias is None or (bias.dtype == torch.float32 and type(bias) in _PLAIN_TYPES and bias.dim() == 1))
        and weight.device.type == "cpu"
        and torch._C._get_mkldnn_enabled()
        and _forward_ad._current_level < 0
        and not _is_wrapped(x)
        and not _is_wrapped(weight)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """`F.linear`, then `activation` ("tanh", "gelu" (exact) or None), through oneDNN where that is faster: fp32
    plain tensors on an x86-64 CPU, at least `ONEDNN_MIN_ROWS` rows, outside autocast and torch.compile (module
    docstring). The activation runs inside oneDNN's product for tanh, and for GELU when no gradient is
    recorded (GELU's backward needs its input, which the fused product does not keep)."""
    if activation not in _POST_OPS:
        raise ValueError(f"activation must be None, 'tanh' or 'gelu', got {activation!r}")
    if onednn_takes(x, weight, bias):
        return _onednn_linear(x, weight, bias, activation)
    y = F.linear(x, weight, bias)
    return y if activation is None else _PLAIN_ACTS[activation](y)


def _onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """`linear` for inputs `onednn_takes`: through autograd when a gradient is recorded, else the plain call."""
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        if activation == "gelu":
            return F.gelu(_OneDNNLinear.apply(x, weight, bias))
        return _OneDNNLinear.apply(x, weight, bias, activation == "tanh")
    return _onednn_product(x, weight, bias, activation)


def split_count(out_features: int) -> int:
    """Row blocks for the split product: 16, 8, 4 or 2, whichever divides the output width (0: none does)."""
    return next((s for s in (16, 8, 4, 2) if out_features % s == 0), 0)


@contextlib.contextmanager
def plain_products() -> Iterator[None]:
    """Within this context every `Linear` and `linear` uses `F.linear` (to compare the paths, or to time them)."""
    global _enabled
    was, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = was


class Linear(nn.Linear):
    """`nn.Linear` that computes few-row inputs without autograd on CPU as one batched GEMM over row blocks of
    the weight, and many-row fp32 inputs on x86-64 CPUs through oneDNN (module docstring).

    The blocked views of the weight and bias are made on the first call and kept: views share the parameters'
    storage, so in-place updates (optimizer steps, `load_state_dict`) show through; a replaced weight (a new
    Parameter, or new storage under the same one) is noticed and gets new views, and moving the module
    (`.to()`, `.half()`) looks again whether the weight qualifies. A decode step runs some 30 of these products,
    so the per-call Python is kept to a few attribute reads.
    """

    # None: not looked at yet; False: this weight never takes the split product (fewer than SPLIT_MIN_WEIGHT
    # elements, not fp32 on the CPU, or no block count divides its rows); else (weight Parameter, weight blocks
    # and bias blocks for one row, the same transposed for several rows, max input numel, the weight's data
    # pointer when the views were made, in_features, out_features, block count).
    _blocks: tuple | bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self._blocks
        if blocks is None:
            blocks = self._blocks = self._make_blocks()
        if blocks is not False and _enabled and not torch.is_grad_enabled():
            w, ws, bs, wt, bt, most, ptr, d_in, out, s = blocks
            n = x.numel()
            if n <= most and x.shape[-1] == d_in:  # (a wrong width goes to F.linear, which says so)
                if self._parameters["weight"] is not w or w.data_ptr() != ptr:  # replaced since: new views
                    self._blocks = None
                    return self.forward(x)
                # Inline rather than a helper function: each Python frame and each tensor-view call costs about
                # a microsecond here, and a decode step makes some 30 of these products.
                nd = x.dim()
                if n == d_in:
                    # One row: block k is (out/S, in) · (in, 1). The row as an (in, 1) operand with strides
                    # (1, in), the same for every block (stride 0): one view. MKL takes it as a transposed operand
                    # and runs the batched GEMM path (the same column made contiguous is 5× slower).
                    xt = (
                        x.as_strided((s, d_in, 1), (0, 1, d_in))
                        if x.is_contiguous()
                        else x.reshape(1, d_in).t().expand(s, -1, -1)
                    )
                    y = torch.bmm(ws, xt) if bs is None else torch.baddbmm(bs, ws, xt)  # (S, out/S, 1)
                    # (S, out/S, 1) holds the row's outputs in order: a view
                    if nd == 3:
                        return y.view(1, 1, out)
                    return y.view(1, out) if nd == 2 else y.view(x.shape[:-1] + (out,))
                # Several rows: block k is (rows, in) · (in, out/S), the weight block read as a transposed
                # operand. With the operands the other way round, as for one row, a decode step took 1.3× as long
                # at batch 8; with these, one row took 1.6× as long (benchmarks/decode_ab.py: weights streamed
                # from memory, unlike a product timed alone, whose weight stays in cache).
                rows = n // d_in
                if x.is_contiguous():
                    xs = x.as_strided((s, rows, d_in), (0, d_in, 1))
                else:
                    xs = x.reshape(rows, d_in).expand(s, -1, -1)
                y = torch.bmm(xs, wt) if bt is None else torch.baddbmm(bt, xs, wt)  # (S, rows, out/S)
                # (S, rows, out/S) → (rows, S, out/S): a copy. The decode step's (B, 1, D) and (B, D) inputs get
                # the shape from ints: building it as x.shape[:-1] + (out,) made a whole decode step measurably
                # slower (benchmarks/decode_ab.py).
                y = y.transpose(0, 1)
                if nd == 3:
                    return y.reshape(x.shape[0], x.shape[1], out)
                return y.reshape(rows, out) if nd == 2 else y.reshape(x.shape[:-1] + (out,))
        return linear(x, self.weight, self.bias)

    def forward_act(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        """activation(self(x)) for "tanh" or "gelu", with the activation inside oneDNN's product where `linear`
        fuses it. The fused call skips `forward`, so it is taken only for a plain `Linear` with no forward
        hooks of its own or global ones (pruning, the old weight_norm, LoRA-style wrappers and hooks go through
        `forward`) and an input oneDNN takes."""
        if (
            type(self) is Linear
            and not self._forward_hooks
            and not self._forward_pre_hooks
            and not _global_forward_hooks
            and not _global_forward_pre_hooks
            and onednn_takes(x, self.weight, self.bias)
        ):
            return _onednn_linear(x, self.weight, self.bias, activation)
        return _PLAIN_ACTS[activation](self(x))

    def _make_blocks(self) -> tuple | bool:
        w, b = self.weight, self.bias
        s = split_count(self.out_features)
        eligible = w.device.type == "cpu" and w.dtype == torch.float32 and w.numel() >= SPLIT_MIN_WEIGHT
        if not s or not eligible or not w.is_contiguous():
            return False
        with torch.no_grad():
            ws = w.detach().view(s, self.out_features // s, self.in_features)  # (S, out/S, in): one row
            bs = None if b is None else b.detach().view(s, -1, 1)
            wt = ws.transpose(1, 2)  # (S, in, out/S): several rows
            bt = None if b is None else b.detach().view(s, 1, -1)
        most = SPLIT_MAX_ROWS * self.in_features
        return (w, ws, bs, wt, bt, most, w.data_ptr(), self.in_features, self.out_features, s)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        self._blocks = None  # after .to() / .half() / .cuda(), look again whether the weight qualifies
        return super()._apply(fn, recurse)


__all__ = [
    "Linear",
    "ONEDNN_MIN_ROWS",
    "SPLIT_MAX_ROWS",
    "SPLIT_MIN_WEIGHT",
    "linear",
    "plain_products",
    "split_count",
]
