"""Vector quantizer with factorized, l2-normalised codes (ViT-VQGAN, section 3.2).

    z (..., D_in) --project_in--> z_e (..., L) --l2--> nearest code e --straight-through--> project_out --> (..., D_out)

With `l2_norm` both z_e and the codebook are l2-normalised, so the nearest code by Euclidean distance is
the code of highest cosine similarity. Without it the lookup is plain Euclidean (VQ-VAE). The lookup always
runs in fp32, also under autocast: bf16 distances would pick wrong codes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vqim.errors import InputError
from vqim.losses import vq_loss
from vqim.nn.linear import Linear

log = logging.getLogger(__name__)

# Distances are computed in row chunks so that (rows × K) never exceeds this many floats.
_MAX_DIST_ELEMENTS = 1 << 26


@dataclass
class QuantizerOutput:
    """Result of `VectorQuantizer.forward`.

    Attributes:
        quantized: straight-through quantized vectors, projected out, (..., D_out), fp32.
        ids: code indices, (...), int64.
        loss: VQ loss ‖sg[z_e]−e‖² + β‖z_e−sg[e]‖² (means over elements), scalar.
        usage: share of the K codes hit by this batch, scalar tensor in [0, 1].
        perplexity: exp(entropy) of the code histogram of this batch, scalar tensor.
    """

    quantized: torch.Tensor
    ids: torch.Tensor
    loss: torch.Tensor
    usage: torch.Tensor
    perplexity: torch.Tensor


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every process along dim 0 (x must have the same shape on every process)."""
    if not _dist_ready():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def code_histogram(ids: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Counts of each code in ids, shape (K,), float64."""
    return torch.bincount(ids.reshape(-1), minlength=codebook_size).double()


def usage_and_perplexity(counts: torch.Tensor) -> tuple[float, float]:
    """Share of codes with a non-zero count, and exp(entropy) of the normalised histogram."""
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).double().mean()), float(entropy.exp())


class VectorQuantizer(nn.Module):
    """Nearest-code lookup with straight-through gradients.

    Args:
        in_dim: width of the encoder output.
        codebook_size: number of codes K.
        lookup_dim: width L of the lookup space; equal to in_dim means no factorization.
        out_dim: width of the decoder input (defaults to in_dim).
        l2_norm: l2-normalise projected encodings and codes.
        beta: commitment weight β.
        dead_code_window: codes unused for this many `update_and_restart` calls are restarted from recent
            encoder outputs (0 disables).
        project: learned input/output maps even where the widths match (taming's quant_conv/post_quant_conv).
    """

    def __init__(
        self,
        in_dim: int,
        codebook_size: int,
        lookup_dim: int,
        out_dim: int | None = None,
        l2_norm: bool = True,
        beta: float = 0.25,
        dead_code_window: int = 0,
        project: bool = False,
    ) -> None:
        super().__init__()
        out_dim = in_dim if out_dim is None else out_dim
        self.codebook_size = codebook_size
        self.lookup_dim = lookup_dim
        self.l2_norm = l2_norm
        self.beta = beta
        self.dead_code_window = dead_code_window
        self.project_in = Linear(in_dim, lookup_dim) if project or lookup_dim != in_dim else nn.Identity()
        self.project_out = Linear(lookup_dim, out_dim) if project or lookup_dim != out_dim else nn.Identity()
        # Codes drawn from a standard normal, as the paper initialises them (docs/papers.md).
        self.codebook = nn.Parameter(torch.randn(codebook_size, lookup_dim))
        # Training-only state, kept out of model.safetensors; the trainer saves it in its training state.
        self.register_buffer("code_age", torch.zeros(codebook_size, dtype=torch.long), persistent=False)
        self.register_buffer("_hits", torch.zeros(codebook_size, dtype=torch.long), persistent=False)
        self._recent: torch.Tensor | None = None
        # Reused output of the distance product: a fresh (rows × K) fp32 matrix each step (67 MB at 2048 × 8192)
        # is above the allocator's mmap threshold on CPU and page-faults in full every time.
        self._sim: torch.Tensor | None = None

    # ------------------------------------------------------------------ lookup
    def codes(self) -> torch.Tensor:
        """The codebook as used for lookup (l2-normalised when `l2_norm`), (K, L), fp32."""
        c = self.codebook.float()
        return F.normalize(c, dim=-1) if self.l2_norm else c

    def embed_in(self, z: torch.Tensor) -> torch.Tensor:
        """Project encoder outputs into the lookup space (and l2-normalise), (..., L), fp32."""
        ze = self.project_in(z.float())
        return F.normalize(ze, dim=-1) if self.l2_norm else ze

    def nearest(self, ze: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ze (M, L); chunked to bound memory."""
        chunk = max(1, _MAX_DIST_ELEMENTS // codes.shape[0])
        out = []
        c_sq = None if self.l2_norm else (codes * codes).sum(1)
        need = min(chunk, ze.shape[0]) * codes.shape[0]
        if self._sim is None or self._sim.numel() < need or self._sim.device != ze.device:
            self._sim = torch.empty(need, device=ze.device, dtype=torch.float32)
        for part in ze.split(chunk):
            sim = torch.mm(
                part, codes.t(), out=self._sim[: part.shape[0] * codes.shape[0]].view(part.shape[0], -1)
            )
            if self.l2_norm:
                out.append(sim.argmax(1))  # unit vectors: max cosine = min Euclidean distance
            else:
                out.append((c_sq - 2 * sim).argmin(1))  # ‖z‖² is the same for every code
        return torch.cat(out)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize z (..., in_dim)."""
        lead = z.shape[:-1]
        # Restart statistics come from forwards in training mode.
        track = self.training and self.dead_code_window > 0
        with torch.autocast(device_type=z.device.type, enabled=False):
            ze = self.embed_in(z).reshape(-1, self.lookup_dim)  # (M, L)
            codes = self.codes()
            ids = self.nearest(ze.detach(), codes.detach())  # (M,)
            e = F.embedding(ids, codes)  # (M, L), differentiable w.r.t. the codebook
            # Codebook term pulls codes to encodings; commitment term (β) pulls encodings to codes.
            loss = vq_loss(ze, e, self.beta)
            q = ze + (e - ze).detach()  # straight-through: forward e, backward identity to ze
            quantized = self.project_out(q).reshape(*lead, -1)
            with torch.no_grad():
                counts = torch.bincount(ids, minlength=self.codebook_size)
                p = counts.float() / ids.numel()
                usage = (counts > 0).float().mean()
                perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
                if track:
                    self._hits += counts
                    self._recent = ze.detach()
        return QuantizerOutput(quantized, ids.reshape(lead), loss, usage, perplexity)

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Code vectors for ids (...), projected out, (..., D_out)."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise InputError(
                f"token ids must be in [0, {self.codebook_size - 1}], got range "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )
        with torch.autocast(device_type=ids.device.type, enabled=False):
            return self.project_out(F.embedding(ids, self.codes()))

    # ------------------------------------------------------------------ codebook health
    @torch.no_grad()
    def init_from_data(
        self, z: torch.Tensor | list[torch.Tensor], generator: torch.Generator | None = None
    ) -> None:
        """Set the codes to encoder outputs z (..., in_dim) projected into the lookup space.

        z may be a list of per-batch tensors. Each batch is gathered from every process (in process order,
        which is the order of one process's global batch) and rows are chosen with the same generator
        everywhere, so every process ends with the codebook a single process would pick. With fewer rows
        than codes, rows are reused with small noise.
        """
        parts = z if isinstance(z, (list, tuple)) else [z]
        ze = torch.cat([_all_gather_cat(self.embed_in(p).reshape(-1, self.lookup_dim)) for p in parts])
        self.codebook.data.copy_(self._sample_rows(ze, self.codebook_size, generator))
        self.code_age.zero_()

    def _sample_rows(self, pool: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
        m = pool.shape[0]
        if m >= n:
            idx = torch.randperm(m, generator=generator)[:n]
            rows = pool[idx.to(pool.device)]
        else:
            idx = torch.randint(m, (n,), generator=generator)
            rows = pool[idx.to(pool.device)]
            noise = torch.randn(rows.shape, generator=generator).to(rows)
            rows = rows + 0.01 * rows.std() * noise
        return F.normalize(rows, dim=-1) if self.l2_norm else rows

    @torch.no_grad()
    def update_and_restart(self, step: int) -> torch.Tensor:
        """Age the codes by one step and restart the dead ones; call once per optimizer step.

        Hits are summed over processes and replacements drawn from encoder outputs gathered from every
        process with a generator seeded by `step`, so all processes restart the same codes identically. The
        i-th dead code (in index order) takes pool row perm[i] of a random permutation of the pool; when more
        codes are dead than the pool has rows, the rest reuse random rows with small noise.

        Nothing here reads a value back to the host: which codes are dead stays a mask on the device, so a
        training step that calls this needs no synchronisation.

        Returns:
            boolean mask (K,) of the restarted codes (all False when none), on the codebook's device.
        """
        dev = self.codebook.device
        if self.dead_code_window <= 0:
            return torch.zeros(self.codebook_size, dtype=torch.bool, device=dev)
        hits = self._hits.clone()
        if _dist_ready():
            dist.all_reduce(hits)
        self.code_age += 1
        self.code_age.masked_fill_(hits > 0, 0)
        self._hits.zero_()
        dead = self.code_age >= self.dead_code_window  # (K,)
        if self._recent is None:
            return torch.zeros_like(dead)
        pool = _all_gather_cat(self._recent)  # (m, L)
        m, k = pool.shape[0], self.codebook_size
        gen = torch.Generator().manual_seed(10_007 * int(step) + 17)
        perm = torch.randperm(m, generator=gen)[:k].to(dev)
        rank = (dead.long().cumsum(0) - 1).clamp_min(0)  # (K,) position of each dead code among the dead
        rows = pool[perm[rank.clamp_max(perm.numel() - 1)]]  # (K, L)
        if m < k:  # more dead codes than pool rows is possible: reuse random rows, with noise
            extra_gen = torch.Generator().manual_seed(10_007 * int(step) + 29)
            idx = torch.randint(m, (k,), generator=extra_gen).to(dev)
            noise = torch.randn((k, self.lookup_dim), generator=extra_gen).to(pool)
            reuse = pool[idx] + 0.01 * pool.std() * noise
            rows = torch.where((rank >= m).unsqueeze(1), reuse, rows)
        if self.l2_norm:
            rows = F.normalize(rows, dim=-1)
        self.codebook.data.copy_(
            torch.where(dead.unsqueeze(1), rows.to(self.codebook.dtype), self.codebook.data)
        )
        self.code_age.masked_fill_(dead, 0)
        return dead
