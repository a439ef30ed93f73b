"""Prior training speed: tokens/s of a training step and model FLOP utilisation, printed as JSON.

A training step is forward + cross-entropy + backward + AdamW update on random tokens (class-conditional with
label dropout, dropout as in the preset). FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B):

    6·N + 12·depth·dim·T

with N the parameters used in matrix products (the Transformer blocks and the head; the embedding tables are
lookups and are left out) and T the sequence length; the attention term counts the full T×T score matrix,
as PaLM does, although causal attention needs only half. The FLOPs of one step are also counted with
torch.utils.flop_counter over an untimed step (matrix products and attention, forward + backward), as a check
of the formula. MFU = achieved FLOP/s ÷ the machine's matmul speed measured in the same run
(benchmarks/machine.py: sgemm 2048² in fp32, or bf16 with --bf16, before and after the workload, the larger
of the two), beside the share of sgemm at the model's largest product, its MLP over the batch.
Usage:
    python benchmarks/prior_speed.py [--preset vim-small] [--batch 8] [--grid 16] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from machine import Limits, count_flops, stats, timed
from vqim import Prior, prior_presets


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

    counts = prior.num_params()
    n_matmul = counts["transformer"] + counts["head"]
    flops_per_token = 6 * n_matmul + 12 * cfg.depth * cfg.dim * seq
    counted = count_flops(step)  # one untimed step
    counted_per_token = counted["total"] / (args.batch * seq)
    shape = (args.batch * seq, cfg.dim, cfg.mlp_dim)  # the MLP's first product over the batch
    with Limits(dev, torch.bfloat16 if args.bf16 else torch.float32, shape) as limits:
        for _ in range(args.warmup):
            step()
        rates = [args.batch * seq / t for t in timed(step, args.repeats, dev)]
    median = statistics.median(rates)
    achieved = median * flops_per_token / 1e9
    achieved_counted = median * counted_per_token / 1e9
    print(
        json.dumps(
            {
                "config": {**cfg.to_dict(), "preset": args.preset, "batch": args.batch, "bf16": args.bf16},
                "params": counts,
                "device": dev,
                "threads": args.threads,
                "torch": torch.__version__,
                "train_tokens_per_s": stats(rates, 1),
                "flops_per_token": flops_per_token,
                "flops_formula": "PaLM: 6*N + 12*depth*dim*T, N = Transformer + head parameters (no embeddings)",
                "flops_per_token_counted": round(counted_per_token),
                "flops_counted_by_op": counted,
                "achieved_gflops": round(achieved, 2),
                "achieved_gflops_counted": round(achieved_counted, 2),
                "mfu": round(achieved / limits["sgemm_gflops"], 4),
                "mfu_counted": round(achieved_counted / limits["sgemm_gflops"], 4),
                "share_of_workload_shape_sgemm": round(
                    achieved / limits["sgemm_gflops_at_workload_shape"], 4
                ),
                "machine": limits.report(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
