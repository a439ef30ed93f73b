"""Tokenizer training on the shared trainer skeleton: CPU, one GPU, or many (`accelerate launch`).

Output folder:
    config.json, model.safetensors     the final tokenizer (`Tokenizer.from_pretrained(out)`)
    checkpoints/step-NNNNNNN/          weights + training state (optimizer, scheduler, step, RNG, discriminator)
    samples/step-NNNNNNN.png           reconstruction grids (top: input, bottom: reconstruction)
    tb/                                TensorBoard scalars and images
    train_config.json, train_summary.json

One step, in order (`TokenizerTrainer`): `compute_loss` (reconstruction terms, then LPIPS, then the GAN
term), the generator update (in the skeleton), then `after_update`: the discriminator step and the codebook
restarts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from vqim.checkpoint import atomic_write
from vqim.data import StepSampler, build_dataset, collate
from vqim.errors import check_settings
from vqim.metrics import psnr
from vqim.options import option
from vqim.tokenizer import Tokenizer
from vqim.train import state as st
from vqim.train.gan import DISCRIMINATORS, GAN
from vqim.train.trainer import StepOutput, TrainConfig, Trainer

log = logging.getLogger(__name__)

_RECIPE = "(default: the preset's recipe, see `vqim presets`)"


@dataclass(kw_only=True)
class TokenizerTrainConfig(TrainConfig):
    """Settings of a tokenizer training run (besides those every run has, see `TrainConfig`).

    Args:
        data: image folder, .npy/.npz array, or built-in: photos, digits.
        preset: tokenizer preset (see `vqim presets`).
        model: overrides of the preset's `TokenizerConfig` fields.
        lr: peak learning rate (ViT-VQGAN: 1e-4).
        betas: Adam betas (ViT-VQGAN 0.9 0.99, VQGAN 0.5 0.9).
        warmup_steps: linear warmup steps (default: 10% of --steps, the paper's 50k of 500k).
        min_lr_ratio: the cosine decay ends at lr × this (paper: 5e-5 / 1e-4 = 0.5).
        image_every: reconstruction-grid interval in steps.
        disc: discriminator: none, stylegan (non-saturating loss, ViT-VQGAN) or patchgan (hinge loss, VQGAN).
        disc_start: step from which the discriminator trains and the GAN term enters.
        adv_weight: weight of the generator's GAN term (ViT-VQGAN 0.1; VQGAN 0.8 times the adaptive λ).
        adaptive_weight: scale the GAN term by VQGAN's adaptive λ (default: on for patchgan).
        r1_gamma: lazy R1 penalty γ (0: off).
        r1_interval: apply R1 every this many steps (lazy regularisation, StyleGAN2).
        disc_lr: discriminator learning rate (default: --lr).
        disc_channels: discriminator width at the input resolution (64 in StyleGAN2 and taming's PatchGAN;
            smaller widths make small-image runs on a CPU practical).
        perceptual_weight: LPIPS weight (ViT-VQGAN 0.1, VQGAN 1.0; 0 trains without VGG weights).
        vgg_weights: VGG16 weights for LPIPS (default: torch hub cache).
        lpips_weights: LPIPS linear heads (default: the lpips package's).
        condition: train a condition tokenizer on this built-in condition of the images (lowres:F, edges,
            edges:SIGMA) instead of the images themselves; for a folder of condition images, pass it as --data.
    """

    data: str = "photos"
    preset: str = "vit-vqgan-tiny"
    model: dict[str, Any] = option(default_factory=dict, cli=False)
    lr: float = option(1e-4, cli_default=None, help=f"peak learning rate {_RECIPE}")
    betas: tuple[float, float] = option((0.9, 0.99), cli_default=None, metavar=("B1", "B2"))
    min_lr_ratio: float = 0.5
    image_every: int = 500
    disc: str = option("none", choices=DISCRIMINATORS, cli_default=None)
    disc_start: int = option(0, cli_default=None)
    adv_weight: float = option(0.1, cli_default=None)
    adaptive_weight: bool | None = None
    r1_gamma: float = option(0.0, cli_default=None)
    r1_interval: int = option(16, cli_default=None)
    disc_lr: float | None = None
    disc_channels: int = option(64, cli_default=None)
    perceptual_weight: float = option(0.0, cli_default=None)
    vgg_weights: str | None = None
    lpips_weights: str | None = None
    condition: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_settings(
            self,
            positive=("image_every", "r1_interval", "disc_lr", "disc_channels"),
            non_negative=("disc_start", "adv_weight", "r1_gamma", "perceptual_weight"),
            unit=("min_lr_ratio",),
        )

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
            recipe["lr"] = per_image * settings.get("batch_size", 16)
        return cls(preset=preset, **{**recipe, **settings})


def lr_lambda(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def reset_optimizer_rows(opt: torch.optim.Optimizer, param: torch.nn.Parameter, rows: torch.Tensor) -> None:
    """Zero Adam's moments of the codebook rows in the boolean mask rows (K,), so that stale momentum does not
    pull restarted codes back (a masked fill: no host synchronisation)."""
    s = opt.state.get(param)
    if not s:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key in s:
            s[key].masked_fill_(rows.unsqueeze(1), 0)


def save_grid(images: torch.Tensor, recon: torch.Tensor, path: Path) -> torch.Tensor:
    """Save a two-row grid (inputs over reconstructions) as PNG atomically; returns the grid tensor."""
    from torchvision.utils import make_grid, save_image

    grid = make_grid(torch.cat([images, recon]).float().clamp(0, 1).cpu(), nrow=images.shape[0], padding=2)
    atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))
    return grid


class TokenizerTrainer(Trainer):
    """Trains a tokenizer: reconstruction + VQ terms, optional LPIPS and GAN terms, codebook restarts."""

    desc = "train"
    rate_name = "images_per_s"
    outputs = (*Trainer.outputs, "samples")
    fixed_settings = ("preset", "model", "condition")
    cfg: TokenizerTrainConfig

    def __init__(self, cfg: TokenizerTrainConfig) -> None:
        super().__init__(cfg)
        self.counters["restarted_codes"] = 0
        self.gan: GAN | None = None
        self.lpips = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> Tokenizer:
        cfg = self.cfg
        if self.resume_from is not None:
            model = Tokenizer.from_pretrained(self.resume_from).train()
        else:
            model = Tokenizer.from_preset(cfg.preset, **cfg.model).train()
        tcfg = model.config
        self.dataset = build_dataset(cfg.data, tcfg.image_size, train=True, seed=cfg.seed)
        try:
            self.preview_set = build_dataset(cfg.data, tcfg.image_size, train=False, seed=cfg.seed)
        except Exception:  # noqa: BLE001 - preview images are optional
            self.preview_set = self.dataset
        if cfg.condition is not None:  # a condition tokenizer: it learns the condition images
            from vqim.conditions import DerivedImages, parse_condition

            cond = parse_condition(cfg.condition)
            self.dataset = DerivedImages(self.dataset, cond)
            self.preview_set = DerivedImages(self.preview_set, cond)
        self.gan = GAN.build(
            cfg.disc, tcfg.image_size, channels=cfg.disc_channels, lr=cfg.disc_lr or cfg.lr, betas=cfg.betas,
            weight=cfg.adv_weight, adaptive=cfg.adaptive_weight, start=cfg.disc_start, r1_gamma=cfg.r1_gamma,
            r1_interval=cfg.r1_interval,
        )  # fmt: skip
        if self.gan is not None and cfg.disc_start >= cfg.steps and self.main:
            log.warning(
                "the discriminator starts at step %d but the run ends at step %d: it will never train "
                "(set --disc-start, or --disc none)", cfg.disc_start, cfg.steps,
            )  # fmt: skip
        if cfg.perceptual_weight > 0:
            from vqim.perceptual import LPIPS

            self.lpips = LPIPS(cfg.vgg_weights, cfg.lpips_weights)
        return model

    def lr_lambda(self, step: int) -> float:
        cfg = self.cfg
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.steps // 10
        return lr_lambda(step, cfg.steps, warmup, cfg.min_lr_ratio)

    def loader(self, start_step: int, seed: int) -> DataLoader:
        cfg = self.cfg
        sampler = StepSampler(len(self.dataset), cfg.batch_size, self.rank, self.world, seed, start_step)
        return DataLoader(
            self.dataset,
            batch_size=cfg.batch_size // self.world,
            sampler=sampler,
            num_workers=cfg.num_workers,
            collate_fn=collate,
            persistent_workers=cfg.num_workers > 0,
            # Its own generator: creating the iterator must not draw from the global RNG (resume).
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def batches(self, start_step: int) -> Iterator[dict[str, Any]]:
        for batch in self.loader(start_step, self.cfg.seed):
            batch["image"] = batch["image"].to(self.device, non_blocking=True)
            yield batch

    def prepare_extra(self) -> None:
        if self.gan is not None:
            self.gan.prepare(self.acc)
        if self.lpips is not None:
            self.lpips = self.lpips.to(self.device)

    def before_loop(self) -> None:
        # Restarted codes so far, counted on the device (read at logging steps and checkpoints).
        self.restarted = torch.tensor(self.counters["restarted_codes"], device=self.device)
        if self.step == 0 and self.raw.config.codebook_init == "data":
            self.init_codebook()
        self.preview = next(
            iter(DataLoader(self.preview_set, batch_size=8, collate_fn=collate, generator=torch.Generator()))
        )["image"].to(self.device)

    def init_codebook(self) -> None:
        """Data-dependent codebook initialisation from encoder outputs of a few batches of a separate stream."""
        cfg, tcfg = self.cfg, self.raw.config
        tokens = tcfg.grid_size[0] * tcfg.grid_size[1]
        it = iter(self.loader(0, cfg.seed + 1))
        need = math.ceil(tcfg.codebook_size / (cfg.batch_size * tokens))
        batches = [next(it)["image"].to(self.device) for _ in range(min(8, max(1, need)))]
        self.raw.init_codebook(batches, torch.Generator().manual_seed(cfg.seed))
        n = sum(b.shape[0] for b in batches) * self.world * tokens
        log.info("codebook initialised from %d encoder outputs", n)

    # ------------------------------------------------------------------ the step
    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        """Generator loss: the tokenizer's terms (VQ, L2, logit-Laplace, ...), then LPIPS, then the GAN term."""
        images = batch["image"]
        outp = model(images)
        loss = outp.loss
        terms = outp.terms()
        if self.lpips is not None:
            p_loss = self.lpips(outp.reconstruction, images).mean()
            loss = loss + self.cfg.perceptual_weight * p_loss
            terms["perceptual_loss"] = p_loss.detach()
        if self.gan is not None and self.gan.active(self.step):
            g_term, g_terms = self.gan.generator_term(outp.reconstruction, loss, self.raw.decoder.last_layer)
            loss = loss + g_term
            terms.update(g_terms)
        return StepOutput(loss, terms, images.shape[0], extra=outp)

    def after_update(self, out: StepOutput, batch: dict[str, Any], found_inf: torch.Tensor) -> None:
        if self.gan is not None and self.gan.active(self.step):
            out.terms.update(
                self.gan.discriminator_step(batch["image"], out.extra.reconstruction.detach(), self.step)
            )
        self.restart_dead_codes()

    def restart_dead_codes(self) -> None:
        """Age the codes and restart the dead ones (a no-op without `dead_code_window`)."""
        dead = self.raw.quantizer.update_and_restart(self.step)
        reset_optimizer_rows(self.optimizer.optimizer, self.raw.quantizer.codebook, dead)
        self.restarted += dead.sum()

    def log_terms(self, out: StepOutput, batch: dict[str, Any]) -> dict[str, float]:
        rec = out.extra.reconstruction.detach()
        return {"psnr": float(psnr(rec, batch["image"]).mean()), "restarted_codes": float(self.restarted)}

    def periodic(self, step: int) -> None:
        if self.main and (step % self.cfg.image_every == 0 or step == self.cfg.steps):
            self.save_preview(step)

    def save_preview(self, step: int) -> None:
        """Reconstruction grid of the preview images, to samples/ and TensorBoard."""
        self.raw.eval()
        with torch.no_grad():
            rec = self.raw(self.preview).reconstruction
        self.raw.train()
        grid = save_grid(self.preview, rec, self.out / "samples" / f"step-{step:07d}.png")
        if self.writer is not None:
            self.writer.add_image("reconstruction", grid, step)

    # ------------------------------------------------------------------ state
    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        self.counters["restarted_codes"] = int(self.restarted)
        tensors = {"quantizer.code_age": self.raw.quantizer.code_age}
        meta: dict[str, Any] = {}
        if self.gan is not None:
            disc = self.acc.unwrap_model(self.gan.disc)
            tensors.update({f"disc.{k}": v for k, v in disc.state_dict().items()})
            d_tensors, meta["disc_optimizer"] = st.optimizer_to_flat(_inner(self.gan.optimizer), "dopt")
            tensors.update(d_tensors)
        return tensors, meta

    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.raw.quantizer.code_age.copy_(tensors["quantizer.code_age"])
        if self.gan is not None:
            self.gan.disc.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("disc.")})
            st.optimizer_from_flat(self.gan.optimizer, "dopt", tensors, meta["disc_optimizer"])

    def config_record(self) -> dict[str, Any]:
        return {"tokenizer": self.raw.config.to_dict()}

    def summary_extra(self) -> dict[str, Any]:
        self.counters["restarted_codes"] = int(self.restarted)
        return {"restarted_codes": self.counters["restarted_codes"]}


def _inner(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(opt, "optimizer", opt)


def train_tokenizer(
    cfg: TokenizerTrainConfig, on_end: Callable[[Tokenizer, Any], None] | None = None
) -> dict[str, Any]:
    """Train a tokenizer; returns the run summary (also written to out/train_summary.json).

    Args:
        cfg: the run's settings.
        on_end: called on every process at the end with (unwrapped model, accelerator).
    """
    trainer = TokenizerTrainer(cfg)
    trainer.on_end = on_end
    return trainer.fit()
