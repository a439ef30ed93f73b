"""One pre-norm Transformer block for the ViT encoder, the ViT decoder and the causal prior.

Attention uses `torch.nn.functional.scaled_dot_product_attention`, which picks a fused kernel
(flash / memory-efficient on GPU, a fused CPU kernel otherwise).

The same modules serve training, prefill and cached decoding: passed one `KVCache` per block
(`Transformer.new_caches`), `Transformer.forward` appends the new positions' keys and values to the caches
and attends over every cached position, so the prior's sampler (`vqim.sampling`) runs the training
network itself one token at a time. The linear layers are `vqim.nn.linear.Linear`, which computes the
few-row products of decoding with a faster CPU kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from vqim.errors import InputError
from vqim.nn.dropout import cheap_masks, dropout
from vqim.nn.linear import Linear


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for the decode step: a LayerNorm goes straight to the kernel with its own parameters (the
    same computation as `nn.LayerNorm.forward`, without its attribute lookups); any other norm is called."""
    if type(module) is nn.LayerNorm:
        p = module._parameters
        return torch.layer_norm(x, module.normalized_shape, p["weight"], p["bias"], module.eps)
    return module(x)


class KVCache:
    """Per-layer key/value cache preallocated for `max_len` positions.

    Decoding writes each step's keys and values in place into two fixed buffers (B, H, max_len, hd) and
    attends over the filled prefix, a view: no per-step allocation or concatenation of the past.

    Args:
        batch_size: rows decoded together.
        max_len: longest sequence the cache holds.
        heads, head_dim: attention geometry.
        device, dtype: where the cache lives.
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        heads: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, hd) after the cached positions; return all keys and values so far."""
        t = k.shape[2]
        end = self.length + t
        if end > self.k.shape[2]:
            raise InputError(f"KV cache overflow: {end} positions > capacity {self.k.shape[2]}")
        # narrow() rather than [:, :, a:b]: the same views, with less Python indexing work per decode step.
        self.k.narrow(2, self.length, t).copy_(k)
        self.v.narrow(2, self.length, t).copy_(v)
        self.length = end
        return self.k.narrow(2, 0, end), self.v.narrow(2, 0, end)

    def clear(self) -> None:
        """Forget every cached position (the buffers are kept and overwritten)."""
        self.length = 0


class Attention(nn.Module):
    """Multi-head self-attention.

    Args:
        dim: model width D.
        heads: number of heads; D must be divisible by it unless head_dim is given.
        dropout: attention-probability and output dropout.
        causal: mask future positions (the prior) or not (ViT encoder/decoder).
        head_dim: width of each head (None: D / heads); the heads together are heads · head_dim wide, which
            proj maps back to D (enhancing-transformers' ViT-VQGAN: 64 per head at any D).
        qkv_bias: the q, k, v projection has a bias.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dropout: float = 0.0,
        causal: bool = False,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if head_dim is None:
            if dim % heads:
                raise InputError(f"dim {dim} is not divisible by heads {heads}")
            head_dim = dim // heads
        if head_dim <= 0:
            raise InputError(f"head_dim must be positive, got {head_dim}")
        self.heads = heads
        self.head_dim = head_dim
        self.causal = causal
        self.dropout = dropout
        self.qkv = Linear(dim, 3 * heads * head_dim, bias=qkv_bias)
        self.proj = Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Attend over x (B, N, D); with a cache, over the cached positions followed by x's N positions,
        whose keys and values are appended to the cache (causal attention only)."""
        b, n, _ = x.shape  # (B, N, D)
        if n == 1 and cache is not None and self.causal:
            # A decode step: (B, 3, H, 1, hd) is the qkv output's memory as it is; the one query sees every
            # cached position, so no mask. The general path below computes the same, with more Python.
            m = self._modules  # submodules without nn.Module.__getattr__ (see Block.forward)
            q, k, v = m["qkv"].forward(x).view(b, 3, self.heads, 1, self.head_dim).unbind(1)
            k, v = cache.append(k, v)
            return m["proj"].forward(F.scaled_dot_product_attention(q, k, v).reshape(b, 1, -1))
        # Each (B, H, N, hd), strided views of the qkv output. Unbinding the (B, N, 3, H, hd) view and transposing
        # each, rather than unbinding a permuted (3, B, H, N, hd) view, lets the backward pass stack the three
        # gradients straight into the qkv output's layout (one copy instead of two).
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2))
        drop = self.dropout if self.training else 0.0
        causal, mask = self.causal, None
        if cache is not None:
            if not self.causal:
                raise InputError("a KV cache is for causal attention (the prior), not a bidirectional ViT")
            past = cache.length
            k, v = cache.append(k, v)  # (B, H, past + N, hd)
            if past:
                # New position i (absolute past + i) sees absolute positions 0 .. past + i.
                mask = torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(past)
                causal = False
        if drop and x.device.type == "cpu" and cheap_masks():
            y = _attention_with_dropout(q, k, v, mask, causal, drop)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=causal)
        y = self.proj(y.transpose(1, 2).reshape(b, n, -1))
        return dropout(y, drop) if drop else y


def _attention_with_dropout(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, p: float
) -> torch.Tensor:
    """softmax(q kᵀ / √hd, masked) with dropout p on the probabilities, times v: (B, H, N, hd).

    On the CPU, `F.scaled_dot_product_attention` with dropout computes exactly this (its math path) with
    PyTorch's Bernoulli mask; here the mask is `vqim.nn.dropout`'s, five times cheaper to draw.
    """
    s = torch.matmul(q, k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)  # (B, H, N, M)
    if causal:  # query i sees keys 0..i (N == M: no cached keys here)
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(dropout(s.softmax(-1), p), v)


_ACTIVATIONS = {"gelu": F.gelu, "tanh": torch.tanh}


class MLP(nn.Module):
    """Two-layer feed-forward with GELU (or tanh).

    Args:
        dim: input/output width.
        hidden: hidden width.
        dropout: dropout after the activation and after the output projection.
        activation: "gelu" or "tanh" (enhancing-transformers' ViT-VQGAN).
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, *, activation: str = "gelu") -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise InputError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.dropout = dropout
        # A plain function in the instance dict: read as fast as the module global F.gelu was.
        self.act = _ACTIVATIONS[activation]
        self.activation = activation
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Dropout only when it does something: in eval mode (sampling) these are no calls at all.
        if self.training and self.dropout:
            p = self.dropout
            return dropout(self.fc2(dropout(self.act(self.fc1(x)), p)), p)
        # fc1 and the activation as one product where oneDNN takes it (vqim.nn.linear.Linear.forward_act)
        return self.fc2(self.fc1.forward_act(x, self.activation))

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` for the cached decode step: the layers' forward called directly, read from _modules (see
        `Block.forward`); module hooks on fc1/fc2 do not fire here."""
        if self.training and self.dropout:
            return self.forward(x)
        m = self._modules
        return m["fc2"].forward(self.act(m["fc1"].forward(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(LN(x)), then x + MLP(LN(x)).

    Args:
        dim, heads, mlp_dim: widths.
        dropout: residual, activation and attention dropout.
        causal: causal self-attention.
        head_dim, qkv_bias: see `Attention`.
        activation: see `MLP`.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        causal: bool = False,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout, causal, head_dim=head_dim, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dropout, activation=activation)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if cache is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        # Cached decoding: the same two lines, calling the children's forward directly, reading them from
        # _modules (nn.Module.__getattr__ is a Python call per attribute) and adding in place. At batch 1 a
        # decode step is a few hundred small calls between weight streams, and each Python frame costs
        # microseconds here (benchmarks/sampling_speed.py); module hooks on the children do not fire here.
        return self.step_(x.clone(), cache)

    def step_(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`forward(x, cache)` adding both residuals into x itself (the caller's own tensor, which is returned):
        `Transformer.forward` copies its input once and passes it through every block."""
        m = self._modules
        x.add_(m["attn"].forward(_norm(m["norm1"], x), cache))
        return x.add_(m["mlp"].step(_norm(m["norm2"], x)))


class Transformer(nn.Module):
    """A stack of `Block`s followed by a final LayerNorm.

    Args:
        dim, depth, heads, mlp_dim: widths and number of blocks.
        dropout: see `Block`.
        causal: causal self-attention in every block.
        head_dim, qkv_bias: see `Attention`.
        activation: see `MLP`.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        causal: bool = False,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        opts = {"head_dim": head_dim, "qkv_bias": qkv_bias, "activation": activation}
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, dropout, causal, **opts) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        # Activation checkpointing: in training, keep only each block's input and recompute the block in the
        # backward pass (torch.utils.checkpoint, non-reentrant; dropout masks are replayed from the saved RNG
        # state, so the gradients are those of the plain forward). Set by `--checkpoint-activations`.
        self.checkpoint_activations = False

    def forward(
        self,
        x: torch.Tensor,
        return_blocks: list[int] | None = None,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the blocks on x (B, N, D).

        Args:
            x: input tokens.
            return_blocks: 0-based block indices whose outputs are also returned (for linear probes).
            caches: one `KVCache` per block (causal Transformers): x holds the N positions after the cached
                ones, and their keys and values are appended. For inference: the caches and the residual
                stream are written in place, so no gradient can be taken through cached decoding.
        """
        if caches is not None and len(caches) != len(self.blocks):
            raise InputError(f"need one KV cache per block ({len(self.blocks)}), got {len(caches)}")
        taps: dict[int, torch.Tensor] = {}
        if caches is not None and return_blocks is None:  # cached decoding: see Block.forward
            x = x.clone()  # the residual stream, updated in place by every block
            for blk, cache in zip(self._modules["blocks"], caches):
                blk.step_(x, cache)
            return _norm(self._modules["norm"], x)
        recompute = (
            self.checkpoint_activations and self.training and caches is None and torch.is_grad_enabled()
        )
        for i, blk in enumerate(self.blocks):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x, None if caches is None else caches[i])
            if return_blocks is not None and i in return_blocks:
                taps[i] = x
        x = self.norm(x)
        return x if return_blocks is None else (x, taps)

    def new_caches(self, batch_size: int, max_len: int) -> list[KVCache]:
        """One empty `KVCache` per block for `batch_size` rows and up to `max_len` positions (for cached
        decoding, see `forward`). The caches take the device and dtype of the blocks' weights.
        """
        w = self.blocks[0].attn.qkv.weight
        return [
            KVCache(batch_size, max_len, b.attn.heads, b.attn.head_dim, device=w.device, dtype=w.dtype)
            for b in self.blocks
        ]


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """ViT-style initialisation: truncated-normal Linear weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):  # vqim.nn.linear.Linear included
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE / MoCo v3), shape (h·w, dim)."""
    if dim % 4:
        raise InputError(f"sincos position embedding needs dim divisible by 4, got {dim}")
    y, x = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ox = x.flatten()[:, None] * omega[None]
    oy = y.flatten()[:, None] * omega[None]
    return torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], dim=1).float()
