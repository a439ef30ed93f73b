"""ViT-VQGAN tokenizer: ViT encoder over p×p patches → factorized l2-normalised quantizer → ViT decoder.

Images enter as float (B, 3, H, W) in [0, 1] and are mapped to [-1, 1] for the encoder. The decoder emits,
per token, a p×p×C patch: C = 6 (μ and ln b per RGB channel) for the logit-Laplace loss, whose image is
φ⁻¹(sigmoid(μ)); otherwise C = 3 in [-1, 1] space. The output heads are the paper's tanh feed-forwards, or
(`TokenizerConfig.vit_head="linear"`) none on the encoder and a per-token linear map to pixels on the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vqim import losses
from vqim.checkpoint import PretrainedMixin
from vqim.config import TokenizerConfig, get_tokenizer_config
from vqim.errors import InputError
from vqim.nn import conv
from vqim.nn.linear import Linear
from vqim.nn.transformer import Transformer, init_weights, sincos_2d
from vqim.quantize import VectorQuantizer


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) → (B, H/p · W/p, p·p·C), patches in raster order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], c: int) -> torch.Tensor:
    """(B, h·w, p·p·C) → (B, C, h·p, w·p)."""
    b = x.shape[0]
    h, w = grid
    x = x.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h * p, w * p)


class PositionEmbedding(nn.Module):
    """Learned or fixed sine-cosine 2-D position embedding; resized for other grids.

    Args:
        grid: (h, w) of the training token grid.
        dim: embedding width.
        kind: "learned" or "sincos".
    """

    def __init__(self, grid: tuple[int, int], dim: int, kind: str) -> None:
        super().__init__()
        self.grid = grid
        self.kind = kind
        if kind == "learned":
            self.weight = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
            nn.init.trunc_normal_(self.weight, std=0.02, a=-0.04, b=0.04)
        else:
            self.register_buffer("weight", sincos_2d(*grid, dim)[None], persistent=False)

    def forward(self, grid: tuple[int, int]) -> torch.Tensor:
        """Embedding for a token grid, (1, h·w, D)."""
        if tuple(grid) == tuple(self.grid):
            return self.weight
        if self.kind == "sincos":
            return sincos_2d(*grid, self.weight.shape[-1])[None].to(self.weight)
        # Learned: bicubic resize of the (h, w) table, as ViTs do for new resolutions.
        d = self.weight.shape[-1]
        table = self.weight.reshape(1, *self.grid, d).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d)


class TanhHead(nn.Sequential):
    """The paper's output head: two-layer feed-forward with tanh in the middle, an `nn.Sequential` of Linear,
    Tanh, Linear (state-dict keys 0.* and 2.*). Built from (dim, hidden, out), or from modules as
    `nn.Sequential` is (its slices are). When it holds exactly those three, the first Linear and tanh run as one
    product where oneDNN takes it (`vqim.nn.linear.Linear.forward_act`)."""

    def __init__(self, *args) -> None:  # noqa: ANN002 ((dim, hidden, out) or modules)
        if len(args) == 3 and all(isinstance(a, int) for a in args):
            dim, hidden, out = args
            args = (Linear(dim, hidden), nn.Tanh(), Linear(hidden, out))
        super().__init__(*args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self) == 3 and isinstance(self[0], Linear) and type(self[1]) is nn.Tanh:
            return self[2](self[0].forward_act(x, "tanh"))
        return super().forward(x)


class PixelHead(nn.Module):
    """Linear map of each token to its p×p×C patch with one bias per channel: a stride-p transposed
    convolution (enhancing-transformers' ViT-VQGAN), in `unpatchify`'s (row, column, channel) order.

    Args:
        dim: token width.
        patch_size: p.
        channels: C.
    """

    def __init__(self, dim: int, patch_size: int, channels: int) -> None:
        super().__init__()
        self.proj = Linear(dim, patch_size * patch_size * channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, D) → (B, N, p·p·C)."""
        return (self.proj(h).unflatten(-1, (-1, self.bias.shape[0])) + self.bias).flatten(-2)


def _transformer(cfg: TokenizerConfig, prefix: str) -> Transformer:
    """The encoder's (prefix "enc") or decoder's ("dec") Transformer of cfg."""
    get = lambda name: getattr(cfg, f"{prefix}_{name}")
    return Transformer(
        get("dim"), get("depth"), get("heads"), get("mlp_dim"), head_dim=get("head_dim") or None,
        qkv_bias=cfg.qkv_bias, activation=cfg.mlp_act,
    )  # fmt: skip


class ViTEncoder(nn.Module):
    """Patch embedding → position embedding → Transformer → tanh head (or none).  (B, C, H, W) → (B, h·w, D)."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        p, d = cfg.patch_size, cfg.enc_dim
        self.patch_size = p
        self.patch_embed = Linear(p * p * cfg.channels, d)
        self.pos = PositionEmbedding(cfg.grid_size, d, cfg.pos_embed)
        self.transformer = _transformer(cfg, "enc")
        self.head = TanhHead(d, cfg.enc_mlp_dim, d) if cfg.vit_head == "tanh_mlp" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = (x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
        h = self.patch_embed(patchify(x, self.patch_size)) + self.pos(grid)  # (B, N, D)
        return self.head(self.transformer(h))


class CNNEncoder(nn.Module):
    """The taming-transformers CNN encoder, flattened to tokens.  (B, C, H, W) → (B, h·w, z)."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.net = conv.Encoder(
            cfg.cnn_channels, cfg.cnn_ch_mult, cfg.cnn_num_res_blocks, cfg.cnn_attn_resolutions, cfg.image_size,
            cfg.enc_dim, cfg.channels,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(2).transpose(1, 2)


class CNNDecoder(nn.Module):
    """The taming-transformers CNN decoder on a token grid.  (B, h·w, z) → (B, C_out, H, W)."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.net = conv.Decoder(
            cfg.cnn_channels, cfg.cnn_ch_mult, cfg.cnn_num_res_blocks, cfg.cnn_attn_resolutions, cfg.image_size,
            cfg.dec_dim, cfg.out_channels,
        )  # fmt: skip

    @property
    def last_layer(self) -> torch.Tensor:
        return self.net.conv_out.weight

    def forward(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, _, d = h.shape
        return self.net(h.transpose(1, 2).reshape(b, d, *grid))


class ViTDecoder(nn.Module):
    """Position embedding → Transformer → tanh (or linear) head to p·p·C per token → image.
    (B, h·w, D) → (B, C, H, W)."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        d, p, c = cfg.dec_dim, cfg.patch_size, cfg.out_channels
        self.patch_size = p
        self.out_channels = c
        self.pos = PositionEmbedding(cfg.grid_size, d, cfg.pos_embed)
        self.transformer = _transformer(cfg, "dec")
        self.head = (
            TanhHead(d, cfg.dec_mlp_dim, p * p * c) if cfg.vit_head == "tanh_mlp" else PixelHead(d, p, c)
        )

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight VQGAN's adaptive GAN weight differentiates against."""
        return self.head.proj.weight if isinstance(self.head, PixelHead) else self.head[-1].weight

    def forward(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h = self.transformer(h + self.pos(grid))
        return unpatchify(self.head(h), self.patch_size, grid, self.out_channels)


@dataclass
class TokenizerOutput:
    """Result of `Tokenizer.forward`.

    Attributes:
        reconstruction: images in [0, 1], (B, 3, H, W), differentiable.
        ids: token ids, (B, h, w).
        loss: weighted sum of the terms below (config weights), scalar.
        vq_loss, l2_loss, l1_loss: scalars (l1 is computed for logging even at weight 0).
        logit_laplace_loss: scalar, or None without the logit-Laplace head.
        usage: share of codes hit in this batch; perplexity: exp(entropy) of the batch's code histogram.
    """

    reconstruction: torch.Tensor
    ids: torch.Tensor
    loss: torch.Tensor
    vq_loss: torch.Tensor
    l2_loss: torch.Tensor
    l1_loss: torch.Tensor
    logit_laplace_loss: torch.Tensor | None
    usage: torch.Tensor
    perplexity: torch.Tensor

    def terms(self) -> dict[str, torch.Tensor]:
        """The loss terms (without the total) and codebook statistics, as detached scalar tensors."""
        out = {
            "vq_loss": self.vq_loss,
            "l2_loss": self.l2_loss,
            "l1_loss": self.l1_loss,
            "usage": self.usage,
            "perplexity": self.perplexity,
        }
        if self.logit_laplace_loss is not None:
            out["logit_laplace_loss"] = self.logit_laplace_loss
        return {k: v.detach() for k, v in out.items()}

    def scalars(self) -> dict[str, float]:
        """The total loss, the loss terms and codebook statistics as floats, for logging."""
        return {"loss": float(self.loss.detach()), **{k: float(v) for k, v in self.terms().items()}}


class Tokenizer(PretrainedMixin, nn.Module):
    """Image tokenizer: `encode` images to token ids and `decode` ids back to images.

    `save_pretrained(dir)` / `Tokenizer.from_pretrained(dir)` write and read `config.json` +
    `model.safetensors`; `fingerprint()` identifies the weights and config (token manifests record it).

    Args:
        config: a `TokenizerConfig`; see `Tokenizer.from_preset` for named sizes.

    Example:
        >>> tok = Tokenizer.from_preset("vit-vqgan-tiny")
        >>> ids = tok.encode(torch.rand(2, 3, 64, 64))  # (2, 8, 8)
        >>> images = tok.decode(ids)                    # (2, 3, 64, 64) in [0, 1]
    """

    checkpoint_kind = "tokenizer"
    config_class = TokenizerConfig

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        vit = config.arch == "vit"
        self.encoder = ViTEncoder(config) if vit else CNNEncoder(config)
        self.quantizer = VectorQuantizer(
            in_dim=config.enc_dim,
            codebook_size=config.codebook_size,
            lookup_dim=config.lookup_dim,
            out_dim=config.dec_dim,
            l2_norm=config.l2_norm,
            beta=config.beta,
            dead_code_window=config.dead_code_window,
            project=config.quant_proj,
        )
        self.decoder = ViTDecoder(config) if vit else CNNDecoder(config)
        if vit:  # the CNN keeps PyTorch's default convolution init, as taming-transformers does
            init_weights(self.encoder)
            init_weights(self.decoder)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Tokenizer:
        """A freshly initialised tokenizer of a named preset (`vqim.config.tokenizer_presets()`).

        Args:
            name: preset name, e.g. "vit-vqgan-ss" or "vit-vqgan-tiny".
            **overrides: any `TokenizerConfig` field, e.g. image_size=128, lookup_dim=8, l2_norm=False.
        """
        return cls(get_tokenizer_config(name, **overrides))

    # ------------------------------------------------------------------ checks
    @property
    def grid_size(self) -> tuple[int, int]:
        return self.config.grid_size

    def _check_images(self, images: Any) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise InputError(
                f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}"
            )
        if images.ndim != 4 or images.shape[1] != self.config.channels:
            raise InputError(
                f"images must have shape (B, {self.config.channels}, H, W), got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise InputError(
                f"images must be a float tensor in [0, 1], got dtype {images.dtype}; "
                "convert uint8 images with images.float() / 255"
            )
        p = self.config.patch_size
        if images.shape[2] % p or images.shape[3] % p:
            raise InputError(
                f"image size {images.shape[2]}×{images.shape[3]} is not divisible by the patch size {p}; "
                f"resize or crop to a multiple of {p}"
            )
        return images

    # ------------------------------------------------------------------ model
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous encoder outputs before quantization, (B, h·w, enc_dim)."""
        images = self._check_images(images)
        return self.encoder(images * 2 - 1)

    def decode_latents(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Raw decoder output for quantized vectors h (B, h·w, dec_dim): (B, out_channels, H, W)."""
        return self.decoder(h, grid)

    def to_image(self, raw: torch.Tensor) -> torch.Tensor:
        """Decoder output → image in pixel units (not clamped): φ⁻¹(sigmoid(μ)) or (y + 1) / 2."""
        c = self.config.channels
        if self.config.logit_laplace:
            return losses.logit_laplace_mean(raw[:, :c])
        return (raw.float() + 1) / 2

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        """Encode, quantize, decode and compute the reconstruction-side loss terms."""
        cfg = self.config
        b = images.shape[0]
        z = self.encode_latents(images)  # (B, N, D)
        grid = (images.shape[2] // cfg.patch_size, images.shape[3] // cfg.patch_size)
        q = self.quantizer(z)
        raw = self.decode_latents(q.quantized.to(z.dtype), grid)  # (B, C_out, H, W)
        x_hat = self.to_image(raw)
        target = images.float()
        l2 = losses.l2_loss(x_hat, target)
        l1 = losses.l1_loss(x_hat, target)
        loss = cfg.vq_weight * q.loss + cfg.l2_weight * l2
        if cfg.l1_weight:
            loss = loss + cfg.l1_weight * l1
        ll = None
        if cfg.logit_laplace:
            c = cfg.channels
            ll = losses.logit_laplace_nll(raw[:, :c], raw[:, c:], target)
            loss = loss + cfg.logit_laplace_weight * ll
        return TokenizerOutput(
            reconstruction=x_hat.clamp(0, 1),
            ids=q.ids.reshape(b, *grid),
            loss=loss,
            vq_loss=q.loss,
            l2_loss=l2,
            l1_loss=l1,
            logit_laplace_loss=ll,
            usage=q.usage,
            perplexity=q.perplexity,
        )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids for images (B, 3, H, W) in [0, 1]: LongTensor (B, H/p, W/p)."""
        z = self.encode_latents(images)
        q = self.quantizer(z)
        p = self.config.patch_size
        return q.ids.reshape(images.shape[0], images.shape[2] // p, images.shape[3] // p)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, 3, h·p, w·p), for token ids (B, h, w)."""
        if not isinstance(ids, torch.Tensor) or ids.ndim != 3:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise InputError(f"ids must be a LongTensor of shape (B, h, w), got {shape}")
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise InputError(f"ids must be an integer tensor, got dtype {ids.dtype}")
        b, h, w = ids.shape
        vecs = self.quantizer.decode_ids(ids.long().reshape(b, h * w))  # (B, N, D)
        dtype = self.decoder.last_layer.dtype
        return self.to_image(self.decode_latents(vecs.to(dtype), (h, w))).clamp(0, 1)

    @torch.no_grad()
    def init_codebook(
        self, images: torch.Tensor | list[torch.Tensor], generator: torch.Generator | None = None
    ) -> None:
        """Data-dependent codebook initialisation from the encoder outputs of images (or a list of batches)."""
        batches = images if isinstance(images, (list, tuple)) else [images]
        self.quantizer.init_from_data([self.encode_latents(b) for b in batches], generator)

    def num_params(self) -> dict[str, int]:
        """Parameter counts of encoder, quantizer, decoder and the total."""
        count = lambda m: sum(p.numel() for p in m.parameters())
        return {
            "encoder": count(self.encoder),
            "quantizer": count(self.quantizer),
            "decoder": count(self.decoder),
            "total": count(self),
        }


__all__ = ["Tokenizer", "TokenizerOutput", "ViTEncoder", "ViTDecoder", "patchify", "unpatchify"]
