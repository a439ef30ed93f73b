"""The demo pipeline: a short run must reach figures that only working stages reach, measured against baselines
computed here (an untrained tokenizer, an untrained prior, a context-free token model, chance); the full recipe
is a slow test that checks the README's figures."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vqim.demo import run_demo

# The short run: 100 tokenizer steps (each of the three tokenizers: the demo's and the two codebook-health
# variants) and 150 prior steps; the conditional stage runs its full recipe (condition tokenizers 500 / 200 steps,
# priors 600): at 150 to 400 prior steps the low-resolution condition did not yet lower the held-out bits
# reliably (by -0.02 to 0.15 bits). 3 min 19 s on 2 idle cores, the conditional stage 107 s of it. Measured at
# these settings on 2026-12-04: PSNR 20.1 dB (untrained 13.1), 371 codes against 3 without restarts, 3.51 bits per
# token (untrained prior 9.04), sample accuracy 0.31 (chance 0.10), probe 0.63 (chance 0.13); held-out bits per
# image token 5.42 without a condition, 4.59 given lowres:4; super-resolution 19.1 dB (uniform grey 12.2).
FAST_STEPS, FAST_PRIOR_STEPS = 100, 150
FAST_CONDITIONAL_STEPS = None


def _photo_eval_images() -> torch.Tensor:
    from vqim.data import build_dataset, collate

    ev = build_dataset("photos", 64, train=False)
    return collate([ev[i] for i in range(len(ev))])["image"]


def _untrained_tokenizer_psnr() -> float:
    from vqim import Tokenizer
    from vqim.data import build_dataset
    from vqim.evaluate import evaluate_tokenizer

    torch.manual_seed(0)
    return evaluate_tokenizer(
        Tokenizer.from_preset("vit-vqgan-tiny"), build_dataset("photos", 64, train=False)
    )["psnr"]


def _untrained_prior_bits(test_tokens: Path) -> float:
    from vqim.prior import Prior, bits_per_token
    from vqim.tokens import TokenDataset

    torch.manual_seed(0)
    prior = Prior.from_preset("vim-tiny", vocab_size=512, grid_size=(8, 8), num_classes=10)
    return bits_per_token(prior, TokenDataset(test_tokens))


def _read_ids(folder: Path) -> np.ndarray:
    """Every token id in a token folder, read from its shards directly."""
    shards = sorted(folder.glob("tokens-*.npy"))
    assert shards, folder
    return np.concatenate([np.load(s).reshape(-1) for s in shards]).astype(np.int64)


def _unigram_bits(train_tokens: Path, test_tokens: Path, vocab: int = 512) -> float:
    """Bits per test token of a context-free model: the training tokens' frequencies (add-one smoothed)."""
    counts = np.bincount(_read_ids(train_tokens), minlength=vocab) + 1.0
    return float(-np.log2(counts[_read_ids(test_tokens)] / counts.sum()).mean())


def test_demo_pipeline_fast(tmp_path, monkeypatch):
    import vqim.probe

    # The probe's regularisation path is cut to one weight to keep this test short (test_probe.py covers the
    # choice along the path); everything else runs as in `make demo`.
    monkeypatch.setattr(
        vqim.probe, "fit_linear_probe", functools.partial(vqim.probe.fit_linear_probe, weight_decays=(1e-2,))
    )
    out = tmp_path / "demo"
    m = run_demo(
        out,
        steps=FAST_STEPS,
        prior_steps=FAST_PRIOR_STEPS,
        progress=False,
        conditional_steps=FAST_CONDITIONAL_STEPS,
    )

    # Artefacts and the report.
    for f in ("index.html", "metrics.json", "reconstructions.png", "usage_histogram.png", "samples.png"):
        assert (out / f).is_file(), f
    assert (out / "tokenizer" / "model.safetensors").is_file() and (
        out / "prior" / "model.safetensors"
    ).is_file()
    assert (out / "probe" / "accuracy_by_block.png").is_file()
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    html = (out / "index.html").read_text()
    for needle in ("samples.png", "reconstructions.png", "codebook-health", "linear probe"):
        assert needle in html, needle

    # Stage 1: the trained tokenizer reconstructs far better than the same tokenizer untrained, and data init +
    # restarts keep codes alive where the paper's plain recipe collapses to a handful.
    t = m["tokenizer"]
    assert t["images"] == 64 and t["train_steps"] == FAST_STEPS
    assert t["psnr"] > _untrained_tokenizer_psnr() + 5.0
    health = t["codebook_health"]
    restarts, plain = health["with data init + restarts"], health["paper-plain (normal init, no restarts)"]
    assert restarts["steps"] == plain["steps"] == FAST_STEPS
    assert restarts["codes_used"] >= 200 and restarts["codes_used"] >= 10 * plain["codes_used"]
    assert restarts["psnr"] > plain["psnr"] + 2.0

    # Stage 2: the prior beats an untrained prior by far and a context-free (unigram) model of the same tokens by
    # a bit per token; its samples are recognised well above chance; the tokenizer keeps digits recognisable.
    p = m["prior"]
    assert p["train_steps"] == FAST_PRIOR_STEPS and p["uniform_bits_per_token"] == 9.0
    assert p["test_bits_per_token"] < _untrained_prior_bits(out / "digits_tokens_test") - 4.0
    assert p["test_bits_per_token"] < _unigram_bits(out / "digits_tokens", out / "digits_tokens_test") - 1.0
    assert p["sample_accuracy"] > 0.2  # chance: 0.1
    assert p["classifier_accuracy_real_test"] > 0.9 and p["classifier_accuracy_reconstructions"] > 0.9

    # Stage 3: every block's features classify digits far above chance.
    probe = m["probe"]
    assert set(probe["per_block_test_accuracy"]) == set(range(4))
    assert probe["chance"] < 0.15
    assert min(probe["per_block_test_accuracy"].values()) > 0.4
    assert probe["baselines"]["pixels"] > 0.9

    # Stage 4: the panels exist; the low-resolution condition tells the prior about held-out photographs (fewer
    # bits per image token than the same prior without it: 0.83 fewer measured at these settings), and
    # super-resolved samples stay closer to the originals than a uniform grey image does (19.1 against 12.2 dB).
    c = m["conditional"]
    for f in ("sr.png", "edges.png", "completion.png", "wide.png"):
        assert (out / "conditional" / f).is_file(), f
    assert "conditional/wide.png" in html
    bits = c["held_out_bits_per_image_token"]
    assert bits["lowres:4"] < bits["no condition"] - 0.5
    grey = float(-10 * torch.log10(((_photo_eval_images() - 0.5) ** 2).mean()))
    assert c["sr_psnr_one_sample"] > grey + 3.0
    from PIL import Image

    assert Image.open(out / "conditional" / "wide.png").size == (4 * 64, 64)  # 8×32 tokens of 8×8 pixels


# The README's table ("The demo"), with tolerances for what may move between machines and library versions.
README_DEMO = {
    ("tokenizer", "psnr"): (23.45, 0.5),
    ("tokenizer", "ssim"): (0.650, 0.03),
    ("tokenizer", "codes_used"): (353, 40),
    ("tokenizer", "perplexity"): (141, 30),
    ("prior", "test_bits_per_token"): (2.19, 0.15),
    ("prior", "sample_accuracy"): (0.925, 0.06),
    ("prior", "classifier_accuracy_real_test"): (0.958, 0.02),
    ("prior", "classifier_accuracy_reconstructions"): (0.964, 0.03),
    ("probe", "chosen_block_test_accuracy"): (0.906, 0.03),
    ("conditional", "sr_psnr_one_sample"): (18.08, 1.0),
    ("conditional", "sr_psnr_bicubic"): (31.93, 0.05),
    ("conditional", "tokenizer_reconstruction_psnr"): (23.45, 0.5),
}
README_HEALTH = {  # 600 steps each: with data init + restarts / the paper's plain recipe
    "with data init + restarts": {"psnr": (22.98, 0.7), "codes_used": (315, 50)},
    "paper-plain (normal init, no restarts)": {"psnr": (17.99, 1.5), "codes_used": (5, 8)},
}
README_CONDITIONAL_BITS = {"no condition": (5.20, 0.2), "lowres:4": (4.75, 0.2), "edges": (5.29, 0.3)}
MEAN_COLOUR_PSNR = 21.08  # every held-out tile painted its mean colour


def readme_mismatches(m: dict) -> list[str]:
    """The demo figures in m (metrics.json of a full `make demo` run) that differ from the README's tables by
    more than their tolerance, one line each."""
    off = []
    for (stage, key), (want, tol) in README_DEMO.items():
        if abs(m[stage][key] - want) > tol:
            off.append(f"{stage}.{key} = {m[stage][key]:.4g} (README {want}, tolerance {tol})")
    for variant, figures in README_HEALTH.items():
        for key, (want, tol) in figures.items():
            got = m["tokenizer"]["codebook_health"][variant][key]
            if abs(got - want) > tol:
                off.append(f"codebook health {variant}: {key} = {got:.4g} (README {want}, tolerance {tol})")
    for condition, (want, tol) in README_CONDITIONAL_BITS.items():
        got = m["conditional"]["held_out_bits_per_image_token"][condition]
        if abs(got - want) > tol:
            off.append(f"held-out bits given {condition} = {got:.4g} (README {want}, tolerance {tol})")
    return off


@pytest.mark.slow
def test_demo_full_recipe_reaches_the_readme_figures(tmp_path):
    """The default recipe (about 12 minutes on 2 cores) reproduces the README's demo tables."""
    from vqim.metrics import psnr

    x = _photo_eval_images()
    mean_colour = float(psnr(x.mean((2, 3), keepdim=True).expand_as(x), x).mean())
    assert mean_colour == pytest.approx(MEAN_COLOUR_PSNR, abs=0.01)

    m = run_demo(tmp_path / "demo", progress=False)
    off = readme_mismatches(m)
    assert not off, "demo figures differ from the README:\n" + "\n".join(off)
    assert m["tokenizer"]["psnr"] > mean_colour + 1.5
    assert m["prior"]["test_bits_per_token"] < m["prior"]["uniform_bits_per_token"] - 6
