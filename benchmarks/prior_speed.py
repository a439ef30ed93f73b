"""Prior training speed: tokens/s of a training step and model FLOP utilisation, printed as JSON.

A training step is forward + cross-entropy + backward + AdamW update on random tokens (class-conditional with
label dropout, dropout as in the preset). FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B):

    6·N + 12·depth·dim·T

with N the parameters used in matrix products (the Transformer blocks and the head; the embedding tables are
lookups and are left out) and T the sequence length; the attention term counts the full T×T score matrix,
as PaLM does, although causal attention needs only half. MFU = achieved FLOP/s ÷ the machine's matmul speed
measured in the same run (sgemm 2048² in fp32, or bf16 with --bf16).
Usage:
    python benchmarks/prior_speed.py [--preset vim-small] [--batch 8] [--grid 16] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vqim import Prior, prior_presets


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_gflops(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="vim-small", choices=prior_presets())
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grid", type=int, default=16, help="token grid side (sequence length grid²)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = args.device

    prior = Prior.from_preset(
        args.preset, vocab_size=args.vocab, grid_size=(args.grid, args.grid), num_classes=args.num_classes
    ).to(dev)
    prior.train()
    cfg = prior.config
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=0.01)
    seq = cfg.seq_len
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, seq), device=dev)
    labels = torch.randint(0, max(cfg.num_classes, 1), (args.batch,), device=dev) if cfg.conditional else None
    amp = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16)

    def step() -> float:
        with amp:
            loss = prior.loss(tokens, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        _sync(dev)
        t = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t)
    rates = [args.batch * seq / t for t in times]

    counts = prior.num_params()
    n_matmul = counts["transformer"] + counts["head"]
    flops_per_token = 6 * n_matmul + 12 * cfg.depth * cfg.dim * seq
    peak = matmul_gflops(dev, torch.bfloat16 if args.bf16 else torch.float32)
    achieved = statistics.median(rates) * flops_per_token / 1e9
    print(
        json.dumps(
            {
                "config": {**cfg.to_dict(), "preset": args.preset, "batch": args.batch, "bf16": args.bf16},
                "params": counts,
                "device": dev,
                "threads": args.threads,
                "torch": torch.__version__,
                "train_tokens_per_s": {
                    "median": round(statistics.median(rates), 1),
                    "min": round(min(rates), 1),
                    "max": round(max(rates), 1),
                },
                "flops_per_token": flops_per_token,
                "flops_formula": "PaLM: 6*N + 12*depth*dim*T, N = Transformer + head parameters (no embeddings)",
                "achieved_gflops": round(achieved, 2),
                "matmul_peak_gflops": round(peak, 1),
                "matmul_peak_measured_with": f"{'bf16' if args.bf16 else 'fp32'} matmul 2048x2048",
                "mfu": round(achieved / peak, 4),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
