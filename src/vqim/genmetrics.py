"""Metrics of generated samples: FID, Inception Score, precision and recall (what `vqim eval-samples` runs).

The ViT-VQGAN / VIM paper reports FID and Inception Score of its samples; precision and recall are those of
Kynkäänniemi et al. 2019 ("Improved Precision and Recall Metric for Assessing Generative Models").

Protocol (`PROTOCOL`, stored with reference statistics):

- Images are read from their files at their own size (no crop, no resize here) as 8-bit RGB (`vqim.data.load_rgb`);
  image tensors in [0, 1] are quantised with `vqim.fid.to_uint8` (round(255·x), as a PNG stores them), exactly
  as for rFID. Samples saved as PNG and samples passed as tensors therefore give the same numbers.
- The network is torch-fidelity's InceptionV3 (the TF-compatible port, weights read from a local file by
  `vqim.fid.load_inception`), which resizes every image to 299×299 itself (bilinear, as the TF graph does).
  Images of different sizes are never put in one batch; a reference folder may hold another size than the samples.
- FID: Fréchet distance between Gaussians fitted (mean, unbiased covariance in float64) to the 2048-d pool
  features of samples and reference, by torch-fidelity's `fid_statistics_to_metric`.
- Inception Score: exp E[KL(p(y|x) ‖ p(y))] of the samples' 1008-way logits ("logits_unbiased") by
  torch-fidelity's `isc_features_to_metric`, in min(10, N) splits (mean and standard deviation over splits; the
  fixed shuffle seed of torch-fidelity makes it deterministic).
- Precision / recall on the pool features, k = 3 (see `precision_recall`).

What the numbers depend on, so compare only numbers measured alike:

- Sample count: FID is biased upward for small N (the covariance estimate is noisy; with N < 2048 it is
  singular) and the bias shrinks roughly like 1/N; papers use 50,000 samples. IS depends on N and the splits;
  precision and recall on N and k (more samples: larger union of balls, higher recall).
- The reference set (which real images, how many: ImageNet train vs val statistics differ).
- Image size and preprocessing: the same samples at another resolution (or JPEG-compressed) score differently,
  since InceptionV3 sees them resized to 299.

Reference statistics (`save_reference` / `load_reference`) are a .npz holding mu and sigma (float64) for FID and
the reference's pool features for precision/recall, stored as float16 (half the size; relative rounding
≤ 2⁻¹¹, far below the spread of k-NN radii) unless a value exceeds float16's range (then float32). The features
of a reference folder are rounded the same way before precision/recall, so a folder and its saved .npz give the
same numbers. An .npz with only mu and sigma (e.g. pytorch-fid's) gives FID; precision/recall are then reported
under `not_measured`.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from vqim.errors import InputError, check_output, check_settings

log = logging.getLogger(__name__)

PROTOCOL = (
    "vqim-genmetrics/1: uint8 (PNG) images at their own size; torch-fidelity InceptionV3 (inception-v3-compat, "
    "resize to 299); pool 2048 for FID and precision/recall, logits_unbiased for IS"
)
METRICS = ("fid", "inception_score", "precision", "recall")
_FP16_MAX = float(np.finfo(np.float16).max)

# A feature network: takes (B, 3, H, W) uint8 images, returns (pool features (B, D), logits (B, C)).
FeatureNet = Any


class Features(NamedTuple):
    """What `image_features` returns.

    Attributes:
        pool: (N, D) float32 pool features (D = 2048 for InceptionV3), on the CPU.
        logits: (N, C) float32 logits (C = 1008), on the CPU.
        skipped: files that could not be read (skipped, in order).
        sizes: the distinct image sizes seen, as (H, W), sorted.
    """

    pool: torch.Tensor
    logits: torch.Tensor
    skipped: list[str]
    sizes: list[tuple[int, int]]


def folder_images(folder: str | os.PathLike) -> list[Path]:
    """The image files (`vqim.data.IMAGE_EXTENSIONS`, any case) under folder, recursively, sorted.

    Raises FileNotFoundError for a missing folder, InputError for a file or a folder without images.
    """
    from vqim.data import IMAGE_EXTENSIONS

    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise InputError(f"{root} is not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise InputError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return files


def _read(path: Path) -> torch.Tensor:
    from vqim.data import load_rgb

    arr = np.asarray(load_rgb(path))  # (H, W, 3) uint8: the values a PNG stores, no resize
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _same_size_runs(images: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Consecutive images of one size stacked into a batch (InceptionV3 resizes each image alone)."""
    for _, run in itertools.groupby(images, key=lambda t: tuple(t.shape)):
        yield torch.stack(list(run))


def _file_batches(paths: list[Path], batch_size: int, skipped: list[str]) -> Iterator[torch.Tensor]:
    """uint8 batches of the readable files, decoded by a few threads one batch ahead; unreadable ones skipped."""
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="vqim-read") as pool:
        ahead = [pool.submit(_read, p) for p in chunks[0]] if chunks else []
        for i, chunk in enumerate(chunks):
            current = ahead
            ahead = [pool.submit(_read, p) for p in chunks[i + 1]] if i + 1 < len(chunks) else []
            images = []
            for p, fut in zip(chunk, current, strict=True):
                try:
                    images.append(fut.result())
                except Exception as e:  # noqa: BLE001 - any decoding failure means "skip this file"
                    log.warning("skipping unreadable image %s (%s: %s)", p, type(e).__name__, e)
                    skipped.append(str(p))
            yield from _same_size_runs(images)


def _tensor_batches(batches: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    for t in batches:
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"image batches must be (B, 3, H, W) tensors, got {shape}")
        if t.dtype != torch.uint8:
            if not t.is_floating_point():
                raise InputError(f"image batches must be float in [0, 1] or uint8, got {t.dtype}")
            from vqim.fid import to_uint8

            t = to_uint8(t)
        yield from t.split(batch_size)


def _device_of(net: FeatureNet, device: str | torch.device | None) -> torch.device:
    if device is not None:
        from vqim.checkpoint import resolve_device

        return resolve_device(device)
    try:
        return next(net.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def image_features(
    source: Iterable[str | os.PathLike] | Iterable[torch.Tensor],
    net: FeatureNet,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Features:
    """Pool features and logits of images, streamed through net in batches.

    Args:
        source: image files (read at their own size, unreadable ones skipped and listed), or an iterable of
            image batches (B, 3, H, W), float in [0, 1] (quantised with `vqim.fid.to_uint8`) or uint8.
        net: from `vqim.fid.load_inception` (or any module mapping uint8 images to (pool, logits)).
        batch_size: images per forward pass.
        device: where the images go (default: net's device).
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise InputError(f"batch_size must be a positive number, got {batch_size}")
    dev = _device_of(net, device)
    items = iter(source)
    first = next(items, None)
    skipped: list[str] = []
    total = None
    if first is None:
        batches: Iterator[torch.Tensor] = iter(())
    elif isinstance(first, torch.Tensor):
        batches = _tensor_batches(itertools.chain([first], items), batch_size)
    else:
        paths = [Path(p) for p in itertools.chain([first], items)]
        total = len(paths)
        batches = _file_batches(paths, batch_size, skipped)
    pools, logits, sizes, counted_skips = [], [], set(), 0
    bar = tqdm(total=total, disable=not progress, desc="inception", unit="img", leave=False)
    try:
        for x in batches:
            out = net(x.to(dev))
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise InputError("the feature network must return (pool features, logits)")
            pools.append(out[0].detach().float().reshape(x.shape[0], -1).cpu())
            logits.append(out[1].detach().float().reshape(x.shape[0], -1).cpu())
            sizes.add((int(x.shape[2]), int(x.shape[3])))
            bar.update(x.shape[0] + len(skipped) - counted_skips)  # skipped files count as done
            counted_skips = len(skipped)
    finally:
        bar.close()
    if pools:
        return Features(torch.cat(pools), torch.cat(logits), skipped, sorted(sizes))
    return Features(torch.zeros(0, 0), torch.zeros(0, 0), skipped, [])


# ---------------------------------------------------------------------------------------------- statistics
def feature_stats(pool: torch.Tensor, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features, float64 (`vqim.metrics.FeatureStats`, as rFID)."""
    from vqim.metrics import FeatureStats

    stats = FeatureStats(pool.shape[1])
    for part in pool.split(chunk):
        stats.update(part)
    mu, cov = stats.mean_cov()
    return mu.numpy(), cov.numpy()


def _stored(pool: torch.Tensor) -> torch.Tensor:
    """The reference features as stored in a .npz: float16 where every value fits, else float32."""
    pool = pool.detach().float().cpu()
    fits = pool.numel() == 0 or (bool(torch.isfinite(pool).all()) and float(pool.abs().max()) <= _FP16_MAX)
    return pool.half() if fits else pool


def save_reference(
    path: str | os.PathLike, feats: Features | torch.Tensor, protocol: str = PROTOCOL, source: str = ""
) -> Path:
    """Write reference statistics to a .npz, atomically; returns its path.

    Keys: mu (D,) and sigma (D, D) float64; features (N, D) float16 (float32 when a value exceeds float16's
    range) for precision/recall; count; protocol; source (where the features came from); image_sizes (S, 2) and
    skipped_files when feats is a `Features`.
    """
    from vqim.checkpoint import atomic_write

    pool = feats.pool if isinstance(feats, Features) else feats
    if pool.dim() != 2 or pool.shape[0] < 2:
        raise InputError(
            f"reference statistics need at least 2 feature vectors, got shape {tuple(pool.shape)}"
        )
    mu, sigma = feature_stats(pool)
    arrays: dict[str, np.ndarray] = {
        "mu": mu,
        "sigma": sigma,
        "features": _stored(pool).numpy(),
        "count": np.asarray(pool.shape[0], dtype=np.int64),
        "protocol": np.asarray(protocol),
        "source": np.asarray(source),
    }
    if isinstance(feats, Features):
        arrays["image_sizes"] = np.asarray(feats.sizes, dtype=np.int64).reshape(-1, 2)
        arrays["skipped_files"] = np.asarray(len(feats.skipped), dtype=np.int64)

    def _w(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    path = Path(path)
    atomic_write(path, _w)
    return path


def load_reference(path: str | os.PathLike) -> dict[str, Any]:
    """Reference statistics from a .npz (np.load with allow_pickle=False).

    Returns {"mu", "sigma" (float64 arrays), "features" (float32 tensor, or None when absent), "count",
    "protocol" (None when absent), "image_sizes"}. Raises FileNotFoundError for a missing file and InputError
    naming the file for one that is not an .npz, lacks mu/sigma, or holds arrays of the wrong shape.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    how = "write one with `vqim eval-samples --reference FOLDER --save-reference FILE.npz`"
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - not a zip, truncated, object arrays: all "not usable"
        raise InputError(
            f"{path}: not a readable .npz of reference statistics ({type(e).__name__}: {e})"
        ) from e
    missing = [k for k in ("mu", "sigma") if k not in data]
    if missing:
        raise InputError(
            f"{path} lacks {', '.join(missing)} (found: {', '.join(sorted(data)) or 'nothing'}): reference "
            f"statistics hold mu, sigma and, for precision/recall, features; {how}"
        )
    mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InputError(
            f"{path}: mu must be (D,) and sigma (D, D), finite; got {mu.shape} and {sigma.shape}; {how}"
        )
    features = None
    if "features" in data:
        f = data["features"]
        if f.ndim != 2 or f.shape[1] != d or not np.issubdtype(f.dtype, np.floating):
            raise InputError(f"{path}: features must be float (N, {d}), got {f.dtype} {f.shape}; {how}")
        features = torch.from_numpy(f.astype(np.float32))
    count = int(data["count"]) if "count" in data else (None if features is None else features.shape[0])
    sizes = data.get("image_sizes")
    if sizes is not None:
        sizes = [[int(h), int(w)] for h, w in np.asarray(sizes).reshape(-1, 2)]
    return {
        "mu": mu,
        "sigma": sigma,
        "features": features,
        "count": count,
        "protocol": str(data["protocol"]) if "protocol" in data else None,
        "image_sizes": sizes,
    }


def fid_from_stats(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """FID between two (mu, sigma) pairs, by torch-fidelity's `fid_statistics_to_metric` (as rFID)."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    if a[0].shape != b[0].shape:
        raise InputError(
            f"the feature widths differ ({a[0].shape[0]} vs {b[0].shape[0]}): statistics of another network?"
        )
    stats = [{"mu": np.asarray(mu, np.float64), "sigma": np.asarray(s, np.float64)} for mu, s in (a, b)]
    return float(fid_statistics_to_metric(stats[0], stats[1], verbose=False)["frechet_inception_distance"])


def inception_score(logits: torch.Tensor, splits: int = 10) -> dict[str, float | int]:
    """{"inception_score", "inception_score_std", "inception_score_splits"} of logits (N, C), in
    min(splits, N) splits, by torch-fidelity's `isc_features_to_metric`."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    n = max(1, min(splits, logits.shape[0]))
    isc = isc_features_to_metric(logits.double(), splits=n)
    return {
        "inception_score": float(isc["inception_score_mean"]),
        "inception_score_std": float(isc["inception_score_std"]),
        "inception_score_splits": n,
    }


# ---------------------------------------------------------------------------------------------- precision/recall
def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)), clamped at 0."""
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None] - 2 * (a @ b.t())
    return d.clamp_min_(0)


def _kth_radii(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Squared distance of each row of x to its k-th nearest other row (the (k+1)-th smallest, self included)."""
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(0, x.shape[0], batch):
        best = None
        for j in range(0, x.shape[0], batch):
            d = _sq_dist(x[i : i + batch], x[j : j + batch])
            cand = d if best is None else torch.cat([best, d], 1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False, sorted=False).values
        out[i : i + batch] = best.max(1).values
    return out


def _covered(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor, batch: int) -> torch.Tensor:
    """Whether each query lies in the union of the balls (points, squared radii), borders included."""
    hit = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    for i in range(0, queries.shape[0], batch):
        for j in range(0, points.shape[0], batch):
            d = _sq_dist(queries[i : i + batch], points[j : j + batch])
            hit[i : i + batch] |= (d <= radii[j : j + batch][None]).any(1)
    return hit


@torch.no_grad()
def precision_recall(
    real: torch.Tensor,
    fake: torch.Tensor,
    k: int = 3,
    batch: int = 4096,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of feature sets real (N, D) and fake (M, D).

    With r_k(x, S) the distance from x to its k-th nearest neighbour in S \\ {x}:

        precision = 1/M · Σ_j 1[∃ i: ‖fake_j − real_i‖ ≤ r_k(real_i, real)]
        recall    = 1/N · Σ_i 1[∃ j: ‖real_i − fake_j‖ ≤ r_k(fake_j, fake)]

    i.e. precision is the share of generated features inside the union of the real k-NN balls, recall the share
    of real features inside the union of the generated ones (borders included, as the reference code).
    Distances are computed in float32 between features centred on the real mean, in blocks of batch × batch
    (memory O(batch² + (N + M)·D)); the result does not depend on the order of the blocks and is deterministic.

    Args:
        real, fake: feature matrices, at least k + 1 rows each.
        k: neighbourhood size (3 in the paper).
        batch: block side for the pairwise distances.
        device: where to compute (default: real's device).
    """
    if k < 1 or batch < 1:
        raise InputError(f"k and batch must be positive, got k={k}, batch={batch}")
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise InputError(
            f"features must be (N, D) with one D, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    for name, x in (("real", real), ("generated", fake)):
        if x.shape[0] <= k:
            raise InputError(
                f"precision/recall with k={k} need more than {k} {name} features, got {x.shape[0]}"
            )
    dev = torch.device(device) if device is not None else real.device
    centre = real.double().mean(0)
    r = (real.double() - centre).float().to(dev)
    f = (fake.double() - centre).float().to(dev)
    precision = _covered(f, r, _kth_radii(r, k, batch), batch).double().mean()
    recall = _covered(r, f, _kth_radii(f, k, batch), batch).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


# ---------------------------------------------------------------------------------------------- command
@dataclass(kw_only=True)
class EvalSamplesConfig:
    """What `vqim eval-samples` does: FID, Inception Score, precision and recall of generated samples.

    Args:
        samples: folder of generated images (searched recursively; read at their own size).
        reference: the real images: an image folder, or a .npz of reference statistics written by
            --save-reference.
        out: also write metrics.json here.
        save_reference: write the reference folder's statistics (mu, sigma and float16 features) to this .npz,
            for reuse as --reference.
        inception_weights: torch-fidelity InceptionV3 weights (.pth or .safetensors; default: torch hub cache).
        batch_size: images per InceptionV3 forward pass.
        k: neighbourhood size of precision and recall (radius of a feature's ball: distance to its k-th
            nearest neighbour).
        device: cpu, cuda, or auto (cuda when available).
        progress: show a progress bar.
    """

    samples: str
    reference: str
    out: str | None = None
    save_reference: str | None = None
    inception_weights: str | None = None
    batch_size: int = 50
    k: int = 3
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        check_output(self.out)
        check_settings(self, positive=("batch_size", "k"))
        if self.save_reference is not None:
            if not str(self.save_reference).lower().endswith(".npz"):
                raise InputError(f"--save-reference must name a .npz file, got {self.save_reference}")
            if str(self.reference).lower().endswith(".npz"):
                raise InputError("--save-reference needs --reference to be an image folder, not a .npz")


def _load_net(weights: str | None, device: torch.device) -> tuple[FeatureNet | None, str | None]:
    """(InceptionV3, None), or (None, why) when the default weights are missing (an explicit path must exist)."""
    from vqim.fid import INCEPTION_URL, default_inception_path, load_inception

    try:
        return load_inception(weights, device), None
    except (FileNotFoundError, ImportError, ValueError) as e:
        if weights is not None:
            if isinstance(e, ImportError):
                raise InputError(f"FID / Inception Score need torch-fidelity: {e}") from e
            raise
        if isinstance(e, FileNotFoundError):
            return None, (
                f"InceptionV3 weights not found (looked for {default_inception_path()}): download {INCEPTION_URL} "
                f"and pass it with --inception-weights PATH (or put it at {default_inception_path()})"
            )
        return None, str(e)


def evaluate_samples(cfg: EvalSamplesConfig, *, net: FeatureNet | None = None) -> dict[str, Any]:
    """FID and precision/recall of cfg.samples against cfg.reference, Inception Score of the samples.

    Inputs are checked before any network runs. Without InceptionV3 weights at the default place the result is
    {"not_measured": {metric: why}} (as eval-tokenizer reports it); an explicit --inception-weights that is
    missing is an error. `net` replaces InceptionV3 (any module mapping uint8 images to (pool, logits); tests).

    Returns:
        {"fid", "inception_score", "inception_score_std", "inception_score_splits", "precision", "recall", "k",
        "samples" / "reference" (feature counts), "skipped_files" (unreadable files, skipped; listed under
        "skipped"), "sample_image_sizes", "reference_image_sizes", "protocol", and "reference_saved" or
        "not_measured" where they apply}; also written to cfg.out/metrics.json.
    """
    from vqim.checkpoint import resolve_device, write_json

    sample_files = folder_images(cfg.samples)
    ref_path = Path(cfg.reference)
    ref_npz = None
    if ref_path.is_dir():
        ref_files = folder_images(ref_path)
    elif ref_path.is_file() and ref_path.suffix.lower() == ".npz":
        ref_npz = load_reference(ref_path)
    elif not ref_path.exists():
        raise FileNotFoundError(f"reference not found: {ref_path}")
    else:
        raise InputError(f"--reference {ref_path} must be an image folder or a .npz of reference statistics")
    if cfg.save_reference is not None and ref_npz is not None:
        raise InputError("--save-reference needs --reference to be an image folder, not a .npz")
    device = resolve_device(cfg.device)
    protocol = PROTOCOL
    if net is None:
        net, why = _load_net(cfg.inception_weights, device)
        if net is None:
            log.info("not measured: %s (%s)", ", ".join(METRICS), why)
            res: dict[str, Any] = {"not_measured": dict.fromkeys(METRICS, why)}
            if cfg.out:
                write_json(Path(cfg.out) / "metrics.json", res)
            return res
    else:
        protocol = f"{PROTOCOL} [feature network replaced by {type(net).__qualname__}]"
    if isinstance(net, torch.nn.Module):
        net = net.to(device).eval()

    fake = image_features(sample_files, net, cfg.batch_size, device, cfg.progress)
    if fake.pool.shape[0] < 2:
        raise InputError(f"{cfg.samples}: FID needs at least 2 readable images, found {fake.pool.shape[0]}")
    if len(fake.sizes) > 1:
        log.warning("the samples in %s have %d different sizes: %s", cfg.samples, len(fake.sizes), fake.sizes)
    res = {"protocol": protocol, "sample_image_sizes": [list(s) for s in fake.sizes]}
    skipped = list(fake.skipped)
    if ref_npz is None:
        real = image_features(ref_files, net, cfg.batch_size, device, cfg.progress)
        skipped += real.skipped
        if real.pool.shape[0] < 2:
            raise InputError(f"{ref_path}: FID needs at least 2 readable images, found {real.pool.shape[0]}")
        mu, sigma = feature_stats(real.pool)
        ref = {
            "mu": mu,
            "sigma": sigma,
            "features": _stored(real.pool).float(),  # rounded as a saved .npz holds them
            "count": real.pool.shape[0],
            "image_sizes": [list(s) for s in real.sizes],
        }
        if cfg.save_reference is not None:
            res["reference_saved"] = str(save_reference(cfg.save_reference, real, protocol, str(ref_path)))
    else:
        ref = ref_npz
        if ref["protocol"] != protocol:
            log.warning("%s was measured by another protocol: %s", ref_path, ref["protocol"])
            res["reference_protocol"] = ref["protocol"]
    notes: dict[str, str] = {}
    res["fid"] = fid_from_stats((ref["mu"], ref["sigma"]), feature_stats(fake.pool))
    res.update(inception_score(fake.logits))
    res["k"] = cfg.k
    if ref["features"] is None:
        notes["precision"] = notes["recall"] = f"{ref_path} holds no features (only mu and sigma)"
    elif ref["features"].shape[0] <= cfg.k or fake.pool.shape[0] <= cfg.k:
        notes["precision"] = notes["recall"] = f"fewer than k + 1 = {cfg.k + 1} reference or sample features"
    else:
        res.update(precision_recall(ref["features"], fake.pool, cfg.k, device=device))
    n = fake.pool.shape[0]
    if n < fake.pool.shape[1]:
        log.warning("FID of %d samples (< %d feature dimensions) is biased upward; papers use 50,000", n,
                    fake.pool.shape[1])  # fmt: skip
    res.update(
        {
            "samples": n,
            "reference": ref["count"],
            "reference_image_sizes": ref["image_sizes"],
            "skipped_files": len(skipped),
        }
    )
    if skipped:
        res["skipped"] = skipped
    if notes:
        res["not_measured"] = notes
    if cfg.out:
        write_json(Path(cfg.out) / "metrics.json", res)
    return res


__all__ = [
    "PROTOCOL",
    "Features",
    "folder_images",
    "image_features",
    "feature_stats",
    "save_reference",
    "load_reference",
    "fid_from_stats",
    "inception_score",
    "precision_recall",
    "EvalSamplesConfig",
    "evaluate_samples",
]
