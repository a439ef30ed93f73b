"""LlamaGen's VQ tokenizer (`tokenizer/tokenizer_image/vq_model.py`, VQ-16 / VQ-8) → a vqim CNN tokenizer.

LlamaGen's tokenizer is taming's VQGAN network with l2-normalised, factorized codes (8-dimensional by default):
in vqim terms a CNN tokenizer with `l2_norm=True`, `lookup_dim = codebook_embed_dim` and `quant_proj=True`
(quant_conv / post_quant_conv), attention in every block of the lowest-resolution level. Everything is read off
the weights (widths, levels, blocks, codebook); only the image size, which fixes no weight, is a setting.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from vqim.config import TokenizerConfig
from vqim.convert.cnn import cnn_state
from vqim.errors import InputError


def tokenizer_config(sd: dict[str, torch.Tensor], image_size: int, path: str | Path) -> TokenizerConfig:
    """The TokenizerConfig of LlamaGen VQModel weights sd."""
    try:
        ch = int(sd["encoder.conv_in.weight"].shape[0])
        levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k)))
        mult = tuple(
            int(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0]) // ch for i in range(levels)
        )
        nrb = 1 + max(
            int(m.group(1)) for k in sd if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k))
        )
        codes, dim = (int(n) for n in sd["quantize.embedding.weight"].shape)
        z = int(sd["quant_conv.weight"].shape[1])
    except (KeyError, ValueError) as e:
        raise InputError(f"{path}: not LlamaGen VQ tokenizer weights (missing {e})") from None
    f = 2 ** (levels - 1)
    if image_size % f:
        raise InputError(f"--image-size {image_size} is not a multiple of the tokenizer's downsampling {f}")
    return TokenizerConfig(
        arch="cnn", image_size=image_size, patch_size=f, channels=int(sd["encoder.conv_in.weight"].shape[1]),
        enc_dim=z, dec_dim=z, codebook_size=codes, lookup_dim=dim, l2_norm=True, quant_proj=True,
        logit_laplace=False, l1_weight=1.0, l2_weight=0.0, cnn_channels=ch, cnn_ch_mult=mult,
        cnn_num_res_blocks=nrb, cnn_attn_resolutions=(image_size // f,),
    )  # fmt: skip


def _blocks(cfg: TokenizerConfig) -> list[tuple[str, str]]:
    """(LlamaGen prefix, vqim prefix) of every block of encoder and decoder, in order."""
    levels, nrb = len(cfg.cnn_ch_mult), cfg.cnn_num_res_blocks
    pairs, k = [], 0
    for i in range(levels):
        for j in range(nrb):
            pairs.append((f"encoder.conv_blocks.{i}.res.{j}", f"encoder.net.body.{k}"))
            k += 1
            if i == levels - 1:
                pairs.append((f"encoder.conv_blocks.{i}.attn.{j}", f"encoder.net.body.{k}"))
                k += 1
        if i < levels - 1:
            pairs.append((f"encoder.conv_blocks.{i}.downsample", f"encoder.net.body.{k}"))
            k += 1
    for m in range(3):
        pairs.append((f"encoder.mid.{m}", f"encoder.net.body.{k}"))
        k += 1
    pairs += [(f"decoder.mid.{m}", f"decoder.net.body.{m}") for m in range(3)]
    k = 3
    for i in range(levels):  # decoder.conv_blocks.0 is the lowest resolution
        for j in range(nrb + 1):
            pairs.append((f"decoder.conv_blocks.{i}.res.{j}", f"decoder.net.body.{k}"))
            k += 1
            if i == 0:
                pairs.append((f"decoder.conv_blocks.{i}.attn.{j}", f"decoder.net.body.{k}"))
                k += 1
        if i < levels - 1:
            pairs.append((f"decoder.conv_blocks.{i}.upsample", f"decoder.net.body.{k}"))
            k += 1
    return pairs


def tokenizer_state(
    sd: dict[str, torch.Tensor], cfg: TokenizerConfig, path: str | Path
) -> dict[str, torch.Tensor]:
    """vqim's state dict of LlamaGen VQModel weights (the usage buffer and training-only keys left out)."""
    blocks = [(src, dst, ".attn." in src or src.endswith("mid.1")) for src, dst in _blocks(cfg)]
    return cnn_state(sd, blocks, path, "a LlamaGen VQ tokenizer")
