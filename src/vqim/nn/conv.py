"""The CNN encoder / decoder of VQGAN ("Taming Transformers", Esser et al. 2021): a DDPM-style ResNet without
skip connections between encoder and decoder, channel multipliers per level, self-attention at chosen
resolutions and in the middle block.

Shapes: Encoder (B, 3, H, W) → (B, z, H/f, W/f); Decoder (B, z, h, w) → (B, C_out, h·f, w·f), f = 2^(levels−1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if c % 32 == 0 else 8 if c % 8 == 0 else 1, c, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice, with a 1×1 shortcut when the width changes."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all h·w positions, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)  # (B, hw, C)
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, hw, C)
        return x + self.proj(y.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """3×3 stride-2 conv with taming's asymmetric (0, 1, 0, 1) padding."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Args: channels (base width), ch_mult (per level), num_res_blocks, attn_resolutions, resolution (input
    side), z_channels (output width)."""

    def __init__(
        self,
        channels: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_resolutions: tuple[int, ...],
        resolution: int,
        z_channels: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        layers: list[nn.Module] = []
        c, res = channels, resolution
        for i, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(c, channels * mult))
                c = channels * mult
                if res in attn_resolutions:
                    layers.append(AttnBlock(c))
            if i < len(ch_mult) - 1:
                layers.append(Downsample(c))
                res //= 2
        layers += [
            ResBlock(c, c),
            AttnBlock(c),
            ResBlock(c, c),
        ]  # middle: one attention at the lowest resolution
        self.body = nn.Sequential(*layers)
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


class Decoder(nn.Module):
    """Mirror of `Encoder` with num_res_blocks + 1 blocks per level; out_channels outputs."""

    def __init__(
        self,
        channels: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_resolutions: tuple[int, ...],
        resolution: int,
        z_channels: int,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        c = channels * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        layers: list[nn.Module] = [ResBlock(c, c), AttnBlock(c), ResBlock(c, c)]
        for i in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock(c, channels * ch_mult[i]))
                c = channels * ch_mult[i]
                if res in attn_resolutions:
                    layers.append(AttnBlock(c))
            if i > 0:
                layers.append(Upsample(c))
                res *= 2
        self.body = nn.Sequential(*layers)
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z)))))
