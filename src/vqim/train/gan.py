"""The adversarial part of tokenizer training: the discriminator, its optimizer and the two GAN objectives.

The training step calls the generator term and then the discriminator step, explicitly and in that order
(no loss object switching on an optimizer index):

    loss = reconstruction terms + perceptual term + gan.generator_term(recon, loss, last_layer)
    ... generator backward and optimizer step ...
    gan.discriminator_step(images, recon.detach(), step)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from vqim.errors import InputError
from vqim.losses import (
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
    r1_penalty,
)
from vqim.train.trainer import grad_norm, nonfinite_flag, optimizer_step

DISCRIMINATORS = ("none", "stylegan", "patchgan")


@dataclass
class GAN:
    """A discriminator with its optimizer, losses and schedule.

    Attributes:
        disc: the discriminator (possibly wrapped by Accelerate after `prepare`).
        optimizer: its Adam optimizer.
        g_loss: generator loss of the discriminator's logits on reconstructions.
        d_loss: discriminator loss of (real logits, fake logits).
        weight: weight of the generator's GAN term.
        adaptive: scale the GAN term by VQGAN's λ = ‖∇L_rec‖ / (‖∇L_GAN‖ + δ) at the decoder's last layer.
        start: step from which the discriminator trains and the GAN term enters (before it: weight 0).
        r1_gamma, r1_interval: lazy R1 penalty γ/2·‖∇D(x)‖² every r1_interval steps (γ 0: off).
    """

    disc: nn.Module
    optimizer: torch.optim.Optimizer
    g_loss: Callable[[torch.Tensor], torch.Tensor]
    d_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    weight: float
    adaptive: bool
    start: int
    r1_gamma: float = 0.0
    r1_interval: int = 16
    accelerator: object | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        kind: str,
        image_size: int,
        *,
        channels: int = 64,
        lr: float,
        betas: tuple[float, float],
        weight: float,
        adaptive: bool | None,
        start: int,
        r1_gamma: float,
        r1_interval: int,
    ) -> GAN | None:
        """The GAN setup for kind "stylegan" (non-saturating loss, ViT-VQGAN) or "patchgan" (hinge, VQGAN).

        Returns None for kind "none". `adaptive` None means on for patchgan, off for stylegan.
        """
        from vqim.discriminator import PatchGANDiscriminator, StyleGANDiscriminator

        if kind == "none":
            return None
        if kind == "stylegan":
            disc: nn.Module = StyleGANDiscriminator(image_size, channels=channels)
            g, d = non_saturating_g_loss, non_saturating_d_loss
        elif kind == "patchgan":
            disc = PatchGANDiscriminator(channels=channels)
            g, d = hinge_g_loss, hinge_d_loss
        else:
            raise InputError(f"--disc must be one of {', '.join(DISCRIMINATORS)}, got {kind!r}")
        if r1_interval <= 0:
            raise InputError(f"--r1-interval must be positive, got {r1_interval}")
        opt = torch.optim.Adam(disc.parameters(), lr=lr, betas=betas, fused=True)
        return cls(
            disc.train(), opt, g, d, weight, kind == "patchgan" if adaptive is None else adaptive, start,
            r1_gamma, r1_interval,
        )  # fmt: skip

    def prepare(self, acc) -> None:
        """Let Accelerate place (and, with several processes, wrap) the discriminator and its optimizer."""
        self.disc, self.optimizer = acc.prepare(self.disc, self.optimizer)
        self.accelerator = acc

    def active(self, step: int) -> bool:
        return step >= self.start

    def generator_term(
        self, recon: torch.Tensor, rec_loss: torch.Tensor, last_layer: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted GAN term of the generator loss, and detached values to log.

        rec_loss is the rest of the generator loss; it sets the adaptive weight when that is on.
        """
        g = self.g_loss(self.disc(recon))
        terms = {"g_loss": g.detach()}
        weight: torch.Tensor | float = self.weight
        if self.adaptive:
            if last_layer is None:
                raise InputError("the adaptive GAN weight needs the decoder's last layer")
            lam = adaptive_gan_weight(rec_loss, g, last_layer)
            weight = weight * lam
            terms["adaptive_weight"] = lam.detach()
        return weight * g, terms

    def discriminator_step(
        self, real: torch.Tensor, fake: torch.Tensor, step: int
    ) -> dict[str, torch.Tensor]:
        """One discriminator update on real images and detached reconstructions (one forward for both).

        A step whose discriminator gradient is not finite leaves its weights unchanged (no host sync).
        """
        self.optimizer.zero_grad(set_to_none=True)  # drop what the generator's backward left here
        r1_now = self.r1_gamma > 0 and step % self.r1_interval == 0
        real = real.detach().requires_grad_(r1_now)
        logits = self.disc(torch.cat([real, fake.detach()]))
        real_logits, fake_logits = logits[: len(real)], logits[len(real) :]
        d_loss = self.d_loss(real_logits, fake_logits)
        out = {"d_loss": d_loss.detach()}
        if r1_now:
            # Lazy R1 (StyleGAN2): every r1_interval steps, scaled by the interval.
            r1 = r1_penalty(real_logits, real)
            d_loss = d_loss + 0.5 * self.r1_gamma * self.r1_interval * r1
            out["r1"] = r1.detach()
        if self.accelerator is not None:
            self.accelerator.backward(d_loss)
        else:
            d_loss.backward()
        found_inf = nonfinite_flag(grad_norm(self.disc.parameters()))
        optimizer_step(self.optimizer, found_inf)
        self.optimizer.zero_grad(set_to_none=True)
        return out
