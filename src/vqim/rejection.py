"""Classifier rejection sampling (the ViT-VQGAN / VIM paper's "acceptance rate" results): `vqim reject`.

A classifier of real images scores each class-conditional sample with the probability of the class it was
sampled for, p(y_i | x_i). The samples scoring at or above a threshold are kept, the threshold being the score of
the ⌈rate·N⌉-th best sample, so that the share kept is the requested acceptance rate (more only where scores
tie at the threshold). The kept samples are linked (or copied) into their own folder, and `rejection.json`
reports the threshold, the rate achieved, the kept count per class and, with a reference, the sample metrics
(`vqim.genmetrics`: FID, IS, precision, recall) before and after.

The classifier is any torchvision classification model whose weights the user gives as a file (the paper uses a
ResNet-101 on ImageNet: `--arch resnet101 --classifier resnet101.safetensors`; images are resized to
`--image-size` and normalised with the ImageNet mean and std), or, for the built-in digits, `digits`: the
classifier vqim fits on real digit images (`vqim.classifier`).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqim.errors import InputError, check_settings

SAMPLE_NAME = re.compile(r"^class(\d+)_(\d+)\.png$")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(kw_only=True)
class RejectConfig:
    """What `vqim reject` does.

    Args:
        samples: a folder of class-conditional samples written by `vqim sample` (file names carry the class).
        classifier: "digits" (vqim's classifier of real digits) or a weight file (.safetensors, or a .pth of
            tensors) of the torchvision model --arch.
        arch: torchvision classification model of --classifier's weights (the paper: resnet101).
        num_classes: output classes of --classifier's model.
        image_size: side the images are resized to for --classifier (ImageNet mean/std normalisation).
        accept_rate: share of the samples to keep, in (0, 1] (the paper reports e.g. 0.5).
        out: folder for the kept samples and rejection.json (default: SAMPLES_accepted, beside SAMPLES).
        reference: with a reference (image folder or .npz, see `vqim eval-samples`), FID, IS, precision and
            recall of all samples and of the kept ones.
        inception_weights: InceptionV3 weights for the metrics (see `vqim eval-samples`).
        batch_size: images scored at once.
        device: cpu, cuda, or auto (cuda when available).
    """

    samples: str
    classifier: str
    arch: str = "resnet101"
    num_classes: int = 1000
    image_size: int = 224
    accept_rate: float = 0.5
    out: str | None = None
    reference: str | None = None
    inception_weights: str | None = None
    batch_size: int = 64
    device: str = "auto"

    def __post_init__(self) -> None:
        check_settings(self, positive=("num_classes", "image_size", "batch_size"))
        if not 0 < self.accept_rate <= 1:
            raise InputError(f"--accept-rate must be in (0, 1], got {self.accept_rate}")


def class_samples(folder: str | os.PathLike) -> tuple[list[Path], np.ndarray]:
    """The samples of a `vqim sample` folder and the class each was sampled for (from its file name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"samples folder not found: {folder}")
    found = sorted(
        (int(m.group(2)), int(m.group(1)), p) for p in folder.iterdir() if (m := SAMPLE_NAME.match(p.name))
    )
    if not found:
        raise InputError(
            f"{folder} holds no class-conditional samples (classC_NNNN.png, written by `vqim sample` with a "
            f"class-conditional prior): rejection needs the class each sample was drawn for"
        )
    return [p for _, _, p in found], np.array([c for _, c, _ in found], dtype=np.int64)


def _read(paths: list[Path]) -> torch.Tensor:
    from vqim.data import load_rgb

    arrays = [np.array(load_rgb(p)) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def torchvision_classifier(path: str, arch: str, num_classes: int, device: Any) -> torch.nn.Module:
    """A torchvision classification model with the weights in `path` (read without unpickling), in eval mode."""
    import torchvision

    from vqim.checkpoint import load_weights

    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except ValueError as e:
        raise InputError(f"--arch {arch!r}: not a torchvision model ({e})") from None
    state = load_weights(path, "--classifier")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    shapes = sorted(k for k in want if k in state and tuple(state[k].shape) != want[k])
    if missing or extra or shapes:
        example = (missing or extra or shapes)[0]
        raise InputError(
            f"--classifier {path} does not fit --arch {arch} with {num_classes} classes ({len(missing)} tensors "
            f"missing, {len(extra)} unexpected, {len(shapes)} of another shape, e.g. {example}): give the --arch and "
            f"--num-classes the weights were trained with"
        )
    model.load_state_dict(state)
    return model.to(device).eval()


@torch.no_grad()
def class_probabilities(cfg: RejectConfig, paths: list[Path], labels: np.ndarray, device: Any) -> np.ndarray:
    """p(labels[i] | image i) from the classifier cfg names, for every sample."""
    import torch.nn.functional as F

    if cfg.classifier == "digits":
        from vqim.classifier import digits_classifier

        first = _read(paths[:1])
        clf = digits_classifier(first.shape[-1])
        probs = np.concatenate([clf.probabilities(_read(paths[i : i + cfg.batch_size]))
                                for i in range(0, len(paths), cfg.batch_size)])  # fmt: skip
        classes = list(clf.classes)
    else:
        model = torchvision_classifier(cfg.classifier, cfg.arch, cfg.num_classes, device)
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        chunks = []
        for i in range(0, len(paths), cfg.batch_size):
            x = _read(paths[i : i + cfg.batch_size]).to(device)
            x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True)
            chunks.append(model((x - mean) / std).float().softmax(-1).cpu().numpy())
        probs = np.concatenate(chunks)
        classes = list(range(probs.shape[1]))
    index = {c: k for k, c in enumerate(classes)}
    unknown = sorted({int(c) for c in labels if int(c) not in index})
    if unknown:
        raise InputError(f"the classifier knows no class {unknown[:5]} of the samples in {cfg.samples}")
    return probs[np.arange(len(labels)), [index[int(c)] for c in labels]]


def threshold_for(scores: np.ndarray, rate: float) -> float:
    """The score of the ⌈rate·N⌉-th best sample: keeping scores >= it keeps the share `rate` (ties: a little more)."""
    k = max(1, math.ceil(rate * len(scores) - 1e-9))
    return float(np.sort(scores)[::-1][k - 1])


def _metrics(cfg: RejectConfig, folder: str | os.PathLike, net: Any) -> dict[str, Any]:
    from vqim.genmetrics import EvalSamplesConfig, evaluate_samples

    mcfg = EvalSamplesConfig(samples=str(folder), reference=cfg.reference, inception_weights=cfg.inception_weights,
                             device=cfg.device, progress=False)  # fmt: skip
    return evaluate_samples(mcfg, net=net)


def reject(cfg: RejectConfig, *, net: Any = None) -> dict[str, Any]:
    """Score, threshold and keep; returns the report (also written to OUT/rejection.json). `net` replaces
    InceptionV3 in the metrics (tests)."""
    from vqim.checkpoint import resolve_device, write_json

    paths, labels = class_samples(cfg.samples)
    src = Path(cfg.samples)
    out = Path(cfg.out) if cfg.out is not None else src.with_name(src.name + "_accepted")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} already exists and is not an empty folder: choose another --out")
    device = resolve_device(cfg.device)
    scores = class_probabilities(cfg, paths, labels, device)
    threshold = threshold_for(scores, cfg.accept_rate)
    keep = scores >= threshold
    metrics: dict[str, Any] = {}
    if cfg.reference is not None:
        metrics["metrics_before"] = _metrics(cfg, cfg.samples, net)
    out.mkdir(parents=True, exist_ok=True)
    for p in np.asarray(paths, dtype=object)[keep]:
        try:
            os.link(p, out / p.name)
        except OSError:  # another file system: copy
            shutil.copy2(p, out / p.name)
    report: dict[str, Any] = {
        "samples": len(paths),
        "accepted": int(keep.sum()),
        "accept_rate_requested": cfg.accept_rate,
        "accept_rate": float(keep.mean()),
        "threshold": threshold,
        "mean_score": float(scores.mean()),
        "mean_score_accepted": float(scores[keep].mean()),
        "accepted_per_class": {int(c): int((keep & (labels == c)).sum()) for c in np.unique(labels)},
        "classifier": cfg.classifier if cfg.classifier == "digits" else f"{cfg.arch}: {cfg.classifier}",
        "out": str(out),
    }
    if cfg.reference is not None:
        report.update(metrics, metrics_after=_metrics(cfg, out, net))
    write_json(out / "rejection.json", report)
    return report


__all__ = ["RejectConfig", "reject", "class_samples", "threshold_for", "torchvision_classifier"]
