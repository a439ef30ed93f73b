"""Discriminators for adversarial tokenizer training, in pure PyTorch (no custom CUDA ops).

- `StyleGANDiscriminator`: the StyleGAN2 residual discriminator (Karras et al. 2020) that ViT-VQGAN uses:
  residual blocks with blurred downsampling, minibatch standard deviation, equalised learning rate.
- `PatchGANDiscriminator`: the taming-transformers / pix2pix PatchGAN (3 layers, 64 filters, BatchNorm,
  LeakyReLU 0.2), one logit per patch.

Both take images in [0, 1], (B, 3, H, W), and return logits (B,) or (B, 1, h, w).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vqim.errors import InputError


class EqualConv2d(nn.Module):
    """Conv2d with equalised learning rate: weights drawn from N(0, 1), scaled by 1/sqrt(fan_in) at run time."""

    def __init__(self, c_in: int, c_out: int, k: int, padding: int = 0, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.scale = 1 / math.sqrt(c_in * k * k)
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class EqualLinear(nn.Module):
    """Linear with equalised learning rate."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.scale = 1 / math.sqrt(c_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


def blur_downsample(x: torch.Tensor) -> torch.Tensor:
    """[1, 3, 3, 1] binomial blur then stride-2 subsampling (antialiased downsampling), per channel."""
    k1 = torch.tensor([1.0, 3.0, 3.0, 1.0], device=x.device, dtype=x.dtype)
    k = (k1[:, None] * k1[None, :]) / 64.0  # (4, 4), sums to 1
    c = x.shape[1]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k.expand(c, 1, 4, 4), stride=2, groups=c)


class ResBlock(nn.Module):
    """StyleGAN2 discriminator block: two 3×3 convs and a blurred downsample, plus a 1×1 skip, scaled by 1/√2."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = EqualConv2d(c_in, c_in, 3, padding=1)
        self.conv2 = EqualConv2d(c_in, c_out, 3, padding=1)
        self.skip = EqualConv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2) * math.sqrt(2)
        h = F.leaky_relu(self.conv2(blur_downsample(h)), 0.2) * math.sqrt(2)
        return (h + self.skip(blur_downsample(x))) / math.sqrt(2)


def minibatch_stddev(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Append one channel: the mean over features of the std over a group of samples (StyleGAN)."""
    b, c, h, w = x.shape
    g = min(group, b)
    while b % g:
        g -= 1
    y = x.view(g, b // g, c, h, w)
    y = (y.var(0, unbiased=False) + 1e-8).sqrt().mean((1, 2, 3))  # (b // g,)
    y = y.view(b // g, 1, 1, 1).repeat(g, 1, h, w)
    return torch.cat([x, y], 1)


class StyleGANDiscriminator(nn.Module):
    """StyleGAN2 residual discriminator.

    Args:
        image_size: input side (a power of two, ≥ 8).
        channels: width at the input resolution; doubles per block up to `max_channels`.
        max_channels: cap on the width.
    """

    def __init__(self, image_size: int = 256, channels: int = 64, max_channels: int = 512) -> None:
        super().__init__()
        n = int(math.log2(image_size))
        if 2**n != image_size or image_size < 8:
            raise InputError(f"image_size must be a power of two ≥ 8, got {image_size}")
        widths = [min(channels * 2**i, max_channels) for i in range(n - 1)]
        self.from_rgb = EqualConv2d(3, widths[0], 1)
        self.blocks = nn.Sequential(*[ResBlock(widths[i], widths[i + 1]) for i in range(n - 2)])  # → 4×4
        c = widths[n - 2]
        self.final_conv = EqualConv2d(c + 1, c, 3, padding=1)
        self.fc = EqualLinear(c * 4 * 4, c)
        self.out = EqualLinear(c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.from_rgb(x * 2 - 1), 0.2) * math.sqrt(2)
        h = self.blocks(h)  # (B, C, 4, 4)
        h = F.leaky_relu(self.final_conv(minibatch_stddev(h)), 0.2) * math.sqrt(2)
        h = F.leaky_relu(self.fc(h.flatten(1)), 0.2) * math.sqrt(2)
        return self.out(h).squeeze(1)  # (B,)


class PatchGANDiscriminator(nn.Module):
    """The PatchGAN of pix2pix / taming-transformers (`NLayerDiscriminator`).

    Args:
        layers: strided conv layers after the first (3 in taming-transformers).
        channels: width of the first layer (64).
    """

    def __init__(self, layers: int = 3, channels: int = 64) -> None:
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2),
            ]
        seq.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():  # taming-transformers' weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x * 2 - 1)  # (B, 1, h, w) patch logits
