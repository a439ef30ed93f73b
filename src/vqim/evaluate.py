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
    lpips_model: torch.nn.Module | None = None,
    inception: torch.nn.Module | None = None,
    distributed: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], torch.Tensor]:
    """Mean per-image PSNR, SSIM, L1, L2 (and logit-Laplace NLL) plus code usage over the dataset.

    Usage is reported over the whole set (`usage`, `codes_used`) and per chunk of 256 images as the
    ViT-VQGAN paper measures it (`usage_per_256`); unreadable files are skipped and counted. With the
    optional networks it adds the mean LPIPS distance (`lpips`) and rFID / Inception Score of the
    reconstructions (`rfid`, `inception_score`, `inception_score_std`; see vqim.fid).

    Args:
        tok: the tokenizer (put in eval mode here).
        dataset: an evaluation dataset from `vqim.data.build_dataset(..., train=False)`.
        batch_size, num_workers: loader settings.
        device: where to run.
        progress: show a progress bar.
        return_counts: also return the code histogram over the whole set, (K,) float64 (for plots).
        lpips_model: a `vqim.perceptual.LPIPS` (None: no LPIPS).
        inception: a network from `vqim.fid.load_inception` (None: no rFID / IS).
        distributed: split the set across the processes of the initialised torch.distributed group (e.g. under
            `accelerate launch`); every process must then call this, with the same optional networks.

    Distributed, each process evaluates a contiguous share of the set and the results are combined before
    anything is computed from them: sums and feature statistics are all-reduced, and the code ids and Inception
    logits are gathered in dataset order, so usage (also per 256 images) and IS equal a one-process run's.
    Every process returns the same result.
    """
    from tqdm.auto import tqdm

    from vqim.data import collate

    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    rank, world = (
        (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    )
    if world > 1:
        # Every process must run the same collectives below: the same optional metrics everywhere.
        mine = (lpips_model is not None, inception is not None)
        if len(set(_all_gather_objects(mine))) > 1:
            raise ValueError(
                "processes disagree on which of LPIPS / Inception metrics to compute (weights found on some "
                "nodes only?); pass the weight paths explicitly or turn the metric off"
            )
        from torch.utils.data import Subset

        share = -(-len(dataset) // world)
        dataset = Subset(dataset, range(rank * share, min(len(dataset), (rank + 1) * share)))
    tok.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    stats = CodebookStats(tok.config.codebook_size)
    # Distributed, the ids are kept (int16 where the codebook allows) and counted in dataset order at the end,
    # so the chunks of 256 images are the same on any number of processes; in one process they stream.
    all_ids: list[torch.Tensor] = []
    id_dtype = torch.int16 if tok.config.codebook_size <= 2**15 else torch.int32
    sums: dict[str, float] = {"psnr": 0.0, "ssim": 0.0, "l1": 0.0, "l2": 0.0, "logit_laplace": 0.0}
    if lpips_model is not None:
        lpips_model = lpips_model.to(device).eval()
        sums["lpips"] = 0.0
    incep = None
    if inception is not None:
        from vqim.fid import InceptionMetrics

        incep = InceptionMetrics(inception.to(device))
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
        if lpips_model is not None:
            sums["lpips"] += float(lpips_model(rec, x).sum())
        if incep is not None:
            incep.update(x, rec)
        if world > 1:
            all_ids.append(q.ids.detach().cpu().to(id_dtype))
        else:
            stats.update(q.ids)
        n += b
    if world > 1:
        ids = torch.cat(all_ids) if all_ids else torch.zeros(0, dtype=id_dtype)
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys] + [float(n)], dtype=torch.float64)
        t = _all_reduce_sum(t, device)
        sums, n = dict(zip(keys, t[:-1].tolist())), int(t[-1])
        ids = torch.cat([part for part in _all_gather_objects(ids) if part.numel()] or [ids])
        if ids.numel():
            stats.update(ids.long())
        skipped = [f for part in _all_gather_objects(skipped) for f in part]
        if incep is not None:
            for fs in (incep.real, incep.fake):
                fs.n = int(_all_reduce_sum(torch.tensor([float(fs.n)], dtype=torch.float64), device)[0])
                fs.sum, fs.outer = _all_reduce_sum(fs.sum, device), _all_reduce_sum(fs.outer, device)
            incep.logits = [
                torch.cat(incep.logits) if incep.logits else torch.zeros(0, 1008, dtype=torch.float64)
            ]
            incep.logits = _all_gather_objects(incep.logits[0])
    if n == 0:
        raise ValueError("the evaluation set holds no readable image")
    result: dict[str, Any] = {k: v / n for k, v in sums.items()}
    if not tok.config.logit_laplace:
        result.pop("logit_laplace")
    result.update(stats.summary())
    if incep is not None:
        result.update(incep.compute())
    result.update(
        {
            "images": n,
            "codebook_size": tok.config.codebook_size,
            "skipped_files": len(skipped),
            "processes": world,
        }
    )
    if skipped:
        result["skipped"] = skipped
    return (result, stats.counts) if return_counts else result


def _all_reduce_sum(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """Sum over processes: on the CPU under gloo, on the evaluation device otherwise (nccl: CUDA only)."""
    dev = torch.device("cpu") if torch.distributed.get_backend() == "gloo" else torch.device(device)
    x = t.to(dev).clone()
    torch.distributed.all_reduce(x)
    return x.cpu()


def _all_gather_objects(obj: Any) -> list[Any]:
    """Every process's obj, in rank order (tensors of ids/logits and file names: internal traffic only)."""
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def optional_metric_models(
    vgg_weights: str | None = None,
    lpips_weights: str | None = None,
    inception_weights: str | None = None,
    lpips: str = "auto",
    fid: str = "auto",
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module | None, torch.nn.Module | None, dict[str, str]]:
    """(LPIPS network, InceptionV3, {metric: why it is not measured}) for `evaluate_tokenizer`.

    Each of `lpips` / `fid` is "on" (a missing weight file is an error), "off", or "auto" (measured when the
    weights are found, else left out with the reason recorded). A weight path given explicitly counts as "on".
    """
    for name, mode in (("lpips", lpips), ("fid", fid)):
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"--{name} must be auto, on or off, got {mode!r}")
    notes: dict[str, str] = {}
    lp = inc = None
    if lpips != "off":
        from vqim.perceptual import LPIPS

        try:
            lp = LPIPS(vgg_weights, lpips_weights).to(device)
        except (FileNotFoundError, ValueError) as e:
            if lpips == "on" or vgg_weights is not None or lpips_weights is not None:
                raise
            notes["lpips"] = str(e)
    if fid != "off":
        from vqim.fid import load_inception

        try:
            inc = load_inception(inception_weights, device)
        except (FileNotFoundError, ImportError, ValueError) as e:
            if fid == "on" or inception_weights is not None:
                raise
            notes["rfid"] = notes["inception_score"] = str(e)
    for k, why in {"lpips": notes.get("lpips"), "rfid, inception_score": notes.get("rfid")}.items():
        if why:
            log.info("not measured: %s (%s)", k, why)
    return lp, inc, notes


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
