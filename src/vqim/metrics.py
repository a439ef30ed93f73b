"""Reconstruction and codebook metrics."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from vqim.errors import InputError
from vqim.quantize import code_histogram, usage_and_perplexity

__all__ = ["psnr", "ssim", "CodebookStats", "code_histogram", "usage_and_perplexity"]


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1], shape (B,)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, σ 1.5, data range 1) of images in [0, 1], shape (B,)."""
    return structural_similarity_index_measure(
        x.float().clamp(0, 1), y.float().clamp(0, 1), data_range=1.0, reduction="none"
    )


class CodebookStats:
    """Code usage over a whole evaluation set and per chunk of `chunk` images (the paper: 256).

    Args:
        codebook_size: K.
        chunk: images per chunk for the per-chunk usage.
    """

    def __init__(self, codebook_size: int, chunk: int = 256) -> None:
        self.k = codebook_size
        self.chunk = chunk
        self.counts = torch.zeros(codebook_size, dtype=torch.float64)
        self._pending: list[torch.Tensor] = []
        self._pending_n = 0
        self.chunk_usage: list[float] = []

    def update(self, ids: torch.Tensor) -> None:
        """Add the ids (B, h, w) of B images."""
        ids = ids.detach().cpu().reshape(ids.shape[0], -1)
        self.counts += code_histogram(ids, self.k)
        self._pending.append(ids)
        self._pending_n += ids.shape[0]
        while self._pending_n >= self.chunk:
            allp = torch.cat(self._pending)
            head, rest = allp[: self.chunk], allp[self.chunk :]
            self.chunk_usage.append(torch.unique(head).numel() / self.k)
            self._pending, self._pending_n = [rest], rest.shape[0]

    def summary(self) -> dict[str, float | int | None]:
        usage, ppl = usage_and_perplexity(self.counts)
        per_chunk = sum(self.chunk_usage) / len(self.chunk_usage) if self.chunk_usage else None
        if per_chunk is None and self._pending_n:
            # Fewer images than one chunk: report the usage of what there is, labelled by its size.
            per_chunk = torch.unique(torch.cat(self._pending)).numel() / self.k
        return {
            "usage": usage,
            "codes_used": int((self.counts > 0).sum()),
            f"usage_per_{self.chunk}": per_chunk,
            "perplexity": ppl,
        }


class FeatureStats:
    """Running mean and covariance of feature vectors, in float64 (for Fréchet distances).

    Args:
        dim: feature width.
    """

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, feats: torch.Tensor) -> None:
        f = feats.detach().to("cpu", torch.float64).reshape(-1, self.sum.shape[0])
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.t() @ f

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (D,) and unbiased covariance (D, D)."""
        if self.n < 2:
            raise InputError("a covariance needs at least 2 feature vectors")
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, cov
