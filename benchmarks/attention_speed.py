"""Attention forward + backward: PyTorch's fused kernel (`scaled_dot_product_attention`) against the same
attention written as matrix products (scores, softmax, weighted sum; the probabilities kept for the backward
pass), at several sequence lengths, printed as JSON.

Each length runs at a batch that keeps the work comparable (8 × 256² score entries per head), 4 heads of width 64
(the tokenizer benchmark's attention), fp32. Both forms are timed alternately in rounds, and the ratio is taken
per round (products ÷ fused; above 1: the fused kernel is faster). GFLOP/s are model FLOPs, 3 × the forward's
4·B·H·N²·d (no recomputation counted), and their share of the sgemm speed measured in the same run.

Usage:
    python benchmarks/attention_speed.py [--lengths 64,256,512,1024] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from machine import Limits, timed


def products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)
    return torch.matmul(s.softmax(-1), v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="64,256,512,1024")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5, help="forward + backward calls per timed round")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h, d = args.heads, args.head_dim
    rows = []
    with Limits("cpu") as limits:
        for n in map(int, args.lengths.split(",")):
            b = max(1, 8 * 256 * 256 // (n * n))
            q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
            g = torch.randn(b, h, n, d)
            forms = {"fused": F.scaled_dot_product_attention, "products": products}

            def run(f, q=q, k=k, v=v, g=g):  # noqa: ANN001, ANN202
                return lambda: [f(q, k, v).backward(g) for _ in range(args.calls)]

            for f in forms.values():
                run(f)()  # warm-up
            t = {name: [] for name in forms}
            for _ in range(args.rounds):
                for name, f in forms.items():
                    t[name].append(timed(run(f), 1, "cpu")[0] / args.calls)
            flops = 3 * 4 * b * h * n * n * d
            ms = {name: statistics.median(v) * 1e3 for name, v in t.items()}
            ratios = [p / f for p, f in zip(t["products"], t["fused"])]
            rows.append({
                "length": n, "batch": b,
                "ms_forward_backward": {name: round(v, 2) for name, v in ms.items()},
                "gflops": {name: round(flops / v / 1e6, 1) for name, v in ms.items()},
                "products_over_fused_time": {"median": round(statistics.median(ratios), 3),
                                             "min": round(min(ratios), 3), "max": round(max(ratios), 3)},
            })  # fmt: skip
    sgemm = limits["sgemm_gflops"]
    for r in rows:
        r["share_of_sgemm"] = {name: round(v / sgemm, 3) for name, v in r["gflops"].items()}
    print(json.dumps({"config": vars(args), "runs": rows, "machine": limits.report()}, indent=2))


if __name__ == "__main__":
    main()
