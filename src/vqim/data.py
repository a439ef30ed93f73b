"""Image datasets: folders, arrays, and the built-in `photos`.

Every dataset returns dicts {"image": float (3, S, S) in [0, 1], "label": int (-1 if none), "skipped": [paths]}.
A file that cannot be read is skipped with a warning and reported in "skipped" so that the training loop
can count it across DataLoader workers; in training the next readable image takes its place (the batch
keeps its size), in evaluation it is dropped (no image is counted twice).

Training augmentation is a pure function of (seed, position in the sample stream), so a resumed run and a
run split over several processes see exactly the same crops as one uninterrupted process.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from vqim.errors import InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
BUILTIN = ("photos", "digits")

# Whole photographs bundled with scikit-image (file names in skimage's data directory). The evaluation
# photographs are never seen in training. motorcycle_left/right are a stereo pair, so both stay in training.
PHOTOS_TRAIN = (
    "astronaut.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
    "motorcycle_right.png", "retina.jpg", "coins.png", "moon.png", "grass.png", "gravel.png", "brick.png",
    "page.png", "clock_motion.png",
)  # fmt: skip
PHOTOS_EVAL = ("chelsea.png", "rocket.jpg", "camera.png")

_MAX_SUBSTITUTIONS = 50


# Images with more pixels than this are refused (a decompression bomb, or a mistake): VQIM_MAX_PIXELS raises it.
MAX_PIXELS = int(os.environ.get("VQIM_MAX_PIXELS", 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)))
# Above this many pixels an image counts as large: decoded at reduced size where the caller needs only part of
# its resolution (JPEG draft, integer box reduction), and announced once per file.
LARGE_PIXELS = 4096 * 4096
_announced: set[str] = set()


def load_rgb(
    path: str | os.PathLike, min_side: int | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Open and fully decode an image file as 8-bit RGB; raises on a corrupt or truncated file.

    16-bit images (PNG "I;16"/"I") are scaled to 8 bits (65535 → 255), not clipped; float images ("F") must lie
    in [0, 1]. An image above `max_pixels` (default `MAX_PIXELS`, env VQIM_MAX_PIXELS) is refused. With
    `min_side`, a large image (over `LARGE_PIXELS`) is decoded and box-reduced to no less than min_side on
    its shorter side, which is all a caller that resizes to min_side uses (JPEG: decoded at reduced scale).
    """
    import warnings

    limit = MAX_PIXELS if max_pixels is None else max_pixels
    name = str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # vqim applies its own limit
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:
            if limit <= 2 * (Image.MAX_IMAGE_PIXELS or 0):
                raise InputError(f"{name}: {e} (set VQIM_MAX_PIXELS to allow larger images)") from e
            pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # vqim's own limit is higher
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = pil_limit
        with im:
            w, h = im.size
            if w * h > limit:
                raise InputError(
                    f"{name}: {w}×{h} = {w * h} pixels exceeds the limit of {limit} (set VQIM_MAX_PIXELS to "
                    f"allow larger images)"
                )
            large = w * h > LARGE_PIXELS
            if large and name not in _announced:
                _announced.add(name)
                log.info(
                    "large image %s (%d×%d)%s", name, w, h, " decoded at reduced size" if min_side else ""
                )
            if large and min_side and im.format == "JPEG":
                s = min_side / min(w, h)
                im.draft("RGB", (max(1, int(w * s + 1)), max(1, int(h * s + 1))))
            im.load()  # decode now: truncated files fail here, not later
            rgb = _to_rgb(
                im, name
            )  # first: Pillow's reduce refuses (or mis-averages) palette and 16-bit modes
            if large and min_side and min(rgb.size) >= 2 * min_side:
                rgb = rgb.reduce(min(rgb.size) // min_side)
            rgb.info["vqim_large"] = large  # the file was large (callers may keep its resized pixels)
            return rgb


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    """8-bit RGB from any PIL mode, scaling high-bit-depth and float images instead of clipping them."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im)
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{name}: the image holds NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if im.mode == "F":
            if lo < 0 or hi > 1:
                raise InputError(
                    f"{name}: a float image must lie in [0, 1], found values in [{lo:g}, {hi:g}]"
                )
            arr8 = np.round(arr * 255)
        else:
            if lo < 0 or hi > 65535:
                raise InputError(
                    f"{name}: a 32-bit integer image must lie in [0, 65535], found [{lo:g}, {hi:g}]"
                )
            arr8 = np.round(arr.astype(np.float64) / 257)
        return Image.fromarray(arr8.astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def resize_shorter(im: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side equals size (bicubic, antialiased)."""
    w, h = im.size
    s = size / min(w, h)
    if s == 1:
        return im
    return im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)


def _crop(arr: np.ndarray, size: int, rng: np.random.Generator | None, flip: bool) -> np.ndarray:
    h, w = arr.shape[:2]
    if rng is None:  # center crop
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    out = arr[top : top + size, left : left + size]
    if flip and rng is not None and rng.random() < 0.5:
        out = out[:, ::-1]
    return out


class _Base(Dataset, abc.ABC):
    """Shared item logic: `key` is an index or (index, augmentation seed) from `StepSampler`."""

    def __init__(self, image_size: int, train: bool, seed: int, augment: bool | None = None) -> None:
        self.image_size = image_size
        self.train = train  # training split (built-ins) and, unless augment says otherwise, augmentation
        self.augment = train if augment is None else augment
        self.seed = seed
        self.class_names: list[str] | None = None

    @abc.abstractmethod
    def _load(self, index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
        """Item index as (H, W, 3) uint8 S×S crop and its label; raises when unreadable."""

    def _name(self, index: int) -> str:
        return f"item {index}"

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, aug = (key, key) if isinstance(key, int) else key
        rng = np.random.default_rng([self.seed, aug]) if self.augment else None
        skipped: list[str] = []
        n = len(self)
        for attempt in range(_MAX_SUBSTITUTIONS):
            i = (index + attempt) % n
            try:
                arr, label = self._load(i, rng)
            except Exception as e:  # noqa: BLE001 - any decoding failure means "skip this file"
                name = self._name(i)
                log.warning("skipping unreadable image %s (%s: %s)", name, type(e).__name__, e)
                skipped.append(name)
                if not self.augment:
                    return {"image": None, "label": -1, "skipped": skipped}
                continue
            return {"image": to_tensor(arr), "label": label, "skipped": skipped}
        raise RuntimeError(
            f"{_MAX_SUBSTITUTIONS} consecutive images could not be read (last: {skipped[-1]}); "
            "check the dataset for corrupt files"
        )


class ImageFolderDataset(_Base):
    """All images under a folder, recursively (jpg, png, webp, bmp; any PIL mode → RGB).

    When every image sits in a first-level sub-folder, the sub-folder names are the classes.

    Args:
        root: the folder.
        image_size: output side S. The shorter side is resized to S, then a random crop and flip (train)
            or a center crop (eval) gives S×S.
        train: training augmentation or deterministic evaluation crops.
        seed: augmentation seed.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        train: bool = True,
        seed: int = 0,
        augment: bool | None = None,
        labels_csv: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(image_size, train, seed, augment)
        self.root = Path(root)
        self._resized: dict[int, np.ndarray] = {}
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.files = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not self.files:
            raise InputError(
                f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}; "
                "point --data at a folder of images, a .npy/.npz array, or a built-in dataset "
                f"({', '.join(BUILTIN)})"
            )
        rel = [p.relative_to(self.root).parts for p in self.files]
        if labels_csv is not None:
            self._labels_from_csv(Path(labels_csv))
        elif all(len(r) >= 2 for r in rel):
            self.class_names = sorted({r[0] for r in rel})
            index = {c: i for i, c in enumerate(self.class_names)}
            self.labels = [index[r[0]] for r in rel]
        else:
            self.labels = [-1] * len(self.files)
        self._check_readable()

    def _labels_from_csv(self, path: Path) -> None:
        """Labels from a CSV with columns `path,label` (path relative to the folder, or a bare file name)."""
        import csv

        if not path.is_file():
            raise FileNotFoundError(f"labels CSV not found: {path}")
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"path", "label"} <= set(rows[0]):
            raise InputError(f"{path}: expected a header with columns 'path' and 'label'")
        by_path = {r["path"].strip(): r["label"].strip() for r in rows}
        names = sorted(set(by_path.values()))
        index = {c: i for i, c in enumerate(names)}
        labels, missing = [], []
        for p in self.files:
            key = p.relative_to(self.root).as_posix()
            lab = by_path.get(key, by_path.get(p.name))
            if lab is None:
                missing.append(key)
            labels.append(-1 if lab is None else index[lab])
        if missing:
            raise InputError(f"{path}: no label for {len(missing)} image(s), e.g. {missing[:3]}")
        self.class_names, self.labels = names, labels

    def _check_readable(self) -> None:
        for p in self.files:
            try:
                load_rgb(p, min_side=self.image_size)
                return
            except Exception as e:  # noqa: BLE001
                log.warning("skipping unreadable image %s (%s: %s)", p, type(e).__name__, e)
        raise InputError(
            f"no readable image in {self.root}: all {len(self.files)} image files failed to decode"
        )

    def __len__(self) -> int:
        return len(self.files)

    def _name(self, index: int) -> str:
        return str(self.files[index])

    def _load(self, index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
        arr = self._resized.get(index)
        if arr is None:
            im = load_rgb(self.files[index], min_side=self.image_size)
            arr = np.asarray(resize_shorter(im, self.image_size))
            if im.info.get(
                "vqim_large"
            ):  # a large file is decoded once per process: its resized pixels are kept
                self._resized[index] = arr
        return _crop(arr, self.image_size, rng, flip=True), self.labels[index]


class ArrayDataset(_Base):
    """Images from a .npy array, or a .npz with an `images` array (and optional `labels`).

    Accepted layouts: (N, H, W, 3), (N, 3, H, W) or (N, H, W) grayscale; uint8 in [0, 255] or float in [0, 1].
    Loaded with allow_pickle=False.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_size: int,
        train: bool = True,
        seed: int = 0,
        augment: bool | None = None,
    ) -> None:
        super().__init__(image_size, train, seed, augment)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"array file not found: {self.path}")
        try:
            data = np.load(self.path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"could not read {self.path} as a numpy array file: {e}") from e
        labels = None
        if isinstance(data, np.lib.npyio.NpzFile):
            if "images" not in data.files:
                raise InputError(f"{self.path} has arrays {data.files}; expected one named 'images'")
            images = data["images"]
            labels = data["labels"] if "labels" in data.files else None
        else:
            images = data
        self.images = _to_uint8_hwc(images, str(self.path))
        if labels is not None:
            if (
                labels.ndim != 1
                or not np.issubdtype(labels.dtype, np.integer)
                or (labels.size and labels.min() < 0)
            ):
                raise InputError(
                    f"{self.path}: 'labels' must be one non-negative integer per image, found {labels.dtype} "
                    f"{tuple(labels.shape)}" + (f" with minimum {labels.min()}" if labels.size else "")
                )
        self.labels = [-1] * len(self.images) if labels is None else [int(v) for v in labels]
        if len(self.labels) != len(self.images):
            raise InputError(f"{self.path}: {len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
        im = resize_shorter(Image.fromarray(self.images[index]), self.image_size)
        return _crop(np.asarray(im), self.image_size, rng, flip=True), self.labels[index]


def _to_uint8_hwc(images: np.ndarray, name: str) -> np.ndarray:
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4:
        raise InputError(f"{name}: expected images of shape (N, H, W, 3) or (N, 3, H, W), got {images.shape}")
    if images.shape[-1] != 3 and images.shape[1] == 3:
        images = images.transpose(0, 2, 3, 1)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.shape[-1] != 3:
        raise InputError(f"{name}: expected 3 colour channels, got shape {images.shape}")
    if len(images) == 0:
        raise InputError(f"{name}: the array holds no images")
    if images.dtype != np.uint8:
        images = _array_to_uint8(images, name)
    return np.ascontiguousarray(images)


def _array_to_uint8(images: np.ndarray, name: str) -> np.ndarray:
    """uint8 images from float images in [0, 1] or integer images in [0, 255]; anything else is refused."""
    if np.issubdtype(images.dtype, np.floating):
        finite = np.isfinite(images)
        if not finite.all():
            raise InputError(f"{name}: the images hold {int((~finite).sum())} NaN or infinite values")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0 or hi > 1:
            hint = " (divide 0..255 images by 255, or save them as uint8)" if hi <= 255 and lo >= 0 else ""
            raise InputError(
                f"{name}: float images must lie in [0, 1], found values in [{lo:g}, {hi:g}]{hint}"
            )
        return (images * 255 + 0.5).astype(np.uint8)
    if np.issubdtype(images.dtype, np.integer) and not np.issubdtype(images.dtype, np.bool_):
        lo, hi = int(images.min()), int(images.max())
        if lo < 0 or hi > 255:
            hint = " (16-bit images: divide by 257)" if hi <= 65535 and lo >= 0 else ""
            raise InputError(
                f"{name}: integer images must lie in [0, 255], found values in [{lo}, {hi}] ({images.dtype}){hint}"
            )
        return images.astype(np.uint8)
    raise InputError(f"{name}: expected uint8, integer or float images, got dtype {images.dtype}")


def photos_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


class PhotosDataset(_Base):
    """Built-in photographs from scikit-image, a fixed split of whole photographs.

    Each photograph is resized so that its shorter side is `scale`·image_size (default 4×). Training draws
    random crops (and flips) from the training photographs; evaluation tiles each held-out photograph into
    non-overlapping image_size crops, a fixed set.

    Args:
        image_size: crop side S.
        train: training photographs with random crops, or held-out photographs tiled.
        seed: augmentation seed.
        scale: shorter side of each photograph in units of S.
        samples_per_epoch: length of the training stream's epoch.
    """

    def __init__(
        self,
        image_size: int,
        train: bool = True,
        seed: int = 0,
        augment: bool | None = None,
        scale: int = 4,
        samples_per_epoch: int = 4096,
    ) -> None:
        super().__init__(image_size, train, seed, augment)
        root = photos_dir()
        names = PHOTOS_TRAIN if train else PHOTOS_EVAL
        self.photos = []
        for n in names:
            im = resize_shorter(load_rgb(root / n), scale * image_size)
            self.photos.append(np.asarray(im))
        # The fixed tiling (used without augmentation): non-overlapping crops, centred on each photograph.
        s = image_size
        self.tiles = []
        for k, arr in enumerate(self.photos):
            h, w = arr.shape[:2]
            oy, ox = (h % s) // 2, (w % s) // 2
            self.tiles += [(k, oy + y * s, ox + x * s) for y in range(h // s) for x in range(w // s)]
        self.length = samples_per_epoch if self.augment else len(self.tiles)
        # Photographs are drawn in proportion to their area, so every region is equally likely.
        areas = np.array([a.shape[0] * a.shape[1] for a in self.photos], dtype=np.float64)
        self.photo_p = areas / areas.sum()

    def __len__(self) -> int:
        return self.length

    def _load(self, index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
        s = self.image_size
        if rng is None:
            k, y, x = self.tiles[index]
            return self.photos[k][y : y + s, x : x + s], -1
        k = int(rng.choice(len(self.photos), p=self.photo_p))
        return _crop(self.photos[k], s, rng, flip=True), -1


class DigitsDataset(_Base):
    """Built-in labelled `digits`: scikit-learn's 1,797 handwritten 8×8 digits (classes 0–9), upsampled.

    Each 8×8 image (grey levels 0–16) is upsampled bicubically to image_size and shown as white ink on
    black in RGB. A fixed split holds out every fifth image (index % 5 == 0) for evaluation.

    Args:
        image_size: output side.
        train: the training 80% or the held-out 20%.
        seed, augment: unused (digits are not augmented); kept for a uniform signature.
    """

    def __init__(
        self, image_size: int, train: bool = True, seed: int = 0, augment: bool | None = None
    ) -> None:
        super().__init__(image_size, train, seed, augment)
        from sklearn.datasets import load_digits

        d = load_digits()
        keep = (np.arange(len(d.target)) % 5 != 0) if train else (np.arange(len(d.target)) % 5 == 0)
        self.raw = (d.images[keep] * (255.0 / 16.0)).round().astype(np.uint8)  # (n, 8, 8)
        self.labels = [int(v) for v in d.target[keep]]
        self.class_names = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.raw)

    def _load(self, index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
        im = Image.fromarray(self.raw[index]).resize((self.image_size, self.image_size), Image.BICUBIC)
        return np.repeat(np.asarray(im)[..., None], 3, axis=-1), self.labels[index]


def build_dataset(
    spec: str,
    image_size: int,
    train: bool = True,
    seed: int = 0,
    augment: bool | None = None,
    labels_csv: str | os.PathLike | None = None,
) -> _Base:
    """Dataset from a spec: a built-in name (`photos`, `digits`), a folder of images, or a .npy / .npz file.

    Args:
        spec: what `--data` names.
        image_size: output side.
        train: for built-ins, the training split (else the held-out split); for all, the default of augment.
        seed: augmentation seed.
        augment: random crops and flips (default: same as train); off gives deterministic center crops.
        labels_csv: for a folder, labels from a CSV (`path,label`) instead of class sub-folders.
    """
    kw = {"train": train, "seed": seed, "augment": augment}
    if spec == "photos":
        return PhotosDataset(image_size, **kw)
    if spec == "digits":
        return DigitsDataset(image_size, **kw)
    p = Path(spec)
    if p.is_dir():
        return ImageFolderDataset(p, image_size, labels_csv=labels_csv, **kw)
    if labels_csv is not None:
        raise InputError("--labels-csv applies to image folders only")
    if p.suffix.lower() in (".npy", ".npz"):
        return ArrayDataset(p, image_size, **kw)
    if not p.exists():
        raise FileNotFoundError(
            f"--data {spec!r} is neither a built-in dataset ({', '.join(BUILTIN)}) nor an existing "
            "folder or .npy/.npz file"
        )
    raise InputError(f"--data {spec!r}: expected a folder of images or a .npy/.npz file")


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and labels; drop items whose image could not be read; gather skipped paths."""
    skipped = [s for it in items for s in it["skipped"]]
    kept = [it for it in items if it["image"] is not None]
    images = torch.stack([it["image"] for it in kept]) if kept else torch.empty(0)
    labels = torch.tensor([it["label"] for it in kept], dtype=torch.long)
    return {"image": images, "label": labels, "skipped": skipped}


class StepSampler(Sampler):
    """Infinite, resumable sample stream split across processes.

    Step s consumes stream positions [s·B, (s+1)·B) of a global batch B; process r takes the r-th contiguous
    slice of B / world. Position t maps to item perm_e[t mod n] of epoch e = t // n, where perm_e is a
    permutation seeded by (seed, e), and to augmentation seed t. So a run resumed at step s, or split over
    several processes, sees exactly the samples of one uninterrupted process.

    Args:
        n: dataset length.
        global_batch: B, summed over processes.
        rank, world: this process and the number of processes.
        seed: shuffling seed.
        start_step: first step to produce.
    """

    def __init__(
        self, n: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0, start_step: int = 0
    ) -> None:
        if global_batch % world:
            raise InputError(f"batch size {global_batch} is not divisible by the number of processes {world}")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start_step = seed, start_step
        self.local = global_batch // world

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 7919, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step = self.start_step
        cache: dict[int, np.ndarray] = {}
        while True:
            start = step * self.global_batch + self.rank * self.local
            for t in range(start, start + self.local):
                e = t // self.n
                if e not in cache:
                    cache.clear()
                    cache[e] = self._perm(e)
                yield int(cache[e][t % self.n]), t
            step += 1
