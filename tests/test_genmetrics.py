"""Sample metrics (vqim.genmetrics): FID / IS / precision-recall with a stand-in feature network (no Inception
weights needed), reference statistics in .npz, skipped files, and the report when the weights are missing."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vqim.fid
from vqim.errors import InputError
from vqim.genmetrics import (
    EvalSamplesConfig,
    evaluate_samples,
    folder_images,
    image_features,
    load_reference,
    precision_recall,
)

N_IMAGES = 24


class StandIn(torch.nn.Module):
    """Like torch-fidelity's extractor: uint8 images (B, 3, H, W) of any size → (pool (B, 64), logits (B, 10)).

    Deterministic: 4×4 average-pooled pixels through fixed random projections (64 wide, not 2048, so that FID's
    eigen-decomposition stays fast)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(48, 64, generator=g))
        self.register_buffer("v", torch.randn(64, 10, generator=g))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.dtype == torch.uint8
        pool = torch.tanh((F.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1) - 0.5) @ self.w / 4)
        return pool, pool @ self.v


def _blocks(seed: int, n: int = N_IMAGES) -> np.ndarray:
    """n images of 4×4 random colour blocks, (n, 4, 4, 3) uint8."""
    return np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)


def _write(folder, blocks: np.ndarray, side: int, shift: int = 0) -> None:
    """PNGs of the blocks upscaled (nearest) to side × side, optionally brightened by shift."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, b in enumerate(blocks):
        arr = np.clip(b.astype(int) + shift, 0, 255).astype(np.uint8)
        Image.fromarray(arr).resize((side, side), Image.NEAREST).save(folder / f"{i:03d}.png")


def _cfg(samples, reference, **kw) -> EvalSamplesConfig:
    return EvalSamplesConfig(
        samples=str(samples), reference=str(reference), device="cpu", progress=False, **kw
    )


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("genmetrics")
    blocks = _blocks(0)
    _write(d / "samples", blocks, 16)
    _write(d / "real", blocks, 32)  # the same images at another size: the network pools them alike
    _write(d / "shifted", blocks, 16, shift=60)
    return d


def test_identical_sets_shifted_set_and_saved_reference(sets, tmp_path):
    """Identical images: FID ≈ 0, precision = recall = 1. A brightened set: a clearly larger FID. The reference
    folder's statistics saved to .npz and reused give the same numbers; metrics.json is written."""
    npz = tmp_path / "ref.npz"
    same = evaluate_samples(
        _cfg(sets / "samples", sets / "real", save_reference=str(npz), out=str(tmp_path / "out")),
        net=StandIn(),
    )
    assert abs(same["fid"]) < 1e-3
    assert same["precision"] == same["recall"] == 1.0
    assert same["samples"] == same["reference"] == N_IMAGES and same["skipped_files"] == 0
    assert same["sample_image_sizes"] == [[16, 16]] and same["reference_image_sizes"] == [[32, 32]]
    assert same["inception_score_splits"] == 10 and same["inception_score"] >= 1.0
    assert same["reference_saved"] == str(npz)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["fid"] == pytest.approx(same["fid"])

    ref = load_reference(npz)
    assert ref["count"] == N_IMAGES and ref["mu"].dtype == np.float64 and ref["sigma"].shape == (64, 64)
    with np.load(npz) as z:
        assert z["features"].dtype == np.float16
    again = evaluate_samples(_cfg(sets / "samples", npz), net=StandIn())
    for key in ("fid", "precision", "recall", "inception_score", "samples", "reference"):
        assert again[key] == same[key], key
    assert "reference_protocol" not in again  # saved with the same protocol and network

    shifted = evaluate_samples(_cfg(sets / "shifted", npz), net=StandIn())
    assert shifted["fid"] > 1.0 > 1000 * abs(same["fid"])  # (24 points in 64-d: k-NN balls too wide for PR)


def test_a_reference_with_only_mu_and_sigma_gives_fid_but_not_precision_recall(sets, tmp_path):
    npz = tmp_path / "ref.npz"
    evaluate_samples(_cfg(sets / "samples", sets / "real", save_reference=str(npz)), net=StandIn())
    with np.load(npz) as z:
        np.savez(tmp_path / "stats.npz", mu=z["mu"], sigma=z["sigma"])  # as pytorch-fid writes them
    res = evaluate_samples(_cfg(sets / "samples", tmp_path / "stats.npz"), net=StandIn())
    assert abs(res["fid"]) < 1e-3 and "precision" not in res
    assert "no features" in res["not_measured"]["precision"] and res["reference_protocol"] is None


def test_corrupt_files_are_skipped_and_counted(sets, tmp_path):
    samples = tmp_path / "samples"
    _write(samples / "sub", _blocks(0), 16)  # found recursively
    (samples / "broken.png").write_bytes(b"not an image")
    good = (samples / "sub" / "000.png").read_bytes()
    (samples / "truncated.png").write_bytes(good[: len(good) // 2])
    assert len(folder_images(samples)) == N_IMAGES + 2
    res = evaluate_samples(_cfg(samples, sets / "real", batch_size=5), net=StandIn())
    assert res["skipped_files"] == 2 and res["samples"] == N_IMAGES
    assert sorted(res["skipped"]) == sorted([str(samples / "broken.png"), str(samples / "truncated.png")])
    assert abs(res["fid"]) < 1e-3


def test_tensor_batches_are_quantised_like_the_png_files(sets):
    """Float images in [0, 1] go through vqim.fid.to_uint8: the same features as their PNG files."""
    files = folder_images(sets / "samples")
    x = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) for f in files]).float()
    x = x / 255 + 0.4 / 255  # off the grid by less than half a step: rounds back to the file's values
    from_files = image_features(files, StandIn(), batch_size=7)
    from_tensors = image_features([x[:14], x[14:]], StandIn(), batch_size=7)  # batches of 7, 7 | 7, 3 alike
    assert torch.equal(from_files.pool, from_tensors.pool) and torch.equal(
        from_files.logits, from_tensors.logits
    )
    assert from_files.pool.shape == (N_IMAGES, 64) and from_files.logits.shape == (N_IMAGES, 10)


def test_missing_inception_weights_are_reported_not_raised(sets, tmp_path, monkeypatch):
    missing = tmp_path / "hub" / vqim.fid.INCEPTION_FILE
    monkeypatch.setattr(vqim.fid, "default_inception_path", lambda: missing)
    res = evaluate_samples(_cfg(sets / "samples", sets / "real", out=str(tmp_path / "out")))
    assert set(res) == {"not_measured"}
    assert set(res["not_measured"]) == {"fid", "inception_score", "precision", "recall"}
    why = res["not_measured"]["fid"]
    assert str(missing) in why and "--inception-weights" in why
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == res
    with pytest.raises(FileNotFoundError, match="nope.pth"):  # a path given explicitly must exist
        evaluate_samples(_cfg(sets / "samples", sets / "real", inception_weights=str(tmp_path / "nope.pth")))


def test_bad_reference_files_and_settings_are_refused(sets, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, features=np.zeros((5, 64), np.float16))
    with pytest.raises(InputError, match=r"bad\.npz lacks mu, sigma"):
        load_reference(bad)
    with pytest.raises(InputError, match=r"bad\.npz"):  # checked before any network is loaded
        evaluate_samples(_cfg(sets / "samples", bad))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"junk")
    with pytest.raises(InputError, match=r"junk\.npz"):
        load_reference(junk)
    with pytest.raises(InputError, match="--save-reference"):
        _cfg(sets / "samples", bad, save_reference=str(tmp_path / "x.npz"))
    with pytest.raises(InputError, match="--k"):
        _cfg(sets / "samples", sets / "real", k=0)
    parser = argparse.ArgumentParser()
    from vqim.options import add_options

    add_options(parser, EvalSamplesConfig)  # every field documented: a CLI option with help
    assert parser.parse_args(["--samples", "S", "--reference", "R"]).k == 3


# ---------------------------------------------------------------------------------------------- precision/recall
def _brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The paper's definition, directly: float64 distances, k-th nearest other point as the radius."""

    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def covered(q, p, r):
        d = np.sqrt(((q[:, None] - p[None]) ** 2).sum(-1))
        return (d <= r[None]).any(1).mean()

    return float(covered(fake, real, radii(real))), float(covered(real, fake, radii(fake)))


def test_precision_recall_of_identical_and_distant_clouds():
    real = torch.from_numpy(np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32))
    assert precision_recall(real, real.clone()) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(real, real + 100) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_of_a_subset_on_a_line_by_hand():
    """Real: the points 0..99 on a line; fake: 0..49. With k = 3 the real radii are 2 (3 at the ends), so every
    fake point is covered: precision 1. Fake radii are 2, and 3 at 49, whose ball reaches 52: the real points
    0..52 are covered, recall 53/100. Any block size gives the same (exact) answer."""
    real = torch.zeros(100, 2)
    real[:, 0] = torch.arange(100.0)
    for batch in (7, 4096):
        assert precision_recall(real, real[:50], k=3, batch=batch) == {"precision": 1.0, "recall": 0.53}
    assert precision_recall(real, real[:50], k=1)["recall"] == 0.51  # radii 1: reaches 50


def test_precision_recall_of_a_half_gaussian_matches_the_definition():
    """Fake = the real points with x < 0: precision 1, recall between ½ and 1, as the definition computes it."""
    real = np.random.default_rng(1).normal(size=(400, 2))
    fake = real[real[:, 0] < 0]
    want = _brute_force(real, fake, 3)
    assert want[0] == 1.0 and 0.5 < want[1] < 0.7
    for batch in (33, 4096):
        got = precision_recall(
            torch.from_numpy(real).float(), torch.from_numpy(fake).float(), k=3, batch=batch
        )
        assert (got["precision"], got["recall"]) == pytest.approx(want, abs=1e-12)
    with pytest.raises(InputError, match="more than 3"):
        precision_recall(torch.zeros(3, 2), torch.zeros(10, 2))


def test_eval_samples_command(sets, tmp_path, monkeypatch, capsys):
    from vqim.cli import main

    monkeypatch.setattr(vqim.fid, "default_inception_path", lambda: tmp_path / "none.pth")
    main(
        [
            "eval-samples",
            "--samples",
            str(sets / "samples"),
            "--reference",
            str(sets / "real"),
            "--no-progress",
        ]
    )
    res = json.loads(capsys.readouterr().out)
    assert set(res["not_measured"]) == {"fid", "inception_score", "precision", "recall"}
    with pytest.raises(SystemExit) as e:
        main(["eval-samples", "--samples", str(sets / "samples"), "--reference", str(tmp_path / "missing")])
    assert e.value.code == 2 and "missing" in capsys.readouterr().err
