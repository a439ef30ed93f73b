"""Reconstruction metrics and feature statistics against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vqim.metrics import CodebookStats, FeatureStats, psnr


def test_feature_stats_stream_the_mean_and_unbiased_covariance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16)) + 3.0  # correlated, far from zero mean
    s = FeatureStats(16)
    for chunk in np.array_split(a, 7):  # streamed in chunks of unequal size, like an evaluation loop
        s.update(torch.from_numpy(chunk))
    mu, cov = s.mean_cov()
    assert s.n == 500
    np.testing.assert_allclose(mu.numpy(), a.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(cov.numpy(), np.cov(a, rowvar=False), rtol=1e-8, atol=1e-8)  # n − 1, not n
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
