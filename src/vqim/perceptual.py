"""LPIPS perceptual distance (Zhang et al. 2018) on VGG16 features, with explicitly loaded weights.

    d(x, y) = Σ_l mean_{h,w} ‖ w_l ⊙ (φ̂_l(x) − φ̂_l(y)) ‖²

φ_l are VGG16 activations at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of inputs shifted and scaled as LPIPS
does; φ̂_l is φ_l normalised to unit length over channels; w_l are LPIPS's learned non-negative per-channel
weights (1×1 convolutions without bias).

Two weight files are needed and nothing is downloaded at run time:
- the VGG16 ImageNet weights, as torchvision saves them (`vgg16-397923af.pth` in torch's hub cache) or given
  by path (`--vgg-weights`; .pth read with weights_only=True, or .safetensors);
- the LPIPS linear heads (`weights/v0.1/vgg.pth` inside the `lpips` package) or given by path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from vqim.errors import InputError

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
# Indices in torchvision's vgg16().features after which LPIPS taps relu1_2 … relu5_3.
_TAPS = (3, 8, 15, 22, 29)
_CHANNELS = (64, 128, 256, 512, 512)
_VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def _load_state(path: Path, flag: str) -> dict[str, torch.Tensor]:
    from vqim.checkpoint import load_weights

    return load_weights(path, flag)  # tensors only: never unpickles objects


def default_vgg_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def default_lin_path() -> Path | None:
    try:
        import lpips
    except ImportError:
        return None
    return Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"


def _missing(what: str, path: Path | None, how: str) -> FileNotFoundError:
    where = f"looked for {path}" if path is not None else "no default location"
    return FileNotFoundError(
        f"{what} not found ({where}). {how} Or train without the perceptual term: --perceptual-weight 0 "
        "(the paper's setting for tokenizers used in linear probes)."
    )


class LPIPS(nn.Module):
    """LPIPS distance with a frozen VGG16 backbone.

    Args:
        vgg_weights: path of VGG16 weights in torchvision's layout (`features.N.weight` …); default: torch's
            hub cache (`~/.cache/torch/hub/checkpoints/vgg16-397923af.pth`).
        lin_weights: path of the LPIPS linear heads (`lin0.model.1.weight` …); default: the `lpips` package's.
    """

    def __init__(
        self, vgg_weights: str | os.PathLike | None = None, lin_weights: str | os.PathLike | None = None
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.features = nn.Sequential(*layers[: _TAPS[-1] + 1])
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self._load(vgg_weights, lin_weights)
        self.requires_grad_(False)
        self.eval()

    def _load(self, vgg_weights: str | os.PathLike | None, lin_weights: str | os.PathLike | None) -> None:
        vgg = Path(vgg_weights) if vgg_weights is not None else default_vgg_path()
        if not vgg.is_file():
            raise _missing(
                "VGG16 weights for the perceptual loss",
                vgg,
                f"Download {VGG16_URL} (or run torchvision.models.vgg16(weights='IMAGENET1K_V1') once with internet) "
                "and pass it with --vgg-weights PATH.",
            )
        state = _load_state(vgg, "--vgg-weights")
        feats = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        wanted = {k for k in self.features.state_dict()}
        if not wanted <= set(feats):
            raise InputError(
                f"{vgg} does not hold VGG16 feature weights (missing {sorted(wanted - set(feats))[:3]})"
            )
        self.features.load_state_dict({k: feats[k] for k in wanted})
        lin = Path(lin_weights) if lin_weights is not None else default_lin_path()
        if lin is None or not lin.is_file():
            raise _missing(
                "LPIPS linear-head weights (vgg.pth)",
                lin,
                "Install the `lpips` package (pip install lpips), which ships them, or pass their path.",
            )
        lstate = _load_state(lin, "--lpips-weights")
        for i, conv in enumerate(self.lins):
            key = f"lin{i}.model.1.weight"
            if key not in lstate:
                raise InputError(f"{lin} does not hold LPIPS heads (missing {key})")
            conv.weight.data.copy_(lstate[key])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance per image, (B,), between images x and y in [0, 1], (B, 3, H, W)."""
        h = torch.cat([x, y]).float() * 2 - 1
        h = (h - self.shift) / self.scale
        b = x.shape[0]
        total = torch.zeros(b, device=x.device)
        k = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
                d = (f[:b] - f[b:]).pow(2)
                total = total + self.lins[k](d).mean((1, 2, 3))
                k += 1
        return total


def perceptual_loss(model: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean LPIPS distance over the batch (a scalar), for the training objective."""
    return model(x, y).mean()


__all__ = ["LPIPS", "perceptual_loss", "default_vgg_path", "default_lin_path"]
