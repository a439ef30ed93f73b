"""Typed model configurations and named presets.

Presets are plain Python functions over frozen dataclasses (no YAML indirection): `get_preset(name)`
returns a `TokenizerConfig`, and `from_preset(name, **overrides)` replaces any field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class TokenizerConfig:
    """Configuration of a tokenizer (encoder + quantizer + decoder).

    Args:
        arch: "vit" (ViT-VQGAN). Other encoder/decoder families are added as new values.
        image_size: side of the square training image in pixels.
        patch_size: side p of the non-overlapping p×p patches; the token grid is image_size / p.
        channels: image channels (3).
        enc_dim, enc_depth, enc_heads, enc_mlp_dim: encoder Transformer width, blocks, heads, MLP width.
        dec_dim, dec_depth, dec_heads, dec_mlp_dim: the same for the decoder.
        codebook_size: number of codes K.
        lookup_dim: dimension of the lookup space. Smaller than enc_dim = factorized codes (ViT-VQGAN 3.2);
            equal to enc_dim = no factorization (project_in is Identity, and project_out too when
            dec_dim equals enc_dim).
        l2_norm: l2-normalise projected encodings and codes (nearest code = highest cosine similarity).
        beta: commitment weight of the VQ loss ‖sg[z]−e‖² + β‖z−sg[e]‖².
        codebook_init: "normal" (the paper) or "data" (codes set from the first batch of encoder outputs).
        dead_code_window: restart codes unused for this many training steps from recent encoder outputs;
            0 disables restarts.
        pos_embed: "learned" or "sincos" (fixed 2-D sine-cosine). The paper does not say; learned is default.
        logit_laplace: decoder emits 6 channels (μ, ln b) for the logit-Laplace loss (DALL-E A.3);
            otherwise it emits 3 channels in [-1, 1] space.
        vq_weight, l2_weight, l1_weight, logit_laplace_weight: weights of the reconstruction-side loss terms
            (SPEC: L = L_VQ + 0.1·L_logit-Laplace + 1.0·L2, plus adversarial and perceptual terms that the
            training step adds).
    """

    arch: Literal["vit"] = "vit"
    image_size: int = 256
    patch_size: int = 8
    channels: int = 3
    enc_dim: int = 512
    enc_depth: int = 8
    enc_heads: int = 8
    enc_mlp_dim: int = 2048
    dec_dim: int = 512
    dec_depth: int = 8
    dec_heads: int = 8
    dec_mlp_dim: int = 2048
    codebook_size: int = 8192
    lookup_dim: int = 32
    l2_norm: bool = True
    beta: float = 0.25
    codebook_init: Literal["normal", "data"] = "normal"
    dead_code_window: int = 0
    pos_embed: Literal["learned", "sincos"] = "learned"
    logit_laplace: bool = True
    vq_weight: float = 1.0
    l2_weight: float = 1.0
    l1_weight: float = 0.0
    logit_laplace_weight: float = 0.1

    def __post_init__(self) -> None:
        if self.arch != "vit":
            raise ValueError(f"arch must be 'vit', got {self.arch!r}")
        if self.image_size <= 0 or self.patch_size <= 0:
            raise ValueError("image_size and patch_size must be positive")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
                "choose an image size that is a multiple of the patch size"
            )
        for prefix in ("enc", "dec"):
            dim, heads = getattr(self, f"{prefix}_dim"), getattr(self, f"{prefix}_heads")
            if dim % heads:
                raise ValueError(f"{prefix}_dim {dim} is not divisible by {prefix}_heads {heads}")
        if not 0 < self.lookup_dim <= self.enc_dim:
            raise ValueError(f"lookup_dim must be in [1, enc_dim={self.enc_dim}], got {self.lookup_dim}")
        if self.codebook_size < 2:
            raise ValueError("codebook_size must be at least 2")
        if self.codebook_init not in ("normal", "data"):
            raise ValueError(f"codebook_init must be 'normal' or 'data', got {self.codebook_init!r}")
        if self.pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {self.pos_embed!r}")
        if self.dead_code_window < 0:
            raise ValueError("dead_code_window must be >= 0 (0 disables restarts)")

    @property
    def grid_size(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return (g, g)

    @property
    def out_channels(self) -> int:
        return 2 * self.channels if self.logit_laplace else self.channels

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown tokenizer config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def hash(self) -> str:
        """A short stable hash of the config, recorded in token manifests."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _vit(enc: tuple[int, int, int, int], dec: tuple[int, int, int, int], **kw: Any) -> TokenizerConfig:
    ed, edepth, eh, em = enc
    dd, ddepth, dh, dm = dec
    return TokenizerConfig(
        enc_dim=ed, enc_depth=edepth, enc_heads=eh, enc_mlp_dim=em,
        dec_dim=dd, dec_depth=ddepth, dec_heads=dh, dec_mlp_dim=dm, **kw,
    )  # fmt: skip


# (dim, blocks, heads, MLP dim) per network — SPEC.md, ViT-VQGAN Table 1.
VIT_SMALL = (512, 8, 8, 2048)
VIT_BASE = (768, 12, 12, 3072)
VIT_LARGE = (1280, 32, 16, 5120)


TOKENIZER_PRESETS: dict[str, Any] = {
    "vit-vqgan-ss": lambda: _vit(VIT_SMALL, VIT_SMALL),
    "vit-vqgan-bb": lambda: _vit(VIT_BASE, VIT_BASE),
    # SL: Small encoder, Large decoder; the quantizer's project_out maps the lookup space to 1280.
    "vit-vqgan-sl": lambda: _vit(VIT_SMALL, VIT_LARGE),
    # The tiny preset trains in minutes on 2 CPU cores: 64 px images, 8×8 tokens.
    "vit-vqgan-tiny": lambda: _vit(
        (128, 2, 4, 512),
        (128, 2, 4, 512),
        image_size=64,
        codebook_size=512,
        lookup_dim=32,
        codebook_init="data",
        dead_code_window=20,
    ),  # fmt: skip
}


def tokenizer_presets() -> list[str]:
    return sorted(TOKENIZER_PRESETS)


def get_tokenizer_config(name: str, **overrides: Any) -> TokenizerConfig:
    """Config of a named preset with any field replaced.

    Args:
        name: one of `tokenizer_presets()`.
        **overrides: TokenizerConfig fields to replace.
    """
    if name not in TOKENIZER_PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {tokenizer_presets()}")
    cfg = TOKENIZER_PRESETS[name]()
    known = {f.name for f in dataclasses.fields(TokenizerConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown tokenizer config fields {bad}; known fields: {sorted(known)}")
    return dataclasses.replace(cfg, **overrides)


__all__ = ["TokenizerConfig", "get_tokenizer_config", "tokenizer_presets", "TOKENIZER_PRESETS"]
