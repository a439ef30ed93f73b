"""Where the tokenizer's training step spends its time, and what that allows its MFU to reach, printed as JSON.

The step is tokenizer_speed.py's eager training step (same configuration, batch 8, fp32, CPU): forward, backward
and the trainer's fused AdamW update. --steps rounds each time one step as it runs and then one step under
torch.profiler, which gives the time of each class of operators (self time: a class's time is its kernels', not
the profiler's bookkeeping around them):

- `products_onednn`: vqim's linear layers on oneDNN (forward and input gradient, `mkldnn::_linear_pointwise`);
- `products_torch_mm`: `torch.mm` / `addmm` / `bmm` (the linear layers' weight gradients, the quantizer's distance
  product);
- `attention`: PyTorch's fused CPU attention kernel, forward and backward;
- `rest`: everything else (elementwise work, norms, reductions, the argmax lookup, the optimizer, Python).

The classes' times are the means over the profiled steps, and the rest is the mean unprofiled step time less
them (so the profiler's own cost is not counted as the rest). Each class gets its share of the step time, its
model FLOPs (torch.utils.flop_counter, as in
tokenizer_speed.py), the FLOP/s it ran at inside the step and that rate's share of the sgemm limit measured in
the same run (benchmarks/machine.py: the faster of torch.mm and oneDNN at 2048³, before and after). From these
it prints what the step's MFU could be:

- `mfu`: the unprofiled steps' FLOP/s ÷ the limit (`mfu_of_profiled_steps`: the same for the profiled ones,
  to show what profiling costs);
- `mfu_if_rest_took_no_time`: products and attention as they ran, everything else free;
- `mfu_if_products_and_attention_ran_at_the_limit`: the rest as it ran, every FLOP at the sgemm rate;
- `mfu_if_all_matrix_work_ran_like_products_onednn`: the rest as it ran, every FLOP at the rate the oneDNN
  products reached in this step (weight gradients and attention as fast as the forward products);
- `rest_seconds_allowed_for`: for each target MFU, how long the rest could take with products and attention as
  they ran (negative: the target is out of reach even with the rest free).

Usage:
    python benchmarks/step_budget.py [--steps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from machine import Limits, count_flops
from tokenizer_speed import bench_config, trainer_update
from vqim import Tokenizer
from vqim.nn.memory import retain_freed_memory

# profiler event names (and model-FLOP keys of count_flops) of each class of matrix work
CLASSES = {
    "products_onednn": ("mkldnn::_linear_pointwise",),
    "products_torch_mm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
}  # fmt: skip


def op_class(name: str) -> str:
    for cls, names in CLASSES.items():
        if name in names:
            return cls
    return "rest"


def flop_class(key: str) -> str:
    """The class of a count_flops key ('mm', 'mkldnn._linear_pointwise', ...)."""
    return op_class(key.replace(".", "::", 1) if "." in key else "aten::" + key)


def budget(seconds: dict[str, float], flops: dict[str, int], step_s: float, limit: float) -> dict:
    """The split of one step's time (`seconds` by class, the rest = step_s − the classes) and its MFU bounds."""
    total_flops = sum(flops.values())
    matrix_s = sum(seconds.get(c, 0.0) for c in CLASSES)
    # On a noisy machine the profiled classes can take longer than the mean plain step; the rest is then 0
    # (and `classes_exceed_step` says so).
    rest_s = max(0.0, step_s - matrix_s)
    classes = {}
    for c in (*CLASSES, "rest"):
        s = rest_s if c == "rest" else seconds.get(c, 0.0)
        f = flops.get(c, 0)
        rate = f / s / 1e9 if s > 0 and f else None
        classes[c] = {
            "seconds_per_step": round(s, 4),
            "share_of_step": round(s / step_s, 3),
            "gflop_per_step": round(f / 1e9, 2),
            "gflops_in_step": round(rate, 1) if rate else None,
            "share_of_limit": round(rate / limit, 3) if rate else None,
        }
    at_limit_s = total_flops / (limit * 1e9)
    onednn_rate = classes["products_onednn"]["gflops_in_step"]
    return {
        "classes": classes,
        "classes_exceed_step": matrix_s > step_s,
        "mfu": round(total_flops / step_s / 1e9 / limit, 3),
        "mfu_if_rest_took_no_time": round(total_flops / matrix_s / 1e9 / limit, 3) if matrix_s > 0 else None,
        "mfu_if_products_and_attention_ran_at_the_limit": round(at_limit_s / (at_limit_s + rest_s), 3),
        "mfu_if_all_matrix_work_ran_like_products_onednn": (
            round(total_flops / (total_flops / (onednn_rate * 1e9) + rest_s) / 1e9 / limit, 3)
            if onednn_rate
            else None
        ),
        "rest_seconds_allowed_for": {
            f"mfu_{t:.2f}": round(at_limit_s / t - matrix_s, 4) for t in (0.7, 0.8, 0.9)
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="rounds of one plain and one profiled step (≥ 1)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("vit-vqgan-ss", **bench_config("vit")).train()
    update = trainer_update(tok)
    x = torch.rand(8, 3, 128, 128)

    def step() -> None:
        tok(x).loss.backward()
        update()

    flops: dict[str, int] = {}
    for key, n in count_flops(step).items():
        if key != "total":
            c = flop_class(key)
            flops[c] = flops.get(c, 0) + n
    seconds: dict[str, float] = {}
    unprofiled, profiled = [], []
    with Limits("cpu", shape=(8 * 256, 256, 1024)) as lim:
        for _ in range(args.warmup):
            step()
        for _ in range(args.steps):  # alternating, so both kinds of step see the same spells of the machine
            t = time.perf_counter()
            step()
            unprofiled.append(time.perf_counter() - t)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t = time.perf_counter()
                step()
                profiled.append(time.perf_counter() - t)
            for event in prof.key_averages():
                c = op_class(event.key)
                if c != "rest":
                    seconds[c] = seconds.get(c, 0.0) + event.self_cpu_time_total / 1e6 / args.steps
    limit = lim["sgemm_gflops"]
    step_s, profiled_s = statistics.mean(unprofiled), statistics.mean(profiled)
    out = {
        "benchmark": "step_budget",
        "config": {**bench_config("vit"), "train_batch": 8, "steps": args.steps, "threads": args.threads},
        "step_seconds": {"unprofiled": round(step_s, 4), "profiled": round(profiled_s, 4)},
        "gflop_per_step": round(sum(flops.values()) / 1e9, 2),
        "limit_sgemm_gflops": limit,
        "sgemm_gflops_by_library": lim.by_library(),
        "mfu_of_profiled_steps": round(sum(flops.values()) / profiled_s / 1e9 / limit, 3),
        **budget(seconds, flops, step_s, limit),
        "machine": lim.report(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
