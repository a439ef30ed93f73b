"""Linear probe: block choice on synthetic features, frozen prior, determinism, CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vqim import Tokenizer
from vqim.cli import main
from vqim.data import build_dataset
from vqim.prior import Prior
from vqim.probe import LinearProbe, extract_features, fit_linear_probe, probe_features


def _synthetic(separable_block: int, blocks: int = 4, n: int = 300, d: int = 16, c: int = 3, seed: int = 0):
    """Features per block: pure noise, except one block where each class sits at its own mean."""
    g = torch.Generator().manual_seed(seed)
    feats = {}
    for split, m in (("train", n), ("test", n // 2)):
        y = torch.arange(m) % c
        feats[f"{split}.labels"] = y
        for k in range(blocks):
            x = torch.randn(m, d, generator=g)
            if k == separable_block:
                centres = torch.randn(c, d, generator=torch.Generator().manual_seed(99)) * 4
                x = x + centres[y]
            feats[f"{split}.block{k}"] = x
    return feats


def test_probe_finds_the_separable_block():
    summary, probes = probe_features(_synthetic(separable_block=2), seed=0)
    assert summary["chosen_block"] == 2
    assert summary["chosen_block_test_accuracy"] > 0.99
    others = [a for k, a in summary["per_block_test_accuracy"].items() if k != 2]
    assert max(others) < 0.6  # noise blocks stay near chance (1/3)
    assert summary["chance"] == pytest.approx(1 / 3, abs=0.01)


def test_fit_linear_probe_is_deterministic_and_chooses_regularisation_on_validation():
    feats = _synthetic(separable_block=0)
    x, y = feats["train.block0"], feats["train.labels"]
    p1, r1 = fit_linear_probe(x, y, seed=3)
    p2, r2 = fit_linear_probe(x, y, seed=3)
    assert torch.equal(p1.weight, p2.weight) and r1 == r2
    assert r1["weight_decay"] in r1["val_by_weight_decay"]
    assert r1["val_accuracy"] == max(r1["val_by_weight_decay"].values())


def test_probe_save_load_round_trip(tmp_path):
    feats = _synthetic(separable_block=1)
    probe, _ = fit_linear_probe(feats["train.block1"], feats["train.labels"])
    probe.save(tmp_path / "p", {"block": 1})
    back = LinearProbe.load(tmp_path / "p")
    x = feats["test.block1"]
    assert torch.equal(back.logits(x), probe.logits(x))


def test_missing_class_is_a_clear_error():
    feats = _synthetic(separable_block=0)
    keep = feats["test.labels"] != 2
    for k in list(feats):
        if k.startswith("test."):
            feats[k] = feats[k][keep]
    with pytest.raises(ValueError, match=r"classes \['2'\] are missing"):
        probe_features(feats)


def test_extract_features_leaves_the_prior_untouched():
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, codebook_size=64)
    prior = Prior.from_preset("vim-tiny", vocab_size=64, grid_size=(4, 4), num_classes=10).train()
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    ds = torch.utils.data.Subset(build_dataset("digits", 32, train=False), range(40))
    f1 = extract_features(prior, tok, ds, blocks=[0, 3])
    f2 = extract_features(prior, tok, ds, blocks=[0, 3])
    assert prior.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in prior.state_dict().items())
    assert all(p.grad is None for p in prior.parameters())
    assert set(f1) == {"block0", "block3", "encoder", "pixels", "labels"}
    assert f1["block0"].shape == (40, 128) and f1["pixels"].shape == (40, 3 * 32 * 32)
    assert torch.equal(f1["block3"], f2["block3"])  # eval mode: no dropout, deterministic
    assert f1["labels"].tolist() == [ds[i]["label"] for i in range(40)]
    # The true label never enters: the prior reads the null class.
    x = torch.stack([ds[i]["image"] for i in range(40)])
    with torch.no_grad():
        ids = tok.encode(x).flatten(1)
        ref = prior.eval()(ids, prior.null_class, return_blocks=[0]).blocks[0].mean(1)
    torch.testing.assert_close(f1["block0"], ref, atol=1e-5, rtol=0)


def test_probe_cli_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, codebook_size=64).save_pretrained(tmp_path / "tok")
    Prior.from_preset("vim-tiny", vocab_size=64, grid_size=(4, 4), num_classes=10).save_pretrained(
        tmp_path / "p"
    )
    args = ["probe", "--prior", str(tmp_path / "p"), "--tokenizer", str(tmp_path / "tok"), "--data", "digits",
            "--blocks", "1,3", "--out", str(tmp_path / "out")]  # fmt: skip
    main(args)
    res = json.loads(capsys.readouterr().out)
    assert set(res["per_block_test_accuracy"]) == {"1", "3"}
    assert res["chosen_block"] in (1, 3)
    assert set(res["baselines"]) == {"encoder", "pixels"}
    assert res["baselines"]["pixels"] > 0.85  # digits are linearly separable in pixels
    out = tmp_path / "out"
    for f in ("probe_results.json", "accuracy_by_block.png", "probe/probe.safetensors", "features/key.json"):
        assert (out / f).is_file(), f
    # Features are cached: a second run reuses them and gives the same result.
    main(args)
    again = json.loads(capsys.readouterr().out)
    assert again["per_block_test_accuracy"] == res["per_block_test_accuracy"]
    assert np.isclose(again["chosen_block_test_accuracy"], res["chosen_block_test_accuracy"])
