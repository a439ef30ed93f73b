"""Loss terms as pure functions.

The training objective of ViT-VQGAN (docs/papers.md) is
    L = L_VQ + 0.1·L_adv + 0.1·L_perceptual + 0.1·L_logit-Laplace + 1.0·L_2.
The reconstruction-side terms live here; the adversarial and perceptual terms are added by the
training step on top of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOGIT_LAPLACE_EPS = 0.1


def squash(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """φ(x) = (1 − 2ε)·x + ε: maps pixels in [0, 1] into (ε, 1 − ε) (DALL-E, appendix A.3)."""
    return (1 - 2 * eps) * x + eps


def unsquash(y: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """φ⁻¹(y) = (y − ε) / (1 − 2ε)."""
    return (y - eps) / (1 - 2 * eps)


def logit_laplace_nll(
    mu: torch.Tensor, log_b: torch.Tensor, target: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS
) -> torch.Tensor:
    """Mean negative log-likelihood of target pixels under the logit-Laplace distribution.

    f(y | μ, b) = exp(−|logit(y) − μ| / b) / (2b · y(1 − y)) on y ∈ (0, 1), evaluated at y = φ(target).

    Args:
        mu: location μ in logit space, same shape as target.
        log_b: ln b, same shape as target.
        target: pixels in [0, 1].
        eps: ε of the squashing φ.

    Returns:
        mean over all elements of −log f(φ(target)), a scalar.
    """
    y = squash(target.float(), eps)
    mu, log_b = mu.float(), log_b.float()
    logit_y = torch.log(y) - torch.log1p(-y)
    nll = (logit_y - mu).abs() * torch.exp(-log_b) + log_b + math.log(2.0) + torch.log(y) + torch.log1p(-y)
    return nll.mean()


def logit_laplace_mean(mu: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """The reconstruction a logit-Laplace decoder shows: φ⁻¹(sigmoid(μ)) (not clamped)."""
    return unsquash(torch.sigmoid(mu.float()), eps)


def l2_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return F.mse_loss(x.float(), target.float())


def l1_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error."""
    return F.l1_loss(x.float(), target.float())


def vq_loss(z_e: torch.Tensor, e: torch.Tensor, beta: float = 0.25) -> torch.Tensor:
    """‖sg[z_e] − e‖² + β‖z_e − sg[e]‖²: the codebook term moves codes, the commitment term (β) the encoder.

    β weights the commitment term, as in VQ-VAE. taming-transformers' quantizer put β on the codebook term
    instead (‖sg[z]−e‖²·β + ‖z−sg[e]‖²); vqim follows the paper for VQGAN presets too.
    """
    return F.mse_loss(e, z_e.detach()) + beta * F.mse_loss(z_e, e.detach())


# ---------------------------------------------------------------------------------------------- adversarial
def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (taming-transformers): ½·(mean relu(1 − D(x)) + mean relu(1 + D(x̂)))."""
    return 0.5 * (F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss paired with the hinge discriminator: −mean D(x̂)."""
    return -fake_logits.float().mean()


def non_saturating_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """StyleGAN discriminator loss: mean softplus(−D(x)) + mean softplus(D(x̂))."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def non_saturating_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """StyleGAN generator loss: mean softplus(−D(x̂))."""
    return F.softplus(-fake_logits.float()).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """R1 gradient penalty (Mescheder et al. 2018): mean over images of ‖∇_x D(x)‖²; the caller scales by γ/2.

    real_images must have requires_grad=True when the logits are computed.
    """
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_images, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def adaptive_gan_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    delta: float = 1e-4,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """VQGAN's λ = ‖∇_w L_rec‖ / (‖∇_w L_GAN‖ + δ) at the decoder's last layer w, clamped to [0, max_weight].

    Returned detached: it scales the GAN term, it is not optimised.
    """
    (g_rec,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_gan,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return (g_rec.norm() / (g_gan.norm() + delta)).clamp(0.0, max_weight).detach()
