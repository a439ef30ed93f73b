"""Sampled images on disk: what `vqim sample` and `vqim complete` do with a prior and its tokenizer.

The prior and tokenizer are loaded together and checked (`vqim.prior.load_prior_and_tokenizer`).

`sample`: `--n` images in all (or `--per-class` per class), balanced over the classes of a class-conditional prior
(sample i takes class classes[i mod C]), generated in batches of `--batch-size` and written one PNG per image as
each batch is done, then a grid (a row per class) and optionally one `samples.npz`. Sample i's randomness comes
from its own seed `row_seed(seed, i)` (`vqim.sampling`), so the images do not depend on the batch size or the
number of processes: an interrupted run started again skips the images already written (resuming without
repeating or skipping a sample), a larger `--n` adds images to a folder, and under `accelerate launch` each
process samples its share of the missing indices into the same folder. `samples.json` records the settings; a
folder holding samples of other settings is refused. With `--condition IMAGE...` (a spatially
conditioned prior), each image gives a condition (derived from it for the built-in conditions, or the image
itself), encoded by the condition tokenizer; `n` samples are drawn for it and written beside it: a grid row
[condition | samples...] per image. `--grid HxW` / `--image-size HxW` sample a canvas larger than the training
grid with the sliding window.

`complete`: each image is encoded, its first token rows (or the tokens a mask keeps) are kept, and the rest is
sampled in raster order: a grid row [original | kept part | completions...] per image.
"""

from __future__ import annotations

import dataclasses
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
        n: images in all, balanced over the classes (default: 8, or 8 per class); with --condition, samples per
            condition image.
        per_class: images per class of a class-conditional prior, instead of --n.
        batch_size: images generated at once (the images do not depend on it).
        npz: also write samples.npz: uint8 images arr_0 (N, H, W, 3) and class ids arr_1 (the layout of common
            FID tools).
        progress: show a progress bar.
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
    n: int | None = None
    per_class: int | None = None
    batch_size: int = 64
    npz: bool = option(False, negatable=False)
    progress: bool = True
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    device: str = "auto"
    condition: list[str] | None = option(None, metavar="IMAGE")
    condition_tokenizer: str | None = None
    condition_given: bool = option(False, negatable=False)
    grid: str | None = option(None, metavar="HxW")
    image_size: str | None = option(None, metavar="HxW")

    def __post_init__(self) -> None:
        check_output(self.out)
        check_settings(self, positive=("n", "per_class", "batch_size"))
        if self.n is not None and self.per_class is not None:
            raise InputError("give --n (images in all) or --per-class (images per class), not both")


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
    """Load the prior and its tokenizer (checked together) on cfg.device (cfg.n is checked by the config)."""
    from vqim.prior import load_prior_and_tokenizer

    device = resolve_device(cfg.device)
    prior, tok = load_prior_and_tokenizer(cfg.prior, cfg.tokenizer, device)
    return prior, tok, device


SAMPLES_RECORD = "samples.json"
GRID_LIMIT = 256  # grid.png shows every image up to this many


def sample_name(index: int, label: int | None, width: int) -> str:
    """File name of sample `index` (zero-padded to width digits), with its class."""
    return f"class{label}_{index:0{width}d}.png" if label is not None else f"{index:0{width}d}.png"


@torch.no_grad()
def sample_to_folder(cfg: SampleConfig) -> dict[str, Any]:
    """Generate the images cfg asks for into cfg.out (resumable, any number of processes); returns a summary.

    See the module docstring. On several processes (`accelerate launch`), every process must call this.
    """
    from vqim.distributed import process_state

    state = process_state()
    if state.num_processes > 1 and cfg.device == "auto":
        cfg = dataclasses.replace(cfg, device=str(state.device))
    prior, tok, device = _load_pair(cfg)
    grid = canvas_grid(cfg.grid, cfg.image_size, prior, tok)
    if prior.config.spatial or cfg.condition:
        return _sample_conditioned(cfg, prior, tok, grid, device)
    if cfg.condition_tokenizer is not None:
        raise InputError(
            "--condition-tokenizer is for a spatially conditioned prior, with --condition images"
        )
    classes = class_list(cfg.classes, prior.config.num_classes)
    if cfg.per_class is not None and classes is None:
        raise InputError("--per-class is for a class-conditional prior; give --n for an unconditional one")
    n = cfg.n if cfg.n is not None else (cfg.per_class or 8) * (len(classes) if classes else 1)
    labels = [classes[i % len(classes)] for i in range(n)] if classes else [None] * n
    width = max(4, len(str(n - 1)))
    out = Path(cfg.out)
    kw = cfg.sampling.kwargs()
    seed = kw.pop("seed")
    record = {
        "format": "vqim-samples/1", "prior_id": prior.fingerprint(), "tokenizer_id": tok.fingerprint(),
        "sampling": cfg.sampling.kwargs(), "grid": list(grid), "classes": classes, "name_width": width,
    }  # fmt: skip
    if state.is_main_process:
        _check_sample_folder(out, record)
        from vqim.checkpoint import write_json

        out.mkdir(parents=True, exist_ok=True)
        write_json(out / SAMPLES_RECORD, {**record, "n": n, "complete": False})
    state.wait_for_everyone()
    paths = [out / sample_name(i, labels[i], width) for i in range(n)]
    missing = [i for i in range(n) if not paths[i].is_file()]
    state.wait_for_everyone()  # every process has the same list before any writes a file
    mine = missing[state.process_index :: state.num_processes]
    _write_samples(prior, tok, mine, labels, paths, seed, kw, grid, device, cfg, state)
    state.wait_for_everyone()
    result = {"images": n, "written": len(missing), "resumed": n - len(missing), "classes": classes,
              "processes": state.num_processes,
              "grid": None, "npz": None, "out": str(out)}  # fmt: skip
    if state.is_main_process:
        from vqim.checkpoint import write_json

        if n <= GRID_LIMIT:
            result["grid"] = str(_write_grid(out / "grid.png", paths, labels, classes))
        if cfg.npz:
            result["npz"] = str(write_npz(out / "samples.npz", paths, labels))
        write_json(out / SAMPLES_RECORD, {**record, "n": n, "complete": True})
    return result


def _check_sample_folder(out: Path, record: dict[str, Any]) -> None:
    """Refuse an output folder holding samples of other settings, or images vqim did not write there."""
    from vqim.checkpoint import read_json_object

    found = out / SAMPLES_RECORD
    if found.is_file():
        saved = read_json_object(found, "samples record")
        diffs = [k for k in record if k != "name_width" and saved.get(k) != json_roundtrip(record[k])]
        if diffs:
            listed = "; ".join(
                f"{k}: saved {saved.get(k)!r}, now {json_roundtrip(record[k])!r}" for k in diffs
            )
            raise InputError(
                f"--out {out} holds samples of other settings ({listed}): choose another --out, or give the saved "
                f"settings to add to or complete those samples"
            )
        if saved.get("name_width") != record["name_width"]:
            raise InputError(
                f"--out {out}: its samples are named with {saved.get('name_width')} digits; --n needs "
                f"{record['name_width']}: choose another --out"
            )
    elif out.is_dir() and any(p.suffix.lower() == ".png" for p in out.iterdir()):
        raise InputError(
            f"--out {out} holds images that vqim sample did not write ({SAMPLES_RECORD} is missing)"
        )


def json_roundtrip(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


def _write_samples(prior, tok, indices, labels, paths, seed, kw, grid, device, cfg, state) -> None:
    """Generate the samples `indices` in batches of cfg.batch_size; write each PNG atomically when its batch is done."""
    from torchvision.utils import save_image
    from tqdm.auto import tqdm

    from vqim.sampling import generate_images, row_seed

    bar = tqdm(total=len(indices), disable=not (cfg.progress and state.is_main_process), desc="sample",
               dynamic_ncols=True)  # fmt: skip
    for start in range(0, len(indices), cfg.batch_size):
        chunk = indices[start : start + cfg.batch_size]
        lab = None if labels[chunk[0]] is None else torch.tensor([labels[i] for i in chunk], device=device)
        seeds = [row_seed(seed, i) for i in chunk]
        images = generate_images(tok, prior, len(chunk), labels=lab, grid=grid, row_seeds=seeds, **kw).cpu()
        for i, im in zip(chunk, images, strict=True):
            atomic_write(paths[i], lambda tmp, im=im: save_image(im, tmp, format="png"))
        bar.update(len(chunk))
    bar.close()


def _write_grid(path: Path, paths: list[Path], labels: list[int | None], classes: list[int] | None) -> Path:
    """One grid of every sample read back from its PNG: a row per class (in the --classes order), else rows of 8."""
    from PIL import Image
    from torchvision.utils import make_grid, save_image

    order = list(range(len(paths)))
    nrow = min(8, len(paths))
    if classes:
        rank = {c: k for k, c in enumerate(classes)}
        order.sort(key=lambda i: (rank[labels[i]], i))
        nrow = max(sum(1 for lab in labels if lab == c) for c in classes)
    images = torch.stack([torch.from_numpy(np.array(Image.open(paths[i]).convert("RGB"))).permute(2, 0, 1)
                          for i in order]).float() / 255  # fmt: skip
    g = make_grid(images, nrow=nrow, padding=2)
    atomic_write(path, lambda tmp: save_image(g, tmp, format="png"))
    return path


def write_npz(path: Path, paths: list[Path], labels: list[int | None]) -> Path:
    """samples.npz with arr_0 = uint8 images (N, H, W, 3) streamed from the PNGs (never all in memory) and
    arr_1 = class ids (N,) (-1: unconditional), written atomically."""
    import zipfile

    from PIL import Image

    first = np.asarray(Image.open(paths[0]).convert("RGB"))

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                header = {"descr": "|u1", "fortran_order": False, "shape": (len(paths), *first.shape)}
                np.lib.format.write_array_header_2_0(f, header)
                for p in paths:
                    arr = np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8)
                    if arr.shape != first.shape:
                        raise InputError(f"{p}: {arr.shape} differs from the other samples' {first.shape}")
                    f.write(arr.tobytes())
            with zf.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(
                    f, np.array([-1 if v is None else v for v in labels], dtype=np.int64)
                )

    atomic_write(path, write)
    return path


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

    per = cfg.n if cfg.n is not None else 8  # samples per condition image

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
        labels = None if classes is None else torch.full((per,), classes[k % len(classes)], device=device)
        images = generate_images(
            tok, prior, per, labels=labels, condition=ctokens[0], grid=grid, **cfg.sampling.kwargs()
        ).cpu()
        stem = f"cond{k:03d}"
        _save(out / f"{stem}_condition.png", shown[0].clamp(0, 1))
        for i, im in enumerate(images):
            _save(out / f"{stem}_{i:04d}.png", im)
        written += len(images)
        rows.append(torch.cat([shown.clamp(0, 1), images]))
    _save(out / "grid.png", make_grid(torch.cat(rows), nrow=per + 1, padding=2))
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
