"""Sampled images on disk: what `vqim sample` does with a prior and the tokenizer its tokens came from.

The prior and tokenizer are loaded together and checked (`vqim.prior.load_prior_and_tokenizer`), `n` images
are generated per class as one batch (or `n` in all for an unconditional prior), and written as one grid
(a row per class) plus one PNG per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vqim.checkpoint import atomic_write, resolve_device
from vqim.config import SamplingConfig


def class_list(text: str | None, num_classes: int) -> list[int] | None:
    """Class ids from "0,3,7" for a prior with num_classes classes (None: all of them); None if unconditional."""
    if num_classes == 0:
        if text:
            raise ValueError("classes given, but the prior is unconditional")
        return None
    try:
        ids = list(range(num_classes)) if not text else [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"classes must be comma-separated integers, got {text!r}") from None
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise ValueError(f"classes {bad} out of range: the prior has classes 0..{num_classes - 1}")
    return ids


@dataclass(kw_only=True)
class SampleConfig:
    """What `vqim sample` does.

    Args:
        prior: prior folder (written by train-prior).
        tokenizer: the tokenizer folder whose tokens the prior was trained on.
        out: folder for grid.png and one PNG per image.
        classes: comma-separated class ids of a class-conditional prior (default: every class).
        n: images per class (unconditional: in all), generated as one batch.
        sampling: sampling settings.
        device: cpu, cuda, or auto (cuda when available).
    """

    prior: str
    tokenizer: str
    out: str
    classes: str | None = None
    n: int = 8
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    device: str = "auto"


@torch.no_grad()
def sample_to_folder(cfg: SampleConfig) -> dict[str, Any]:
    """Generate cfg.n images per class and write grid.png and single PNGs; returns what was written."""
    from torchvision.utils import make_grid, save_image

    from vqim.prior import load_prior_and_tokenizer
    from vqim.sampling import generate_images

    if cfg.n < 1:
        raise ValueError(f"n must be at least 1, got {cfg.n}")
    device = resolve_device(cfg.device)
    prior, tok = load_prior_and_tokenizer(cfg.prior, cfg.tokenizer, device)
    classes = class_list(cfg.classes, prior.config.num_classes)
    if classes is None:
        images = generate_images(tok, prior, cfg.n, **cfg.sampling.kwargs()).cpu()
        nrow = min(8, cfg.n)
    else:
        labels = torch.tensor([c for c in classes for _ in range(cfg.n)], device=device)
        images = generate_images(tok, prior, len(labels), labels=labels, **cfg.sampling.kwargs()).cpu()
        nrow = cfg.n
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images, nrow=nrow, padding=2)
    atomic_write(out / "grid.png", lambda tmp: save_image(grid, tmp, format="png"))
    for i, im in enumerate(images):
        tag = f"class{classes[i // cfg.n]}_" if classes is not None else ""
        atomic_write(out / f"{tag}{i:04d}.png", lambda tmp, im=im: save_image(im, tmp, format="png"))
    return {"images": len(images), "grid": str(out / "grid.png"), "classes": classes}


__all__ = ["SampleConfig", "class_list", "sample_to_folder"]
