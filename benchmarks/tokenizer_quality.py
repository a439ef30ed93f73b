"""Tokenizer quality at a fixed wall-clock budget on the built-in photos, printed as JSON.

Trains the speed benchmark's configuration (patch 8, width 256, 4 + 4 blocks, 4 heads, MLP 1024, 8192 codes,
lookup dim 32, l2-norm) at 64 px (8×8 tokens), batch 16, L2 + VQ loss, for a fixed budget per variant, then
evaluates on the held-out photographs. Variants:
    vqim          data-dependent codebook init + dead-code restarts (vqim's defaults for small budgets)
    paper-plain   codes from a normal, no restarts (the paper's recipe, as public re-implementations run it)
References that need no training: every tile painted its mean colour; 8×8 block averages upsampled.

    python benchmarks/tokenizer_quality.py [--minutes 8] [--variants vqim,paper-plain] [--out runs/bench_quality]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vqim import Tokenizer
from vqim.data import build_dataset
from vqim.evaluate import evaluate_tokenizer
from vqim.metrics import psnr, ssim
from vqim.train.tokenizer import TokenizerTrainConfig, train_tokenizer

MODEL = dict(
    image_size=64, patch_size=8, enc_dim=256, enc_depth=4, enc_heads=4, enc_mlp_dim=1024, dec_dim=256,
    dec_depth=4, dec_heads=4, dec_mlp_dim=1024, codebook_size=8192, lookup_dim=32, l2_norm=True,
    logit_laplace=False, l1_weight=0.0,
)  # fmt: skip
VARIANTS = {
    "vqim": {"codebook_init": "data", "dead_code_window": 50},
    "paper-plain": {"codebook_init": "normal", "dead_code_window": 0},
}


def references(images: torch.Tensor) -> dict:
    mean = images.mean((2, 3), keepdim=True).expand_as(images)
    blocks = F.interpolate(F.avg_pool2d(images, 8), scale_factor=8, mode="nearest")
    return {
        "mean_colour_per_tile": {
            "psnr": float(psnr(mean, images).mean()),
            "ssim": float(ssim(mean, images).mean()),
        },
        "block_average_8x8": {
            "psnr": float(psnr(blocks, images).mean()),
            "ssim": float(ssim(blocks, images).mean()),
        },
    }


def steps_for_budget(model: dict, seconds: float, batch: int) -> int:
    """Estimate how many steps fit in the budget from a short timed probe (so the lr schedule completes)."""
    tok = Tokenizer.from_preset("vit-vqgan-ss", **model).train()
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, 64, 64)
    times = []
    for _ in range(8):
        t = time.perf_counter()
        tok(x).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    per_step = sorted(times[2:])[len(times[2:]) // 2] * 1.1  # data loading and logging overhead
    return max(10, int(seconds / per_step))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=8.0, help="training budget per variant")
    ap.add_argument("--variants", default="vqim,paper-plain")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_quality")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    eval_set = build_dataset("photos", 64, train=False)
    images = torch.stack([eval_set[i]["image"] for i in range(len(eval_set))])
    result = {
        "config": {
            **MODEL,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "minutes_per_variant": args.minutes,
        },
        "eval_images": len(eval_set),
        "references": references(images),
        "variants": {},
    }
    steps = steps_for_budget(MODEL, 60 * args.minutes, args.batch_size)
    for name in args.variants.split(","):
        out = Path(args.out) / name
        cfg = TokenizerTrainConfig(
            out=str(out), data="photos", preset="vit-vqgan-ss", model={**MODEL, **VARIANTS[name]}, steps=steps,
            batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=False, log_every=10,
            image_every=10**9, ckpt_every=10**9, max_minutes=args.minutes,
        )  # fmt: skip
        summary = train_tokenizer(cfg)
        tok = Tokenizer.from_pretrained(out)
        m = evaluate_tokenizer(tok, eval_set, batch_size=64)
        result["variants"][name] = {
            "switches": VARIANTS[name],
            "steps": summary["steps"],
            "train_seconds": round(summary["seconds"], 1),
            "psnr": round(m["psnr"], 3),
            "ssim": round(m["ssim"], 4),
            "codes_used": m["codes_used"],
            "usage": round(m["usage"], 4),
            "perplexity": round(m["perplexity"], 1),
            "restarted_codes": summary["restarted_codes"],
        }
    ref = result["references"]["mean_colour_per_tile"]["psnr"]
    for v in result["variants"].values():
        v["psnr_over_mean_colour_db"] = round(v["psnr"] - ref, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
