"""Reconstruction and distribution metrics against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from vqim.metrics import CodebookStats, FeatureStats, frechet_distance, psnr


def _scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("shift", [0.0, 0.5, 3.0])
def test_frechet_distance_matches_scipy(shift):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(size=(400, 16)) * 1.3 + shift
    sa, sb = FeatureStats(16), FeatureStats(16)
    for chunk in np.array_split(a, 7):  # streamed in chunks, like an evaluation loop
        sa.update(torch.from_numpy(chunk).float())
    sb.update(torch.from_numpy(b).float())
    got = frechet_distance(*sa.mean_cov(), *sb.mean_cov())
    assert got == pytest.approx(
        _scipy_fd(a.astype(np.float32).astype(np.float64), b.astype(np.float32)), rel=1e-4
    )


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = torch.randn(300, 8)
    s = FeatureStats(8)
    s.update(x)
    assert abs(frechet_distance(*s.mean_cov(), *s.mean_cov())) < 1e-8
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(8).mean_cov()


def test_psnr_and_usage_by_hand():
    x = torch.zeros(1, 3, 4, 4)
    y = torch.full((1, 3, 4, 4), 0.1)
    assert float(psnr(y, x)[0]) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01 → 20 dB
    stats = CodebookStats(codebook_size=8, chunk=2)
    stats.update(torch.tensor([[[0, 1], [1, 1]], [[2, 2], [2, 3]], [[7, 7], [7, 7]]]))
    s = stats.summary()
    assert s["codes_used"] == 5 and s["usage"] == 5 / 8
    assert s["usage_per_2"] == pytest.approx(4 / 8)  # first chunk of 2 images uses codes 0-3
