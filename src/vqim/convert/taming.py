"""taming-transformers' VQGAN (`taming.models.vqgan.VQModel`) → a vqim CNN tokenizer.

The architectures are the same network: vqim's CNN (`vqim.nn.conv`) is taming's Encoder/Decoder with the
blocks of each level in one `nn.Sequential`, and its single-head attention keeps q, k and v in one 1×1 convolution
(taming's separate q, k, v weights are concatenated). taming's quant_conv / post_quant_conv become the quantizer's
project_in / project_out (`TokenizerConfig.quant_proj`), its codebook the quantizer's, with plain Euclidean lookup
(`l2_norm=False`). taming feeds images in [-1, 1] and decodes to [-1, 1], as vqim does inside (`encode_latents`,
`to_image`), so the converted tokenizer gives taming's codes and taming's reconstruction for the same image.
Gumbel (`GumbelVQ`) and EMA quantizers are not converted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from vqim.config import TokenizerConfig
from vqim.convert.cnn import cnn_state
from vqim.errors import InputError


def tokenizer_config(config: dict[str, Any], path: str | Path) -> TokenizerConfig:
    """vqim's TokenizerConfig of a taming VQModel config (the YAML's model section, or the whole YAML)."""
    model = config.get("model", config)
    target = str(model.get("target", "taming.models.vqgan.VQModel"))
    if not target.endswith(".VQModel"):
        raise InputError(
            f"{path}: model target {target}: only taming's VQModel is converted (not Gumbel or EMA VQ)"
        )
    params = model.get("params", model)
    try:
        dd = params["ddconfig"]
        ch_mult = tuple(int(m) for m in dd["ch_mult"])
        if dd.get("double_z", False) or dd["z_channels"] <= 0:
            raise InputError(f"{path}: ddconfig.double_z is set: not a VQGAN encoder")
        return TokenizerConfig(
            arch="cnn", image_size=int(dd["resolution"]), patch_size=2 ** (len(ch_mult) - 1),
            channels=int(dd["in_channels"]), enc_dim=int(dd["z_channels"]), dec_dim=int(dd["z_channels"]),
            codebook_size=int(params["n_embed"]), lookup_dim=int(params["embed_dim"]), l2_norm=False,
            quant_proj=True, logit_laplace=False, l1_weight=1.0, l2_weight=0.0, cnn_channels=int(dd["ch"]),
            cnn_ch_mult=ch_mult, cnn_num_res_blocks=int(dd["num_res_blocks"]),
            cnn_attn_resolutions=tuple(int(r) for r in dd["attn_resolutions"]),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: not a taming VQModel config ({type(e).__name__}: {e})") from None


def _levels(cfg: TokenizerConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(taming prefix, vqim prefix) pairs of every block of the encoder and the decoder, in order."""
    mult, nrb, attn = cfg.cnn_ch_mult, cfg.cnn_num_res_blocks, cfg.cnn_attn_resolutions
    enc, k, res = [], 0, cfg.image_size
    for i in range(len(mult)):
        for j in range(nrb):
            enc.append((f"encoder.down.{i}.block.{j}", f"encoder.net.body.{k}"))
            k += 1
            if res in attn:
                enc.append((f"encoder.down.{i}.attn.{j}", f"encoder.net.body.{k}"))
                k += 1
        if i < len(mult) - 1:
            enc.append((f"encoder.down.{i}.downsample", f"encoder.net.body.{k}"))
            k += 1
            res //= 2
    for name in ("block_1", "attn_1", "block_2"):
        enc.append((f"encoder.mid.{name}", f"encoder.net.body.{k}"))
        k += 1
    dec = [
        (f"decoder.mid.{n}", f"decoder.net.body.{i}") for i, n in enumerate(("block_1", "attn_1", "block_2"))
    ]
    k = 3
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            dec.append((f"decoder.up.{i}.block.{j}", f"decoder.net.body.{k}"))
            k += 1
            if res in attn:
                dec.append((f"decoder.up.{i}.attn.{j}", f"decoder.net.body.{k}"))
                k += 1
        if i > 0:
            dec.append((f"decoder.up.{i}.upsample", f"decoder.net.body.{k}"))
            k += 1
            res *= 2
    return enc, dec


def tokenizer_state(
    sd: dict[str, torch.Tensor], cfg: TokenizerConfig, path: str | Path
) -> dict[str, torch.Tensor]:
    """vqim's state dict of the taming VQModel weights sd (training-only keys, e.g. loss.*, are left out)."""
    enc, dec = _levels(cfg)
    blocks = [(src, dst, bool(re.search(r"\.attn(_1|\.\d+)$", src))) for src, dst in enc + dec]
    return cnn_state(sd, blocks, path, "a taming VQModel of this config")
