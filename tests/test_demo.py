"""The demo pipeline: a fast run with few steps checks every artefact; the full recipe is a slow test."""

from __future__ import annotations

import json

import pytest

from vqim.demo import run_demo


def test_demo_pipeline_fast(tmp_path):
    m = run_demo(tmp_path / "demo", steps=30, prior_steps=10, progress=False)
    out = tmp_path / "demo"
    for f in ("index.html", "metrics.json", "reconstructions.png", "usage_histogram.png", "samples.png"):
        assert (out / f).is_file(), f
    assert (out / "tokenizer" / "model.safetensors").is_file() and (
        out / "prior" / "model.safetensors"
    ).is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["tokenizer"]["images"] == 64 and 0 < saved["tokenizer"]["usage"] <= 1
    assert saved["prior"]["test_bits_per_token"] < saved["prior"]["uniform_bits_per_token"] + 1
    html = (out / "index.html").read_text()
    assert "samples.png" in html and "reconstructions.png" in html
    assert m["prior"]["classifier_accuracy_real_test"] > 0.85
    assert set(m["probe"]["per_block_test_accuracy"]) == set(range(4))
    health = m["tokenizer"]["codebook_health"]
    assert len(health) == 2 and all(v["steps"] == 30 for v in health.values())
    assert "codebook-health" in html
    assert (out / "probe" / "accuracy_by_block.png").is_file() and "linear probe" in html


@pytest.mark.slow
def test_demo_full_recipe_quality(tmp_path):
    """The default recipe (about 8 minutes on 2 cores) reaches the README's figures."""
    m = run_demo(tmp_path / "demo", progress=False)
    t, p = m["tokenizer"], m["prior"]
    assert t["psnr"] > 22.5  # mean colour per tile: 21.1 dB
    assert t["usage"] > 0.5
    assert p["test_bits_per_token"] < p["uniform_bits_per_token"] - 2
    assert p["sample_accuracy"] > 0.5  # chance: 0.1
