"""VIM prior: a decoder-only causal Transformer over raster-order image tokens (ViT-VQGAN, Stage 2).

Sequence layout. For tokens (B, T), T ≤ h·w, in raster order, the network reads

    [r_0, ..., r_{L-1}, start, tokens[:, 0], ..., tokens[:, T-2]]               (B, L + T, D)

and `logits[:, i]` is the distribution of `tokens[:, i]` given the condition and `tokens[:, :i]`: the targets are
the tokens themselves, no shift is needed by the caller. `start` is a learned start vector for an unconditional
prior, or the embedding of the class for a class-conditional one (its own table of `num_classes + 1` rows; row
`num_classes` is the "null" class used for label dropout in training and for classifier-free guidance) plus a
learned position of its own. Token j carries the position embedding row[j // w] + col[j % w].

`r` is the optional spatial condition (Taming Transformers, section 3.2): the L = hc·wc tokens, in raster order,
of a condition image (an edge map, a low-resolution image, a segmentation) from a second tokenizer trained on
that modality, with their own embedding table and row/column position tables. The network predicts only the
image tokens: the head reads the last T positions, so the likelihood is p(s | r) over the image tokens s, and
nothing is spent on modelling r. Without a spatial condition L = 0 and the layout is the plain one above.

Sampling lives beside the model in `vqim.sampling` (prefill + cached decode, guidance, top-k / top-p).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from vqim.checkpoint import PretrainedMixin
from vqim.config import PriorConfig, get_prior_config
from vqim.errors import InputError
from vqim.nn.dropout import Dropout
from vqim.nn.linear import Linear
from vqim.nn.transformer import KVCache, Transformer

if TYPE_CHECKING:
    from vqim.tokenizer import Tokenizer

LabelsLike = torch.Tensor | int | Iterable[int] | None


@dataclass
class PriorOutput:
    """Result of `Prior.forward`.

    Attributes:
        logits: (B, T, V); logits[:, i] scores tokens[:, i] given the condition and tokens[:, :i].
        blocks: block index (0-based) → that block's output hidden states (B, T, D), for the blocks asked for
            with `return_blocks`; None otherwise. Position i is the state after reading the condition and
            tokens[:, :i] (the state that predicts tokens[:, i]), before the final LayerNorm.
    """

    logits: torch.Tensor
    blocks: dict[int, torch.Tensor] | None = None


class Prior(PretrainedMixin, nn.Module):
    """Decoder-only causal Transformer over token ids: unconditional, class-conditional, spatially conditioned
    (condition tokens in front), or both.

    `save_pretrained(dir)` / `Prior.from_pretrained(dir)` write and read `config.json` + `model.safetensors`.

    Args:
        config: a `PriorConfig`; see `Prior.from_preset` for named sizes.

    Example:
        >>> prior = Prior.from_preset("vim-tiny", vocab_size=512, grid_size=(8, 8), num_classes=10)
        >>> tokens = torch.randint(0, 512, (4, 8, 8))
        >>> loss = prior.loss(tokens, labels=torch.tensor([0, 1, 2, 3]))   # nats per token
        >>> samples = prior.generate(4, labels=3, top_k=100, seed=0)        # (4, 8, 8)
    """

    checkpoint_kind = "prior"
    config_class = PriorConfig

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        h, w = c.grid_size
        self.tok_embed = nn.Embedding(c.vocab_size, c.dim)
        # Learned 2-D position embedding: a row table and a column table, summed (or one vector per position).
        self.pos = self.pos_row = self.pos_col = None
        if c.pos_embed == "1d":
            self.pos = nn.Parameter(torch.zeros(h * w, c.dim))
        else:
            self.pos_row = nn.Parameter(torch.zeros(h, c.dim))
            self.pos_col = nn.Parameter(torch.zeros(w, c.dim))
        if c.conditional:
            self.class_embed = nn.Embedding(c.num_classes + 1, c.dim)  # row num_classes = null class
            self.cond_pos = nn.Parameter(torch.zeros(c.dim))  # the condition token's own position
            self.start = None
        else:
            self.class_embed = None
            self.cond_pos = None
            self.start = nn.Parameter(torch.zeros(c.dim))  # learned start token
        if c.spatial:
            hc, wc = c.cond_grid_size
            self.cond_embed = nn.Embedding(c.cond_vocab_size, c.dim)
            self.cond_pos_row = nn.Parameter(torch.zeros(hc, c.dim))
            self.cond_pos_col = nn.Parameter(torch.zeros(wc, c.dim))
        else:
            self.cond_embed = self.cond_pos_row = self.cond_pos_col = None
        self.drop = Dropout(c.dropout)
        # Blocks + final LayerNorm; dropout on residual branches, MLP activations and attention probabilities.
        self.transformer = Transformer(c.dim, c.depth, c.heads, c.mlp_dim, c.dropout, causal=True)
        self.head = Linear(c.dim, c.vocab_size)
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    def reset_parameters(self, std: float = 0.02) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights and embeddings, zero biases, unit LayerNorm; the projections
        that write into the residual stream (attention output, second MLP layer) get std / sqrt(2·depth), so the
        residual stream's variance does not grow with depth. With LayerNorm before a small head the logits start
        near zero and the loss near ln(vocab_size)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        residual_std = std / math.sqrt(2 * self.config.depth)
        for blk in self.transformer.blocks:
            nn.init.normal_(blk.attn.proj.weight, std=residual_std)
            nn.init.normal_(blk.mlp.fc2.weight, std=residual_std)
        for p in (
            self.pos,
            self.pos_row,
            self.pos_col,
            self.cond_pos,
            self.start,
            self.cond_pos_row,
            self.cond_pos_col,
        ):
            if p is not None:
                nn.init.normal_(p, std=std)

    @classmethod
    def from_preset(
        cls,
        name: str,
        vocab_size: int | None = None,
        grid_size: tuple[int, int] | None = None,
        num_classes: int | None = None,
        **overrides: Any,
    ) -> Prior:
        """A freshly initialised prior of a named preset (`vqim.config.prior_presets()`).

        Args:
            name: preset name, e.g. "vim-base", "vim-large", "vim-small" or "vim-tiny".
            vocab_size: the tokenizer's codebook_size (None keeps the preset's).
            grid_size: the tokenizer's grid_size (h, w) (None keeps the preset's).
            num_classes: 0 for an unconditional prior, C for C classes (None keeps the preset's, 0).
            **overrides: any other `PriorConfig` field, e.g. depth=2, dropout=0.0.
        """
        return cls(get_prior_config(name, vocab_size, grid_size, num_classes, **overrides))

    # ------------------------------------------------------------------ properties
    @property
    def grid_size(self) -> tuple[int, int]:
        return self.config.grid_size

    @property
    def null_class(self) -> int | None:
        """Label id of the null class (= num_classes) of a conditional prior; None when unconditional."""
        return self.config.num_classes if self.config.conditional else None

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def num_params(self) -> dict[str, int]:
        """Parameter counts: embeddings (token, position, class/start), Transformer, head and the total."""
        count = lambda ps: sum(p.numel() for p in ps)
        emb = [self.tok_embed.weight]
        emb += [
            p
            for p in (self.pos, self.pos_row, self.pos_col, self.cond_pos, self.start, self.cond_pos_row,
                      self.cond_pos_col)
            if p is not None
        ]  # fmt: skip
        for table in (self.class_embed, self.cond_embed):
            if table is not None:
                emb.append(table.weight)
        return {
            "embeddings": count(emb),
            "transformer": count(self.transformer.parameters()),
            "head": count(self.head.parameters()),
            "total": count(self.parameters()),
        }

    # ------------------------------------------------------------------ checks
    def check_tokens(self, tokens: Any, values: bool = True) -> torch.Tensor:
        """Validate token ids (B, T) with 1 ≤ T ≤ h·w, or a full grid (B, h, w); return them as (B, T) int64.

        `values=False` checks types and shapes only: reading the id range back from the device is a host sync,
        which the training step avoids (an id out of range still fails in the embedding lookup).
        """
        if not isinstance(tokens, torch.Tensor):
            raise InputError(f"tokens must be a LongTensor of shape (B, T), got {type(tokens).__name__}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise InputError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        h, w = self.config.grid_size
        if tokens.ndim == 3:
            if tuple(tokens.shape[1:]) != (h, w):
                raise InputError(f"a token grid must have shape (B, {h}, {w}), got {tuple(tokens.shape)}")
            tokens = tokens.reshape(tokens.shape[0], h * w)
        if tokens.ndim != 2:
            raise InputError(f"tokens must have shape (B, T) or (B, {h}, {w}), got {tuple(tokens.shape)}")
        t = tokens.shape[1]
        if not 1 <= t <= h * w:
            raise InputError(f"sequence length T = {t} must be in [1, h·w = {h * w}] for the {h}×{w} grid")
        v = self.config.vocab_size
        if values and tokens.numel() and bool(((tokens < 0) | (tokens >= v)).any()):
            lo, hi = int(tokens.min()), int(tokens.max())
            raise InputError(f"token ids must be in [0, {v}), got values in [{lo}, {hi}]")
        return tokens.long()

    def check_labels(self, labels: LabelsLike, batch_size: int, values: bool = True) -> torch.Tensor | None:
        """Validate class labels: an int, a sequence or a tensor of B ints in [0, num_classes]; id num_classes is
        the null class. Returns a LongTensor (B,) on the model's device, or None for an unconditional prior.
        `values=False`: types and shapes only (no host sync), as for `check_tokens`."""
        c = self.config.num_classes
        if not self.config.conditional:
            if labels is not None:
                raise InputError("this prior is unconditional (num_classes = 0): pass labels=None")
            return None
        if labels is None:
            raise InputError(
                f"this prior is class-conditional ({c} classes): pass labels, a LongTensor (B,) of ids in "
                f"[0, {c}) (or {c}, the null class)"
            )
        if isinstance(labels, bool):
            raise InputError("labels must be ints, got a bool")
        if isinstance(labels, int):
            labels = torch.full((batch_size,), labels, dtype=torch.long)
        elif not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(list(labels))
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise InputError(f"labels must be integers, got dtype {labels.dtype}")
        if labels.ndim == 0:
            labels = labels.expand(batch_size)
        if labels.shape != (batch_size,):
            raise InputError(f"labels must have shape ({batch_size},), got {tuple(labels.shape)}")
        if values and bool(((labels < 0) | (labels > c)).any()):
            raise InputError(
                f"labels must be in [0, {c}) (or {c}, the null class), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        return labels.to(self.device, torch.long)

    def check_condition(self, condition: Any, batch_size: int, values: bool = True) -> torch.Tensor | None:
        """Validate spatial condition tokens: (B, hc, wc), (B, hc·wc), or one grid (hc, wc) for every row.

        Returns a LongTensor (B, hc·wc) on the model's device, or None for a prior without a spatial condition.
        `values=False`: types and shapes only (no host sync), as for `check_tokens`.
        """
        c = self.config
        if not c.spatial:
            if condition is not None:
                raise InputError(
                    "this prior has no spatial condition (cond_vocab_size = 0): pass condition=None"
                )
            return None
        hc, wc = c.cond_grid_size
        if condition is None:
            raise InputError(
                f"this prior is conditioned on a {hc}×{wc} grid of condition tokens: pass condition, a LongTensor "
                f"(B, {hc}, {wc}) of ids in [0, {c.cond_vocab_size}) from the condition tokenizer"
            )
        if not isinstance(condition, torch.Tensor):
            raise InputError(
                f"condition must be a LongTensor (B, {hc}, {wc}), got {type(condition).__name__}"
            )
        if condition.is_floating_point() or condition.is_complex() or condition.dtype == torch.bool:
            raise InputError(f"condition tokens must be integers, got dtype {condition.dtype}")
        if condition.ndim == 2 and tuple(condition.shape) == (hc, wc) and (batch_size, hc * wc) != (hc, wc):
            condition = condition.reshape(1, hc * wc).expand(batch_size, -1)
        elif condition.ndim == 3 and tuple(condition.shape[1:]) == (hc, wc):
            condition = condition.reshape(condition.shape[0], hc * wc)
        if condition.ndim != 2 or tuple(condition.shape) != (batch_size, hc * wc):
            raise InputError(
                f"condition must be condition tokens of shape ({batch_size}, {hc}, {wc}) (the prior's condition "
                f"grid), got {tuple(condition.shape)}: encode the condition with the condition tokenizer the "
                "prior was trained with"
            )
        v = c.cond_vocab_size
        if values and bool(((condition < 0) | (condition >= v)).any()):
            raise InputError(
                f"condition token ids must be in [0, {v}) (the condition tokenizer's codebook), got values in "
                f"[{int(condition.min())}, {int(condition.max())}]"
            )
        return condition.to(self.device, torch.long)

    # ------------------------------------------------------------------ model pieces (also used by sampling)
    def position_table(self) -> torch.Tensor:
        """Position embedding of every grid position in raster order, (h·w, D)."""
        if self.pos is not None:
            return self.pos
        h, w = self.config.grid_size
        return (self.pos_row[:, None, :] + self.pos_col[None, :, :]).reshape(h * w, -1)

    def cond_position_table(self) -> torch.Tensor:
        """Position embedding of every condition-grid position in raster order, (hc·wc, D)."""
        return (self.cond_pos_row[:, None, :] + self.cond_pos_col[None, :, :]).flatten(0, 1)

    def embed_start(self, labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """The input vector that predicts the first image token, (B, 1, D): the start token, or class
        embedding + its position.

        Args:
            labels: LongTensor (B,) already checked (see `check_labels`), or None for an unconditional prior.
            batch_size: B.
        """
        if self.class_embed is None:
            return self.start.expand(batch_size, 1, -1)
        return (self.class_embed(labels) + self.cond_pos)[:, None, :]

    def embed_prefix(
        self, labels: torch.Tensor | None, condition: torch.Tensor | None, batch_size: int
    ) -> torch.Tensor:
        """Every input vector before the first image token, (B, L + 1, D): the spatial condition's L tokens
        (none without one), then the start vector.

        Args:
            labels: checked labels (B,) or None (see `check_labels`).
            condition: checked condition tokens (B, L) or None (see `check_condition`).
            batch_size: B.
        """
        start = self.embed_start(labels, batch_size)
        if condition is None:
            return start
        return torch.cat([self.cond_embed(condition) + self.cond_position_table(), start], dim=1)

    def extend(self, x: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """Cached decoding: run input vectors x (B, N, D), the N positions after those in `caches`, through
        the network, appending their keys and values; return the logits (B, V) at the last of them."""
        m = self._modules  # no nn.Module.__getattr__ per step (see vqim.nn.transformer.Block.forward)
        return m["head"].forward(m["transformer"].forward(x, caches=caches).select(1, -1))

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Replace each label by the null class with probability class_dropout (training only)."""
        p = self.config.class_dropout
        if not self.training or p == 0.0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < p
        return labels.masked_fill(drop, self.config.num_classes)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        tokens: torch.Tensor,
        labels: LabelsLike = None,
        return_blocks: Iterable[int] | None = None,
        check_values: bool = True,
        *,
        condition: torch.Tensor | None = None,
    ) -> PriorOutput:
        """Next-token logits for every position of tokens.

        Args:
            tokens: LongTensor (B, T) of ids in [0, vocab_size), 1 ≤ T ≤ h·w, in raster order; or a grid (B, h, w).
            labels: class ids (B,) (or one int for the whole batch) of a conditional prior, in [0, num_classes]
                where num_classes is the null class; None for an unconditional prior. In training mode each label
                becomes the null class with probability class_dropout.
            return_blocks: 0-based block indices whose outputs to return in `PriorOutput.blocks`.
            check_values: check that ids and labels are in range (a host sync; the trainer turns it off).
            condition: spatial condition tokens (B, hc, wc) of a prior with a spatial condition; None otherwise.

        Returns:
            `PriorOutput` with logits (B, T, V): logits[:, i] is the distribution of tokens[:, i] given the
            condition and tokens[:, :i]. The condition positions get no logits: the likelihood is the image
            tokens' alone.
        """
        tokens = self.check_tokens(tokens, check_values)
        b, t = tokens.shape
        labels = self.check_labels(labels, b, check_values)
        if labels is not None:
            labels = self.drop_labels(labels)
        condition = self.check_condition(condition, b, check_values)
        taps = None
        if return_blocks is not None:
            taps = sorted({int(i) for i in return_blocks})
            depth = self.config.depth
            if any(not 0 <= i < depth for i in taps):
                raise InputError(f"return_blocks must be block indices in [0, {depth}), got {taps}")
        prefix = self.embed_prefix(labels, condition, b)  # (B, L + 1, D)
        body = self.tok_embed(tokens[:, : t - 1]) + self.position_table()[: t - 1]  # (B, T-1, D)
        x = self.drop(torch.cat([prefix, body], dim=1))  # (B, L + T, D)
        skip = self.config.cond_len  # condition positions: no prediction is read there
        if taps is None:
            return PriorOutput(logits=self.head(self.transformer(x)[:, skip:]))
        x, blocks = self.transformer(x, return_blocks=taps)
        return PriorOutput(logits=self.head(x[:, skip:]), blocks={i: v[:, skip:] for i, v in blocks.items()})

    def loss(
        self, tokens: torch.Tensor, labels: LabelsLike = None, *, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over the image tokens in nats per token (a scalar); divide by ln 2 for
        bits per token.

        Args:
            tokens, labels, condition: as in `forward`.
        """
        tokens = self.check_tokens(tokens)
        logits = self(tokens, labels, condition=condition).logits  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1))

    # ------------------------------------------------------------------ sampling
    def generate(
        self,
        n: int,
        labels: LabelsLike = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float = 1.0,
        seed: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Sample n token grids, LongTensor (n, h, w) (or (n, H, W) for `grid=(H, W)`), with the KV cache.

        Keyword arguments `condition`, `prefix`, `known`, `keep` and `grid` give spatial conditioning,
        completion, inpainting and sliding-window sampling beyond the training grid: see
        `vqim.sampling.generate`.
        """
        from vqim.sampling import generate

        return generate(self, n, labels, temperature, top_k, top_p, cfg_scale, seed, **kwargs)


def nats_to_bits(x: torch.Tensor | float) -> torch.Tensor | float:
    """Convert a loss in nats to bits."""
    return x / math.log(2)


@torch.no_grad()
def bits_per_token(prior: Prior, dataset, batch_size: int = 64, device: str | torch.device = "cpu") -> float:
    """Mean bits per image token of a `vqim.tokens.TokenDataset` under the prior (eval mode; with the labels
    and the spatial condition when the prior reads them).

    Args:
        prior: the prior (its training mode is restored afterwards).
        dataset: token sequences, with labels when the prior is class-conditional.
        batch_size: sequences per forward pass.
        device: where to run.
    """
    from torch.utils.data import DataLoader

    from vqim.tokens import collate_tokens

    was = prior.training
    prior.eval()
    total, count = 0.0, 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_tokens):
        tokens = batch["tokens"].to(device)
        labels = batch["label"].to(device) if prior.config.num_classes > 0 else None
        cond = batch["condition"].to(device) if "condition" in batch and prior.config.spatial else None
        logits = prior(tokens, labels, condition=cond).logits.float()
        total += float(F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="sum"))
        count += tokens.numel()
    prior.train(was)
    return float(nats_to_bits(total / count))


def load_prior_and_tokenizer(
    prior_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[Prior, Tokenizer]:
    """Load a prior and the tokenizer it samples through, refusing a tokenizer that cannot be the right one.

    The tokenizer must be the one whose tokens the prior was trained on (by weights and config, as the prior's
    tokens.json records it; see `vqim.tokens.check_tokens_match`), and its codebook and token grid must match
    the prior's vocabulary and grid.

    Args:
        prior_dir: folder written by `train-prior` (or `save_pretrained`).
        tokenizer_dir: tokenizer folder.
        device: where to load both ("auto": CUDA when available).

    Raises:
        vqim.tokens.TokenizerMismatchError: the prior was trained on another tokenizer's tokens.
        ValueError: the tokenizer's codebook or grid does not fit the prior.
    """
    from vqim.tokenizer import Tokenizer
    from vqim.tokens import check_tokens_match, read_prior_tokens

    prior = Prior.from_pretrained(prior_dir, device=device)
    tok = Tokenizer.from_pretrained(tokenizer_dir, device=device)
    record = read_prior_tokens(prior_dir)
    if record is not None:
        check_tokens_match(
            record, tok, f"the prior in {prior_dir} was trained on tokens of", f"{tokenizer_dir} is",
            "pass the tokenizer that `vqim encode` used for the prior's training tokens",
        )  # fmt: skip
    if tok.config.codebook_size != prior.config.vocab_size or tuple(tok.grid_size) != prior.grid_size:
        raise InputError(
            f"the tokenizer in {tokenizer_dir} ({tok.config.codebook_size} codes, grid {tuple(tok.grid_size)}) "
            f"does not fit the prior in {prior_dir} (vocabulary {prior.config.vocab_size}, grid "
            f"{prior.grid_size})"
        )
    return prior, tok


__all__ = ["Prior", "PriorOutput", "bits_per_token", "load_prior_and_tokenizer", "nats_to_bits"]
