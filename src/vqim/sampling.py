"""Sampling from a `Prior`: temperature / top-k / top-p, classifier-free guidance, prefill + cached decode.

`generate` runs the condition token through the network once (prefill), then decodes one token at a time:
each step feeds only the newest token and attends over keys and values kept in a preallocated per-layer
`KVCache`, so a step costs one pass over the weights instead of a pass over the whole prefix.
`generate_recompute` recomputes the full prefix every step; it is the slow reference for tests and benchmarks.

Decoding one token is bound by reading the weights once per step (batch 1) or by small-M matrix products
(batch 8), so the step (`Decoder.step`) is a flat loop of tensor ops over the blocks' weights, with none of the
per-module Python of `nn.Module.__call__`, and in-place residual adds. On CPU each product `x W^T` runs as one
batched GEMM over 16 (or 8, 4, 2) row blocks of W: PyTorch's one-row linear is a single-threaded GEMV that
streams the weights at one core's memory bandwidth, and its few-row linear repacks each weight on every call;
the batched form keeps every thread streaming (2.9× faster per step at batch 1, 1.3× at batch 8, measured).
It computes the same function as `Prior.forward`, up to float rounding (tests check ≤ 1e-5).

Classifier-free guidance (Ho & Salimans 2022; LlamaGen) runs the conditional rows and the same number of
null-class rows as one batch of 2n and samples from  logits = uncond + s · (cond − uncond);  s = 1 is plain
conditional sampling and runs only the n conditional rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vqim.nn.transformer import KVCache

if TYPE_CHECKING:
    from vqim.prior import LabelsLike, Prior
    from vqim.tokenizer import Tokenizer


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError for a negative temperature, top_k < 1 or top_p outside (0, 1]."""
    if not temperature >= 0.0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p}")


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one id per row from logits (B, V); returns a LongTensor (B,).

    Filters apply in the order temperature → top-k → top-p (as in Hugging Face transformers): top-p keeps the
    smallest set of the highest-probability ids, among those top-k left, whose mass reaches top_p (the most
    likely id is always kept).

    Args:
        logits: unnormalised scores (B, V).
        temperature: divides the logits; 0 means greedy (argmax).
        top_k: keep only the k highest logits (None = all); top_k = 1 is greedy.
        top_p: nucleus mass in (0, 1] (None or 1 = no nucleus filtering).
        generator: random source (None = torch's global generator); must live on the logits' device.
    """
    if temperature == 0.0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    ids = None  # (B, k) vocabulary ids of the kept candidates, in descending order of logit
    if top_k is not None and top_k < logits.shape[-1]:
        logits, ids = logits.topk(top_k, dim=-1)  # (B, k), sorted: only k candidates go on
    elif top_p is not None and top_p < 1.0:
        logits, ids = logits.sort(dim=-1, descending=True)
    if top_p is not None and top_p < 1.0:
        probs = logits.softmax(dim=-1)
        # Drop a candidate when the mass of the (more likely) candidates before it already reaches top_p.
        before = probs.cumsum(dim=-1) - probs
        logits = logits.masked_fill(before >= top_p, float("-inf"))
    choice = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)  # (B, 1)
    if ids is not None:
        choice = ids.gather(-1, choice)
    return choice.squeeze(-1)


def _split_count(out_features: int) -> int:
    """Row blocks for a split matrix-vector product: 16, 8, 4 or 2, whichever divides the output width (0: none)."""
    return next((s for s in (16, 8, 4, 2) if out_features % s == 0), 0)


def _linear_fn(layer: nn.Linear, rows: int, split: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (rows, in) → layer(x): as a batched product over row blocks of the weight when `split`, else F.linear."""
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    n_split = _split_count(w.shape[0]) if split else 0
    if n_split:
        # On CPU a one-row F.linear is a single-threaded GEMV that streams the weight at one core's bandwidth;
        # the same product as a batch of n_split (out/n_split × in) · (in × rows) GEMMs runs on every thread
        # (benchmarks/sampling_speed.py). Same sums, different rounding order.
        ws = w.contiguous().view(n_split, -1, w.shape[1])
        bs = None if b is None else b.view(n_split, -1, 1)

        def split_linear(x: torch.Tensor) -> torch.Tensor:
            # x (1, in) transposed to (in, 1) with strides (1, in): MKL takes it as a transposed operand and
            # runs the batched GEMM path; the same column made contiguous (strides (1, 1)) is 5× slower.
            xt = x.reshape(rows, -1).t().expand(n_split, -1, -1)
            y = torch.bmm(ws, xt) if bs is None else torch.baddbmm(bs, ws, xt)
            return y.permute(2, 0, 1).reshape(rows, -1)  # (S, out/S, rows) → (rows, out)

        return split_linear
    return lambda x: F.linear(x, w, b)


class Decoder:
    """Incremental decoding state of a prior for `rows` sequences: one preallocated `KVCache` per block.

    `step(x)` takes the input vectors of the newest position, (rows, D), appends its keys and values to the
    caches and returns next-token logits (rows, V), which equal `Prior.forward`'s logits at that position up to
    float rounding. Dropout is not applied (sampling runs the model in eval mode). The weights are read from the
    prior's modules when the decoder is built; build a new decoder after changing them.

    Args:
        prior: a `vqim.Prior`.
        rows: number of sequences decoded together.
        max_len: positions to hold, condition included (at most h·w).
        split: compute each product as one batched GEMM over row blocks of the weight, so every thread streams
            part of it; None = on CPU in fp32.
    """

    def __init__(self, prior: Prior, rows: int, max_len: int, split: bool | None = None) -> None:
        w = prior.head.weight
        if split is None:
            split = w.device.type == "cpu" and w.dtype == torch.float32
        self.rows, self.split = rows, split
        self.dim = prior.config.dim
        self.caches = prior.transformer.new_caches(rows, max_len)
        self.layers = []
        for blk in prior.transformer.blocks:
            a, m = blk.attn, blk.mlp
            self.layers.append(
                (
                    (blk.norm1.weight, blk.norm1.bias, blk.norm1.eps),
                    _linear_fn(a.qkv, rows, self.split),
                    _linear_fn(a.proj, rows, self.split),
                    (blk.norm2.weight, blk.norm2.bias, blk.norm2.eps),
                    _linear_fn(m.fc1, rows, self.split),
                    _linear_fn(m.fc2, rows, self.split),
                    a.heads,
                    a.head_dim,
                )
            )
        norm = prior.transformer.norm
        self.norm = (norm.weight, norm.bias, norm.eps)
        self.head = _linear_fn(prior.head, rows, self.split)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Input vectors (rows, D) of the next position → logits (rows, V) for the token after it."""
        r, d = x.shape
        x = x.clone()  # the residual stream, updated in place below
        cache: KVCache
        for cache, (ln1, qkv, proj, ln2, fc1, fc2, heads, hd) in zip(self.caches, self.layers):
            h = F.layer_norm(x, (d,), *ln1)
            q, k, v = qkv(h).view(r, 3, heads, 1, hd).unbind(1)  # each (R, H, 1, hd)
            k, v = cache.append(k, v)  # (R, H, L, hd): every cached position, this one included
            y = F.scaled_dot_product_attention(q, k, v)  # (R, H, 1, hd)
            x.add_(proj(y.reshape(r, d)))
            h = F.layer_norm(x, (d,), *ln2)
            x.add_(fc2(F.gelu(fc1(h))))
        return self.head(F.layer_norm(x, (d,), *self.norm))


def generate(
    prior: Prior,
    n: int,
    labels: LabelsLike = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
    seed: int | None = None,
    *,
    num_tokens: int | None = None,
) -> torch.Tensor:
    """Sample token grids from a prior with the KV cache: prefill the condition, then decode token by token.

    Args:
        prior: a `vqim.Prior`; it runs in eval mode and inference_mode inside, and its mode is restored after.
        n: number of samples.
        labels: class ids (n,), or one int for all, of a conditional prior; None for an unconditional one.
        temperature, top_k, top_p: see `sample_logits`.
        cfg_scale: classifier-free guidance scale s (conditional priors; 1 = no guidance).
        seed: seeds a torch.Generator on the prior's device, so the same seed gives the same samples;
            None draws from torch's global generator.
        num_tokens: stop after this many raster-order tokens and return (n, num_tokens) (for benchmarks).

    Returns:
        LongTensor (n, h, w) of token ids on the prior's device (or (n, num_tokens), see above).
    """
    return _sample(prior, n, labels, temperature, top_k, top_p, cfg_scale, seed, num_tokens, cache=True)


def generate_recompute(
    prior: Prior,
    n: int,
    labels: LabelsLike = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
    seed: int | None = None,
    *,
    num_tokens: int | None = None,
) -> torch.Tensor:
    """`generate` without the KV cache: every step runs the whole prefix through the network again.

    The slow reference: with the same seed it draws the same random numbers in the same order as `generate`,
    so the two agree token for token up to floating-point ties. Arguments as in `generate`.
    """
    return _sample(prior, n, labels, temperature, top_k, top_p, cfg_scale, seed, num_tokens, cache=False)


@torch.no_grad()
def _sample(
    prior: Prior,
    n: int,
    labels: LabelsLike,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    cfg_scale: float,
    seed: int | None,
    num_tokens: int | None,
    cache: bool,
) -> torch.Tensor:
    cfg = prior.config
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    check_sampling_args(temperature, top_k, top_p)
    total = cfg.seq_len if num_tokens is None else num_tokens
    if not 1 <= total <= cfg.seq_len:
        raise ValueError(f"num_tokens must be in [1, h·w = {cfg.seq_len}], got {num_tokens}")
    guided = cfg_scale != 1.0
    if guided and not cfg.conditional:
        raise ValueError("classifier-free guidance (cfg_scale != 1) needs a class-conditional prior")
    labels = prior.check_labels(labels, n)  # (n,) or None
    rows = n
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])  # conditional, then null rows
        rows = 2 * n
    device = prior.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)

    out = torch.empty(n, total, dtype=torch.long, device=device)  # sampled ids, filled column by column
    was_training = prior.training
    prior.eval()
    try:
        # inference_mode: no autograd bookkeeping on the ~20 small ops per block and step. Only `out`, made
        # outside it, leaves this block, so callers get an ordinary tensor.
        with torch.inference_mode():
            cond = prior.embed_condition(labels, rows)  # (R, 1, D)
            pos = prior.position_table()  # (h·w, D), computed once
            emb = prior.tok_embed.weight  # (V, D)
            # Positions held: the condition and tokens 0 .. total-2 (the last sampled token is never fed back).
            decoder = Decoder(prior, rows, total) if cache else None
            x = cond[:, 0]  # (R, D)
            for i in range(total):
                if decoder is not None:
                    logits = decoder.step(x)  # only the newest position → (R, V)
                else:
                    prefix = out[:, :i].repeat(rows // n, 1)  # (R, i)
                    seq = torch.cat([cond, F.embedding(prefix, emb) + pos[:i]], dim=1)  # (R, i+1, D)
                    logits = prior.head(prior.transformer(seq)[:, -1])  # the whole prefix again
                if guided:
                    c, u = logits[:n], logits[n:]
                    logits = u + cfg_scale * (c - u)
                tok = sample_logits(logits, temperature, top_k, top_p, generator)  # (n,)
                out[:, i] = tok
                if decoder is not None and i + 1 < total:
                    fed = torch.cat([tok, tok]) if guided else tok  # both halves continue with the same token
                    x = F.embedding(fed, emb).add_(pos[i])  # (R, D)
    finally:
        prior.train(was_training)
    if num_tokens is None:
        return out.view(n, *cfg.grid_size)
    return out


def generate_images(
    tokenizer: Tokenizer,
    prior: Prior,
    n: int,
    labels: LabelsLike = None,
    **sampling_kwargs,
) -> torch.Tensor:
    """Sample n token grids from the prior and decode them: images (n, 3, H, W) in [0, 1].

    Args:
        tokenizer: a `vqim.Tokenizer` whose codebook_size and grid_size match the prior's vocab_size and
            grid_size.
        prior: a `vqim.Prior`.
        n: number of images.
        labels: class ids of a conditional prior (see `generate`).
        **sampling_kwargs: temperature, top_k, top_p, cfg_scale, seed (see `generate`).
    """
    tcfg, pcfg = tokenizer.config, prior.config
    if tcfg.codebook_size != pcfg.vocab_size:
        raise ValueError(
            f"the prior's vocab_size {pcfg.vocab_size} does not match the tokenizer's codebook_size "
            f"{tcfg.codebook_size}: train the prior on this tokenizer's tokens"
        )
    if tuple(tokenizer.grid_size) != tuple(pcfg.grid_size):
        raise ValueError(
            f"the prior's grid_size {tuple(pcfg.grid_size)} does not match the tokenizer's grid_size "
            f"{tuple(tokenizer.grid_size)}"
        )
    bad = sorted(set(sampling_kwargs) - {"temperature", "top_k", "top_p", "cfg_scale", "seed"})
    if bad:
        raise ValueError(f"unknown sampling arguments {bad}; use temperature, top_k, top_p, cfg_scale, seed")
    ids = generate(prior, n, labels, **sampling_kwargs)  # (n, h, w)
    return tokenizer.decode(ids.to(next(tokenizer.parameters()).device))


__all__ = [
    "Decoder",
    "sample_logits",
    "generate",
    "generate_recompute",
    "generate_images",
    "check_sampling_args",
]
