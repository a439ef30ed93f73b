"""enhancing-transformers' ViT-VQGAN (`enhancing.modules.stage1.vitvqgan.ViTVQ`) → a vqim ViT tokenizer.

The source is the ViT-VQGAN of vqim's own tokenizer with other choices, each a `TokenizerConfig` option here:
attention heads 64 wide whatever the width (`enc_head_dim`, `dec_head_dim`; the large decoder's 16 heads are 1024
wide in a 1280-wide Transformer), q, k, v without bias (`qkv_bias=False`), tanh in the MLPs (`mlp_act="tanh"`),
and no tanh output heads (`vit_head="linear"`): the encoder's Transformer (with its final LayerNorm) feeds
pre_quant, and the decoder ends in a stride-p transposed convolution, which is a per-token linear map to the
token's p×p pixels with one bias per channel. Its position tables are the fixed 2-D sine-cosine tables in
vqim's channel order (`pos_embed="sincos"`; a checkpoint whose tables differ keeps them as learned tables,
exact at the training grid). pre_quant / post_quant and the l2-normalised codebook are the quantizer's
project_in / project_out and codebook (`quant_proj=True`, `l2_norm` = the source's use_norm).

The source reads images in [0, 1] (torchvision's ToTensor) and decodes to [0, 1] with no final activation;
vqim's encoder reads 2x − 1 and its decoder output y is shown as (y + 1) / 2. Both affine maps are folded into
the converted weights (the patch embedding takes half the convolution's weights, its bias the convolution's
plus half their sums; the pixel head doubles the transposed convolution and maps its bias b to 2b − 1), so the
converted tokenizer gives the source's codes and the source's reconstruction of the same image. vqim's
`decode` clamps images to [0, 1]; the source's `decode_codes` does not clamp.
Residual quantizers (use_residual) and the Gumbel variant are not converted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from vqim.config import TokenizerConfig
from vqim.errors import InputError
from vqim.nn.transformer import sincos_2d

_POS = {"encoder": "encoder.en_pos_embedding", "decoder": "decoder.de_pos_embedding"}


def _sincos_tables(sd: dict[str, torch.Tensor], cfg: TokenizerConfig) -> bool:
    """Whether both position tables in sd are vqim's sine-cosine tables (within float32 rounding)."""
    h, w = cfg.grid_size
    for side, key in _POS.items():
        table = sd.get(key)
        dim = cfg.enc_dim if side == "encoder" else cfg.dec_dim
        if table is None or table.is_meta or tuple(table.shape) != (1, h * w, dim) or dim % 4:
            return False
        if (table[0].double() - sincos_2d(h, w, dim).double()).abs().max() > 1e-5:
            return False
    return True


def tokenizer_config(
    config: dict[str, Any], sd: dict[str, torch.Tensor], path: str | Path
) -> TokenizerConfig:
    """vqim's TokenizerConfig of a ViTVQ config (the YAML's model section, or the whole YAML); the weights sd
    tell whether its position tables are the sine-cosine ones."""
    model = config.get("model", config)
    target = str(model.get("target", "enhancing.modules.stage1.vitvqgan.ViTVQ"))
    if not target.endswith(".ViTVQ"):
        raise InputError(f"{path}: model target {target}: only enhancing-transformers' ViTVQ is converted")
    params = model.get("params", model)
    try:
        enc, dec, q = params["encoder"], params["decoder"], params["quantizer"]
        residual = bool(q.get("use_residual", False))
        one_head = [n for n, s in (("encoder", enc), ("decoder", dec))
                    if int(s["heads"]) == 1 and int(s.get("dim_head", 64)) == int(s["dim"])]  # fmt: skip
        channels = {int(enc.get("channels", 3)), int(dec.get("channels", 3))}
        cfg = TokenizerConfig(
            arch="vit", image_size=int(params["image_size"]), patch_size=int(params["patch_size"]),
            channels=int(enc.get("channels", 3)), enc_dim=int(enc["dim"]), enc_depth=int(enc["depth"]),
            enc_heads=int(enc["heads"]), enc_mlp_dim=int(enc["mlp_dim"]), enc_head_dim=int(enc.get("dim_head", 64)),
            dec_dim=int(dec["dim"]), dec_depth=int(dec["depth"]), dec_heads=int(dec["heads"]),
            dec_mlp_dim=int(dec["mlp_dim"]), dec_head_dim=int(dec.get("dim_head", 64)),
            codebook_size=int(q["n_embed"]), lookup_dim=int(q["embed_dim"]), l2_norm=bool(q.get("use_norm", True)),
            quant_proj=True, beta=float(q.get("beta", 0.25)), pos_embed="sincos", vit_head="linear",
            qkv_bias=False, mlp_act="tanh", logit_laplace=False, l2_weight=1.0, l1_weight=0.0,
        )  # fmt: skip
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(
            f"{path}: not an enhancing-transformers ViTVQ config ({type(e).__name__}: {e})"
        ) from None
    if residual:
        raise InputError(f"{path}: quantizer.use_residual is set: residual quantizers are not converted")
    if one_head:  # the source has no attention output projection then
        raise InputError(
            f"{path}: the {one_head[0]} has one attention head as wide as the model: not converted"
        )
    if len(channels) > 1:
        raise InputError(f"{path}: the encoder and the decoder differ in their image channels")
    return cfg if _sincos_tables(sd, cfg) else dataclasses.replace(cfg, pos_embed="learned")


def _transformer(
    sd: dict[str, torch.Tensor], src: str, dst: str, depth: int, path: str | Path
) -> dict[str, torch.Tensor]:
    """vqim's Transformer weights (prefix dst) of the source's (prefix src): PreNorm(Attention), PreNorm(FF)."""
    if any(k.startswith(f"{src}.layers.{depth}.") for k in sd):  # a --config shallower than the weights
        deeper = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(f"{src}.layers."))
        raise InputError(
            f"{path}: {src}.layers: {deeper} blocks in the checkpoint, {depth} in the config: give the --config "
            "the checkpoint was trained with"
        )
    out = {f"{dst}.norm.{q}": sd[f"{src}.norm.{q}"] for q in ("weight", "bias")}
    for i in range(depth):
        s, d = f"{src}.layers.{i}", f"{dst}.blocks.{i}"
        out[f"{d}.attn.qkv.weight"] = sd[f"{s}.0.fn.to_qkv.weight"]  # [q; k; v], heads outer: vqim's layout
        for q in ("weight", "bias"):
            out[f"{d}.norm1.{q}"] = sd[f"{s}.0.norm.{q}"]
            out[f"{d}.attn.proj.{q}"] = sd[f"{s}.0.fn.to_out.{q}"]
            out[f"{d}.norm2.{q}"] = sd[f"{s}.1.norm.{q}"]
            out[f"{d}.mlp.fc1.{q}"] = sd[f"{s}.1.fn.net.0.{q}"]
            out[f"{d}.mlp.fc2.{q}"] = sd[f"{s}.1.fn.net.2.{q}"]
    return out


def tokenizer_state(
    sd: dict[str, torch.Tensor], cfg: TokenizerConfig, path: str | Path
) -> dict[str, torch.Tensor]:
    """vqim's state dict of ViTVQ weights sd (its `state_dict`; the loss.* training keys are left out)."""
    p = cfg.patch_size
    try:
        conv_w, conv_b = sd["encoder.to_patch_embedding.0.weight"], sd["encoder.to_patch_embedding.0.bias"]
        tconv_w, tconv_b = sd["decoder.to_pixel.1.weight"], sd["decoder.to_pixel.1.bias"]
        out = {
            **_transformer(sd, "encoder.transformer", "encoder.transformer", cfg.enc_depth, path),
            **_transformer(sd, "decoder.transformer", "decoder.transformer", cfg.dec_depth, path),
            "quantizer.codebook": sd["quantizer.embedding.weight"],
        }
        for mine, theirs in (("project_in", "pre_quant"), ("project_out", "post_quant")):
            for q in ("weight", "bias"):
                out[f"quantizer.{mine}.{q}"] = sd[f"{theirs}.{q}"]
        if cfg.pos_embed == "learned":
            out["encoder.pos.weight"], out["decoder.pos.weight"] = sd[_POS["encoder"]], sd[_POS["decoder"]]
    except KeyError as e:
        raise InputError(
            f"{path}: the checkpoint lacks {e.args[0]}: not an enhancing-transformers ViTVQ"
        ) from None
    expect = {"patch embedding": (conv_w, (cfg.enc_dim, cfg.channels, p, p)),
              "pixel head": (tconv_w, (cfg.dec_dim, cfg.channels, p, p))}  # fmt: skip
    for what, (w, shape) in expect.items():
        if tuple(w.shape) != shape:
            raise InputError(f"{path}: the {what} has shape {list(w.shape)}, the config needs {list(shape)}")
    # Conv2d(C, D, p, stride p) on an image x in [0, 1] = Linear on patchify(2x − 1) with (row, col, channel)
    # inputs: half the weights, and the bias plus half the weights' sums (the folded −1). Folded in float64 and kept
    # at float32 at least (a half-precision checkpoint's folded sums would otherwise be rounded to half precision).
    w = conv_w.double().permute(0, 2, 3, 1).reshape(cfg.enc_dim, -1)
    dtype = torch.promote_types(conv_w.dtype, torch.float32)
    out["encoder.patch_embed.weight"] = (w / 2).to(dtype)
    out["encoder.patch_embed.bias"] = (conv_b.double() + w.sum(1) / 2).to(dtype)
    # ConvTranspose2d(D, C, p, stride p) = per-token Linear to (row, col, channel) pixels + a bias per channel;
    # doubled, with bias 2b − 1, it gives vqim's [-1, 1] output y whose (y + 1) / 2 is the source's image.
    tw = tconv_w.double().permute(2, 3, 1, 0).reshape(p * p * cfg.channels, cfg.dec_dim)
    out["decoder.head.proj.weight"] = (2 * tw).to(dtype)
    out["decoder.head.bias"] = (2 * tconv_b.double() - 1).to(dtype)
    return out
