"""Tokenizer evaluation: reconstruction quality and codebook usage over a fixed evaluation set."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vqim import losses
from vqim.metrics import CodebookStats, psnr, ssim
from vqim.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_tokenizer(
    tok: Tokenizer,
    dataset: Dataset,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    return_counts: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], torch.Tensor]:
    """Mean per-image PSNR, SSIM, L1, L2 (and logit-Laplace NLL) plus code usage over the dataset.

    Usage is reported over the whole set (`usage`, `codes_used`) and per chunk of 256 images as the
    ViT-VQGAN paper measures it (`usage_per_256`); unreadable files are skipped and counted.

    Args:
        tok: the tokenizer (put in eval mode here).
        dataset: an evaluation dataset from `vqim.data.build_dataset(..., train=False)`.
        batch_size, num_workers: loader settings.
        device: where to run.
        progress: show a progress bar.
        return_counts: also return the code histogram over the whole set, (K,) float64 (for plots).
    """
    from tqdm.auto import tqdm

    from vqim.data import collate

    tok.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    stats = CodebookStats(tok.config.codebook_size)
    sums: dict[str, float] = {"psnr": 0.0, "ssim": 0.0, "l1": 0.0, "l2": 0.0, "logit_laplace": 0.0}
    n, skipped = 0, []
    for batch in tqdm(loader, disable=not progress, desc="eval", leave=False):
        skipped += batch["skipped"]
        x = batch["image"].to(device)
        if x.numel() == 0:
            continue
        b = x.shape[0]
        grid = (x.shape[2] // tok.config.patch_size, x.shape[3] // tok.config.patch_size)
        q = tok.quantizer(tok.encode_latents(x))
        raw = tok.decode_latents(q.quantized, grid)
        rec = tok.to_image(raw).clamp(0, 1)
        sums["psnr"] += float(psnr(rec, x).sum())
        sums["ssim"] += float(ssim(rec, x).sum())
        sums["l1"] += float((rec - x).abs().flatten(1).mean(1).sum())
        sums["l2"] += float((rec - x).pow(2).flatten(1).mean(1).sum())
        if tok.config.logit_laplace:
            # Images share one size, so batch mean × b adds up to the mean of per-image means.
            c = tok.config.channels
            sums["logit_laplace"] += b * float(losses.logit_laplace_nll(raw[:, :c], raw[:, c:], x))
        stats.update(q.ids)
        n += b
    if n == 0:
        raise ValueError("the evaluation set holds no readable image")
    result: dict[str, Any] = {k: v / n for k, v in sums.items()}
    if not tok.config.logit_laplace:
        result.pop("logit_laplace")
    result.update(stats.summary())
    result.update({"images": n, "codebook_size": tok.config.codebook_size, "skipped_files": len(skipped)})
    if skipped:
        result["skipped"] = skipped
    return (result, stats.counts) if return_counts else result


def usage_histogram_png(counts: torch.Tensor, path: str | os.PathLike, title: str = "") -> None:
    """Plot code counts sorted by frequency (log scale) and save as PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vqim.checkpoint import atomic_write

    c = counts.double().sort(descending=True).values.numpy()
    used = int((c > 0).sum())
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.bar(range(len(c)), c + 1e-9, width=1.0, color="#3b6ea8")
    ax.set_yscale("log")
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("count")
    ax.set_title(title or f"codebook usage: {used} / {len(c)} codes used ({100 * used / len(c):.1f}%)")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
