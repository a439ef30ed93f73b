"""Classifier rejection sampling: the kept share is the acceptance rate, the kept samples are those the
classifier finds most like their class, and metrics are reported before and after."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from vqim import InputError
from vqim.cli import main
from vqim.data import build_dataset
from vqim.rejection import RejectConfig, reject, threshold_for

pytestmark = pytest.mark.usefixtures("one_thread")


def _save(folder: Path, images: torch.Tensor, labels: list[int]) -> None:
    folder.mkdir(parents=True)
    for i, (im, c) in enumerate(zip(images, labels, strict=True)):
        arr = (im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"class{c}_{i:04d}.png")


def test_digits_rejection_keeps_the_samples_that_look_like_their_class(tmp_path, capsys):
    ds = build_dataset("digits", 16, train=False)
    items = [ds[i] for i in range(80)]
    images = torch.stack([it["image"] for it in items])
    truth = [it["label"] for it in items]
    # Half the "samples" were drawn for their true class, half for another one.
    labels = [c if i % 2 == 0 else (c + 1) % 10 for i, c in enumerate(truth)]
    _save(tmp_path / "s", images, labels)
    main(["reject", "--samples", str(tmp_path / "s"), "--classifier", "digits", "--accept-rate", "0.5"])
    rep = json.loads(capsys.readouterr().out)
    assert rep["samples"] == 80 and rep["accepted"] == 40 and rep["accept_rate"] == 0.5
    assert 0 < rep["threshold"] < 1 and rep["mean_score_accepted"] > rep["mean_score"]
    kept = sorted(Path(rep["out"]).glob("class*.png"))
    assert len(kept) == 40 and Path(rep["out"]) == tmp_path / "s_accepted"
    right = sum(int(p.stem.split("_")[1]) % 2 == 0 for p in kept)
    assert right >= 36  # the classifier is ~95% accurate on real digits
    assert json.loads((tmp_path / "s_accepted" / "rejection.json").read_text()) == rep
    with pytest.raises(InputError, match="already exists"):
        reject(RejectConfig(samples=str(tmp_path / "s"), classifier="digits"))


class _Features(torch.nn.Module):
    """A stand-in for InceptionV3: grey levels pooled to 4×4 as features, and 10 logits."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = torch.nn.functional.adaptive_avg_pool2d(x.float().mean(1, keepdim=True) / 255, 4).flatten(1)
        return pool, pool[:, :10] * 3


def test_a_torchvision_classifier_file_and_metrics_before_and_after(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=3).eval()
    save_file(model.state_dict(), tmp_path / "clf.safetensors")
    images = torch.rand(12, 3, 24, 24)
    labels = [i % 3 for i in range(12)]
    _save(tmp_path / "s", images, labels)
    _save(tmp_path / "ref", torch.rand(12, 3, 24, 24), labels)
    rep = reject(RejectConfig(samples=str(tmp_path / "s"), classifier=str(tmp_path / "clf.safetensors"),
                              arch="resnet18", num_classes=3, image_size=32, accept_rate=0.5,
                              reference=str(tmp_path / "ref"), device="cpu"), net=_Features())  # fmt: skip
    assert rep["accepted"] == 6 and rep["accept_rate"] == 0.5
    # The kept ones are the six best by the classifier's probability of their class, computed here directly.
    x = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in
                     sorted((tmp_path / "s").glob("*.png"), key=lambda q: int(q.stem.split("_")[1]))]).float() / 255  # fmt: skip
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        p = model((x - mean) / std).softmax(-1)[torch.arange(12), torch.tensor(labels)].numpy()
    best = sorted(np.argsort(-p)[:6].tolist())
    kept = sorted(int(q.stem.split("_")[1]) for q in Path(rep["out"]).glob("class*.png"))
    assert kept == best
    assert rep["metrics_before"]["samples"] == 12 and rep["metrics_after"]["samples"] == 6
    assert np.isfinite(rep["metrics_before"]["fid"]) and np.isfinite(rep["metrics_after"]["fid"])
    with pytest.raises(
        InputError,
        match=r"does not fit --arch resnet50 with 3 classes \(\d+ tensors missing, 0 unexpected, \d+ of another shape",
    ):
        reject(RejectConfig(samples=str(tmp_path / "s"), classifier=str(tmp_path / "clf.safetensors"),
                            arch="resnet50", num_classes=3, out=str(tmp_path / "o2")))  # fmt: skip


def test_threshold_and_bad_inputs(tmp_path):
    scores = np.array([0.9, 0.1, 0.5, 0.7])
    assert (
        threshold_for(scores, 0.5) == 0.7
        and threshold_for(scores, 1.0) == 0.1
        and threshold_for(scores, 0.01) == 0.9
    )
    (tmp_path / "u").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "u" / "0000.png")  # unconditional samples carry no class
    with pytest.raises(InputError, match="no class-conditional samples"):
        reject(RejectConfig(samples=str(tmp_path / "u"), classifier="digits"))
    with pytest.raises(InputError, match="--accept-rate"):
        RejectConfig(samples="s", classifier="digits", accept_rate=0)
