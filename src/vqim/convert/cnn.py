"""The weight mapping shared by the taming-derived CNN tokenizers (taming-transformers, LlamaGen) → vqim's CNN.

Both sources name the ends of their networks as vqim does (conv_in, norm_out, conv_out) and keep a ResNet block's
tensors under the same names (norm1, conv1, norm2, conv2; nin_shortcut is vqim's skip). Their attention keeps q,
k and v in three 1×1 convolutions, concatenated here into vqim's one qkv; proj_out is vqim's proj. The quantizer's
quant_conv / post_quant_conv are 1×1 convolutions, i.e. vqim's project_in / project_out linear maps.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vqim.errors import InputError

_RENAME = {"nin_shortcut": "skip", "proj_out": "proj"}


def cnn_state(
    sd: dict[str, torch.Tensor], blocks: list[tuple[str, str, bool]], path: str | Path, what: str
) -> dict[str, torch.Tensor]:
    """vqim's tokenizer state dict from sd, given (source prefix, vqim prefix, is attention) for every block of
    the encoder and decoder bodies; keys of sd outside them (losses, usage buffers) are left out."""
    out: dict[str, torch.Tensor] = {}
    try:
        for side in ("encoder", "decoder"):
            for name in ("conv_in", "norm_out", "conv_out"):
                for p in ("weight", "bias"):
                    out[f"{side}.net.{name}.{p}"] = sd[f"{side}.{name}.{p}"]
        for src, dst, attention in blocks:
            if attention:
                for p in ("weight", "bias"):
                    out[f"{dst}.norm.{p}"] = sd[f"{src}.norm.{p}"]
                    out[f"{dst}.qkv.{p}"] = torch.cat([sd[f"{src}.{q}.{p}"] for q in "qkv"])
                    out[f"{dst}.proj.{p}"] = sd[f"{src}.proj_out.{p}"]
                continue
            keys = [k for k in sd if k.startswith(src + ".")]
            if not keys:
                raise KeyError(src)
            for key in keys:
                head, _, tail = key[len(src) + 1 :].partition(".")
                out[f"{dst}.{_RENAME.get(head, head)}.{tail}"] = sd[key]
        out["quantizer.codebook"] = sd["quantize.embedding.weight"]
        for mine, theirs in (("project_in", "quant_conv"), ("project_out", "post_quant_conv")):
            out[f"quantizer.{mine}.weight"] = sd[f"{theirs}.weight"].flatten(1)
            out[f"quantizer.{mine}.bias"] = sd[f"{theirs}.bias"]
    except KeyError as e:
        raise InputError(f"{path}: the checkpoint lacks {e.args[0]}: not {what}") from None
    return out
