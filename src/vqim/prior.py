"""VIM prior: a decoder-only causal Transformer over raster-order image tokens (ViT-VQGAN, Stage 2).

Sequence layout. For tokens (B, T), T ≤ h·w, in raster order, the network reads

    [cond, tokens[:, 0], ..., tokens[:, T-2]]                                   (B, T, D)

and `logits[:, i]` is the distribution of `tokens[:, i]` given the condition and `tokens[:, :i]`: the targets are
the tokens themselves, no shift is needed by the caller. `cond` is a learned start vector for an unconditional
prior, or the embedding of the class for a class-conditional one (its own table of `num_classes + 1` rows; row
`num_classes` is the "null" class used for label dropout in training and for classifier-free guidance) plus a
learned position of its own. Token j carries the position embedding row[j // w] + col[j % w].

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
from vqim.nn.transformer import Transformer

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
    """Decoder-only causal Transformer over token ids, unconditional or class-conditional.

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
        # Learned 2-D position embedding: a row table and a column table, summed.
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
        self.drop = nn.Dropout(c.dropout)
        # Blocks + final LayerNorm; dropout on residual branches, MLP activations and attention probabilities.
        self.transformer = Transformer(c.dim, c.depth, c.heads, c.mlp_dim, c.dropout, causal=True)
        self.head = nn.Linear(c.dim, c.vocab_size)
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
        for p in (self.pos_row, self.pos_col, self.cond_pos, self.start):
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
        emb = [self.tok_embed.weight, self.pos_row, self.pos_col]
        emb += [p for p in (self.cond_pos, self.start) if p is not None]
        if self.class_embed is not None:
            emb.append(self.class_embed.weight)
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
            raise ValueError(f"tokens must be a LongTensor of shape (B, T), got {type(tokens).__name__}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        h, w = self.config.grid_size
        if tokens.ndim == 3:
            if tuple(tokens.shape[1:]) != (h, w):
                raise ValueError(f"a token grid must have shape (B, {h}, {w}), got {tuple(tokens.shape)}")
            tokens = tokens.reshape(tokens.shape[0], h * w)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (B, T) or (B, {h}, {w}), got {tuple(tokens.shape)}")
        t = tokens.shape[1]
        if not 1 <= t <= h * w:
            raise ValueError(f"sequence length T = {t} must be in [1, h·w = {h * w}] for the {h}×{w} grid")
        v = self.config.vocab_size
        if values and tokens.numel() and bool(((tokens < 0) | (tokens >= v)).any()):
            lo, hi = int(tokens.min()), int(tokens.max())
            raise ValueError(f"token ids must be in [0, {v}), got values in [{lo}, {hi}]")
        return tokens.long()

    def check_labels(self, labels: LabelsLike, batch_size: int, values: bool = True) -> torch.Tensor | None:
        """Validate class labels: an int, a sequence or a tensor of B ints in [0, num_classes]; id num_classes is
        the null class. Returns a LongTensor (B,) on the model's device, or None for an unconditional prior.
        `values=False`: types and shapes only (no host sync), as for `check_tokens`."""
        c = self.config.num_classes
        if not self.config.conditional:
            if labels is not None:
                raise ValueError("this prior is unconditional (num_classes = 0): pass labels=None")
            return None
        if labels is None:
            raise ValueError(
                f"this prior is class-conditional ({c} classes): pass labels, a LongTensor (B,) of ids in "
                f"[0, {c}) (or {c}, the null class)"
            )
        if isinstance(labels, bool):
            raise ValueError("labels must be ints, got a bool")
        if isinstance(labels, int):
            labels = torch.full((batch_size,), labels, dtype=torch.long)
        elif not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(list(labels))
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        if labels.ndim == 0:
            labels = labels.expand(batch_size)
        if labels.shape != (batch_size,):
            raise ValueError(f"labels must have shape ({batch_size},), got {tuple(labels.shape)}")
        if values and bool(((labels < 0) | (labels > c)).any()):
            raise ValueError(
                f"labels must be in [0, {c}) (or {c}, the null class), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        return labels.to(self.device, torch.long)

    # ------------------------------------------------------------------ model pieces (also used by sampling)
    def position_table(self) -> torch.Tensor:
        """Position embedding of every grid position in raster order, (h·w, D)."""
        h, w = self.config.grid_size
        return (self.pos_row[:, None, :] + self.pos_col[None, :, :]).reshape(h * w, -1)

    def embed_condition(self, labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """The first input vector of each row, (B, 1, D): the start token, or class embedding + its position.

        Args:
            labels: LongTensor (B,) already checked (see `check_labels`), or None for an unconditional prior.
            batch_size: B.
        """
        if self.class_embed is None:
            return self.start.expand(batch_size, 1, -1)
        return (self.class_embed(labels) + self.cond_pos)[:, None, :]

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
    ) -> PriorOutput:
        """Next-token logits for every position of tokens.

        Args:
            tokens: LongTensor (B, T) of ids in [0, vocab_size), 1 ≤ T ≤ h·w, in raster order; or a grid (B, h, w).
            labels: class ids (B,) (or one int for the whole batch) of a conditional prior, in [0, num_classes]
                where num_classes is the null class; None for an unconditional prior. In training mode each label
                becomes the null class with probability class_dropout.
            return_blocks: 0-based block indices whose outputs to return in `PriorOutput.blocks`.
            check_values: check that ids and labels are in range (a host sync; the trainer turns it off).

        Returns:
            `PriorOutput` with logits (B, T, V): logits[:, i] is the distribution of tokens[:, i] given the
            condition and tokens[:, :i].
        """
        tokens = self.check_tokens(tokens, check_values)
        b, t = tokens.shape
        labels = self.check_labels(labels, b, check_values)
        if labels is not None:
            labels = self.drop_labels(labels)
        taps = None
        if return_blocks is not None:
            taps = sorted({int(i) for i in return_blocks})
            depth = self.config.depth
            if any(not 0 <= i < depth for i in taps):
                raise ValueError(f"return_blocks must be block indices in [0, {depth}), got {taps}")
        cond = self.embed_condition(labels, b)  # (B, 1, D)
        body = self.tok_embed(tokens[:, : t - 1]) + self.position_table()[: t - 1]  # (B, T-1, D)
        x = self.drop(torch.cat([cond, body], dim=1))  # (B, T, D)
        if taps is None:
            return PriorOutput(logits=self.head(self.transformer(x)))
        x, blocks = self.transformer(x, return_blocks=taps)
        return PriorOutput(logits=self.head(x), blocks=blocks)

    def loss(self, tokens: torch.Tensor, labels: LabelsLike = None) -> torch.Tensor:
        """Mean next-token cross-entropy in nats per token (a scalar); divide by ln 2 for bits per token.

        Args:
            tokens, labels: as in `forward`.
        """
        tokens = self.check_tokens(tokens)
        logits = self(tokens, labels).logits  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1))

    def bits_per_token(self, tokens: torch.Tensor, labels: LabelsLike = None) -> torch.Tensor:
        """`loss` in bits per token."""
        return nats_to_bits(self.loss(tokens, labels))

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
    ) -> torch.Tensor:
        """Sample n token grids, LongTensor (n, h, w), with the KV cache. See `vqim.sampling.generate`."""
        from vqim.sampling import generate

        return generate(self, n, labels, temperature, top_k, top_p, cfg_scale, seed)


def nats_to_bits(x: torch.Tensor | float) -> torch.Tensor | float:
    """Convert a loss in nats to bits."""
    return x / math.log(2)


@torch.no_grad()
def bits_per_token(prior: Prior, dataset, batch_size: int = 64, device: str | torch.device = "cpu") -> float:
    """Mean bits per token of a `vqim.tokens.TokenDataset` under the prior (eval mode; labels when conditional).

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
        logits = prior(tokens, labels).logits.float()
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
        raise ValueError(
            f"the tokenizer in {tokenizer_dir} ({tok.config.codebook_size} codes, grid {tuple(tok.grid_size)}) "
            f"does not fit the prior in {prior_dir} (vocabulary {prior.config.vocab_size}, grid "
            f"{prior.grid_size})"
        )
    return prior, tok


__all__ = ["Prior", "PriorOutput", "bits_per_token", "load_prior_and_tokenizer", "nats_to_bits"]
