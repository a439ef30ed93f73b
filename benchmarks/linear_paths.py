"""The linear layers' two CPU paths, timed against each other on small models: a training step with vqim's
default (many-row fp32 products through oneDNN on x86-64, `vqim.nn.linear`) and the same step with every layer
on plain `F.linear` (MKL), alternating step by step in one process, printed as JSON.

Models: the demo's (`make demo`): the vit-vqgan-tiny tokenizer at batch 16 (64×64 images, 8×8 tokens) and the
vim-tiny class-conditional prior at batch 64 (8×8 tokens), each with its AdamW step; and, with --products, single
products of several shapes (rows × in → out), forward, input gradient and weight gradient, each path's
GFLOP/s (the last four shapes are the tokenizer_speed.py step's). The larger
models' figures are printed by tokenizer_speed.py (`train_step_time_onednn_over_plain_linear`) and
prior_speed.py (`linear_ab`). Ratios are oneDNN ÷ F.linear time: below 1, oneDNN is faster.

Usage:
    python benchmarks/linear_paths.py [--pairs 30] [--threads 2] [--products]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from machine import Limits, linear_paths_ab, seconds_per_call
from vqim import Tokenizer
from vqim.nn import linear
from vqim.nn.memory import retain_freed_memory
from vqim.prior import Prior
from vqim.train.common import param_groups


def demo_steps(pairs: int) -> dict:
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("vit-vqgan-tiny").train()
    opt = torch.optim.AdamW(param_groups(tok, 1e-4), lr=1e-4, fused=True)
    x = torch.rand(16, 3, 64, 64)

    def tok_step() -> None:
        tok(x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    prior = Prior.from_preset("vim-tiny", num_classes=10).train()
    popt = torch.optim.AdamW(prior.parameters(), lr=1e-4, fused=True)
    tokens, labels = torch.randint(0, 512, (64, 64)), torch.randint(0, 10, (64,))

    def prior_step() -> None:
        prior.loss(tokens, labels).backward()
        popt.step()
        popt.zero_grad(set_to_none=True)

    return {
        "tokenizer vit-vqgan-tiny, batch 16": linear_paths_ab(tok_step, pairs, warmup_pairs=3),
        "prior vim-tiny, batch 64": linear_paths_ab(prior_step, pairs, warmup_pairs=3),
    }


def product_rates(rows: int, d_in: int, d_out: int) -> dict:
    """GFLOP/s of one product shape through each path: forward (x · Wᵀ + b), input gradient (g · W) and weight
    gradient (gᵀ · x: vqim's on `torch.mm`, against oneDNN with the transposed operands as they are, with gᵀ
    copied contiguous first, and as (xᵀ · g)ᵀ with xᵀ copied)."""
    x, w, b = torch.randn(rows, d_in), torch.randn(d_out, d_in), torch.randn(d_out)
    g = torch.randn(rows, d_out)
    flops = 2 * rows * d_in * d_out
    return {
        kind: {path: round(flops / seconds_per_call(f, "cpu") / 1e9, 1) for path, f in paths.items()}
        for kind, paths in product_paths(x, w, b, g).items()
    }


def product_paths(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> dict:
    """The calls `product_rates` times, by product and path; each path of a product computes the same result."""
    return {
        "forward": {"onednn": lambda: linear._onednn_product(x, w, b), "f_linear": lambda: F.linear(x, w, b)},
        "input_gradient": {
            "onednn": lambda: linear._onednn_product(g, w.t(), None),
            "f_linear": lambda: g @ w,
        },
        "weight_gradient": {
            "torch_mm": lambda: torch.mm(g.t(), x),
            "onednn_strided": lambda: linear._onednn_product(g.t(), x.t(), None),
            "onednn_g_copied": lambda: linear._onednn_product(g.t().contiguous(), x.t(), None),
            "onednn_x_copied": lambda: linear._onednn_product(x.t().contiguous(), g.t(), None).t(),
        },
    }


def products() -> dict:
    """`product_rates` for narrow and wide layers at a few row counts."""
    shapes = [(1024, 64, 64), (4096, 64, 64), (1024, 128, 512), (4096, 128, 512), (2048, 256, 256),
              (2048, 256, 768), (2048, 256, 1024), (2048, 1024, 256)]  # fmt: skip
    return {f"{r}x{i}->{o}": product_rates(r, i, o) for r, i, o in shapes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--products", action="store_true", help="also single products of several shapes")
    args = ap.parse_args()
    if not linear._onednn:
        raise SystemExit(
            "oneDNN's linear path is taken on x86-64 CPU builds of PyTorch only; nothing to compare"
        )
    retained = retain_freed_memory()
    torch.set_num_threads(args.threads)
    with Limits("cpu") as limits:
        steps = demo_steps(args.pairs)
        prods = products() if args.products else None
    print(json.dumps({"threads": args.threads, "malloc_retains_freed_memory": retained, "training_steps": steps,
                      "products_gflops": prods, "machine": limits.report()}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
