"""Sampled images on disk: what `vqim sample` and `vqim complete` do with a prior and its tokenizer.

The prior and tokenizer are loaded together and checked (`vqim.prior.load_prior_and_tokenizer`).

`sample`: `n` images are generated per class as one batch (or `n` in all for an unconditional prior), and
written as one grid (a row per class) plus one PNG per image. With `--condition IMAGE...` (a spatially
conditioned prior), each image gives a condition (derived from it for the built-in conditions, or the image
itself), encoded by the condition tokenizer; `n` samples are drawn for it and written beside it: a grid row
[condition | samples...] per image. `--grid HxW` / `--image-size HxW` sample a canvas larger than the training
grid with the sliding window.

`complete`: each image is encoded, its first token rows (or the tokens a mask keeps) are kept, and the rest is
sampled in raster order: a grid row [original | kept part | completions...] per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqim.checkpoint import atomic_write, resolve_device
from vqim.config import SamplingConfig
from vqim.errors import InputError, check_output, check_settings
from vqim.options import option


def parse_size(text: str | None, what: str) -> tuple[int, int] | None:
    """(H, W) from "HxW" (or one int for a square); None stays None."""
    if text is None:
        return None
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise InputError(f"{what} must be HxW with positive integers (e.g. 32x64), got {text!r}")
    return size


def load_image(path: str | Path, size: tuple[int, int] | None) -> torch.Tensor:
    """An image file as (3, H, W) in [0, 1]: resized (shorter side) and centre-cropped to size, or as it is."""
    from PIL import Image

    from vqim.data import load_rgb

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        im = load_rgb(path)
    except Exception as e:  # noqa: BLE001 - any decoding failure is bad input here
        raise InputError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if size is not None:
        h, w = size
        scale = max(h / im.height, w / im.width)
        im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.BICUBIC)
        left, top = (im.width - w) // 2, (im.height - h) // 2
        im = im.crop((left, top, left + w, top + h))
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def _save(path: Path, image: torch.Tensor) -> None:
    from torchvision.utils import save_image

    atomic_write(path, lambda tmp: save_image(image, tmp, format="png"))


def class_list(text: str | None, num_classes: int) -> list[int] | None:
    """Class ids from "0,3,7" for a prior with num_classes classes (None: all of them); None if unconditional."""
    if num_classes == 0:
        if text:
            raise InputError("classes given, but the prior is unconditional")
        return None
    try:
        ids = list(range(num_classes)) if not text else [int(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"classes must be comma-separated integers, got {text!r}") from None
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise InputError(f"classes {bad} out of range: the prior has classes 0..{num_classes - 1}")
    return ids


@dataclass(kw_only=True)
class SampleConfig:
    """What `vqim sample` does.

    Args:
        prior: prior folder (written by train-prior).
        tokenizer: the tokenizer folder whose tokens the prior was trained on.
        out: folder for grid.png and one PNG per image.
        classes: comma-separated class ids of a class-conditional prior (default: every class); with
            --condition, the k-th condition image takes the k-th class (cycling through the list).
        n: images per class (unconditional: in all), generated as one batch; with --condition, samples per
            condition image.
        sampling: sampling settings.
        device: cpu, cuda, or auto (cuda when available).
        condition: images giving the spatial condition of a spatially conditioned prior: photos from which the
            prior's built-in condition (lowres:F, edges) is derived, a low-resolution image of 1/F the size for
            lowres:F, or condition images themselves (user conditions, or with --condition-given).
        condition_tokenizer: the condition tokenizer the prior's training tokens were encoded with.
        condition_given: the --condition images are condition images already (do not derive the condition).
        grid: canvas in tokens, HxW, larger than the training grid: sliding-window sampling.
        image_size: canvas in pixels, HxW (a multiple of the tokenizer's patch size); instead of --grid.
    """

    prior: str
    tokenizer: str
    out: str
    classes: str | None = None
    n: int = 8
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    device: str = "auto"
    condition: list[str] | None = option(None, metavar="IMAGE")
    condition_tokenizer: str | None = None
    condition_given: bool = option(False, negatable=False)
    grid: str | None = option(None, metavar="HxW")
    image_size: str | None = option(None, metavar="HxW")

    def __post_init__(self) -> None:
        check_output(self.out)
        check_settings(self, positive=("n",))


def canvas_grid(cfg_grid: str | None, cfg_image_size: str | None, prior: Any, tok: Any) -> tuple[int, int]:
    """The token canvas from --grid or --image-size (default: the prior's training grid)."""
    if cfg_grid is not None and cfg_image_size is not None:
        raise InputError("pass --grid (tokens) or --image-size (pixels), not both")
    if cfg_image_size is not None:
        h, w = parse_size(cfg_image_size, "--image-size")
        p = tok.config.patch_size
        if h % p or w % p:
            raise InputError(f"--image-size {h}x{w} must be a multiple of the tokenizer's patch size {p}")
        return h // p, w // p
    return parse_size(cfg_grid, "--grid") or tuple(prior.grid_size)


def _load_pair(cfg: SampleConfig | CompleteConfig) -> tuple[Any, Any, torch.device]:
    """Check cfg.n, then load the prior and its tokenizer (checked together) on cfg.device."""
    from vqim.prior import load_prior_and_tokenizer

    if cfg.n < 1:
        raise InputError(f"n must be at least 1, got {cfg.n}")
    device = resolve_device(cfg.device)
    prior, tok = load_prior_and_tokenizer(cfg.prior, cfg.tokenizer, device)
    return prior, tok, device


@torch.no_grad()
def sample_to_folder(cfg: SampleConfig) -> dict[str, Any]:
    """Generate cfg.n images per class and write grid.png and single PNGs; returns what was written."""
    from torchvision.utils import make_grid, save_image

    from vqim.sampling import generate_images

    prior, tok, device = _load_pair(cfg)
    grid = canvas_grid(cfg.grid, cfg.image_size, prior, tok)
    if prior.config.spatial or cfg.condition:
        return _sample_conditioned(cfg, prior, tok, grid, device)
    if cfg.condition_tokenizer is not None:
        raise InputError(
            "--condition-tokenizer is for a spatially conditioned prior, with --condition images"
        )
    kw = {**cfg.sampling.kwargs(), "grid": grid}
    classes = class_list(cfg.classes, prior.config.num_classes)
    if classes is None:
        images = generate_images(tok, prior, cfg.n, **kw).cpu()
        nrow = min(8, cfg.n)
    else:
        labels = torch.tensor([c for c in classes for _ in range(cfg.n)], device=device)
        images = generate_images(tok, prior, len(labels), labels=labels, **kw).cpu()
        nrow = cfg.n
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images, nrow=nrow, padding=2)
    atomic_write(out / "grid.png", lambda tmp: save_image(grid, tmp, format="png"))
    for i, im in enumerate(images):
        tag = f"class{classes[i // cfg.n]}_" if classes is not None else ""
        atomic_write(out / f"{tag}{i:04d}.png", lambda tmp, im=im: save_image(im, tmp, format="png"))
    return {"images": len(images), "grid": str(out / "grid.png"), "classes": classes}


def load_condition_tokenizer(
    prior_dir: str, prior: Any, tokenizer_dir: str | None, device: Any
) -> tuple[Any, Any]:
    """The condition tokenizer of a spatially conditioned prior, checked against the prior's tokens.json;
    returns (tokenizer, the parsed `vqim.conditions.Condition`)."""
    from vqim.conditions import parse_condition
    from vqim.tokenizer import Tokenizer
    from vqim.tokens import check_tokens_match, read_prior_tokens

    if not prior.config.spatial:
        raise InputError(f"the prior in {prior_dir} has no spatial condition: sample without --condition")
    record = (read_prior_tokens(prior_dir) or {}).get("condition")
    if record is None:
        raise InputError(
            f"{prior_dir}/tokens.json records no condition: cannot tell which condition the prior reads"
        )
    if tokenizer_dir is None:
        raise InputError(
            f"the prior in {prior_dir} is conditioned on {record['spec']}: pass --condition-tokenizer, the condition "
            f"tokenizer its tokens were encoded with ({record.get('tokenizer_dir') or 'see tokens.json'})"
        )
    ctok = Tokenizer.from_pretrained(tokenizer_dir, device=device)
    check_tokens_match(
        record, ctok, f"the prior in {prior_dir} was trained on condition tokens of", f"{tokenizer_dir} is",
        "pass the --condition-tokenizer that `vqim encode --condition` used",
    )  # fmt: skip
    spec = record["spec"]
    cond = parse_condition(spec) if not Path(spec).is_absolute() else None
    return ctok, cond


def condition_tokens(
    images: torch.Tensor, cond: Any, ctok: Any, size: tuple[int, int], given: bool
) -> torch.Tensor:
    """Condition token grids (B, hc, wc) of input images: derived (built-in) or as given, then encoded."""
    if cond is not None and not given:
        images = cond.from_input(images, size)
    p = ctok.config.patch_size
    if tuple(images.shape[2:]) != tuple(size) or size[0] % p or size[1] % p:
        raise InputError(
            f"condition images must be {size[0]}×{size[1]} pixels (the sampled image's size), got "
            f"{images.shape[2]}×{images.shape[3]}"
        )
    return ctok.encode(images.to(next(ctok.parameters()).device))


def _sample_conditioned(cfg: SampleConfig, prior: Any, tok: Any, grid: tuple[int, int], device: Any) -> dict:
    from torchvision.utils import make_grid

    from vqim.sampling import generate_images

    if not cfg.condition:
        raise InputError(
            f"the prior in {cfg.prior} is spatially conditioned: pass --condition IMAGE... (and --condition-tokenizer)"
        )
    ctok, cond = load_condition_tokenizer(cfg.prior, prior, cfg.condition_tokenizer, device)
    p = tok.config.patch_size
    size = (grid[0] * p, grid[1] * p)
    classes = class_list(cfg.classes, prior.config.num_classes)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, written = [], 0
    for k, path in enumerate(cfg.condition):
        small = cond is not None and cond.kind == "lowres" and not cfg.condition_given
        image = load_image(path, None if small else size)
        if small and tuple(image.shape[1:]) != (size[0] // cond.factor, size[1] // cond.factor):
            image = load_image(path, size)  # a full-size photo: the condition is derived from it
        ctokens = condition_tokens(image[None], cond, ctok, size, cfg.condition_given)  # (1, hc, wc)
        shown = image[None] if cfg.condition_given or cond is None else cond.from_input(image[None], size)
        labels = None if classes is None else torch.full((cfg.n,), classes[k % len(classes)], device=device)
        images = generate_images(
            tok, prior, cfg.n, labels=labels, condition=ctokens[0], grid=grid, **cfg.sampling.kwargs()
        ).cpu()
        stem = f"cond{k:03d}"
        _save(out / f"{stem}_condition.png", shown[0].clamp(0, 1))
        for i, im in enumerate(images):
            _save(out / f"{stem}_{i:04d}.png", im)
        written += len(images)
        rows.append(torch.cat([shown.clamp(0, 1), images]))
    _save(out / "grid.png", make_grid(torch.cat(rows), nrow=cfg.n + 1, padding=2))
    return {
        "images": written,
        "conditions": len(cfg.condition),
        "grid": str(out / "grid.png"),
        "canvas": list(grid),
    }


@dataclass(kw_only=True)
class CompleteConfig:
    """What `vqim complete` does: keep part of each image's tokens and sample the rest.

    Args:
        images: images to complete (resized and centre-cropped to the tokenizer's image size).
        prior: prior folder (written by train-prior).
        tokenizer: the tokenizer folder whose tokens the prior was trained on.
        out: folder for grid.png and one PNG per completion.
        rows: token rows to keep from the top (default: half the grid).
        mask: a mask image instead of --rows: white keeps the token under it (resized to the token grid).
        label: class id of a class-conditional prior.
        n: completions per image.
        sampling: sampling settings.
        device: cpu, cuda, or auto (cuda when available).
    """

    images: list[str] = option(positional=True, metavar="IMAGE")
    prior: str
    tokenizer: str
    out: str
    rows: int | None = None
    mask: str | None = None
    label: int | None = None
    n: int = 4
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    device: str = "auto"

    def __post_init__(self) -> None:
        check_output(self.out)
        check_settings(self, positive=("n",))


def mask_from_image(path: str | Path, grid: tuple[int, int]) -> torch.Tensor:
    """A keep-mask (h, w) from a mask image: the mean brightness of each token's cell above one half keeps it."""
    import torch.nn.functional as F

    m = load_image(path, None).mean(0, keepdim=True)[None]  # (1, 1, H, W)
    return F.interpolate(m, size=grid, mode="area")[0, 0] > 0.5


@torch.no_grad()
def complete_to_folder(cfg: CompleteConfig) -> dict[str, Any]:
    """Complete each image n times from its kept tokens; writes grid.png and single PNGs."""
    from torchvision.utils import make_grid

    from vqim.sampling import generate

    prior, tok, device = _load_pair(cfg)
    if prior.config.spatial:
        raise InputError("`vqim complete` takes a prior without a spatial condition")
    h, w = prior.grid_size
    if cfg.rows is not None and cfg.mask is not None:
        raise InputError("pass --rows or --mask, not both")
    if cfg.mask is not None:
        keep = mask_from_image(cfg.mask, (h, w))
    else:
        rows = h // 2 if cfg.rows is None else cfg.rows
        if not 0 <= rows < h:
            raise InputError(f"--rows must be in [0, {h - 1}] (the grid has {h} token rows), got {rows}")
        keep = torch.zeros(h, w, dtype=torch.bool)
        keep[:rows] = True
    labels = None
    if prior.config.conditional:
        if cfg.label is None:
            raise InputError(
                f"the prior is class-conditional: pass --label (0..{prior.config.num_classes - 1})"
            )
        labels = cfg.label
    elif cfg.label is not None:
        raise InputError("--label given, but the prior is unconditional")
    size = tok.config.image_size
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    p = tok.config.patch_size
    pixel_keep = keep.repeat_interleave(p, 0).repeat_interleave(p, 1).float()  # (H, W)
    rows_out = []
    for k, path in enumerate(cfg.images):
        image = load_image(path, (size, size))
        known = tok.encode(image[None].to(device))[0]  # (h, w)
        ids = generate(prior, cfg.n, labels, known=known, keep=keep.to(device), **cfg.sampling.kwargs())
        images = tok.decode(ids).cpu()
        shown = image * pixel_keep + 0.5 * (1 - pixel_keep)  # the kept part, the rest grey
        for i, im in enumerate(images):
            _save(out / f"image{k:03d}_{i:04d}.png", im)
        rows_out.append(torch.cat([image[None], shown[None], images]))
    _save(out / "grid.png", make_grid(torch.cat(rows_out), nrow=cfg.n + 2, padding=2))
    return {"images": len(cfg.images) * cfg.n, "kept_tokens": int(keep.sum()), "grid": str(out / "grid.png")}


__all__ = [
    "CompleteConfig",
    "SampleConfig",
    "canvas_grid",
    "class_list",
    "complete_to_folder",
    "condition_tokens",
    "load_condition_tokenizer",
    "load_image",
    "mask_from_image",
    "parse_size",
    "sample_to_folder",
]
