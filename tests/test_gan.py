"""Discriminators and GAN loss functions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vqim import losses
from vqim.discriminator import (
    EqualConv2d,
    EqualLinear,
    PatchGANDiscriminator,
    StyleGANDiscriminator,
    blur_downsample,
    minibatch_stddev,
)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_stylegan_discriminator_shapes_and_gradients(size):
    torch.manual_seed(0)
    d = StyleGANDiscriminator(image_size=size, channels=16, max_channels=64)
    x = torch.rand(4, 3, size, size, requires_grad=True)
    out = d(x)
    assert out.shape == (4,) and torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())
    with pytest.raises(ValueError, match="power of two"):
        StyleGANDiscriminator(image_size=48)


def test_equalised_lr_stores_unit_weights_and_scales_them_at_run_time():
    """Equalised learning rate (Karras et al.): the parameter is N(0, 1) and the layer multiplies it by
    1/sqrt(fan_in) in every forward pass, so (i) a unit-variance input gives a unit-variance output, and (ii) the
    parameter's gradient is that scale times the gradient of the effective weight (which is what equalises the
    step size of Adam across layers; scaling the initial weights instead would pass (i) but not (ii))."""
    torch.manual_seed(0)
    d = StyleGANDiscriminator(image_size=64, channels=32, max_channels=128)
    layers = [m for m in d.modules() if isinstance(m, EqualConv2d | EqualLinear)]
    assert len(layers) == 1 + 3 * 4 + 3  # from_rgb, 4 residual blocks of 3 convolutions, final conv, fc, out
    for layer in layers:
        w = layer.weight
        fan_in = w[0].numel()
        assert layer.scale == pytest.approx(fan_in**-0.5)
        if w.numel() >= 1000:  # the sample std of 1000+ N(0, 1) draws is within 10% of 1
            assert 0.9 < float(w.detach().std()) < 1.1
        conv = isinstance(layer, EqualConv2d)
        x = torch.randn(16, w.shape[1], 8, 8) if conv else torch.randn(256, w.shape[1])
        y = layer(x)
        w_eff = (w.detach() * fan_in**-0.5).requires_grad_(True)
        b = None if layer.bias is None else layer.bias.detach()
        ref = F.conv2d(x, w_eff, b, padding=layer.padding) if conv else F.linear(x, w_eff, b)
        torch.testing.assert_close(y, ref)
        if w.numel() >= 1000 and (not conv or layer.padding == 0):  # no zero padding to shrink the output
            assert 0.85 < float(y.detach().std()) < 1.15
        r = torch.randn_like(y)
        (g,) = torch.autograd.grad((y * r).sum(), w)
        (g_eff,) = torch.autograd.grad((ref * r).sum(), w_eff)
        torch.testing.assert_close(g, g_eff * fan_in**-0.5)


def test_blur_downsample_preserves_constants_and_halves_size():
    x = torch.full((2, 5, 8, 8), 0.7)
    y = blur_downsample(x)
    assert y.shape == (2, 5, 4, 4)
    torch.testing.assert_close(y, torch.full_like(y, 0.7))


def test_minibatch_stddev_channel():
    x = torch.randn(8, 3, 4, 4)
    y = minibatch_stddev(x, group=4)
    assert y.shape == (8, 4, 4, 4)
    groups = x.view(4, 2, 3, 4, 4)
    expect = (groups.var(0, unbiased=False) + 1e-8).sqrt().mean((1, 2, 3))  # one value per column of groups
    torch.testing.assert_close(y[0, 3, 0, 0], expect[0])
    torch.testing.assert_close(y[1, 3, 0, 0], expect[1])
    # Identical samples carry no spread.
    same = minibatch_stddev(torch.ones(4, 2, 4, 4))
    assert float(same[:, 2].max()) < 1e-3


def test_patchgan_matches_taming_layout():
    d = PatchGANDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 1), (512, 1, 1),
    ]  # fmt: skip
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules()) == 3
    assert d(torch.rand(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_gan_losses_match_their_formulas():
    r, f = torch.randn(10), torch.randn(10)
    torch.testing.assert_close(
        losses.hinge_d_loss(r, f), 0.5 * (torch.clamp(1 - r, min=0).mean() + torch.clamp(1 + f, min=0).mean())
    )
    torch.testing.assert_close(losses.hinge_g_loss(f), -f.mean())
    torch.testing.assert_close(
        losses.non_saturating_d_loss(r, f),
        torch.log1p(torch.exp(-r)).mean() + torch.log1p(torch.exp(f)).mean(),
    )
    torch.testing.assert_close(losses.non_saturating_g_loss(f), torch.log1p(torch.exp(-f)).mean())


def test_r1_penalty_on_a_linear_discriminator():
    w = torch.randn(12)
    x = torch.randn(5, 12, requires_grad=True)
    logits = x @ w  # ∇_x D = w for every sample
    torch.testing.assert_close(losses.r1_penalty(logits, x), w.pow(2).sum())


def test_adaptive_weight_is_the_gradient_norm_ratio():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    out = layer(torch.randn(6, 4))
    rec = F.mse_loss(out, torch.zeros_like(out))
    gan = -out.mean() * 0.01
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, layer.weight, retain_graph=True)[0]
    lam = losses.adaptive_gan_weight(rec, gan, layer.weight)
    torch.testing.assert_close(lam, (g_rec.norm() / (g_gan.norm() + 1e-4)))
    assert not lam.requires_grad
    assert float(losses.adaptive_gan_weight(rec, gan * 0, layer.weight, max_weight=10.0)) == 10.0


def test_disc_channels_sets_the_discriminator_width():
    from vqim.train.gan import GAN

    kw = {"lr": 1e-4, "betas": (0.9, 0.99), "weight": 0.1, "adaptive": None, "start": 0, "r1_gamma": 0.0}
    for kind in ("stylegan", "patchgan"):
        narrow = GAN.build(kind, 64, channels=16, r1_interval=16, **kw).disc
        wide = GAN.build(kind, 64, r1_interval=16, **kw).disc
        first = next(p for p in narrow.parameters() if p.dim() == 4)
        assert first.shape[0] == 16
        assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in wide.parameters()) / 4
