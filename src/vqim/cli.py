"""`vqim` command line: thin subcommands over the library functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("vqim")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _json_out(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


# ---------------------------------------------------------------------------------------------- train
def add_train_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-tokenizer", help="train a tokenizer (CPU, GPU, or `accelerate launch`)")
    p.add_argument("--preset", default="vit-vqgan-tiny", help="tokenizer preset (see `vqim presets`)")
    p.add_argument("--data", required=True, help="image folder, .npy/.npz array, or built-in: photos, digits")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16, help="global batch, summed over processes")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's image size")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's paper)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --steps")
    p.add_argument(
        "--min-lr-ratio", type=float, default=0.5, help="cosine decay ends at lr × this (paper: 0.5)"
    )
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--image-every", type=int, default=500)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much training time")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the model (MODE: default, max-autotune-no-cudagraphs, ...)")  # fmt: skip
    p.add_argument("--mixed-precision", choices=["auto", "no", "bf16"], default="auto")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("adversarial and perceptual terms")
    g.add_argument("--disc", choices=["none", "stylegan", "patchgan"], default=None,
                   help="discriminator (default: the preset's paper; see `vqim presets`)")  # fmt: skip
    g.add_argument("--disc-start", type=int, default=None, help="step from which the GAN term is used")
    g.add_argument(
        "--adv-weight", type=float, default=None, help="GAN term weight (ViT-VQGAN 0.1, VQGAN 0.8)"
    )
    g.add_argument("--adaptive-weight", action=argparse.BooleanOptionalAction, default=None,
                   help="VQGAN's adaptive GAN weight (default: on for patchgan)")  # fmt: skip
    g.add_argument("--r1-gamma", type=float, default=None, help="lazy R1 penalty γ (0: off)")
    g.add_argument("--r1-interval", type=int, default=None)
    g.add_argument("--disc-lr", type=float, default=None)
    g.add_argument("--disc-channels", type=int, default=None, help="discriminator width (default 64)")
    g.add_argument("--betas", type=float, nargs=2, default=None, metavar=("B1", "B2"),
                   help="Adam betas (ViT-VQGAN 0.9 0.99, VQGAN 0.5 0.9)")  # fmt: skip
    g.add_argument("--perceptual-weight", type=float, default=None,
                   help="LPIPS weight (ViT-VQGAN 0.1, VQGAN 1.0; 0 trains without VGG weights)")  # fmt: skip
    g.add_argument("--vgg-weights", default=None, help="VGG16 weights for LPIPS (default: torch hub cache)")
    g.add_argument("--lpips-weights", default=None, help="LPIPS linear heads (default: the lpips package's)")
    m = p.add_argument_group("model overrides")
    m.add_argument("--arch", choices=["vit", "cnn"], help="encoder/decoder family (cnn: the VQGAN presets)")
    m.add_argument("--patch-size", type=int)
    m.add_argument("--codebook-size", type=int)
    m.add_argument("--lookup-dim", type=int)
    m.add_argument("--l2-norm", dest="l2_norm", action=argparse.BooleanOptionalAction, default=None)
    m.add_argument("--codebook-init", choices=["normal", "data"])
    m.add_argument("--dead-code-window", type=int, help="restart codes unused for N steps (0: off)")
    m.add_argument("--logit-laplace", action=argparse.BooleanOptionalAction, default=None)
    m.add_argument("--pos-embed", choices=["learned", "sincos"])
    p.set_defaults(func=cmd_train_tokenizer)


def model_overrides(a: argparse.Namespace) -> dict[str, Any]:
    keys = {
        "arch": a.arch, "image_size": a.image_size, "patch_size": a.patch_size, "codebook_size": a.codebook_size,
        "lookup_dim": a.lookup_dim, "l2_norm": a.l2_norm, "codebook_init": a.codebook_init,
        "dead_code_window": a.dead_code_window, "logit_laplace": a.logit_laplace, "pos_embed": a.pos_embed,
    }  # fmt: skip
    return {k: v for k, v in keys.items() if v is not None}


def cmd_train_tokenizer(a: argparse.Namespace) -> None:
    from vqim.train.tokenizer import TokenizerTrainConfig, train_tokenizer

    given = {
        "lr": a.lr, "disc": a.disc, "disc_start": a.disc_start, "adv_weight": a.adv_weight,
        "adaptive_weight": a.adaptive_weight, "r1_gamma": a.r1_gamma, "r1_interval": a.r1_interval,
        "disc_lr": a.disc_lr, "disc_channels": a.disc_channels, "betas": tuple(a.betas) if a.betas else None, "perceptual_weight": a.perceptual_weight,
    }  # fmt: skip
    cfg = TokenizerTrainConfig.for_preset(
        a.preset, out=a.out, data=a.data, model=model_overrides(a), steps=a.steps,
        batch_size=a.batch_size, warmup_steps=a.warmup_steps, min_lr_ratio=a.min_lr_ratio, weight_decay=a.weight_decay,
        grad_clip=a.grad_clip, seed=a.seed, num_workers=a.num_workers, log_every=a.log_every,
        image_every=a.image_every, ckpt_every=a.ckpt_every, resume=a.resume,
        mixed_precision=a.mixed_precision, progress=not a.no_progress,
        max_seconds=None if a.max_minutes is None else 60 * a.max_minutes, compile=a.compile,
        vgg_weights=a.vgg_weights, lpips_weights=a.lpips_weights, **{k: v for k, v in given.items() if v is not None},
    )  # fmt: skip
    log.info(
        "recipe: disc=%s adv_weight=%s perceptual_weight=%s lr=%.3g betas=%s",
        cfg.disc, cfg.adv_weight, cfg.perceptual_weight, cfg.lr, cfg.betas,
    )  # fmt: skip
    summary = train_tokenizer(cfg)
    if summary.get("skipped_files"):
        log.warning("skipped %d unreadable files (listed in %s)", summary["skipped_files"],
                    Path(a.out) / "train_summary.json")  # fmt: skip
    log.info("tokenizer written to %s", a.out)


# ---------------------------------------------------------------------------------------------- use
def _load_tokenizer(path: str, device: str):
    from vqim.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(path, device=device)


def cmd_reconstruct(a: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from torchvision.utils import save_image

    from vqim.checkpoint import atomic_write
    from vqim.data import load_rgb, resize_shorter, to_tensor
    from vqim.metrics import psnr

    device = _device(a.device)
    tok = _load_tokenizer(a.tokenizer, device)
    size = a.size or tok.config.image_size
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    for path in a.images:
        try:
            im = resize_shorter(load_rgb(path), size)
        except FileNotFoundError:
            raise SystemExit(f"error: image not found: {path}") from None
        except Exception as e:  # noqa: BLE001
            log.warning("skipping unreadable image %s (%s)", path, e)
            continue
        arr = np.asarray(im)
        h, w = arr.shape[:2]
        top, left = (h - size) // 2, (w - size) // 2
        x = to_tensor(arr[top : top + size, left : left + size])[None].to(device)
        with torch.no_grad():
            rec = tok.decode(tok.encode(x))
        name = Path(path).stem
        pair = torch.cat([x, rec], dim=3)[0].cpu()
        atomic_write(
            out / f"{name}_reconstruction.png", lambda tmp, pair=pair: save_image(pair, tmp, format="png")
        )
        result[str(path)] = {
            "psnr": round(float(psnr(rec, x)[0]), 3),
            "png": str(out / f"{name}_reconstruction.png"),
        }
    _json_out(result)


def cmd_encode(a: argparse.Namespace) -> None:
    from vqim.data import build_dataset
    from vqim.tokens import encode_dataset

    device = _device(a.device)
    tok = _load_tokenizer(a.tokenizer, device)
    # Center crops, no augmentation; --split picks a built-in dataset's split (folders and arrays: all).
    size = a.image_size or tok.config.image_size
    ds = build_dataset(a.data, size, train=a.split == "train", augment=False, labels_csv=a.labels_csv)
    manifest = encode_dataset(
        tok, ds, a.out, batch_size=a.batch_size, shard_size=a.shard_size, num_workers=a.num_workers,
        device=device, progress=not a.no_progress,
    )  # fmt: skip
    _json_out(
        {
            k: manifest[k]
            for k in ("count", "grid_size", "codebook_size", "tokenizer_config_hash", "skipped_files")
        }
    )


def cmd_decode(a: argparse.Namespace) -> None:
    import torch
    from torchvision.utils import save_image

    from vqim.checkpoint import atomic_write
    from vqim.tokens import load_ids

    device = _device(a.device)
    tok = _load_tokenizer(a.tokenizer, device)
    ids = torch.from_numpy(load_ids(a.ids).astype("int64"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for start in range(0, ids.shape[0], a.batch_size):
        images = tok.decode(ids[start : start + a.batch_size].to(device)).cpu()
        for i, im in enumerate(images):
            atomic_write(out / f"{start + i:06d}.png", lambda tmp, im=im: save_image(im, tmp, format="png"))
            n += 1
    _json_out({"images": n, "out": str(out)})


def cmd_eval_tokenizer(a: argparse.Namespace) -> None:
    import os

    from vqim.checkpoint import write_json
    from vqim.data import build_dataset
    from vqim.evaluate import evaluate_tokenizer, optional_metric_models, usage_histogram_png

    main_process, distributed = True, False
    device = _device(a.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under `accelerate launch` / torchrun: every process evaluates a share; results are combined.
        # Without a GPU, cpu=True makes Accelerate join the launch as a gloo group (as the trainers do).
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        main_process, device, distributed = state.is_main_process, str(state.device), state.num_processes > 1
    tok = _load_tokenizer(a.tokenizer, device)
    ds = build_dataset(a.data, a.image_size or tok.config.image_size, train=False)
    try:
        lp, inc, notes = optional_metric_models(
            a.vgg_weights, a.lpips_weights, a.inception_weights, a.lpips, a.fid, device
        )
    except (FileNotFoundError, ImportError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    res, counts = evaluate_tokenizer(
        tok, ds, a.batch_size, a.num_workers, device, progress=not a.no_progress and main_process,
        return_counts=True, lpips_model=lp, inception=inc, distributed=distributed,
    )  # fmt: skip
    if notes:
        res["not_measured"] = notes
    if not main_process:
        return
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", res)
        usage_histogram_png(counts, out / "usage_histogram.png")
    _json_out(res)


def add_use_commands(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--tokenizer", required=True, help="folder written by save_pretrained / train-tokenizer"
        )
        p.add_argument("--device", default="auto", help="cpu, cuda, or auto")

    p = sub.add_parser("reconstruct", help="side-by-side reconstructions of images, with PSNR")
    common(p)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=None, help="center-crop side (default: the tokenizer's)")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("encode", help="encode a dataset to token shards + manifest")
    common(p)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=8192)
    p.add_argument("--split", choices=["train", "eval"], default="train",
                   help="split of a built-in dataset (photos, digits) to encode")  # fmt: skip
    p.add_argument(
        "--labels-csv", default=None, help="labels for an image folder: CSV with columns path,label"
    )
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="decode a .npy of token ids (n, h, w) to PNGs")
    common(p)
    p.add_argument("ids", help=".npy file of integer ids")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("eval-tokenizer", help="reconstruction metrics and codebook usage as JSON")
    common(p)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default=None, help="also write metrics.json and usage_histogram.png here")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    add_metric_weight_args(p)
    p.set_defaults(func=cmd_eval_tokenizer)


def add_metric_weight_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("perceptual and Inception metrics (auto: measured when the weights are found)")
    g.add_argument("--lpips", choices=["auto", "on", "off"], default="auto", help="LPIPS distance")
    g.add_argument("--fid", choices=["auto", "on", "off"], default="auto", help="rFID and Inception Score")
    add_weight_paths(g)


def add_weight_paths(g: argparse._ActionsContainer) -> None:
    g.add_argument("--vgg-weights", default=None, help="VGG16 weights for LPIPS (default: torch hub cache)")
    g.add_argument("--lpips-weights", default=None, help="LPIPS linear heads (default: the lpips package's)")
    g.add_argument("--inception-weights", default=None,
                   help="torch-fidelity InceptionV3 weights (.pth or .safetensors; default: torch hub cache)")  # fmt: skip


# ---------------------------------------------------------------------------------------------- ablate
def cmd_ablate(a: argparse.Namespace) -> None:
    from vqim.ablate import AblationConfig, run_ablation
    from vqim.config import parse_overrides

    try:
        base = parse_overrides(a.set or [])
    except ValueError as e:
        raise SystemExit(f"error: --set: {e}") from None
    cfg = AblationConfig(
        out=a.out,
        base_model=base, data=a.data, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, preset=a.preset,
        disc_start=a.disc_start, perceptual_weight=a.perceptual_weight, vgg_weights=a.vgg_weights,
        lpips_weights=a.lpips_weights, inception_weights=a.inception_weights, only=a.only,
        num_workers=a.num_workers, progress=not a.no_progress, device=_device(a.device),
    )  # fmt: skip
    command = "vqim ablate " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] == "ablate" else ""
    res = run_ablation(cfg, command=command)
    print(res["markdown"])


def add_ablate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablate", help="the ViT-VQGAN ablation study: train + evaluate every variant, table and plots"
    )
    p.add_argument(
        "--data", default="photos", help="dataset (training split to train, held-out split to evaluate)"
    )
    p.add_argument("--out", required=True, help="study folder (re-running resumes)")
    p.add_argument("--steps", type=int, default=400, help="training steps per variant")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--lr", type=float, default=1e-3, help="peak lr (short budgets need more than the paper's 1e-4)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="vit-vqgan-tiny", help="base tokenizer preset")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", default=None,
                   help="tokenizer config overrides for every variant, e.g. dead_code_window=0 codebook_init=normal")  # fmt: skip
    p.add_argument("--disc-start", type=int, default=None, help="default: a quarter of --steps")
    p.add_argument("--perceptual-weight", type=float, default=0.0)
    p.add_argument("--only", nargs="+", default=None, help="run only these variants (names as in results.md)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    add_weight_paths(p)
    p.set_defaults(func=cmd_ablate)


# ---------------------------------------------------------------------------------------------- prior
def add_prior_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-prior", help="train a VIM prior on token shards from `vqim encode`")
    p.add_argument("--tokens", required=True, help="token folder written by `vqim encode`")
    p.add_argument("--val-tokens", default=None, help="held-out token folder (default: every 20th sequence)")
    p.add_argument(
        "--val-every", type=int, default=20, help="hold out every N-th sequence of --tokens (0: none)"
    )
    p.add_argument("--preset", default="vim-tiny")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=4.5e-4, help="peak learning rate (paper: 4.5e-4)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps")
    p.add_argument("--decay-start", type=int, default=None, help="default: half of --steps")
    p.add_argument("--final-lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--class-dropout", type=float, default=None, help="label dropout for guidance")
    p.add_argument("--unconditional", action="store_true", help="ignore labels")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--mixed-precision", choices=["auto", "no", "bf16"], default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_prior)

    def sampling(p: argparse.ArgumentParser) -> None:
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=None)
        p.add_argument("--top-p", type=float, default=None)
        p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (1: none)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto")

    p = sub.add_parser("sample", help="sample images: a PNG grid (a row per class) and single PNGs")
    p.add_argument("--prior", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--classes", default=None, help="comma-separated class ids (class-conditional priors)")
    p.add_argument("--n", type=int, default=8, help="samples per class (or in all, unconditional)")
    p.add_argument("--out", required=True)
    sampling(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval-prior", help="bits per token on held-out tokens; sample accuracy on digits")
    p.add_argument("--prior", required=True)
    p.add_argument("--tokens", required=True, help="token folder to score")
    p.add_argument("--val-every", type=int, default=0,
                   help="score only every N-th sequence (the hold-out train-prior carves by default: 20)")  # fmt: skip
    p.add_argument("--tokenizer", default=None, help="with --data digits: also score generated samples")
    p.add_argument("--data", default=None, help="labelled built-in data for the sample classifier: digits")
    p.add_argument("--samples-per-class", type=int, default=20)
    sampling(p)
    p.set_defaults(func=cmd_eval_prior)


def cmd_train_prior(a: argparse.Namespace) -> None:
    from vqim.train.prior import PriorTrainConfig, train_prior

    model = {
        k: v for k, v in {"dropout": a.dropout, "class_dropout": a.class_dropout}.items() if v is not None
    }
    cfg = PriorTrainConfig(
        out=a.out, tokens=a.tokens, val_tokens=a.val_tokens, val_every=a.val_every, preset=a.preset, model=model,
        unconditional=a.unconditional, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
        warmup_steps=a.warmup_steps, decay_start=a.decay_start, final_lr=a.final_lr, weight_decay=a.weight_decay,
        eval_every=a.eval_every, seed=a.seed, log_every=a.log_every, ckpt_every=a.ckpt_every, resume=a.resume,
        mixed_precision=a.mixed_precision, progress=not a.no_progress,
    )  # fmt: skip
    _json_out(train_prior(cfg))


def _load_pair(prior_dir: str, tokenizer_dir: str, device: str):
    from vqim.checkpoint import read_json
    from vqim.prior import Prior

    prior = Prior.from_pretrained(prior_dir, device=device)
    tok = _load_tokenizer(tokenizer_dir, device)
    info = Path(prior_dir) / "tokens.json"
    if info.is_file():
        want = read_json(info).get("tokenizer_config_hash")
        if want and want != tok.config.hash():
            raise ValueError(
                f"the prior in {prior_dir} was trained on tokens of tokenizer {want}, but {tokenizer_dir} is "
                f"tokenizer {tok.config.hash()}; pass the tokenizer used by `vqim encode`"
            )
    return prior, tok


def _class_list(text: str | None, prior) -> list[int] | None:
    c = prior.config.num_classes
    if c == 0:
        if text:
            raise ValueError("--classes given, but the prior is unconditional")
        return None
    ids = list(range(c)) if not text else [int(v) for v in text.split(",")]
    bad = [i for i in ids if not 0 <= i < c]
    if bad:
        raise ValueError(f"--classes {bad} out of range: the prior has classes 0..{c - 1}")
    return ids


def cmd_sample(a: argparse.Namespace) -> None:
    import torch
    from torchvision.utils import make_grid, save_image

    from vqim.checkpoint import atomic_write
    from vqim.sampling import generate_images

    device = _device(a.device)
    prior, tok = _load_pair(a.prior, a.tokenizer, device)
    classes = _class_list(a.classes, prior)
    kw = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, cfg_scale=a.cfg_scale, seed=a.seed)
    if classes is None:
        images = generate_images(tok, prior, a.n, **kw).cpu()
        nrow = min(8, a.n)
    else:
        labels = torch.tensor([c for c in classes for _ in range(a.n)], device=device)
        images = generate_images(tok, prior, len(labels), labels=labels, **kw).cpu()
        nrow = a.n
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images, nrow=nrow, padding=2)
    atomic_write(out / "grid.png", lambda tmp: save_image(grid, tmp, format="png"))
    for i, im in enumerate(images):
        tag = f"class{classes[i // a.n]}_" if classes is not None else ""
        atomic_write(out / f"{tag}{i:04d}.png", lambda tmp, im=im: save_image(im, tmp, format="png"))
    _json_out({"images": len(images), "grid": str(out / "grid.png"), "classes": classes})


def cmd_eval_prior(a: argparse.Namespace) -> None:
    from vqim.prior import Prior
    from vqim.tokens import TokenDataset
    from vqim.train.prior import evaluate_bits_per_token

    device = _device(a.device)
    prior = Prior.from_pretrained(a.prior, device=device)
    split = "val" if a.val_every > 0 else "all"
    ds = TokenDataset(a.tokens, split=split, val_every=a.val_every)
    ds.check_compatible(prior.config.vocab_size, tuple(prior.config.grid_size))
    result = {"bits_per_token": evaluate_bits_per_token(prior, ds, device=device), "sequences": len(ds)}
    if a.tokenizer and a.data:
        result.update(sample_accuracy(a, device))
    _json_out(result)


def sample_accuracy(a: argparse.Namespace, device: str) -> dict[str, Any]:
    """Accuracy of a classifier trained on the real images, on samples of each class (built-in digits)."""
    import numpy as np
    import torch

    from vqim.classifier import fit_sample_classifier
    from vqim.data import build_dataset
    from vqim.sampling import generate_images

    if a.data != "digits":
        raise ValueError("--data for the sample classifier must be the labelled built-in dataset: digits")
    prior, tok = _load_pair(a.prior, a.tokenizer, device)
    if prior.config.num_classes == 0:
        raise ValueError("sample accuracy needs a class-conditional prior")
    size = tok.config.image_size
    clf = fit_sample_classifier(
        build_dataset("digits", size, train=True), build_dataset("digits", size, train=False)
    )
    labels = torch.arange(prior.config.num_classes, device=device).repeat_interleave(a.samples_per_class)
    images = generate_images(
        tok, prior, len(labels), labels=labels, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
        cfg_scale=a.cfg_scale, seed=a.seed,
    ).cpu()  # fmt: skip
    per_class = clf.accuracy_per_class(images, labels.cpu().numpy())
    return {
        "sample_accuracy": float(np.mean(list(per_class.values()))),
        "sample_accuracy_per_class": per_class,
        "classifier_real_test_accuracy": clf.real_test_accuracy,
        "samples_per_class": a.samples_per_class,
    }


def add_probe_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="linear probe on the frozen prior's block features")
    p.add_argument("--prior", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument(
        "--data", required=True, help="labelled data: digits, a folder with class sub-folders, or .npz"
    )
    p.add_argument("--test-data", default=None,
                   help="test images (default: the built-in test split, or every 5th image of --data)")  # fmt: skip
    p.add_argument(
        "--labels-csv", default=None, help="labels for an image folder: CSV with columns path,label"
    )
    p.add_argument("--blocks", default="all", help="'all' or comma-separated 0-based block indices")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_probe)


def probe_splits(data: str, test_data: str | None, size: int, labels_csv: str | None):
    """(train, test, class names) for the probe: built-in splits, a given test set, or every 5th image held out."""
    from torch.utils.data import Subset

    from vqim.data import BUILTIN, build_dataset

    kw = {"augment": False, "labels_csv": labels_csv}
    if data in BUILTIN:
        train, test = (
            build_dataset(data, size, train=True, augment=False),
            build_dataset(data, size, train=False),
        )
    elif test_data is not None:
        train, test = (
            build_dataset(data, size, train=True, **kw),
            build_dataset(test_data, size, train=False, **kw),
        )
    else:
        full = build_dataset(data, size, train=False, **kw)
        idx = range(len(full))
        train = Subset(full, [i for i in idx if i % 5 != 0])
        test = Subset(full, [i for i in idx if i % 5 == 0])
        return train, test, full.class_names
    return train, test, train.class_names


def cmd_probe(a: argparse.Namespace) -> None:
    from vqim.probe import run_probe

    device = _device(a.device)
    prior, tok = _load_pair(a.prior, a.tokenizer, device)
    blocks = None if a.blocks == "all" else [int(v) for v in a.blocks.split(",")]
    if blocks is not None and any(not 0 <= b < prior.config.depth for b in blocks):
        raise ValueError(f"--blocks must be in [0, {prior.config.depth}), got {blocks}")
    train, test, names = probe_splits(a.data, a.test_data, tok.config.image_size, a.labels_csv)
    res = run_probe(
        prior, tok, train, test, a.out, blocks=blocks, class_names=names, device=device, seed=a.seed
    )
    res.pop("details")
    _json_out(res)


def cmd_presets(a: argparse.Namespace) -> None:
    import torch

    from vqim.config import (
        get_prior_config,
        get_tokenizer_config,
        prior_presets,
        tokenizer_presets,
        train_recipe,
    )
    from vqim.prior import Prior
    from vqim.tokenizer import Tokenizer

    rows: dict[str, Any] = {"tokenizers": {}, "priors": {}}
    for name in tokenizer_presets():
        with torch.device("meta"):
            tok = Tokenizer(get_tokenizer_config(name))
        counts = {k: round(v / 1e6, 2) for k, v in tok.num_params().items()}
        recipe = {k: list(v) if isinstance(v, tuple) else v for k, v in train_recipe(name).items()}
        rows["tokenizers"][name] = {"params_M": counts, "train_recipe": recipe, **tok.config.to_dict()}
    # Priors are counted at the paper's ImageNet setting: 8192 codes, 32×32 tokens, 1000 classes.
    for name in prior_presets():
        with torch.device("meta"):
            prior = Prior(get_prior_config(name, vocab_size=8192, grid_size=(32, 32), num_classes=1000))
        total = sum(p.numel() for p in prior.parameters())
        rows["priors"][name] = {"params_M": round(total / 1e6, 2), **prior.config.to_dict()}
    _json_out(rows)


def cmd_demo(a: argparse.Namespace) -> None:
    from vqim.demo import run_demo

    m = run_demo(a.out, steps=a.steps, prior_steps=a.prior_steps, progress=not a.no_progress)
    t, p = m["tokenizer"], m["prior"]
    _json_out(
        {
            "tokenizer": {k: t[k] for k in ("psnr", "ssim", "usage", "codes_used", "perplexity", "train_seconds",
                                            "codebook_health")},
            "prior": {k: p[k] for k in ("test_bits_per_token", "sample_accuracy", "classifier_accuracy_real_test",
                                        "classifier_accuracy_reconstructions", "seconds")},
            "probe": {k: m["probe"][k] for k in ("per_block_test_accuracy", "chosen_block",
                                                 "chosen_block_test_accuracy", "baselines")},
        }
    )  # fmt: skip
    print(f"demo report: {Path(a.out) / 'index.html'}  (tokenizer: {t['path']}, prior: {p['path']})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqim", description="Vector-quantized image modeling.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_tokenizer(sub)
    add_use_commands(sub)
    add_prior_commands(sub)
    add_probe_command(sub)
    add_ablate(sub)
    p = sub.add_parser("presets", help="list model presets with parameter counts")
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("demo", help="the two-stage pipeline on built-in data (photos, digits)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=None, help="tokenizer training steps (default: the demo's)")
    p.add_argument("--prior-steps", type=int, default=None, help="prior training steps (default: the demo's)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
