"""rFID and Inception Score with torch-fidelity's InceptionV3, on weights read from a local file.

The network, its TensorFlow-compatible resize and the metric formulas are torch-fidelity's (the same
InceptionV3 port as the FID/IS reference code). What vqim adds is the loading: nothing is downloaded at run time,
and a user's weight file is never unpickled.

- The weights are `weights-inception-2015-12-05-6726825d.pth` (torch-fidelity's conversion of the TF graph), read
  from torch's hub cache (`~/.cache/torch/hub/checkpoints/`) or from `--inception-weights PATH` (.pth is read with
  weights_only=True, or .safetensors).
- torch-fidelity itself reads weight files with full unpickling; vqim hands it only a file it wrote itself from the
  validated tensors.

Protocol (also in the README): images in [0, 1] are quantised to uint8 as a PNG would store them; InceptionV3
resizes them to 299×299; FID uses the 2048-d pool features of the real images and the reconstructions of the same
images (rFID), IS uses the reconstructions' 1008-way logits in 10 splits.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from vqim.errors import InputError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def default_inception_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def _read_state(path: Path, flag: str = "--inception-weights") -> dict[str, torch.Tensor]:
    from vqim.checkpoint import load_weights

    return load_weights(path, flag)  # tensors only: never unpickles objects


def load_inception(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """torch-fidelity's InceptionV3 feature extractor (features "2048" and "logits_unbiased"), frozen.

    Args:
        path: weight file; None = torch's hub cache.
        device: where to put it.

    Raises:
        FileNotFoundError: the weights are not there (the message says which file, where, and how to get it).
        ImportError: torch-fidelity is not installed.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError("rFID and IS need torch-fidelity: pip install torch-fidelity") from e
    p = Path(path) if path is not None else default_inception_path()
    if not p.is_file():
        raise FileNotFoundError(
            f"InceptionV3 weights for rFID/IS not found (looked for {p}). Download {INCEPTION_URL} and pass it with "
            f"--inception-weights PATH (or put it at {default_inception_path()}); or leave rFID/IS out with --fid off."
        )
    state = _read_state(p)
    if (
        not isinstance(state, dict)
        or not all(isinstance(v, torch.Tensor) for v in state.values())
        or "fc.weight" not in state
        or "Mixed_7c.branch_pool.conv.weight" not in state
    ):
        raise InputError(
            f"{p} does not hold torch-fidelity's InceptionV3 weights (a dict of tensors with fc.weight …)"
        )
    with tempfile.TemporaryDirectory(prefix="vqim-inception-") as tmp:
        clean = Path(tmp) / "inception.pth"
        # Only tensors we validated, in a file we wrote: torch-fidelity reads it with full unpickling.
        torch.save({k: v.contiguous() for k, v in state.items()}, clean)
        try:
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], str(clean))
        except RuntimeError as e:  # missing / unexpected keys or wrong shapes
            raise InputError(f"{p} does not match torch-fidelity's InceptionV3: {e}") from None
    return net.to(device).eval().requires_grad_(False)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (float) to uint8 as PNG stores them: round(255·x)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


class InceptionMetrics:
    """Streams real/reconstructed image batches through InceptionV3; `compute()` gives rFID and IS.

    Args:
        net: from `load_inception`.
        is_splits: Inception Score splits (10, as is standard).
    """

    def __init__(self, net: torch.nn.Module, is_splits: int = 10) -> None:
        from vqim.metrics import FeatureStats

        self.net = net
        self.is_splits = is_splits
        self.real = FeatureStats(2048)
        self.fake = FeatureStats(2048)
        self.logits: list[torch.Tensor] = []

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = next(self.net.parameters()).device
        pool, logits = self.net(to_uint8(images).to(dev))
        return pool, logits

    def update(self, real: torch.Tensor, reconstruction: torch.Tensor) -> None:
        """Add a batch of real images and their reconstructions, both (B, 3, H, W) in [0, 1]."""
        pool, _ = self.features(real)
        self.real.update(pool)
        pool, logits = self.features(reconstruction)
        self.fake.update(pool)
        self.logits.append(logits.double().cpu())

    def compute(self) -> dict[str, float]:
        """{"rfid", "inception_score", "inception_score_std", "inception_score_splits"}, torch-fidelity's formulas."""
        from torch_fidelity.metric_fid import fid_statistics_to_metric
        from torch_fidelity.metric_isc import isc_features_to_metric

        stats = []
        for s in (self.real, self.fake):
            mu, cov = s.mean_cov()
            stats.append({"mu": mu.numpy(), "sigma": cov.numpy()})
        fid = fid_statistics_to_metric(stats[0], stats[1], verbose=False)["frechet_inception_distance"]
        logits = torch.cat(self.logits)
        # Fewer images than splits would leave empty splits: use at most one split per image, and say so (a
        # split of one image scores exactly 1).
        splits = max(1, min(self.is_splits, logits.shape[0]))
        isc = isc_features_to_metric(logits, splits=splits)
        return {
            "rfid": float(fid),
            "inception_score": float(isc["inception_score_mean"]),
            "inception_score_std": float(isc["inception_score_std"]),
            "inception_score_splits": splits,
        }


__all__ = ["load_inception", "InceptionMetrics", "default_inception_path", "INCEPTION_URL", "to_uint8"]
