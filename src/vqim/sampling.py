"""Sampling from a `Prior`: temperature / top-k / top-p, classifier-free guidance, prefill + cached decode.

`generate` runs the prefix (spatial condition, class or start token) through the network once (prefill), then
decodes one token at a time: each step feeds only the newest token and attends over keys and values kept in a
preallocated per-layer `KVCache`, so a step costs one pass over the weights instead of a pass over the whole
prefix. The step is the prior's own network (`Prior.extend`, the modules that train), so a change to the block
changes training and sampling alike; its linear layers compute the few-row products of decoding with the
row-split CPU kernel of `vqim.nn.linear`. `generate_recompute` runs the whole prefix through the network every
step; it is the slow reference for tests and benchmarks.

The same loop completes images (kept tokens are fed, not sampled; runs of them go in as one prefill) and
samples canvases larger than the training grid with a sliding window (`window_origin`).

Classifier-free guidance (Ho & Salimans 2022; LlamaGen) runs the conditional rows and the same number of
null-class rows as one batch of 2n and samples from  logits = uncond + s · (cond − uncond);  s = 1 is plain
conditional sampling and runs only the n conditional rows.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vqim.errors import InputError

if TYPE_CHECKING:
    from vqim.prior import LabelsLike, Prior
    from vqim.tokenizer import Tokenizer


def check_sampling_args(
    temperature: float, top_k: int | None, top_p: float | None, cfg_scale: float = 1.0
) -> None:
    """Raise InputError for a negative temperature, top_k < 1, top_p outside (0, 1] or a non-finite cfg_scale
    (each message names the argument and its command-line flag)."""
    if not temperature >= 0.0 or math.isinf(temperature):  # also rejects NaN
        raise InputError(
            f"temperature (--temperature) must be a finite number >= 0 (0 = greedy), got {temperature}"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k (--top-k) must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p (--top-p) must be None or in (0, 1], got {top_p}")
    if not math.isfinite(cfg_scale):
        raise InputError(f"cfg_scale (--cfg-scale) must be a finite number, got {cfg_scale}")


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
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
        uniform: instead of a generator, one number in [0, 1) per row (B,): row b takes the id where the
            cumulative probability passes uniform[b] (inverse-CDF sampling, the same distribution), so each
            row's draw depends on its own number only, not on the other rows of the batch.
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
    probs = logits.softmax(dim=-1)
    if uniform is None:
        choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
    else:
        cdf = probs.double().cumsum(dim=-1)
        u = uniform.to(cdf.device, torch.float64).reshape(-1, 1) * cdf[:, -1:]  # the sum is 1 up to rounding
        choice = torch.searchsorted(cdf, u, right=True)
        # Rounding can put u at the very top: take the last candidate of positive probability, never a filtered one.
        last = probs.shape[-1] - 1 - (probs > 0).flip(-1).long().argmax(dim=-1, keepdim=True)
        choice = torch.minimum(choice, last)
    if ids is not None:
        choice = ids.gather(-1, choice)
    return choice.squeeze(-1)


def row_seed(seed: int, index: int) -> int:
    """The random seed of sample `index` of a run seeded `seed` (independent streams, any batch layout)."""
    import numpy as np

    entropy = [
        int(seed) & (2**64 - 1),
        int(index),
    ]  # SeedSequence takes non-negative ints; torch seeds may be < 0
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def row_uniforms(seeds: Any, steps: int, device: Any) -> torch.Tensor:
    """(len(seeds), steps) numbers in [0, 1): row r from its own generator seeded seeds[r]."""
    rows = [
        torch.rand(steps, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds
    ]
    return torch.stack(rows).to(device)


def window_origin(i: int, j: int, canvas: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner (r0, c0) of the training-size window that predicts canvas position (i, j).

    The window of h×w tokens is centred on the position where the canvas allows and pushed inside at the edges
    (Taming Transformers' sliding-window sampling): r0 = clamp(i − h//2, 0, H − h), likewise for columns. Every
    window position before (i, j) in the window's raster order is a canvas position before (i, j) in the
    canvas's raster order, so the window only ever reads tokens already sampled.
    """
    (hh, ww), (h, w) = canvas, grid
    return min(max(i - h // 2, 0), hh - h), min(max(j - w // 2, 0), ww - w)


def _check_grid(prior: Prior, grid: Any) -> tuple[int, int]:
    h, w = prior.config.grid_size
    if grid is None:
        return h, w
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid)
    ):
        raise InputError(f"grid must be two ints (H, W), got {grid!r}")
    if grid[0] < h or grid[1] < w:
        raise InputError(
            f"grid {tuple(grid)} is smaller than the prior's {h}×{w} training grid; the sliding window needs a "
            f"canvas of at least {h}×{w} tokens"
        )
    return int(grid[0]), int(grid[1])


def _check_ids(t: Any, name: str, vocab: int, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise InputError(f"{name} must be an integer tensor of {what} ids, got {got}")
    if t.numel() and bool(((t < 0) | (t >= vocab)).any()):
        raise InputError(
            f"{name} ids must be in [0, {vocab}), got values in [{int(t.min())}, {int(t.max())}]"
        )
    return t.long()


def _known_tokens(
    prior: Prior, n: int, canvas: tuple[int, int], prefix: Any, known: Any, keep: Any
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(given ids (n, H·W), kept mask (n, H·W)) from `prefix` or `known` + `keep`; None when neither is given."""
    hh, ww = canvas
    total, v, dev = hh * ww, prior.config.vocab_size, prior.device
    if prefix is not None and (known is not None or keep is not None):
        raise InputError("pass either prefix (a raster prefix) or known + keep (a mask), not both")
    if prefix is not None:
        prefix = _check_ids(prefix, "prefix", v, "token")
        if prefix.ndim == 1:
            prefix = prefix[None].expand(n, -1)
        if prefix.ndim != 2 or prefix.shape[0] != n:
            raise InputError(f"prefix must have shape (k,) or ({n}, k), got {tuple(prefix.shape)}")
        k = prefix.shape[1]
        if not 1 <= k <= total:
            raise InputError(f"prefix length {k} must be in [1, {total}] (the {hh}×{ww} grid's tokens)")
        given = torch.zeros(n, total, dtype=torch.long, device=dev)
        given[:, :k] = prefix.to(dev)
        kept = torch.zeros(n, total, dtype=torch.bool, device=dev)
        kept[:, :k] = True
        return given, kept
    if known is None and keep is None:
        return None
    if known is None or keep is None:
        raise InputError(
            "inpainting needs both known (token grid (n, H, W)) and keep (bool mask (H, W) or (n, H, W))"
        )
    known = _check_ids(known, "known", v, "token")
    if known.ndim == 2:
        known = known[None].expand(n, -1, -1)
    if tuple(known.shape) != (n, hh, ww):
        raise InputError(f"known must have shape ({n}, {hh}, {ww}) or ({hh}, {ww}), got {tuple(known.shape)}")
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise InputError("keep must be a bool tensor (True = keep the known token)")
    if keep.ndim == 2:
        keep = keep[None].expand(n, -1, -1)
    if tuple(keep.shape) != (n, hh, ww):
        raise InputError(f"keep must have shape ({hh}, {ww}) or ({n}, {hh}, {ww}), got {tuple(keep.shape)}")
    return known.reshape(n, total).to(dev), keep.reshape(n, total).to(dev)


def _condition_canvas(prior: Prior, condition: Any, n: int, canvas: tuple[int, int]) -> torch.Tensor | None:
    """Condition tokens as a canvas (n, Hc, Wc) (the prior's condition grid, or the image canvas when sliding)."""
    cfg = prior.config
    if canvas == tuple(cfg.grid_size) or not cfg.spatial:
        cond = prior.check_condition(condition, n)
        return None if cond is None else cond.view(n, *cfg.cond_grid_size)
    if tuple(cfg.cond_grid_size) != tuple(cfg.grid_size):
        raise InputError(
            f"sliding-window sampling with a spatial condition needs the condition grid {cfg.cond_grid_size} to "
            f"equal the image grid {cfg.grid_size}, so that each window reads the condition's matching window"
        )
    if condition is None:
        raise InputError(
            f"this prior is spatially conditioned: pass condition tokens ({n}, {canvas[0]}, {canvas[1]})"
        )
    cond = _check_ids(condition, "condition", cfg.cond_vocab_size, "condition token")
    if cond.ndim == 2:
        cond = cond[None].expand(n, -1, -1)
    if tuple(cond.shape) != (n, *canvas):
        raise InputError(
            f"for a {canvas[0]}×{canvas[1]} canvas the condition must be a token grid of the same size, "
            f"({n}, {canvas[0]}, {canvas[1]}), got {tuple(cond.shape)}"
        )
    return cond.to(prior.device)


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
    condition: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    known: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
    num_tokens: int | None = None,
    row_seeds: list[int] | None = None,
) -> torch.Tensor:
    """Sample token grids from a prior in raster order with the KV cache (prefill, then one token per step).

    Completion and inpainting: `prefix` keeps the first k raster-order tokens verbatim and samples the rest;
    `known` + `keep` keep the known tokens wherever `keep` is True and sample the others in raster order, each
    conditioned on every token before it (kept or sampled). Raster order cannot see ahead: a sampled token is
    not conditioned on kept tokens after it (below it, or to its right in its row).

    Sliding window: with `grid=(H, W)` larger than the training grid (h, w), each token is sampled from the prior
    applied to the h×w window around it (`window_origin`), with window-relative positions; keys and values are
    reused while the window stays put. On the training grid this is the plain sampler, token for token.

    Args:
        prior: a `vqim.Prior`; it runs in eval mode and inference_mode inside, and its mode is restored after.
        n: number of samples.
        labels: class ids (n,), or one int for all, of a conditional prior; None for an unconditional one.
        temperature, top_k, top_p: see `sample_logits`.
        cfg_scale: classifier-free guidance scale s on the class (conditional priors; 1 = no guidance).
        seed: seeds a torch.Generator on the prior's device, so the same seed gives the same samples;
            None draws from torch's global generator.
        condition: spatial condition tokens of a spatially conditioned prior: (n, hc, wc) or one grid (hc, wc);
            for a canvas larger than the training grid, a condition canvas of the canvas's size.
        prefix: token ids (k,) or (n, k) to keep as the first k raster-order tokens.
        known: token ids (n, H, W) or (H, W), kept where `keep` is True.
        keep: bool mask (H, W) or (n, H, W) of the known tokens to keep.
        grid: canvas (H, W) in tokens, at least the training grid in each dimension (None = the training grid).
        num_tokens: stop after this many raster-order tokens and return (n, num_tokens) (for benchmarks).
        row_seeds: one seed per sample, instead of `seed`: each sample draws from its own stream (inverse-CDF,
            see `sample_logits`), so it is the same whatever batch it is drawn in (`row_seed(seed, index)` gives
            the seeds of a run's samples).

    Returns:
        LongTensor (n, H, W) of token ids on the prior's device (or (n, num_tokens), see above).
    """
    return _sample(prior, n, labels, temperature, top_k, top_p, cfg_scale, seed, condition, prefix, known, keep,
                   grid, num_tokens, cache=True, row_seeds=row_seeds)  # fmt: skip


def generate_recompute(
    prior: Prior,
    n: int,
    labels: LabelsLike = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
    seed: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """`generate` without the KV cache: every step runs the whole (window) prefix through `Prior.forward`'s
    network again.

    The slow reference: with the same seed it draws the same random numbers in the same order as `generate`,
    so the two agree token for token up to floating-point ties. Arguments as in `generate`.
    """
    names = ("condition", "prefix", "known", "keep", "grid", "num_tokens", "row_seeds")
    kw = {k: kwargs.pop(k, None) for k in names}
    if kwargs:
        raise TypeError(f"unexpected arguments {sorted(kwargs)}")
    return _sample(prior, n, labels, temperature, top_k, top_p, cfg_scale, seed, kw["condition"], kw["prefix"],
                   kw["known"], kw["keep"], kw["grid"], kw["num_tokens"], cache=False,
                   row_seeds=kw["row_seeds"])  # fmt: skip


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
    condition: Any,
    prefix: Any,
    known: Any,
    keep: Any,
    grid: Any,
    num_tokens: int | None,
    cache: bool,
    row_seeds: Any = None,
) -> torch.Tensor:
    cfg = prior.config
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive int, got {n!r}")
    check_sampling_args(temperature, top_k, top_p, cfg_scale)
    h, w = cfg.grid_size
    canvas = _check_grid(prior, grid)
    hh, ww = canvas
    total = hh * ww if num_tokens is None else num_tokens
    if not 1 <= total <= hh * ww:
        raise InputError(f"num_tokens must be in [1, H·W = {hh * ww}], got {num_tokens}")
    guided = cfg_scale != 1.0
    if guided and not cfg.conditional:
        raise InputError("classifier-free guidance (cfg_scale != 1) needs a class-conditional prior")
    labels = prior.check_labels(labels, n)  # (n,) or None
    cond = _condition_canvas(prior, condition, n, canvas)  # (n, Hc, Wc) or None
    fixed = _known_tokens(prior, n, canvas, prefix, known, keep)
    rows = n
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])  # conditional, then null rows
        cond = None if cond is None else cond.repeat(2, 1, 1)  # both halves see the same spatial condition
        rows = 2 * n
    device = prior.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    uniforms = None
    if row_seeds is not None:
        if len(row_seeds) != n:
            raise InputError(f"row_seeds needs one seed per sample ({n}), got {len(row_seeds)}")
        uniforms = row_uniforms(
            row_seeds, total, device
        )  # (n, total): sample r's draws, position by position
    sliding = canvas != (h, w)

    out = torch.empty(n, total, dtype=torch.long, device=device)  # sampled ids, filled position by position
    if fixed is not None:
        given, kept = fixed[0][:, :total], fixed[1][:, :total]
        all_kept, any_kept = kept.all(0).tolist(), kept.any(0).tolist()
    was_training = prior.training
    prior.eval()
    try:
        # inference_mode: no autograd bookkeeping on the ~20 small ops per block and step. Only `out`, made
        # outside it, leaves this block, so callers get an ordinary tensor.
        with torch.inference_mode():
            pos = prior.position_table()  # (h·w, D), computed once
            emb = prior.tok_embed.weight  # (V, D)
            # The cache holds the prefix (condition and start) and at most h·w − 1 image tokens of one window.
            caches = prior.transformer.new_caches(rows, cfg.cond_len + h * w) if cache else None
            # The cached window's origin, how many of its image positions the cache holds, its prefix vectors.
            window, fed, head = None, 0, None

            def image_inputs(r0: int, c0: int, a: int, b: int) -> torch.Tensor:
                """Input vectors (R, b − a, D) of window positions a .. b−1 of the window at (r0, c0)."""
                if b - a == 1:  # one decode step: a slice, no index tensor
                    k = (r0 + a // w) * ww + c0 + a % w
                    ids = out[:, k : k + 1]
                else:
                    local = torch.arange(a, b, device=device)
                    ids = out[:, (r0 + local // w) * ww + c0 + local % w]  # (n, b − a)
                if guided:
                    ids = ids.repeat(2, 1)  # both halves continue with the same tokens
                return F.embedding(ids, emb) + pos[a:b]

            for p in range(total):
                if fixed is not None and all_kept[p]:
                    out[:, p] = given[:, p]  # kept in every row: no prediction needed here
                    continue
                i, j = divmod(p, ww)
                r0, c0 = window_origin(i, j, canvas, (h, w))  # (0, 0) throughout on the training grid
                here = (i - r0) * w + (j - c0)  # the position's index in its window's raster order
                if not cache or (r0, c0) != window or fed > here:
                    if head is None or (sliding and cond is not None):  # the condition's window moved too
                        c = None if cond is None else cond[:, r0 : r0 + h, c0 : c0 + w].reshape(rows, -1)
                        head = prior.embed_prefix(labels, c, rows)  # (R, L + 1, D)
                    x = torch.cat([head, image_inputs(r0, c0, 0, here)], dim=1) if here else head
                    if cache:
                        for kv in caches:
                            kv.clear()
                        logits = prior.extend(x, caches)
                    else:
                        logits = prior.head(prior.transformer(x)[:, -1])  # the whole prefix again
                    window = (r0, c0)
                else:
                    logits = prior.extend(image_inputs(r0, c0, fed, here), caches)  # only the new positions
                fed = here
                if guided:
                    c_, u = logits[:n], logits[n:]
                    logits = u + cfg_scale * (c_ - u)
                u = None if uniforms is None else uniforms[:, p]
                tok = sample_logits(logits, temperature, top_k, top_p, generator, u)  # (n,)
                if fixed is not None and any_kept[p]:
                    tok = torch.where(kept[:, p], given[:, p], tok)
                out[:, p] = tok
    finally:
        prior.train(was_training)
    if num_tokens is None:
        return out.view(n, hh, ww)
    return out


def generate_images(
    tokenizer: Tokenizer,
    prior: Prior,
    n: int,
    labels: LabelsLike = None,
    **sampling_kwargs: Any,
) -> torch.Tensor:
    """Sample n token grids from the prior and decode them: images (n, 3, H, W) in [0, 1].

    Args:
        tokenizer: a `vqim.Tokenizer` whose codebook_size and grid_size match the prior's vocab_size and
            grid_size (`vqim.prior.load_prior_and_tokenizer` loads a checked pair).
        prior: a `vqim.Prior`.
        n: number of images.
        labels: class ids of a conditional prior (see `generate`).
        **sampling_kwargs: any keyword of `generate` (temperature, top_k, top_p, cfg_scale, seed, condition,
            prefix, known, keep, grid).
    """
    tcfg, pcfg = tokenizer.config, prior.config
    if tcfg.codebook_size != pcfg.vocab_size or tuple(tokenizer.grid_size) != tuple(pcfg.grid_size):
        raise InputError(
            f"the tokenizer ({tcfg.codebook_size} codes, grid {tuple(tokenizer.grid_size)}) does not fit the "
            f"prior (vocabulary {pcfg.vocab_size}, grid {tuple(pcfg.grid_size)}): use the tokenizer whose tokens "
            "the prior was trained on"
        )
    allowed = "temperature top_k top_p cfg_scale seed condition prefix known keep grid row_seeds".split()
    bad = sorted(set(sampling_kwargs) - set(allowed))
    if bad:
        raise InputError(f"unknown sampling arguments {bad}; use {', '.join(allowed)}")
    ids = generate(prior, n, labels, **sampling_kwargs)  # (n, H, W)
    return tokenizer.decode(ids.to(next(tokenizer.parameters()).device))


__all__ = [
    "row_seed",
    "check_sampling_args",
    "generate",
    "generate_images",
    "generate_recompute",
    "sample_logits",
    "window_origin",
]
