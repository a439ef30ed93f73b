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

from vqim.errors import InputError


@dataclass(frozen=True)
class TokenizerConfig:
    """Configuration of a tokenizer (encoder + quantizer + decoder).

    Args:
        arch: encoder/decoder family: "vit" (ViT-VQGAN) or "cnn" (taming-transformers' VQGAN).
        image_size: side of the square training image in pixels.
        patch_size: side p of the non-overlapping p×p patches (CNN: the downsampling factor); the token grid
            is image_size / p.
        channels: image channels (3).
        enc_dim: encoder width (ViT: Transformer width; CNN: the latent width z).
        enc_depth: encoder Transformer blocks (ViT only).
        enc_heads: encoder attention heads (ViT only).
        enc_mlp_dim: encoder MLP width (ViT only).
        dec_dim: decoder width (ViT: Transformer width; CNN: the latent width z, equal to enc_dim).
        dec_depth: decoder Transformer blocks (ViT only).
        dec_heads: decoder attention heads (ViT only).
        dec_mlp_dim: decoder MLP width (ViT only).
        codebook_size: number of codes K.
        lookup_dim: dimension of the lookup space. Smaller than enc_dim = factorized codes (ViT-VQGAN 3.2);
            equal to enc_dim = no factorization (project_in is Identity, and project_out too when
            dec_dim equals enc_dim); larger than enc_dim is allowed (a projection up, as in the paper's
            lookup-dim ablation with small encoders).
        l2_norm: l2-normalise projected encodings and codes (nearest code = highest cosine similarity).
        quant_proj: always map into and out of the lookup space with learned linear maps (taming-transformers'
            quant_conv / post_quant_conv), even when lookup_dim equals the encoder width.
        beta: commitment weight of the VQ loss ‖sg[z]−e‖² + β‖z−sg[e]‖².
        codebook_init: "normal" (the paper) or "data" (codes set from the first batch of encoder outputs).
        dead_code_window: restart codes unused for this many training steps from recent encoder outputs;
            0 disables restarts.
        pos_embed: ViT position embedding: "learned" or "sincos" (fixed 2-D sine-cosine). The paper does not
            say; learned is default.
        vit_head: ViT output heads: "tanh_mlp" (the paper's two-layer feed-forward with tanh after each
            Transformer) or "linear" (enhancing-transformers' ViT-VQGAN): the encoder has no head (its
            Transformer's final LayerNorm feeds the quantizer's project_in) and the decoder maps each token
            linearly to its p×p×C pixels with one bias per channel (a stride-p transposed convolution).
        enc_head_dim: width of each encoder attention head; 0 means enc_dim / enc_heads. Other widths make
            the heads together enc_heads · enc_head_dim wide (ViT only).
        dec_head_dim: width of each decoder attention head; 0 means dec_dim / dec_heads (ViT only).
        qkv_bias: the attention's q, k, v projection has a bias (ViT only).
        mlp_act: activation of the Transformer MLPs: "gelu" or "tanh" (ViT only).
        logit_laplace: decoder emits 6 channels (μ, ln b) for the logit-Laplace loss (DALL-E A.3);
            otherwise it emits 3 channels in [-1, 1] space.
        vq_weight: weight of the VQ loss. The reconstruction-side loss is (docs/papers.md) L = L_VQ +
            0.1·L_logit-Laplace + 1.0·L2; the training step adds the adversarial and perceptual terms.
        l2_weight: weight of the L2 reconstruction loss.
        l1_weight: weight of the L1 reconstruction loss (taming's VQGAN).
        logit_laplace_weight: weight of the logit-Laplace loss (needs logit_laplace).
        cnn_channels: CNN base width (channels at the input resolution).
        cnn_ch_mult: CNN width multipliers per resolution level; the image is downsampled 2× between levels.
        cnn_num_res_blocks: residual blocks per CNN level.
        cnn_attn_resolutions: feature-map sides at which the CNN adds self-attention blocks.
    """

    arch: Literal["vit", "cnn"] = "vit"
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
    quant_proj: bool = False
    beta: float = 0.25
    codebook_init: Literal["normal", "data"] = "normal"
    dead_code_window: int = 0
    pos_embed: Literal["learned", "sincos"] = "learned"
    vit_head: Literal["tanh_mlp", "linear"] = "tanh_mlp"
    enc_head_dim: int = 0
    dec_head_dim: int = 0
    qkv_bias: bool = True
    mlp_act: Literal["gelu", "tanh"] = "gelu"
    logit_laplace: bool = True
    vq_weight: float = 1.0
    l2_weight: float = 1.0
    l1_weight: float = 0.0
    logit_laplace_weight: float = 0.1
    cnn_channels: int = 128
    cnn_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    cnn_num_res_blocks: int = 2
    cnn_attn_resolutions: tuple[int, ...] = (16,)

    def __post_init__(self) -> None:
        if self.arch not in ("vit", "cnn"):
            raise InputError(f"arch must be 'vit' or 'cnn', got {self.arch!r}")
        if self.arch == "cnn":
            f = 2 ** (len(self.cnn_ch_mult) - 1)
            if self.patch_size != f:
                raise InputError(
                    f"a CNN tokenizer downsamples by 2^(levels-1) = {f}; set patch_size={f} "
                    f"(got {self.patch_size}) or change cnn_ch_mult"
                )
            if self.enc_dim != self.dec_dim:
                raise InputError("a CNN tokenizer uses one latent width: enc_dim must equal dec_dim")
        if self.image_size <= 0 or self.patch_size <= 0:
            raise InputError("image_size and patch_size must be positive")
        if self.image_size % self.patch_size:
            raise InputError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
                "choose an image size that is a multiple of the patch size"
            )
        for name in ("qkv_bias", "quant_proj"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("enc_head_dim", "dec_head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise InputError(f"{name} must be an int, got {v!r}")
        for prefix in ("enc", "dec"):
            dim, heads = getattr(self, f"{prefix}_dim"), getattr(self, f"{prefix}_heads")
            head_dim = getattr(self, f"{prefix}_head_dim")
            if head_dim < 0:
                raise InputError(f"{prefix}_head_dim must be >= 0 (0: {prefix}_dim / {prefix}_heads)")
            if dim % heads and not head_dim:
                raise InputError(f"{prefix}_dim {dim} is not divisible by {prefix}_heads {heads}")
        if self.lookup_dim <= 0:
            raise InputError(f"lookup_dim must be positive, got {self.lookup_dim}")
        if self.codebook_size < 2:
            raise InputError("codebook_size must be at least 2")
        if self.codebook_init not in ("normal", "data"):
            raise InputError(f"codebook_init must be 'normal' or 'data', got {self.codebook_init!r}")
        if self.pos_embed not in ("learned", "sincos"):
            raise InputError(f"pos_embed must be 'learned' or 'sincos', got {self.pos_embed!r}")
        if self.vit_head not in ("tanh_mlp", "linear"):
            raise InputError(f"vit_head must be 'tanh_mlp' or 'linear', got {self.vit_head!r}")
        if self.mlp_act not in ("gelu", "tanh"):
            raise InputError(f"mlp_act must be 'gelu' or 'tanh', got {self.mlp_act!r}")
        if self.dead_code_window < 0:
            raise InputError("dead_code_window must be >= 0 (0 disables restarts)")
        if self.arch == "cnn":  # ViT-only options a CNN would ignore while they still changed its config hash
            vit_set = [n for n in ("vit_head", "enc_head_dim", "dec_head_dim", "qkv_bias", "mlp_act")
                       if getattr(self, n) != _OMIT_AT_DEFAULT[n]]  # fmt: skip
            if vit_set:
                raise InputError(f"{', '.join(vit_set)}: ViT options; a CNN tokenizer does not read them")

    @property
    def grid_size(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return (g, g)

    @property
    def out_channels(self) -> int:
        return 2 * self.channels if self.logit_laplace else self.channels

    def to_dict(self, arch_only: bool = False) -> dict[str, Any]:
        """The fields as a dict; with arch_only, without those the other architecture's networks read."""
        d = dataclasses.asdict(self)
        for k, default in _OMIT_AT_DEFAULT.items():  # so that configs written before the field stay the same
            if d[k] == default:
                del d[k]
        if arch_only:
            unused = _CNN_ONLY if self.arch == "vit" else _VIT_ONLY
            d = {k: v for k, v in d.items() if k not in unused}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown tokenizer config keys {unknown}; known keys: {sorted(known)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # JSON lists → tuples
        return cls(**d)

    def hash(self) -> str:
        """A short stable hash of the config, recorded in token manifests."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Fields added after configs were first written, left out of `to_dict` at their default: the config hash and the
# tokenizer fingerprint of every existing model stay what they were.
_OMIT_AT_DEFAULT = {
    "quant_proj": False, "vit_head": "tanh_mlp", "enc_head_dim": 0, "dec_head_dim": 0, "qkv_bias": True,
    "mlp_act": "gelu",
}  # fmt: skip

# Fields only one architecture reads (the CNN's latent width is enc_dim = dec_dim).
_VIT_ONLY = ("enc_depth", "enc_heads", "enc_mlp_dim", "dec_depth", "dec_heads", "dec_mlp_dim", "pos_embed",
             "vit_head", "enc_head_dim", "dec_head_dim", "qkv_bias", "mlp_act")  # fmt: skip
_CNN_ONLY = ("cnn_channels", "cnn_ch_mult", "cnn_num_res_blocks", "cnn_attn_resolutions")


def _vit(enc: tuple[int, int, int, int], dec: tuple[int, int, int, int], **kw: Any) -> TokenizerConfig:
    ed, edepth, eh, em = enc
    dd, ddepth, dh, dm = dec
    return TokenizerConfig(
        enc_dim=ed, enc_depth=edepth, enc_heads=eh, enc_mlp_dim=em,
        dec_dim=dd, dec_depth=ddepth, dec_heads=dh, dec_mlp_dim=dm, **kw,
    )  # fmt: skip


# (dim, blocks, heads, MLP dim) per network — ViT-VQGAN Table 1 (docs/papers.md).
VIT_SMALL = (512, 8, 8, 2048)
VIT_BASE = (768, 12, 12, 3072)
VIT_LARGE = (1280, 32, 16, 5120)


def _cnn(
    channels: int,
    ch_mult: tuple[int, ...],
    image_size: int = 256,
    z: int = 256,
    attn: tuple[int, ...] = (16,),
    res_blocks: int = 2,
    codebook_size: int = 1024,
    lookup_dim: int | None = None,
    l2_norm: bool = False,
) -> TokenizerConfig:
    return TokenizerConfig(
        arch="cnn", image_size=image_size, patch_size=2 ** (len(ch_mult) - 1), enc_dim=z, dec_dim=z, enc_heads=1,
        dec_heads=1, codebook_size=codebook_size, lookup_dim=lookup_dim or z, l2_norm=l2_norm, logit_laplace=False,
        l2_weight=0.0, l1_weight=1.0, cnn_channels=channels, cnn_ch_mult=ch_mult, cnn_num_res_blocks=res_blocks,
        cnn_attn_resolutions=attn,
    )  # fmt: skip


TOKENIZER_PRESETS: dict[str, Any] = {
    "vit-vqgan-ss": lambda: _vit(VIT_SMALL, VIT_SMALL),
    "vit-vqgan-bb": lambda: _vit(VIT_BASE, VIT_BASE),
    # SL: Small encoder, Large decoder; the quantizer's project_out maps the lookup space to 1280.
    "vit-vqgan-sl": lambda: _vit(VIT_SMALL, VIT_LARGE),
    # CNN VQGAN (taming-transformers): vanilla VQ (no factorization, no l2-norm), L1 reconstruction.
    "vqgan-f16-1024": lambda: _cnn(128, (1, 1, 2, 2, 4), codebook_size=1024),
    "vqgan-f16-16384": lambda: _cnn(128, (1, 1, 2, 2, 4), codebook_size=16384),
    # The ViT-VQGAN paper's CNN comparison points: its codebook (8192 codes, dim 32, l2), 32×32 tokens at 256 px.
    "cnn-vqgan-x1": lambda: _cnn(128, (1, 1, 2, 4), codebook_size=8192, lookup_dim=32, l2_norm=True),
    "cnn-vqgan-x2": lambda: _cnn(256, (1, 1, 2, 4), codebook_size=8192, lookup_dim=32, l2_norm=True),
    "vqgan-tiny": lambda: _cnn(
        32, (1, 2, 2, 4), image_size=64, z=64, attn=(8,), res_blocks=1, codebook_size=512, lookup_dim=64
    ),
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


# Loss and optimiser defaults of each tokenizer preset, from its paper; `vqim train-tokenizer` (and
# `TokenizerTrainConfig.for_preset`) use them for every setting not given explicitly.
# - ViT-VQGAN (docs/papers.md: L = L_VQ + 0.1·L_adv + 0.1·L_perceptual + 0.1·L_logit-Laplace + 1.0·L2;
#   Adam (0.9, 0.99), lr 1e-4). The paper leaves the GAN loss form, R1 and the start step open: vqim uses
#   StyleGAN2's non-saturating loss with lazy R1 (γ = 10 every 16 steps, StyleGAN2's setting) from step 0.
# - Taming VQGAN (its released ImageNet configs): PatchGAN + hinge, adaptive weight × 0.8 from step 250001,
#   LPIPS weight 1.0, Adam (0.5, 0.9), lr 4.5e-6 per image of the global batch.
# - The tiny presets are for CPU minutes and offline machines: no discriminator, no perceptual term.
_VIT_RECIPE: dict[str, Any] = {
    "disc": "stylegan", "adv_weight": 0.1, "disc_start": 0, "r1_gamma": 10.0,
    "r1_interval": 16, "perceptual_weight": 0.1, "betas": (0.9, 0.99), "lr": 1e-4,
}  # fmt: skip
_TAMING_RECIPE: dict[str, Any] = {
    "disc": "patchgan", "adv_weight": 0.8, "adaptive_weight": True, "disc_start": 250001, "r1_gamma": 0.0,
    "perceptual_weight": 1.0, "betas": (0.5, 0.9), "lr_per_image": 4.5e-6,
}  # fmt: skip
_TINY_RECIPE: dict[str, Any] = {"disc": "none", "perceptual_weight": 0.0}
TRAIN_RECIPES: dict[str, dict[str, Any]] = {
    "vit-vqgan-ss": _VIT_RECIPE,
    "vit-vqgan-bb": _VIT_RECIPE,
    "vit-vqgan-sl": _VIT_RECIPE,
    # The ViT-VQGAN paper trains its CNN comparison points with its own objective.
    "cnn-vqgan-x1": _VIT_RECIPE,
    "cnn-vqgan-x2": _VIT_RECIPE,
    "vqgan-f16-1024": _TAMING_RECIPE,
    "vqgan-f16-16384": _TAMING_RECIPE,
    "vit-vqgan-tiny": _TINY_RECIPE,
    "vqgan-tiny": {**_TINY_RECIPE, "betas": (0.5, 0.9)},
}


def train_recipe(preset: str) -> dict[str, Any]:
    """Training defaults of a tokenizer preset (see TRAIN_RECIPES); {} for an unknown name."""
    return dict(TRAIN_RECIPES.get(preset, {}))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["key=value", ...]` to TokenizerConfig overrides, each value read as its field's type.

    Booleans take true/false (or 1/0), tuples comma-separated integers (`cnn_ch_mult=1,1,2,2`).
    """
    defaults = {f.name: f.default for f in dataclasses.fields(TokenizerConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"expected KEY=VALUE, got {item!r}")
        if key not in defaults:
            raise InputError(f"unknown tokenizer config field {key!r}; known fields: {sorted(defaults)}")
        d = defaults[key]
        try:
            if isinstance(d, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise InputError(value)
                out[key] = value.lower() in ("true", "1")
            elif isinstance(d, int):
                out[key] = int(value)
            elif isinstance(d, float):
                out[key] = float(value)
            elif isinstance(d, tuple):
                out[key] = tuple(int(v) for v in value.split(",") if v)
            else:
                out[key] = value
        except ValueError:
            raise InputError(f"{key}={value!r} is not a valid {type(d).__name__}") from None
    return out


def tokenizer_presets() -> list[str]:
    return sorted(TOKENIZER_PRESETS)


def get_tokenizer_config(name: str, **overrides: Any) -> TokenizerConfig:
    """Config of a named preset with any field replaced.

    Args:
        name: one of `tokenizer_presets()`.
        **overrides: TokenizerConfig fields to replace.
    """
    return _from_preset("tokenizer", TOKENIZER_PRESETS, name, overrides)


def _from_preset(kind: str, presets: dict[str, Any], name: str, overrides: dict[str, Any]) -> Any:
    """presets[name]() with fields replaced; unknown preset names and fields are ValueErrors naming the choices."""
    if name not in presets:
        raise InputError(f"unknown {kind} preset {name!r}; choose one of {sorted(presets)}")
    cfg = presets[name]()
    known = {f.name for f in dataclasses.fields(cfg)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise InputError(f"unknown {kind} config fields {bad}; known fields: {sorted(known)}")
    return dataclasses.replace(cfg, **overrides)


# ---------------------------------------------------------------------------------------------- prior


@dataclass(frozen=True)
class PriorConfig:
    """Configuration of a VIM prior: a decoder-only causal Transformer over raster-order token ids.

    Args:
        vocab_size: number of token ids V (the tokenizer's codebook_size).
        grid_size: (h, w) of the token grid (the tokenizer's grid_size); sequences hold up to h·w tokens.
            A list (as read back from JSON) is turned into a tuple.
        num_classes: number of classes C of a class-conditional prior; 0 = unconditional. A conditional
            prior has C + 1 class embeddings: the last one (id C) is the "null" class used for label
            dropout in training and for classifier-free guidance.
        dim, depth, heads, mlp_dim: Transformer width, blocks, heads and MLP width.
        dropout: residual, activation, attention and embedding dropout (docs/papers.md: 0.1).
        class_dropout: probability, in training, of replacing a label by the null class (classifier-free
            guidance needs it; ignored by an unconditional prior).
        cond_vocab_size: vocabulary of the spatial condition's tokens (the condition tokenizer's
            codebook_size); 0 = no spatial condition.
        cond_grid_size: (h, w) of the spatial condition's token grid (the condition tokenizer's grid_size);
            None when cond_vocab_size is 0.
        pos_embed: image-token positions: "rowcol" (a learned row table plus a learned column table) or "1d"
            (one learned vector per raster position, as minGPT / taming-transformers' priors have).
    """

    vocab_size: int = 8192
    grid_size: tuple[int, int] = (32, 32)
    num_classes: int = 0
    dim: int = 512
    depth: int = 8
    heads: int = 8
    mlp_dim: int = 2048
    dropout: float = 0.1
    class_dropout: float = 0.1
    cond_vocab_size: int = 0
    cond_grid_size: tuple[int, int] | None = None
    pos_embed: Literal["rowcol", "1d"] = "rowcol"

    def __post_init__(self) -> None:
        for name in ("grid_size", "cond_grid_size"):
            grid = getattr(self, name)
            if grid is None and name == "cond_grid_size":
                continue
            if (
                not isinstance(grid, (tuple, list))
                or len(grid) != 2
                or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
            ):
                raise InputError(f"{name} must be two positive ints (h, w), got {grid!r}")
            object.__setattr__(self, name, (int(grid[0]), int(grid[1])))
        for name in ("vocab_size", "num_classes", "dim", "depth", "heads", "mlp_dim", "cond_vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise InputError(f"{name} must be an int, got {v!r}")
        if self.vocab_size < 2:
            raise InputError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if self.num_classes < 0:
            raise InputError(f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")
        if self.cond_vocab_size < 0 or self.cond_vocab_size == 1:
            raise InputError(
                f"cond_vocab_size must be 0 (no spatial condition) or >= 2, got {self.cond_vocab_size}"
            )
        if (self.cond_vocab_size > 0) != (self.cond_grid_size is not None):
            raise InputError(
                "a spatial condition needs both cond_vocab_size and cond_grid_size (or neither), got "
                f"cond_vocab_size={self.cond_vocab_size}, cond_grid_size={self.cond_grid_size}"
            )
        for name in ("dim", "depth", "heads", "mlp_dim"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise InputError(f"dim {self.dim} is not divisible by heads {self.heads}")
        for name in ("dropout", "class_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise InputError(f"{name} must be in [0, 1), got {v}")

    @property
    def seq_len(self) -> int:
        """Tokens per image, h·w."""
        return self.grid_size[0] * self.grid_size[1]

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def spatial(self) -> bool:
        """Whether the prior reads a spatial condition (condition tokens before the image tokens)."""
        return self.cond_vocab_size > 0

    @property
    def cond_len(self) -> int:
        """Condition tokens per sequence, hc·wc (0 without a spatial condition)."""
        return 0 if self.cond_grid_size is None else self.cond_grid_size[0] * self.cond_grid_size[1]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["pos_embed"] == "rowcol":  # added later: left out at its default, so identities stay the same
            del d["pos_embed"]
        d["grid_size"] = list(self.grid_size)  # JSON has no tuples; __post_init__ turns it back
        if self.cond_grid_size is not None:
            d["cond_grid_size"] = list(self.cond_grid_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PriorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown prior config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


def _vim(dim: int, depth: int, heads: int, mlp_dim: int, **kw: Any) -> PriorConfig:
    return PriorConfig(dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim, **kw)


# Architecture presets. vim-base / vim-large are the paper's (VIM-Base 650M, VIM-Large 1.7B; docs/papers.md)
# over the ImageNet-256 ViT-VQGAN grid (patch 8 → 32×32, 8192 codes); vim-small is the size of the public
# samplers in docs/reference-figures.md; vim-tiny pairs with the vit-vqgan-tiny tokenizer (512 codes, 8×8
# tokens) for CPU runs.
PRIOR_PRESETS: dict[str, Any] = {
    "vim-base": lambda: _vim(1536, 24, 16, 6144),
    "vim-large": lambda: _vim(2048, 36, 32, 8192),
    "vim-small": lambda: _vim(512, 8, 8, 2048),
    "vim-tiny": lambda: _vim(128, 4, 4, 512, vocab_size=512, grid_size=(8, 8)),
}


# The data-side setting each prior preset is meant for (and counted at by `vqim presets`): the paper's
# ImageNet setting (8192 codes, 32×32 tokens, 1000 classes), except vim-tiny, which the demo runs on the tiny
# tokenizer's digits tokens (512 codes, 8×8 tokens, 10 classes).
PAPER_PRIOR_SETTING: dict[str, Any] = {"vocab_size": 8192, "grid_size": (32, 32), "num_classes": 1000}
PRIOR_PRESET_SETTINGS: dict[str, dict[str, Any]] = {
    "vim-base": PAPER_PRIOR_SETTING,
    "vim-large": PAPER_PRIOR_SETTING,
    "vim-small": PAPER_PRIOR_SETTING,
    "vim-tiny": {"vocab_size": 512, "grid_size": (8, 8), "num_classes": 10},
}


def prior_presets() -> list[str]:
    return sorted(PRIOR_PRESETS)


def get_prior_config(
    name: str,
    vocab_size: int | None = None,
    grid_size: tuple[int, int] | None = None,
    num_classes: int | None = None,
    **overrides: Any,
) -> PriorConfig:
    """Config of a named prior preset with the data-side fields and any other field replaced.

    Args:
        name: one of `prior_presets()`.
        vocab_size: the tokenizer's codebook_size; None keeps the preset's (8192; 512 for vim-tiny).
        grid_size: the tokenizer's grid_size (h, w); None keeps the preset's ((32, 32); (8, 8) for vim-tiny).
        num_classes: classes of a class-conditional prior, 0 = unconditional; None keeps the preset's (0).
        **overrides: any other PriorConfig field, e.g. depth=2, dropout=0.0.
    """
    data = {"vocab_size": vocab_size, "grid_size": grid_size, "num_classes": num_classes}
    return _from_preset(
        "prior", PRIOR_PRESETS, name, {**overrides, **{k: v for k, v in data.items() if v is not None}}
    )


def preset_table() -> dict[str, dict[str, Any]]:
    """Every preset with its parameter counts (millions), as `vqim presets` prints it.

    Tokenizers: encoder / decoder / quantizer counts, the paper's training recipe, and the config fields the
    preset's architecture reads. Priors: the total count at the setting each is meant for
    (`PRIOR_PRESET_SETTINGS`: vocabulary, grid and classes, shown in its config). Models are built on the meta device: no memory
    is allocated for the weights.
    """
    import torch

    from vqim.prior import Prior
    from vqim.tokenizer import Tokenizer

    def jsonable(d: dict[str, Any]) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    rows: dict[str, dict[str, Any]] = {"tokenizers": {}, "priors": {}}
    for name in tokenizer_presets():
        with torch.device("meta"):
            tok = Tokenizer(get_tokenizer_config(name))
        rows["tokenizers"][name] = {
            "params_M": {k: round(v / 1e6, 2) for k, v in tok.num_params().items()},
            "train_recipe": jsonable(train_recipe(name)),
            **jsonable(tok.config.to_dict(arch_only=True)),
        }
    for name in prior_presets():
        setting = PRIOR_PRESET_SETTINGS.get(name, PAPER_PRIOR_SETTING)
        with torch.device("meta"):
            prior = Prior(get_prior_config(name, **setting))
        rows["priors"][name] = {
            "params_M": round(sum(p.numel() for p in prior.parameters()) / 1e6, 2),
            **jsonable(prior.config.to_dict()),
        }
    return rows


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings.

    What `vqim sample` and `vqim eval-prior` sample with; `kwargs()` gives them to `vqim.sampling.generate`.

    Args:
        temperature: divides the logits before sampling (0: greedy).
        top_k: sample among the k most likely tokens only (default: all).
        top_p: nucleus sampling: the smallest set of most likely tokens whose probability reaches top_p
            (default: no nucleus filter).
        cfg_scale: classifier-free guidance scale for a class-conditional prior (1: plain conditional
            sampling).
        seed: random seed of the sampler.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        from vqim.sampling import check_sampling_args

        check_sampling_args(self.temperature, self.top_k, self.top_p, self.cfg_scale)

    def kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments of `generate` / `generate_images`."""
        return dataclasses.asdict(self)


__all__ = [
    "SamplingConfig",
    "preset_table",
    "PRIOR_PRESET_SETTINGS",
    "TokenizerConfig",
    "get_tokenizer_config",
    "tokenizer_presets",
    "TOKENIZER_PRESETS",
    "TRAIN_RECIPES",
    "train_recipe",
    "parse_overrides",
    "PriorConfig",
    "get_prior_config",
    "prior_presets",
    "PRIOR_PRESETS",
]
