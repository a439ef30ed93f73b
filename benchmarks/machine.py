"""The machine's own limits, measured in the benchmark's run, and the helpers every speed benchmark shares.

A speed figure means little without the speed of the machine it came from, and a machine shared with other
work changes speed from minute to minute. So each benchmark measures, in the same process and right before
and right after its workload:

- sgemm: GFLOP/s of one matrix product, at 2048×2048×2048 and at a shape the workload itself runs
  (its largest product), in the workload's dtype, through each library this PyTorch build offers for it
  (`torch.mm`; on x86-64 CPUs also oneDNN, which vqim's linear layers use, and which runs fp32 products
  faster than `torch.mm`'s MKL on AMD CPUs): the limit is the fastest of them;
- memory read bandwidth: GB/s of summing a 256 MiB tensor (one read of every byte).

Shares of the limit (MFU, roofline share) use the larger of the two measurements, so a slow moment while
the limit was measured never flatters the share. Rates are reported as median, min and max of the repeats.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, bmm_flop, sdpa_backward_flop_count, sdpa_flop_count

from vqim.nn import linear

SQUARE = 2048  # sgemm size reported as the machine's matmul speed


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int, device: str) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn, each bracketed by a device sync."""
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def stats(values: list[float], digits: int = 2) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def seconds_per_call(fn: Callable[[], object], device: str, reps: int = 5, min_s: float = 0.02) -> float:
    """Median seconds of one call of fn: `reps` samples, each of as many back-to-back calls as take at least
    `min_s` (so a product of a few microseconds is not timed alone), after one warm-up call."""

    def repeat(calls: int) -> Callable[[], None]:
        return lambda: [fn() for _ in range(calls)]

    fn()
    calls = 1
    while timed(repeat(calls), 1, device)[0] < min_s and calls < 2**16:
        calls *= 2
    return statistics.median(timed(repeat(calls), reps, device)) / calls


def products(a: torch.Tensor, b: torch.Tensor) -> dict[str, Callable[[], object]]:
    """a @ b through each library this build offers for it: `torch.mm`, and on x86-64 CPUs in fp32 oneDNN
    (the product of vqim's linear layers: a times the transpose of a contiguous (n, k) weight)."""
    fns: dict[str, Callable[[], object]] = {"torch.mm": lambda: a @ b}
    if a.device.type == "cpu" and a.dtype == torch.float32 and linear._onednn:
        bt = b.t().contiguous()
        fns["onednn"] = lambda: linear._onednn_product(a, bt, None)
    return fns


def matmul_gflops_by_library(
    device: str, m: int = SQUARE, k: int = SQUARE, n: int = SQUARE, dtype=torch.float32, reps: int = 5
) -> dict[str, float]:
    """GFLOP/s of an (m, k) @ (k, n) product through each library of `products` (median of `reps` samples)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    return {
        name: round(2 * m * k * n / seconds_per_call(fn, device, reps) / 1e9, 1)
        for name, fn in products(a, b).items()
    }


def paired_mfu(
    fn: Callable[[], object], flops: float, repeats: int, device: str, sgemm_calls: int = 3
) -> dict:
    """MFU on a machine whose speed drifts within a run: each of `repeats` timed calls of fn follows an sgemm
    sample (`sgemm_calls` back-to-back square fp32 products through each library of `products`, the fastest
    counting) taken just before it, and the ratio of the call's FLOP/s (`flops` per call) to that sample is
    computed per pair. Returns the ratios' median and quartiles and the sgemm samples' median, min and max."""
    a = torch.randn(SQUARE, SQUARE, device=device)
    b = torch.randn(SQUARE, SQUARE, device=device)
    fns = list(products(a, b).values())
    for f in fns:
        f()
    ratios, sgemm, seconds = [], [], []
    for _ in range(repeats):
        t_mm = (
            min(timed(lambda f=f: [f() for _ in range(sgemm_calls)], 1, device)[0] for f in fns) / sgemm_calls
        )
        seconds.append(timed(fn, 1, device)[0])
        sgemm.append(2 * SQUARE**3 / t_mm / 1e9)
        ratios.append(flops / seconds[-1] / 1e9 / sgemm[-1])
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"median": round(statistics.median(ratios), 3), "q1": round(q[0], 3), "q3": round(q[2], 3),
            "seconds_per_call": stats(seconds, 3), "sgemm_gflops_before_each_call": stats(sgemm, 1),
            "pairs": repeats}  # fmt: skip


def linear_paths_ab(step: Callable[[], object], pairs: int, warmup_pairs: int = 1) -> dict:
    """Time ratio of `step` with vqim's linear layers on oneDNN's product (their default on x86-64 CPUs,
    vqim.nn.linear) to the same step with every layer on plain F.linear (`plain_products`), CPU: `pairs`
    back-to-back pairs, the order alternating, after `warmup_pairs` untimed pairs. Returns the per-pair ratios'
    median and quartiles and each path's seconds per step."""
    import contextlib

    def run(plain: bool) -> float:
        with linear.plain_products() if plain else contextlib.nullcontext():
            return timed(step, 1, "cpu")[0]

    for _ in range(warmup_pairs):
        run(True), run(False)
    ratios, times = [], {True: [], False: []}
    for i in range(pairs):
        t = {plain: run(plain) for plain in ((True, False) if i % 2 else (False, True))}
        for plain, v in t.items():
            times[plain].append(v)
        ratios.append(t[False] / t[True])
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"median": round(statistics.median(ratios), 3), "q1": round(q[0], 3), "q3": round(q[2], 3),
            "seconds_per_step": {"onednn": stats(times[False], 4), "f_linear": stats(times[True], 4)},
            "pairs": pairs}  # fmt: skip


def memory_read_gb_per_s(device: str, mbytes: int = 256, reps: int = 5) -> float:
    """GB/s of reading a `mbytes` MiB fp32 tensor once (its sum; median of `reps` samples)."""
    x = torch.ones(mbytes * 2**20 // 4, device=device)
    return x.numel() * 4 / seconds_per_call(x.sum, device, reps) / 1e9


def measure_limits(device: str, dtype=torch.float32, shape: tuple[int, int, int] | None = None) -> dict:
    """sgemm GFLOP/s (square, and at `shape` = (m, k, n) when given) and memory read GB/s, measured now."""
    by_lib = matmul_gflops_by_library(device, dtype=dtype)
    out = {
        "sgemm_gflops": max(by_lib.values()),
        "memory_read_gb_per_s": round(memory_read_gb_per_s(device), 2),
    }
    if shape is not None:
        at_shape = matmul_gflops_by_library(device, *shape, dtype=dtype)
        out["sgemm_gflops_at_workload_shape"] = max(at_shape.values())
    # Each library's own figures, beside the limits above (the fastest of them)
    out["sgemm_gflops_by_library"] = by_lib
    if shape is not None:
        out["sgemm_gflops_at_workload_shape_by_library"] = at_shape
    return out


def describe(device: str, dtype=torch.float32, shape: tuple[int, int, int] | None = None) -> dict:
    """What the limits were measured with, and on what."""
    d = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "logical_cpus": os.cpu_count(),
        "cpu": _cpu_name(),
        "device": device,
        "sgemm": f"{str(dtype).removeprefix('torch.')} {SQUARE}x{SQUARE}x{SQUARE} matmul, median of 5 samples, "
        "the fastest of the libraries listed",
        "memory_read": "sum of a 256 MiB fp32 tensor, median of 5 samples",
        "limits_used": "the larger of the measurements before and after the workload",
    }
    if shape is not None:
        d["workload_shape_mkn"] = list(shape)
    if device.startswith("cuda"):
        d["gpu"] = torch.cuda.get_device_name(device)
    return d


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Limits:
    """Limits measured before and after a workload: `with Limits(dev) as lim: work()`, then `lim.report()`."""

    def __init__(self, device: str, dtype=torch.float32, shape: tuple[int, int, int] | None = None):
        self.device, self.dtype, self.shape = device, dtype, shape
        self.before: dict = {}
        self.after: dict = {}

    def __enter__(self) -> Limits:
        self.before = measure_limits(self.device, self.dtype, self.shape)
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.after = measure_limits(self.device, self.dtype, self.shape)

    def __getitem__(self, key: str) -> float:
        return max(self.before[key], self.after.get(key, self.before[key]))

    def by_library(self, key: str = "sgemm_gflops_by_library") -> dict[str, float]:
        """Each library's sgemm figure, the larger of before and after."""
        after = self.after.get(key, {})
        return {lib: max(v, after.get(lib, v)) for lib, v in self.before[key].items()}

    def report(self) -> dict:
        return {
            "measured_with": describe(self.device, self.dtype, self.shape),
            "before": self.before,
            "after": self.after,
            "limits": {k: self[k] for k, v in self.before.items() if not isinstance(v, dict)},
        }


# FlopCounterMode knows the fused attention kernels of CUDA; on CPU, scaled_dot_product_attention runs
# `_scaled_dot_product_flash_attention_for_cpu`, which it does not count, so it is added here with the same
# formula (the full T×T score matrix, causal or not).
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Backward: PyTorch's formula counts five products, the fused kernels' recomputation of the scores q·kᵀ among
# them. MFU counts the model's FLOPs, not what a kernel recomputes (as for activation checkpointing), so the
# backward of attention is the four products of its gradients, for every fused kernel, CPU and CUDA.
def _sdpa_backward_model_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kw
):
    b, h, s_q, d_q = query_shape
    recomputed_scores = bmm_flop((b * h, s_q, d_q), (b * h, d_q, key_shape[2]))
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape) - recomputed_scores


# vqim's linear layers run oneDNN's product on x86-64 CPUs (vqim.nn.linear), an operator FlopCounterMode does not
# know: input (..., k) times the transpose of an (n, k) weight, 2·k·n FLOPs per input row (the bias added inside).
def _onednn_linear_flop(input_shape, weight_shape, *args, out_shape=None, **kw) -> int:
    rows = 1
    for d in input_shape[:-1]:
        rows *= d
    return 2 * rows * weight_shape[1] * weight_shape[0]


def _custom_flops() -> dict:
    aten = torch.ops.aten
    out = {}
    if linear._onednn:
        out[torch.ops.mkldnn._linear_pointwise] = _onednn_linear_flop
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop
    for name in ("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward",
                 "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_cudnn_attention_backward"):  # fmt: skip
        if hasattr(aten, name):
            out[getattr(aten, name)] = _sdpa_backward_model_flop
    return out


def count_flops(fn: Callable[[], object]) -> dict[str, int]:
    """FLOPs of the matrix products, convolutions and attention that one call of fn runs, by operator.

    Counted by torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add; elementwise work, norms,
    softmax and the optimizer update are not counted, as in MFU).
    """
    with FlopCounterMode(display=False, custom_mapping=_custom_flops()) as counter:
        fn()
    by_op = {
        str(k).removeprefix("aten."): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()
    }
    return {"total": int(counter.get_total_flops()), **dict(sorted(by_op.items()))}
