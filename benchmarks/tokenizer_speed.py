"""Tokenizer speed: training-step and encode throughput, and the share of the machine's matmul speed it reaches,
printed as JSON.

Configuration: 128×128 images, patch 8 (16×16 tokens), width 256, 4 + 4 blocks, 4 heads, MLP 1024, 8192
codes, lookup dim 32, l2-norm; training step = forward + backward (L2 + VQ loss) + the trainer's update
(gradient norm, then clipping and the non-finite skip inside the fused AdamW step) at batch 8; encode at batch
32; fp32 on CPU with 2 threads. (docs/reference-figures.md lists public implementations'
figures at this configuration, measured elsewhere; they are references, and nothing here divides by them.)

Printed: images/s (median, min–max of --repeats timed calls); the FLOPs of one training step and of one
encode, counted with torch.utils.flop_counter over an untimed call (matrix products, convolutions and
attention, forward + backward; model FLOPs: a fused kernel's recomputation is not counted); the FLOP/s they
imply; and MFU = that FLOP/s ÷ the sgemm speed measured in the same run (benchmarks/machine.py: before and after
the workload, the larger of the two), beside the share of sgemm at the model's own largest product shape. On
CPU, `train_mfu_paired` times --repeats more training steps, each right after an sgemm sample, and gives the
per-pair MFU's median and quartiles: the figure to quote on a machine whose speed moves within a run; and
`train_step_time_onednn_over_plain_linear` times --repeats pairs of steps with the linear layers on oneDNN
(vqim's default on x86-64 CPUs, vqim.nn.linear) and on plain F.linear (MKL), and gives the time ratio.

--gan stylegan|patchgan times the full adversarial step as `vqim train-tokenizer` runs it: the generator step
(reconstruction + GAN term through the discriminator, backward, Adam) and then the discriminator step on real
and reconstructed images (lazy R1 every 16 steps for StyleGAN, the JSON says how many timed steps ran it;
VQGAN's adaptive weight for PatchGAN).
--compare runs the ViT and the CNN at the same 16×16 token grid and about the same parameter count (7.8M vs
8.6M) in one process and prints their ratio, both sides timed in this run. Usage:
    python benchmarks/tokenizer_speed.py [--repeats 7] [--device cpu|cuda] [--threads 2] [--arch vit|cnn]
        [--gan none|stylegan|patchgan] [--compare]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from machine import Limits, count_flops, linear_paths_ab, paired_mfu, stats, timed
from vqim import Tokenizer
from vqim.nn import linear
from vqim.nn.memory import retain_freed_memory
from vqim.train.common import param_groups
from vqim.train.trainer import clip_scale, grad_norm, nonfinite_flag, optimizer_step


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


def trainer_update(tok: Tokenizer) -> Callable[[], None]:
    """The update of `vqim train-tokenizer`, as a call after each backward: AdamW with decay on matrices only,
    gradient clipping (1.0) and the non-finite skip folded into the fused step, then the gradients cleared."""
    opt = torch.optim.AdamW(param_groups(tok, 1e-4), lr=1e-4, betas=(0.9, 0.99), fused=True)

    def update() -> None:
        norm = grad_norm(tok.parameters())
        optimizer_step(opt, nonfinite_flag(norm), clip_scale(norm, 1.0))
        opt.zero_grad(set_to_none=True)

    return update


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage does not count them)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(fn, n_items: int, repeats: int, warmup: int, device: str) -> dict:
    """Items/s of `repeats` timed calls after `warmup` untimed ones; fn gets the call's index."""
    i = iter(range(warmup + repeats))
    for _ in range(warmup):
        fn(next(i))
    return stats([n_items / t for t in timed(lambda: fn(next(i)), repeats, device)])


def run_arch(args, arch: str) -> dict:
    """Train-step and encode throughput of one architecture (optionally with the full GAN step), and the
    FLOPs of each, counted over untimed calls."""
    dev = args.device
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("vit-vqgan-ss", **bench_config(arch)).to(dev)
    params = sum(p.numel() for p in tok.parameters())
    model = torch.compile(tok, mode=args.compile_mode) if args.compile else tok
    update = trainer_update(tok)
    x_train = torch.rand(args.train_batch, 3, 128, 128, device=dev)
    x_enc = torch.rand(args.encode_batch, 3, 128, 128, device=dev)
    amp = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16)
    gan = None
    if args.gan != "none":
        from vqim.train.gan import GAN

        # `vqim train-tokenizer`'s defaults: StyleGAN with lazy R1 (γ 10 every 16 steps), PatchGAN with the
        # adaptive weight; the GAN term from step 0.
        gan = GAN.build(
            args.gan, 128, lr=1e-4, betas=(0.9, 0.99), weight=0.1, adaptive=None, start=0,
            r1_gamma=10.0 if args.gan == "stylegan" else 0.0, r1_interval=16,
        )  # fmt: skip
        gan.disc.to(dev)

    def train_step(step: int, net=model) -> None:
        with amp:
            out = net(x_train)  # loss = VQ + L2 (logit-Laplace head off, l1 weight 0)
            loss = out.loss
            if gan is not None:
                loss = loss + gan.generator_term(out.reconstruction, loss, tok.decoder.last_layer)[0]
        loss.backward()
        update()
        if gan is not None:
            with amp:
                gan.discriminator_step(x_train, out.reconstruction.detach(), step)

    def encode(_step: int = 0) -> None:
        with amp:
            tok.encode(x_enc)

    # Lazy R1 runs on steps divisible by its interval; count the timed steps that ran it, and weight the FLOPs
    # of a step with R1 and one without accordingly (both counted on the eager model, outside the timing).
    r1_on = gan is not None and gan.r1_gamma > 0
    timed_steps = range(args.warmup, args.warmup + args.repeats)
    r1_timed = sum(1 for s in timed_steps if r1_on and s % gan.r1_interval == 0)
    tok.train()
    step_flops = count_flops(lambda: train_step(1, tok))
    flops_per_step = step_flops["total"]
    if r1_timed:
        r1_flops = count_flops(lambda: train_step(0, tok))["total"]
        flops_per_step = (r1_timed * r1_flops + (args.repeats - r1_timed) * flops_per_step) / args.repeats
    faults0 = minor_faults()
    train = measure(train_step, args.train_batch, args.repeats, args.warmup, dev)
    faults_per_step = (minor_faults() - faults0) / (args.repeats + args.warmup)
    steps = iter(range(args.warmup + args.repeats, 10**9))
    paired = (
        paired_mfu(lambda: train_step(next(steps)), flops_per_step, args.repeats, dev)
        if dev == "cpu"
        else None
    )
    linear_ab = (
        linear_paths_ab(lambda: train_step(next(steps)), args.repeats)
        if dev == "cpu" and not args.compile and linear._onednn
        else None
    )
    tok.eval()
    enc_flops = count_flops(encode)
    enc = measure(encode, args.encode_batch, args.repeats, args.warmup, dev)
    return {
        "config": {**bench_config(arch), "train_batch": args.train_batch, "encode_batch": args.encode_batch},
        "params": params,
        "disc_params": sum(p.numel() for p in gan.disc.parameters()) if gan is not None else 0,
        "train_images_per_s": train,
        "encode_images_per_s": enc,
        # Pages the kernel had to map (and zero) for this process, per training step: freed memory handed back
        # to the kernel and faulted in again (see --malloc).
        "minor_page_faults_per_train_step": round(faults_per_step),
        # Each of --repeats further training steps right after an sgemm sample, MFU per pair (machine.paired_mfu):
        # on a shared machine whose speed moves within a run, steadier than the median rate over sgemm's best.
        "train_mfu_paired": paired,
        # Training step with the linear layers' oneDNN product against plain F.linear (MKL), alternating
        # (machine.linear_paths_ab); None where it does not apply (GPU, compiled, no oneDNN path).
        "train_step_time_onednn_over_plain_linear": linear_ab,
        "flops": {
            "train_per_image": round(flops_per_step / args.train_batch),
            "encode_per_image": round(enc_flops["total"] / args.encode_batch),
            "train_step_by_op": step_flops,
            "encode_by_op": enc_flops,
            "r1_steps_among_timed": r1_timed,
            "counted_with": "torch.utils.flop_counter.FlopCounterMode over one untimed call, eager model: "
            "matmuls, convolutions, attention (full score matrix), forward + backward; 2 FLOPs per MAC",
        },
    }


def utilisation(run: dict, limits: Limits, shape_is_its_own: bool) -> dict:
    """Achieved FLOP/s at the median rate, and its share of the sgemm speed measured in this run (and of sgemm
    at the workload's shape, when that shape is this architecture's)."""
    out: dict = {"achieved_gflops": {}, "mfu": {}}
    for kind in ("train", "encode"):
        gflops = run[f"{kind}_images_per_s"]["median"] * run["flops"][f"{kind}_per_image"] / 1e9
        out["achieved_gflops"][kind] = round(gflops, 1)
        out["mfu"][kind] = round(gflops / limits["sgemm_gflops"], 3)
        # The same FLOP/s over each library's own sgemm (the MFU above uses the fastest)
        out.setdefault("mfu_against_each_library", {})[kind] = {
            lib: round(gflops / v, 3) for lib, v in limits.by_library().items()
        }
        if shape_is_its_own:
            out.setdefault("share_of_workload_shape_sgemm", {})[kind] = round(
                gflops / limits["sgemm_gflops_at_workload_shape"], 3
            )
    return out


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
    ap.add_argument("--malloc", choices=["retain", "default"], default="retain",
                    help="retain: freed memory kept for reuse, as `vqim train-tokenizer` sets it on CPU "
                    "(vqim.nn.memory); default: the C library's own policy")  # fmt: skip
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode, e.g. max-autotune-no-cudagraphs")  # fmt: skip
    args = ap.parse_args()
    retained = args.malloc == "retain" and retain_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = args.device
    archs = ("vit", "cnn") if args.compare else (args.arch,)
    # The ViT's largest product: its MLP over every token of the training batch, (B·256, 256) @ (256, 1024).
    shape = (args.train_batch * 256, 256, 1024) if "vit" in archs else None
    with Limits(dev, torch.bfloat16 if args.bf16 else torch.float32, shape) as limits:
        runs = {arch: run_arch(args, arch) for arch in archs}
    for arch, r in runs.items():
        r.update(utilisation(r, limits, shape_is_its_own=arch == "vit"))
    head = {
        "device": dev, "threads": args.threads, "bf16": args.bf16, "gan": args.gan,
        "compile": args.compile_mode if args.compile else False, "malloc_retains_freed_memory": retained,
    }  # fmt: skip

    if args.compare:
        v, c = runs["vit"], runs["cnn"]
        result = {
            **head, "token_grid": [16, 16], "runs": runs,
            "params_ratio_cnn_over_vit": round(c["params"] / v["params"], 3),
            # Both sides timed in this process, one after the other.
            "vit_over_cnn_train": round(v["train_images_per_s"]["median"] / c["train_images_per_s"]["median"], 2),
            "vit_over_cnn_encode": round(v["encode_images_per_s"]["median"] / c["encode_images_per_s"]["median"], 2),
            "machine": limits.report(),
        }  # fmt: skip
    else:
        result = {**head, **runs[args.arch], "machine": limits.report()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
