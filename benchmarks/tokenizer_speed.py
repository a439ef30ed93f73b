"""Tokenizer speed: training-step and encode throughput, printed as JSON.

Configuration (the public figures in PEER_FIGURES.md use the same): 128×128 images, patch 8 (16×16 tokens),
width 256, 4 + 4 blocks, 4 heads, MLP 1024, 8192 codes, lookup dim 32, l2-norm; training step = forward +
backward (L2 + VQ loss) + Adam update at batch 8; encode at batch 32; fp32 on CPU with 2 threads.

The machine's matmul speed is measured in the same run (sgemm 2048²), so figures from another day can be
compared after normalising by it.

--gan stylegan|patchgan times the full adversarial step as `vqim train-tokenizer` runs it: the generator step
(reconstruction + GAN term through the discriminator, backward, Adam) and then the discriminator step on real
and reconstructed images (lazy R1 every 16 steps for StyleGAN). --compare runs the ViT and the CNN at the same
16×16 token grid and about the same parameter count (7.8M vs 8.6M) in one process and prints their ratio (the
ViT-VQGAN paper: SS 1.6× faster than CNN ×1). Usage:
    python benchmarks/tokenizer_speed.py [--repeats 7] [--device cpu|cuda] [--threads 2] [--arch vit|cnn]
        [--gan none|stylegan|patchgan] [--compare]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vqim import Tokenizer

# Public implementations at these configurations, from PEER_FIGURES.md, measured on a 2-core Xeon with
# sgemm ≈ 202 GFLOP/s. ViT: enhancing-transformers (two runs of the training step: medians 7.8 and 10.0).
# CNN: taming-transformers VQGAN, ch 64, ch_mult (1, 1, 2, 2) → f8, 2 res blocks, attention at 16, z 256.
PEERS = {
    "vit": {"name": "enhancing-transformers", "train_images_per_s": 10.0, "encode_images_per_s": 26.3},
    "cnn": {"name": "taming-transformers", "train_images_per_s": 1.0, "encode_images_per_s": 8.7},
}
PEER_SGEMM = 202.0


def sgemm_gflops(device: str, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    _sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_config(arch: str = "vit", **kw) -> dict:
    if arch == "cnn":  # taming's f8 configuration at the same 16×16 token grid
        return dict(
            arch="cnn", image_size=128, patch_size=8, enc_dim=256, dec_dim=256, enc_heads=1, dec_heads=1,
            codebook_size=8192, lookup_dim=256, l2_norm=False, logit_laplace=False, cnn_channels=64,
            cnn_ch_mult=(1, 1, 2, 2), cnn_num_res_blocks=2, cnn_attn_resolutions=(16,), **kw,
        )  # fmt: skip
    return dict(
        image_size=128, patch_size=8, enc_dim=256, enc_depth=4, enc_heads=4, enc_mlp_dim=1024,
        dec_dim=256, dec_depth=4, dec_heads=4, dec_mlp_dim=1024, codebook_size=8192, lookup_dim=32,
        l2_norm=True, logit_laplace=False, **kw,
    )  # fmt: skip


def measure(fn, n_items: int, repeats: int, warmup: int, device: str) -> dict:
    for _ in range(warmup):
        fn()
    _sync(device)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        rates.append(n_items / (time.perf_counter() - t))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


class _Backward:
    """Stands in for the Accelerator in `discriminator_step` (single process: plain backward)."""

    @staticmethod
    def backward(loss: torch.Tensor) -> None:
        loss.backward()


def run_arch(args, arch: str) -> dict:
    """Train-step and encode throughput of one architecture (optionally with the full GAN step)."""
    from vqim.train.tokenizer import TokenizerTrainConfig, build_gan, discriminator_step

    dev = args.device
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("vit-vqgan-ss", **bench_config(arch)).to(dev)
    params = sum(p.numel() for p in tok.parameters())
    model = torch.compile(tok, mode=args.compile_mode) if args.compile else tok
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-4, fused=True)
    x_train = torch.rand(args.train_batch, 3, 128, 128, device=dev)
    x_enc = torch.rand(args.encode_batch, 3, 128, 128, device=dev)
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=args.bf16)
    gcfg = TokenizerTrainConfig(out="", disc=args.gan, r1_gamma=10.0 if args.gan == "stylegan" else 0.0)
    disc, d_opt, gan = build_gan(gcfg, 128)
    if disc is not None:
        disc = disc.to(dev)
    step = [0]

    def train_step() -> None:
        with amp:
            out = model(x_train)  # loss = VQ + L2 (logit-Laplace head off, l1 weight 0)
            loss = out.loss
            if disc is not None:
                loss = loss + gcfg.adv_weight * gan["g"](disc(out.reconstruction))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if disc is not None:
            with amp:
                discriminator_step(
                    gcfg, disc, d_opt, gan, x_train, out.reconstruction.detach(), step[0], _Backward
                )
        step[0] += 1

    def encode() -> None:
        with amp:
            tok.encode(x_enc)

    tok.train()
    train = measure(train_step, args.train_batch, args.repeats, args.warmup, dev)
    tok.eval()
    enc = measure(encode, args.encode_batch, args.repeats, args.warmup, dev)
    return {
        "config": {**bench_config(arch), "train_batch": args.train_batch, "encode_batch": args.encode_batch},
        "params": params,
        "disc_params": sum(p.numel() for p in disc.parameters()) if disc is not None else 0,
        "train_images_per_s": {k: round(v, 2) for k, v in train.items()},
        "encode_images_per_s": {k: round(v, 2) for k, v in enc.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--encode-batch", type=int, default=32)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    ap.add_argument("--arch", choices=["vit", "cnn"], default="vit", help="ViT-VQGAN or the taming CNN VQGAN")
    ap.add_argument("--gan", choices=["none", "stylegan", "patchgan"], default="none",
                    help="time the full generator + discriminator step")  # fmt: skip
    ap.add_argument("--compare", action="store_true", help="ViT vs CNN at matched grid and size, one process")
    ap.add_argument("--compile", action="store_true", help="torch.compile the tokenizer")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode, e.g. max-autotune-no-cudagraphs")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = args.device

    if args.compare:
        runs = {arch: run_arch(args, arch) for arch in ("vit", "cnn")}
        v, c = runs["vit"], runs["cnn"]
        result = {
            "device": dev, "threads": args.threads, "bf16": args.bf16, "gan": args.gan,
            "compile": args.compile_mode if args.compile else False, "runs": runs,
            "token_grid": [16, 16], "params_ratio_cnn_over_vit": round(c["params"] / v["params"], 3),
            "vit_over_cnn_train": round(v["train_images_per_s"]["median"] / c["train_images_per_s"]["median"], 2),
            "vit_over_cnn_encode": round(v["encode_images_per_s"]["median"] / c["encode_images_per_s"]["median"], 2),
            "paper_vit_ss_over_cnn_x1_train": round(1520 / 946, 2),
        }  # fmt: skip
        print(json.dumps(result, indent=2))
        return

    r = run_arch(args, args.arch)
    train, enc = r["train_images_per_s"], r["encode_images_per_s"]
    gflops = sgemm_gflops(dev)
    machine = gflops / PEER_SGEMM if dev == "cpu" else None
    peer = PEERS[args.arch]
    result = {
        "config": r["config"],
        "params": r["params"],
        "device": dev,
        "threads": args.threads,
        "bf16": args.bf16,
        "gan": args.gan,
        "disc_params": r["disc_params"],
        "compile": args.compile_mode if args.compile else False,
        "sgemm_gflops": round(gflops, 1),
        "train_images_per_s": train,
        "encode_images_per_s": enc,
    }
    if dev == "cpu" and args.gan == "none":
        # The public figures time the reconstruction step without a discriminator.
        result["peer"] = {**peer, "sgemm_gflops": PEER_SGEMM}
        result["speedup_vs_peer_train"] = round(train["median"] / peer["train_images_per_s"], 2)
        result["speedup_vs_peer_encode"] = round(enc["median"] / peer["encode_images_per_s"], 2)
        # Same ratio after scaling the peer's figure by this machine's matmul speed relative to theirs.
        result["speedup_vs_peer_train_machine_normalised"] = round(
            train["median"] / (peer["train_images_per_s"] * machine), 2
        )
        result["speedup_vs_peer_encode_machine_normalised"] = round(
            enc["median"] / (peer["encode_images_per_s"] * machine), 2
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
