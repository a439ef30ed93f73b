"""Spatial conditions for the prior (Taming Transformers, section 3.2): what a condition image is, per image.

A spatially conditioned prior reads the tokens of a condition image, written by a tokenizer trained on that
modality, before the image tokens. A condition is named by a spec:

    lowres:F   the image box-downsampled by F and enlarged back by nearest neighbour (super-resolution): the
               condition carries exactly the low-resolution image, at the image's size, so a condition
               tokenizer of the image tokenizer's patch size gives the image's token grid
    edges      a Canny edge map of the image's luminance (scikit-image), white edges on black, in 3 channels
    edges:S    the same with Gaussian smoothing S (default 2.0) before edge detection
    a folder   condition images the user brings (segmentation, depth, sketches), one per image, found by the
               image's path relative to its folder (any image extension); they are resized and cropped as the
               image is

The built-in conditions are derived from any image, so they need no download and no extra data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vqim.data import IMAGE_EXTENSIONS, ImageFolderDataset, _crop, load_rgb, resize_shorter, to_tensor
from vqim.errors import InputError

BUILTIN_CONDITIONS = ("lowres:F", "edges", "edges:SIGMA")


@dataclass(frozen=True)
class Condition:
    """A parsed condition spec (see the module docstring).

    Attributes:
        kind: "lowres", "edges" or "folder".
        factor: the downsampling factor of "lowres".
        sigma: the Gaussian smoothing of "edges".
        folder: the condition images of "folder".
    """

    kind: str
    factor: int = 1
    sigma: float = 2.0
    folder: Path | None = None

    @property
    def spec(self) -> str:
        """The spec string this condition was parsed from (a folder as an absolute path)."""
        if self.kind == "lowres":
            return f"lowres:{self.factor}"
        if self.kind == "edges":
            return "edges" if self.sigma == 2.0 else f"edges:{self.sigma:g}"
        return str(self.folder)

    @property
    def derived(self) -> bool:
        """Whether the condition is computed from the image itself (built-in) rather than read from files."""
        return self.kind != "folder"

    def derive(self, images: torch.Tensor) -> torch.Tensor:
        """Condition images (B, 3, H, W) in [0, 1] for images (B, 3, H, W) in [0, 1] (built-in conditions)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        if self.kind == "lowres":
            f = self.factor
            h, w = images.shape[2:]
            if h % f or w % f:
                raise InputError(f"lowres:{f} needs an image size divisible by {f}, got {h}×{w}")
            return upsample(F.avg_pool2d(images.float(), f), f)
        if self.kind == "edges":
            from skimage.feature import canny

            gray = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).float().cpu().numpy()
            edges = np.stack([canny(g, sigma=self.sigma) for g in gray]).astype(np.float32)
            return torch.from_numpy(edges)[:, None].expand(-1, 3, -1, -1).contiguous().to(images.device)
        raise InputError(f"the condition {self.spec} is read from files, not derived from the image")

    def from_input(self, images: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Condition images for user input: a low-resolution image (H/F, W/F) is enlarged by F (super-resolving
        a real small image); an image of the full size gets the built-in condition derived from it."""
        if self.kind == "lowres" and tuple(images.shape[2:]) != tuple(image_size):
            f = self.factor
            small = (image_size[0] // f, image_size[1] // f)
            if tuple(images.shape[2:]) != small:
                raise InputError(
                    f"a lowres:{f} condition is an image of {small[0]}×{small[1]} (enlarged ×{f}) or of the full "
                    f"{image_size[0]}×{image_size[1]} (downsampled first), got {images.shape[2]}×{images.shape[3]}"
                )
            return upsample(images.float(), f)
        return self.derive(images)


def upsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour enlargement by an integer factor (the low-resolution condition's pixels, as blocks)."""
    return images.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def parse_condition(spec: str) -> Condition:
    """A `Condition` from a spec: lowres:F, edges, edges:SIGMA, or a folder of condition images."""
    if not isinstance(spec, str) or not spec:
        raise InputError(f"a condition spec must be a non-empty string, got {spec!r}")
    if spec.startswith("lowres"):
        _, _, f = spec.partition(":")
        if not f.isdigit() or int(f) < 2:
            raise InputError(
                f"condition {spec!r}: write lowres:F with an integer factor F >= 2, e.g. lowres:4"
            )
        return Condition("lowres", factor=int(f))
    if spec == "edges" or spec.startswith("edges:"):
        _, _, s = spec.partition(":")
        try:
            sigma = float(s) if s else 2.0
        except ValueError:
            sigma = -1.0
        if not sigma > 0:
            raise InputError(f"condition {spec!r}: write edges or edges:SIGMA with a smoothing SIGMA > 0")
        return Condition("edges", sigma=sigma)
    path = Path(spec)
    if path.is_dir():
        return Condition("folder", folder=path.resolve())
    raise InputError(
        f"condition {spec!r} is neither a built-in condition ({', '.join(BUILTIN_CONDITIONS)}) nor a folder of "
        "condition images"
    )


class ConditionImages(torch.utils.data.Dataset):
    """A dataset's items with their condition images beside them: {"image", "condition", "label", "skipped"}.

    Built-in conditions are derived from the image; a folder condition is read from the file at the image's
    relative path (any image extension), resized and cropped as the image is (evaluation crops only, so the
    two stay aligned). An image whose condition file is missing or unreadable is skipped and counted.

    Args:
        base: the image dataset (for a folder condition: an `ImageFolderDataset` without augmentation).
        condition: the parsed condition.
    """

    def __init__(self, base: torch.utils.data.Dataset, condition: Condition) -> None:
        self.base, self.condition = base, condition
        self.class_names = getattr(base, "class_names", None)
        self.labels = getattr(base, "labels", [])
        if not condition.derived:
            if not isinstance(base, ImageFolderDataset):
                raise InputError("a folder of condition images pairs with a folder of images (--data DIR)")
            if base.augment:
                raise InputError("a folder of condition images needs deterministic crops (no augmentation)")

    def __len__(self) -> int:
        return len(self.base)

    def _condition_file(self, index: int) -> Path:
        rel = Path(self.base.files[index]).relative_to(self.base.root).with_suffix("")
        folder = self.condition.folder
        for ext in IMAGE_EXTENSIONS:
            for candidate in (folder / rel.with_suffix(ext), folder / rel.with_suffix(ext.upper())):
                if candidate.is_file():
                    return candidate
        raise FileNotFoundError(
            f"no condition image for {rel} in {folder} (any of {', '.join(IMAGE_EXTENSIONS)})"
        )

    def __getitem__(self, key: Any) -> dict[str, Any]:
        item = dict(self.base[key])
        if item["image"] is None:
            return {**item, "condition": None}
        if self.condition.derived:
            item["condition"] = self.condition.derive(item["image"][None])[0]
            return item
        index = key if isinstance(key, int) else key[0]
        try:
            path = self._condition_file(int(index))
            size = self.base.image_size
            cond = to_tensor(
                _crop(np.asarray(resize_shorter(load_rgb(path, min_side=size), size)), size, None, flip=False)
            )
        except Exception as e:  # noqa: BLE001 - a missing or corrupt condition file skips the pair
            return {"image": None, "condition": None, "label": -1, "skipped": [*item["skipped"], f"{e}"]}
        item["condition"] = cond
        return item


class DerivedImages(torch.utils.data.Dataset):
    """A dataset whose images are replaced by their built-in condition images: the training data of a condition
    tokenizer (`train-tokenizer --condition lowres:4`). Labels, skipped files and augmentation are the base's.

    Args:
        base: the image dataset.
        condition: a built-in (derived) condition.
    """

    def __init__(self, base: torch.utils.data.Dataset, condition: Condition) -> None:
        if not condition.derived:
            raise InputError(
                f"a condition tokenizer for the folder {condition.folder} trains on that folder: pass it as --data"
            )
        self.base, self.condition = base, condition
        self.class_names = getattr(base, "class_names", None)
        self.labels = getattr(base, "labels", [])

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        item = dict(self.base[key])
        if item["image"] is not None:
            item["image"] = self.condition.derive(item["image"][None])[0]
        return item


def collate_conditioned(items: list[dict[str, Any]]) -> dict[str, Any]:
    """`vqim.data.collate` for items with a "condition" image: drops unreadable pairs, stacks the rest."""
    from vqim.data import collate

    kept = [it for it in items if it["image"] is not None]
    out = collate(items)
    out["condition"] = torch.stack([it["condition"] for it in kept]) if kept else torch.empty(0)
    return out


__all__ = [
    "BUILTIN_CONDITIONS",
    "Condition",
    "ConditionImages",
    "DerivedImages",
    "collate_conditioned",
    "parse_condition",
    "upsample",
]
