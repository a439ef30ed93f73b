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

from vqim.config import PriorConfig, TokenizerConfig
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


def is_transformer(config: dict[str, Any]) -> bool:
    """Whether a taming config describes a Net2NetTransformer (a prior) rather than a VQModel."""
    return str(config.get("model", config).get("target", "")).endswith(".Net2NetTransformer")


def prior_config(config: dict[str, Any], path: str | Path) -> tuple[PriorConfig, TokenizerConfig, int | None]:
    """(vqim PriorConfig, the first stage's TokenizerConfig, the unconditional start token or None) of a taming
    Net2NetTransformer config whose condition is a class label (Labelator) or nothing (SOSProvider)."""
    params = config.get("model", config).get("params", {})
    try:
        first = tokenizer_config(params["first_stage_config"], path)
        gpt = params["transformer_config"]["params"]
        cond = params["cond_stage_config"]
        permuter = str(params.get("permuter_config", {}).get("target", "permuter.Identity"))
        if not permuter.endswith(".Identity"):
            raise InputError(f"{path}: permuter {permuter}: only the raster order (Identity) is converted")
        target, cparams = str(cond.get("target", "")), cond.get("params", {})
        h = w = first.image_size // first.patch_size
        vocab = int(gpt["vocab_size"])
        if vocab != first.codebook_size:
            raise InputError(
                f"{path}: the GPT's vocab_size {vocab} differs from the first stage's {first.codebook_size}"
            )
        if int(gpt["block_size"]) < h * w:
            raise InputError(f"{path}: block_size {gpt['block_size']} is shorter than the {h}×{w} token grid")
        if target.endswith(".Labelator"):
            classes, sos = int(cparams["n_classes"]), None
        elif target.endswith(".SOSProvider"):
            classes, sos = 0, int(cparams.get("sos_token", 0))
        else:
            raise InputError(
                f"{path}: condition {target}: only class labels and unconditional priors are converted"
            )
        dim = int(gpt["n_embd"])
        pcfg = PriorConfig(
            vocab_size=vocab, grid_size=(h, w), num_classes=classes, dim=dim, depth=int(gpt["n_layer"]),
            heads=int(gpt["n_head"]), mlp_dim=4 * dim, dropout=0.0, class_dropout=0.0, pos_embed="1d",
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(
            f"{path}: not a taming Net2NetTransformer config ({type(e).__name__}: {e})"
        ) from None
    return pcfg, first, sos


def prior_state(
    sd: dict[str, torch.Tensor], cfg: PriorConfig, sos: int | None, path: str | Path
) -> dict[str, torch.Tensor]:
    """vqim's prior state dict of the `transformer.*` weights of a taming Net2NetTransformer.

    minGPT's sequence is [c, z_0, z_1, ...] through one token table and one 1-D position table; vqim's is
    [start or class vector, z_0, ...] with the class (or start) vector carrying its own position. So the class
    embeddings are taming's token rows of the class ids (+ its position 0 in `cond_pos`), the start vector is
    the sos token's row + position 0, and image position i is taming's position i + 1 (the last image position
    is never an input; it stays zero). The head has no bias in minGPT (zero here).
    """
    h, w = cfg.grid_size
    p = "transformer."
    try:
        tok, pos = sd[p + "tok_emb.weight"], sd[p + "pos_emb"][0]
        out = {"tok_embed.weight": tok[: cfg.vocab_size], "transformer.norm.weight": sd[p + "ln_f.weight"],
               "transformer.norm.bias": sd[p + "ln_f.bias"], "head.weight": sd[p + "head.weight"],
               "head.bias": torch.zeros(cfg.vocab_size)}  # fmt: skip
        table = torch.zeros(h * w, cfg.dim)
        n = min(h * w, pos.shape[0] - 1)
        table[:n] = pos[1 : 1 + n]
        out["pos"] = table
        if cfg.num_classes:
            null = torch.zeros(1, cfg.dim)  # no guidance in taming's priors: the null class is never trained
            out["class_embed.weight"] = torch.cat([tok[: cfg.num_classes], null])
            out["cond_pos"] = pos[0]
        else:
            out["start"] = tok[sos] + pos[0]
        for i in range(cfg.depth):
            src, dst = f"{p}blocks.{i}.", f"transformer.blocks.{i}."
            for a, b in (("ln1", "norm1"), ("ln2", "norm2"), ("attn.proj", "attn.proj"), ("mlp.0", "mlp.fc1"),
                         ("mlp.2", "mlp.fc2")):  # fmt: skip
                for q in ("weight", "bias"):
                    out[f"{dst}{b}.{q}"] = sd[f"{src}{a}.{q}"]
            for q in ("weight", "bias"):
                out[f"{dst}attn.qkv.{q}"] = torch.cat(
                    [sd[f"{src}attn.{k}.{q}"] for k in ("query", "key", "value")]
                )
    except KeyError as e:
        raise InputError(
            f"{path}: the checkpoint lacks {e.args[0]}: not a taming Net2NetTransformer"
        ) from None
    return out
