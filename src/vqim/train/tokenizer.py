"""Tokenizer training on Accelerate: the same code runs on CPU, one GPU, or many (`accelerate launch`).

Output folder:
    config.json, model.safetensors     the final tokenizer (`Tokenizer.from_pretrained(out)`)
    checkpoints/step-NNNNNNN/          weights + training state (optimizer, scheduler, step, RNG)
    samples/step-NNNNNNN.png           reconstruction grids (top: input, bottom: reconstruction)
    tb/                                TensorBoard scalars and images
    train_config.json, train_summary.json
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from vqim.checkpoint import atomic_write, write_json
from vqim.data import StepSampler, build_dataset, collate
from vqim.losses import (
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
    r1_penalty,
)
from vqim.metrics import psnr
from vqim.tokenizer import Tokenizer
from vqim.train import state as st
from vqim.train.common import (
    gather_names,
    make_accelerator,
    param_groups,
    restore_checkpoint,
    save_checkpoint,
    tensorboard,
)

log = logging.getLogger(__name__)


@dataclass
class TokenizerTrainConfig:
    """Settings of a tokenizer training run.

    Args:
        out: output folder.
        data: dataset spec (`photos`, a folder, or a .npy/.npz file).
        preset: tokenizer preset name.
        model: overrides of the preset's `TokenizerConfig` fields.
        steps: optimizer steps.
        batch_size: global batch (summed over processes).
        lr: peak learning rate (paper: 1e-4).
        warmup_steps: linear warmup; None = 10% of steps (the paper's 50k of 500k).
        min_lr_ratio: cosine decay ends at lr · ratio (paper: 5e-5 / 1e-4 = 0.5).
        weight_decay: decoupled weight decay on weight matrices (paper: 1e-4).
        betas: Adam betas (paper: 0.9, 0.99).
        grad_clip: max global gradient norm (0 disables).
        seed: model initialisation, shuffling and augmentation seed.
        num_workers: DataLoader workers per process.
        log_every, image_every, ckpt_every: intervals in steps.
        keep_checkpoints: complete checkpoints kept on disk.
        resume: continue from the latest checkpoint in out/checkpoints.
        mixed_precision: "auto" (bf16 on GPU, fp32 on CPU), "no" or "bf16".
        progress: show a progress bar.
        max_seconds: stop (with a checkpoint) once this much training time has passed; the lr schedule
            still follows `steps`.
        compile: torch.compile mode for the model's forward and backward (None: eager), e.g. "default" or
            "max-autotune-no-cudagraphs" (fastest on CPU in benchmarks/tokenizer_speed.py).
        disc: "none", "stylegan" (non-saturating loss, ViT-VQGAN) or "patchgan" (hinge loss, VQGAN).
        disc_start: step from which the discriminator trains and the GAN term enters (before it: weight 0).
        adv_weight: weight of the generator's GAN term (ViT-VQGAN: 0.1; VQGAN: 0.8 times the adaptive λ).
        adaptive_weight: scale the GAN term by VQGAN's λ = ‖∇L_rec‖ / (‖∇L_GAN‖ + δ) at the decoder's last
            layer; None = on for patchgan, off for stylegan.
        r1_gamma, r1_interval: lazy R1 penalty γ/2·‖∇D(x)‖² every r1_interval steps (0 disables).
        disc_lr: discriminator learning rate (None: lr).
        disc_channels: discriminator width at the input resolution (64 in StyleGAN2 and taming's PatchGAN;
            smaller widths make small-image runs on a CPU practical).
        perceptual_weight: weight of the LPIPS term (ViT-VQGAN: 0.1; 0 for tokenizers used in linear probes).
        vgg_weights, lpips_weights: weight files for LPIPS (see vqim.perceptual).
        max_nonfinite: stop after this many consecutive steps with a non-finite loss.
    """

    out: str
    data: str = "photos"
    preset: str = "vit-vqgan-tiny"
    model: dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    seed: int = 0
    num_workers: int = 2
    log_every: int = 10
    image_every: int = 500
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    mixed_precision: str = "auto"
    progress: bool = True
    max_seconds: float | None = None
    compile: str | None = None
    disc: str = "none"
    disc_start: int = 0
    adv_weight: float = 0.1
    adaptive_weight: bool | None = None
    r1_gamma: float = 0.0
    r1_interval: int = 16
    disc_lr: float | None = None
    disc_channels: int = 64
    perceptual_weight: float = 0.0
    vgg_weights: str | None = None
    lpips_weights: str | None = None
    max_nonfinite: int = 20

    @classmethod
    def for_preset(cls, preset: str, **settings: Any) -> TokenizerTrainConfig:
        """Settings with the preset's paper recipe (vqim.config.TRAIN_RECIPES) for everything not given.

        A recipe's `lr_per_image` (taming's convention) becomes lr = lr_per_image × batch_size. Settings given as
        None are ignored. Choosing another discriminator than the recipe's drops the recipe's GAN settings (weight,
        adaptive weight, start step, R1) back to the defaults of the chosen one.
        """
        from vqim.config import train_recipe

        settings = {k: v for k, v in settings.items() if v is not None}
        recipe = train_recipe(preset)
        if "disc" in settings and settings["disc"] != recipe.get("disc"):
            # Another discriminator than the paper's: its GAN settings go back to the defaults of that choice.
            for k in ("adv_weight", "adaptive_weight", "disc_start", "r1_gamma", "r1_interval"):
                recipe.pop(k, None)
        per_image = recipe.pop("lr_per_image", None)
        if per_image is not None and "lr" not in settings:
            recipe["lr"] = per_image * settings.get("batch_size", cls.batch_size)
        return cls(preset=preset, **{**recipe, **settings})


def lr_lambda(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """Weight decay on weight matrices only: not the position tables or the codebook."""
    return name.endswith("pos.weight") or name.endswith("codebook")


def build_gan(cfg: TokenizerTrainConfig, image_size: int):
    """(discriminator, its optimizer, loss functions) for cfg.disc, or (None, None, None)."""
    if cfg.disc == "none":
        return None, None, None
    from vqim.discriminator import PatchGANDiscriminator, StyleGANDiscriminator

    if cfg.disc == "stylegan":
        disc = StyleGANDiscriminator(image_size, channels=cfg.disc_channels)
        fns = {"g": non_saturating_g_loss, "d": non_saturating_d_loss}
    elif cfg.disc == "patchgan":
        disc = PatchGANDiscriminator(channels=cfg.disc_channels)
        fns = {"g": hinge_g_loss, "d": hinge_d_loss}
    else:
        raise ValueError(f"--disc must be none, stylegan or patchgan, got {cfg.disc!r}")
    fns["adaptive"] = cfg.adaptive_weight if cfg.adaptive_weight is not None else cfg.disc == "patchgan"
    d_opt = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=cfg.betas)
    return disc.train(), d_opt, fns


def discriminator_step(cfg, disc, d_opt, gan, images, fake, step, acc) -> dict[str, torch.Tensor]:
    """One discriminator update on real images and detached reconstructions (one forward for both)."""
    d_opt.zero_grad(set_to_none=True)
    r1_now = cfg.r1_gamma > 0 and step % cfg.r1_interval == 0
    real = images.detach().requires_grad_(r1_now)
    logits = disc(torch.cat([real, fake]))
    real_logits, fake_logits = logits[: len(real)], logits[len(real) :]
    d_loss = gan["d"](real_logits, fake_logits)
    out = {"d_loss": d_loss.detach()}
    if r1_now:
        # Lazy R1: applied every r1_interval steps, scaled by the interval (StyleGAN2).
        r1 = r1_penalty(real_logits, real)
        d_loss = d_loss + 0.5 * cfg.r1_gamma * cfg.r1_interval * r1
        out["r1"] = r1.detach()
    acc.backward(d_loss)
    d_opt.step()
    d_opt.zero_grad(set_to_none=True)
    return out


def reset_optimizer_rows(opt: torch.optim.Optimizer, param: torch.nn.Parameter, rows: torch.Tensor) -> None:
    """Zero Adam's moments for restarted codebook rows, so stale momentum does not pull them back."""
    s = opt.state.get(param)
    if not s:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key in s:
            s[key][rows] = 0


def save_grid(images: torch.Tensor, recon: torch.Tensor, path: Path) -> torch.Tensor:
    """Save a two-row grid (inputs over reconstructions) as PNG atomically; returns the grid tensor."""
    from torchvision.utils import make_grid, save_image

    grid = make_grid(torch.cat([images, recon]).float().clamp(0, 1).cpu(), nrow=images.shape[0], padding=2)
    atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))
    return grid


def train_tokenizer(
    cfg: TokenizerTrainConfig, on_end: Callable[[Tokenizer, Any], None] | None = None
) -> dict[str, Any]:
    """Train a tokenizer; returns the run summary (also written to out/train_summary.json).

    Args:
        cfg: the run's settings.
        on_end: called on every process at the end with (unwrapped model, accelerator).
    """
    from tqdm.auto import tqdm

    acc = make_accelerator(cfg.mixed_precision)
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"

    start_step = 0
    resume_from = st.latest_checkpoint(ckpt_root) if cfg.resume else None
    if cfg.resume and resume_from is None:
        log.warning("--resume: no complete checkpoint under %s; starting from scratch", ckpt_root)

    torch.manual_seed(cfg.seed)  # identical initial weights on every process
    if resume_from is not None:
        model = Tokenizer.from_pretrained(resume_from).train()
    else:
        model = Tokenizer.from_preset(cfg.preset, **cfg.model).train()
    tcfg = model.config
    dataset = build_dataset(cfg.data, tcfg.image_size, train=True, seed=cfg.seed)
    try:
        preview_set = build_dataset(cfg.data, tcfg.image_size, train=False, seed=cfg.seed)
    except Exception:  # noqa: BLE001 - preview images are optional
        preview_set = dataset

    disc, d_opt, gan = build_gan(cfg, tcfg.image_size)
    if disc is not None and cfg.disc_start >= cfg.steps and rank == 0:
        log.warning(
            "the discriminator starts at step %d but the run ends at step %d: it will never train "
            "(set --disc-start, or --disc none)", cfg.disc_start, cfg.steps,
        )  # fmt: skip
    lpips_model = None
    if cfg.perceptual_weight > 0:
        from vqim.perceptual import LPIPS

        lpips_model = LPIPS(cfg.vgg_weights, cfg.lpips_weights)

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.steps // 10
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, _no_decay), lr=cfg.lr, betas=cfg.betas, fused=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.steps, warmup, cfg.min_lr_ratio)
    )
    shared_meta: dict[str, Any] = {}
    if resume_from is not None:
        tensors, shared_meta = restore_checkpoint(resume_from, rank, optimizer, scheduler)
        model.quantizer.code_age.copy_(tensors["quantizer.code_age"])
        start_step = int(shared_meta["step"])
        if disc is not None:
            disc.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("disc.")})
            st.optimizer_from_flat(d_opt, "dopt", tensors, shared_meta["disc_optimizer"])
    else:
        torch.manual_seed(cfg.seed + 1000 * rank)

    model, optimizer = acc.prepare(model, optimizer)
    raw = acc.unwrap_model(model)
    if disc is not None:
        disc, d_opt = acc.prepare(disc, d_opt)
    if lpips_model is not None:
        lpips_model = lpips_model.to(acc.device)
    if cfg.compile:
        # Compile the (possibly DDP-wrapped) module; weights, checkpoints and restarts go through `raw`.
        model = torch.compile(model, mode=cfg.compile)
    device = acc.device

    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "train_config.json", {**dataclasses.asdict(cfg), "tokenizer": tcfg.to_dict()})
    writer = tensorboard(out, main)

    def loader_from(step: int, seed: int) -> DataLoader:
        sampler = StepSampler(len(dataset), cfg.batch_size, rank, world, seed=seed, start_step=step)
        return DataLoader(
            dataset,
            batch_size=cfg.batch_size // world,
            sampler=sampler,
            num_workers=cfg.num_workers,
            collate_fn=collate,
            persistent_workers=cfg.num_workers > 0,
            # Its own generator: creating the iterator must not draw from the global RNG (resume).
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    skipped: set[str] = set(shared_meta.get("skipped", []))
    restarted_total = int(shared_meta.get("restarted_codes", 0))
    nonfinite_total = int(shared_meta.get("nonfinite_steps", 0))
    nonfinite_run = 0

    if start_step == 0 and tcfg.codebook_init == "data":
        # Data-dependent init: encoder outputs of a few batches (drawn from a separate stream).
        init_iter = iter(loader_from(0, cfg.seed + 1))
        need = math.ceil(tcfg.codebook_size / (cfg.batch_size * tcfg.grid_size[0] * tcfg.grid_size[1]))
        batches = [next(init_iter)["image"].to(device) for _ in range(min(8, max(1, need)))]
        raw.init_codebook(batches, torch.Generator().manual_seed(cfg.seed))
        del init_iter
        n_init = sum(b.shape[0] for b in batches) * world * tcfg.grid_size[0] * tcfg.grid_size[1]
        log.info("codebook initialised from %d encoder outputs", n_init)

    preview = next(
        iter(DataLoader(preview_set, batch_size=8, collate_fn=collate, generator=torch.Generator()))
    )["image"].to(device)

    def checkpoint(step: int) -> None:
        meta = {
            "skipped": sorted(skipped),
            "restarted_codes": restarted_total,
            "nonfinite_steps": nonfinite_total,
        }
        extra = {"quantizer.code_age": raw.quantizer.code_age}
        if disc is not None:
            extra.update({f"disc.{k}": v for k, v in acc.unwrap_model(disc).state_dict().items()})
            d_tensors, d_meta = st.optimizer_to_flat(d_opt.optimizer, "dopt")
            extra.update(d_tensors)
            meta["disc_optimizer"] = d_meta
        save_checkpoint(
            acc, ckpt_root, step, raw, optimizer.optimizer, scheduler, extra, meta, cfg.keep_checkpoints
        )

    data_iter = iter(loader_from(start_step, cfg.seed))
    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        disable=not (main and cfg.progress),
        desc="train",
        dynamic_ncols=True,
    )
    t_last, n_last = time.perf_counter(), 0
    t0 = time.perf_counter()
    step = start_step
    last: dict[str, float] = {}
    while step < cfg.steps:
        batch = next(data_iter)
        skipped.update(batch["skipped"])
        images = batch["image"].to(device, non_blocking=True)
        outp = model(images)
        loss = outp.loss
        terms: dict[str, torch.Tensor] = {}  # detached; read (a device sync) only on logging steps
        if lpips_model is not None:
            p_loss = lpips_model(outp.reconstruction, images).mean()
            loss = loss + cfg.perceptual_weight * p_loss
            terms["perceptual_loss"] = p_loss.detach()
        use_gan = disc is not None and step >= cfg.disc_start
        if use_gan:
            # Generator step: the GAN term through the discriminator (its grads are cleared before its step).
            g_loss = gan["g"](disc(outp.reconstruction))
            weight = cfg.adv_weight
            if gan["adaptive"]:
                lam = adaptive_gan_weight(loss, g_loss, raw.decoder.last_layer)
                weight = weight * lam
                terms["adaptive_weight"] = lam
            loss = loss + weight * g_loss
            terms["g_loss"] = g_loss.detach()
        # Every process must agree to skip, or DDP's gradient all-reduce would hang.
        bad = acc.reduce(torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=device), "sum")
        if float(bad) > 0:
            nonfinite_total += 1
            nonfinite_run += 1
            log.warning("step %d: non-finite loss, step skipped (%d so far)", step, nonfinite_total)
            if nonfinite_run >= cfg.max_nonfinite:
                last_good = st.latest_checkpoint(ckpt_root)
                raise RuntimeError(
                    f"{nonfinite_run} consecutive steps had a non-finite loss (up to step {step}); stopping. "
                    f"Last good checkpoint: {last_good or 'none'}; resume from it with a lower --lr."
                )
            optimizer.zero_grad(set_to_none=True)
            step += 1
            scheduler.step()
            continue
        nonfinite_run = 0
        acc.backward(loss)
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if use_gan:
            terms.update(
                discriminator_step(cfg, disc, d_opt, gan, images, outp.reconstruction.detach(), step, acc)
            )
        dead = raw.quantizer.update_and_restart(step)
        if dead.numel():
            reset_optimizer_rows(optimizer.optimizer, raw.quantizer.codebook, dead)
            restarted_total += dead.numel()
        step += 1
        n_last += images.shape[0] * world

        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            last = {**outp.scalars(), **{k: float(v) for k, v in terms.items()}}
            last["psnr"] = float(psnr(outp.reconstruction.detach(), images).mean())
            last["lr"] = scheduler.get_last_lr()[0]
            last["images_per_s"] = n_last / (now - t_last)
            last["restarted_codes"] = float(restarted_total)
            t_last, n_last = now, 0
            if writer is not None:
                for k, v in last.items():
                    writer.add_scalar(f"train/{k}", v, step)
            if not cfg.progress and main:
                log.info(
                    "step %d/%d loss %.4f psnr %.2f usage %.3f %.1f img/s",
                    step, cfg.steps, last["loss"], last["psnr"], last["usage"], last["images_per_s"],
                )  # fmt: skip
            bar.set_postfix(
                loss=f"{last['loss']:.4f}", psnr=f"{last['psnr']:.1f}", usage=f"{last['usage']:.2f}",
                img_s=f"{last['images_per_s']:.1f}",
            )  # fmt: skip
        bar.update(1)

        if main and (step % cfg.image_every == 0 or step == cfg.steps):
            raw.eval()
            with torch.no_grad():
                rec = raw(preview).reconstruction
            raw.train()
            grid = save_grid(preview, rec, out / "samples" / f"step-{step:07d}.png")
            if writer is not None:
                writer.add_image("reconstruction", grid, step)
        out_of_time = False
        if cfg.max_seconds is not None and step % cfg.log_every == 0:
            # Every process must stop at the same step: the main process's clock decides.
            flag = torch.tensor(
                float(time.perf_counter() - t0 > cfg.max_seconds) if main else 0.0, device=device
            )
            out_of_time = float(acc.reduce(flag, "sum")) > 0
        if step % cfg.ckpt_every == 0 or step == cfg.steps or out_of_time:
            checkpoint(step)
        if out_of_time:
            log.info("time budget of %.0f s reached at step %d", cfg.max_seconds, step)
            break
    bar.close()

    all_skipped = gather_names(acc, skipped)
    summary = {
        "steps": step,
        "resumed_from": str(resume_from) if resume_from else None,
        "seconds": time.perf_counter() - t0,
        "skipped_files": len(all_skipped),
        "skipped": all_skipped,
        "restarted_codes": restarted_total,
        "nonfinite_steps": nonfinite_total,
        "last": last,
        "processes": world,
    }
    if main:
        raw.save_pretrained(out)
        write_json(out / "train_summary.json", summary)
        if writer is not None:
            writer.close()
        if all_skipped:
            log.warning("%d unreadable files were skipped: %s", len(all_skipped), ", ".join(all_skipped[:10]))
    if on_end is not None:
        on_end(raw, acc)
    acc.wait_for_everyone()
    acc.end_training()
    return summary
