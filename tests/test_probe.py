"""Linear probe: block and L2-weight choice on validation, baselines only when asked, frozen prior, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vqim import Tokenizer
from vqim.cli import main
from vqim.data import build_dataset
from vqim.prior import Prior
from vqim.probe import (
    LinearProbe,
    _validation_mask,
    extract_features,
    fit_linear_probe,
    probe_features,
    run_probe,
)


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


def test_block_is_chosen_on_validation_not_on_test():
    """Block 1 is clean on the training data but its test classes are shuffled; block 2 is weaker but honest."""
    feats = _synthetic(separable_block=1, blocks=3)
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(3, 16, generator=torch.Generator().manual_seed(7))
    for split in ("train", "test"):
        y = feats[f"{split}.labels"]
        feats[f"{split}.block2"] = torch.randn(len(y), 16, generator=g) + 0.6 * centres[y]
    y_te = feats["test.labels"]
    feats["test.block1"] = feats["test.block1"] - 4 * _centres()[y_te] + 4 * _centres()[(y_te + 1) % 3]
    summary, _ = probe_features(feats, seed=0)
    acc = summary["per_block_test_accuracy"]
    assert acc[1] < 0.1 and 0.6 < acc[2] < 1  # block 1 fails on test, block 2 is the best there
    assert summary["best_test_block"] == 2
    assert summary["per_block_val_accuracy"][1] > 0.99 > summary["per_block_val_accuracy"][2]
    assert summary["chosen_block"] == 1  # chosen on validation all the same
    assert summary["chosen_block_test_accuracy"] == acc[1]


def _centres():
    return torch.randn(3, 16, generator=torch.Generator().manual_seed(99))


def _cancelling_noise(n: int = 300, seed: int = 0):
    """2 classes; x0 = ±1 + large noise, x1 = the same noise: only a weakly regularised probe reads x0 − x1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    noise = 2 * torch.randn(n, 1, generator=g)
    signal = (2.0 * y - 1).unsqueeze(1)
    x = torch.cat(
        [signal + noise, noise + 0.05 * torch.randn(n, 1, generator=g), torch.randn(n, 4, generator=g)], 1
    )
    return x, y


def test_weight_decay_is_chosen_on_the_validation_rows():
    x, y = _cancelling_noise()
    wds = (1e-4, 10.0)
    probe, rep = fit_linear_probe(x, y, weight_decays=wds, seed=3)
    assert rep["weight_decay"] == 1e-4  # the weak one reads x0 − x1 and is right on validation
    assert rep["val_by_weight_decay"][1e-4] == 1.0 > 0.85 > rep["val_by_weight_decay"][10.0]
    assert rep["val_accuracy"] == 1.0 and probe.weight_decay == 1e-4
    x_te, y_te = _cancelling_noise(seed=1)
    assert probe.accuracy(x_te, y_te) > 0.97

    # The same training rows, but on the validation rows x1 carries the signal reversed: x0 − x1 is wrong there,
    # while the strong weight (which reads mostly x0) is right. The choice must follow the validation rows.
    val = _validation_mask(y, 2, 0.2, seed=3)
    assert val.sum() == 60 and (y[val] == 0).sum() == 30  # stratified 20%
    signal = 2.0 * y[val] - 1
    x2 = x.clone()
    x2[val] = 0
    x2[val, 0], x2[val, 1] = 3 * signal, 4.5 * signal
    probe2, rep2 = fit_linear_probe(x2, y, weight_decays=wds, seed=3)
    assert rep2["val_by_weight_decay"] == {1e-4: 0.0, 10.0: 1.0}
    assert rep2["weight_decay"] == 10.0 and probe2.weight_decay == 10.0


def test_weight_decay_ties_go_to_the_stronger_and_the_fit_is_deterministic():
    feats = _synthetic(separable_block=0)
    x, y = feats["train.block0"], feats["train.labels"]
    p1, r1 = fit_linear_probe(x, y, seed=3)
    p2, r2 = fit_linear_probe(x, y, seed=3)
    assert torch.equal(p1.weight, p2.weight) and r1 == r2
    assert list(r1["val_by_weight_decay"]) == [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert set(r1["val_by_weight_decay"].values()) == {1.0}  # separable: every weight is perfect
    assert r1["weight_decay"] == 0.1 and r1["val_accuracy"] == 1.0


def test_fit_reaches_the_optimum():
    """The fitted probe is a stationary point of mean cross-entropy + λ/2·‖W‖² on standardised features."""
    x, y = _cancelling_noise()
    probe, rep = fit_linear_probe(x, y, weight_decays=(1e-2,))
    w = probe.weight.double().requires_grad_()
    b = probe.bias.double().requires_grad_()
    xs = ((x - probe.mean) / probe.std).double()
    loss = torch.nn.functional.cross_entropy(xs @ w.t() + b, y) + 0.5 * 1e-2 * (w * w).sum()
    loss.backward()
    assert w.grad.abs().max() < 2e-4 and b.grad.abs().max() < 2e-4  # the stopping tolerance is 1e-4


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
    f2 = extract_features(prior, tok, ds, blocks=[0, 3], baselines=["encoder", "pixels"])
    assert prior.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in prior.state_dict().items())
    assert all(p.grad is None for p in prior.parameters())
    assert set(f1) == {"block0", "block3", "labels"}  # no baseline unless asked
    assert set(f2) == {"block0", "block3", "labels", "encoder", "pixels"}
    assert f1["block0"].shape == (40, 128) and f2["pixels"].shape == (40, 3 * 32 * 32)
    assert f2["encoder"].shape[0] == 40
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
    assert res["baselines"] == {} and res["baselines_requested"] == []  # none unless asked
    out = tmp_path / "out"
    for f in ("probe_results.json", "accuracy_by_block.png", "probe/probe.safetensors", "features/key.json"):
        assert (out / f).is_file(), f
    # Features are cached: a second run reuses them and gives the same result; asked, a baseline is fitted.
    main([*args, "--baselines", "pixels"])
    again = json.loads(capsys.readouterr().out)
    assert set(again["baselines"]) == {"pixels"}
    assert again["baselines"]["pixels"] > 0.85  # digits are linearly separable in pixels
    assert again["per_block_test_accuracy"] == res["per_block_test_accuracy"]
    assert np.isclose(again["chosen_block_test_accuracy"], res["chosen_block_test_accuracy"])


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, codebook_size=64)
    prior = Prior.from_preset("vim-tiny", vocab_size=64, grid_size=(4, 4), num_classes=10)
    train = torch.utils.data.Subset(build_dataset("digits", 32, train=True, augment=False), range(80))
    test = torch.utils.data.Subset(build_dataset("digits", 32, train=False), range(50))  # every class in both
    return prior, tok, train, test


def test_run_probe_fits_baselines_only_when_asked(tiny_pair, tmp_path, monkeypatch):
    import vqim.probe

    fitted: list[int] = []  # feature width of every source fitted
    fit = vqim.probe.fit_linear_probe

    def spy(x, *args, **kwargs):
        fitted.append(x.shape[1])
        return fit(x, *args, **kwargs)

    monkeypatch.setattr(vqim.probe, "fit_linear_probe", spy)
    prior, tok, train, test = tiny_pair
    out = tmp_path / "out"

    def run(**kw):
        fitted.clear()
        res = run_probe(prior, tok, train, test, out, blocks=[0, 2], **kw)
        assert (
            json.loads((out / "probe_results.json").read_text())["baselines_requested"]
            == res["baselines_requested"]
        )
        return res, sorted(fitted)

    res, widths = run()
    assert res["baselines"] == {} and res["baselines_requested"] == []
    assert widths == [128, 128]  # the two blocks, nothing else
    cached = vqim.probe._load_cache(out / "features", json.loads((out / "features" / "key.json").read_text()))
    assert not any("encoder" in k or "pixels" in k for k in cached)

    res, widths = run(baselines=("pixels", "encoder"))  # not in the cache: extracted again
    assert set(res["baselines"]) == {"encoder", "pixels"} and res["baselines_requested"] == [
        "encoder",
        "pixels",
    ]
    assert widths == [128, 128, 128, 3 * 32 * 32]

    res, widths = run(baselines=["pixels"])  # from the cache, which also holds the encoder's features
    assert set(res["baselines"]) == {"pixels"} and res["baselines_requested"] == ["pixels"]
    assert widths == [128, 128, 3 * 32 * 32]

    res, widths = run()  # still none fitted
    assert res["baselines"] == {} and widths == [128, 128]


@pytest.mark.parametrize("bad", [["pixel"], ["encoder", "raw"], "pixels", None, True, [1], {"pixels": 1}])
def test_unknown_baselines_are_refused_before_any_work(tiny_pair, tmp_path, bad):
    prior, tok, train, test = tiny_pair
    with pytest.raises(ValueError, match=r"baselines must be a list of names from \['encoder', 'pixels'\]"):
        run_probe(prior, tok, train, test, tmp_path / "out", blocks=[0], baselines=bad)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="encoder"):
        extract_features(prior, tok, test, blocks=[0], baselines=bad)


def test_feature_cache_is_keyed_on_the_weights(tiny_pair, tmp_path, monkeypatch):
    import copy

    import vqim.probe

    prior, tok, train, test = tiny_pair
    out = tmp_path / "out"
    run_probe(prior, tok, train, test, out, blocks=[0])
    extracted: list[int] = []
    extract = vqim.probe.extract_features
    monkeypatch.setattr(
        vqim.probe, "extract_features", lambda *a, **k: extracted.append(1) or extract(*a, **k)
    )
    run_probe(prior, tok, train, test, out, blocks=[0])
    assert extracted == []  # same models: the cache serves
    retrained = copy.deepcopy(tok)  # same config, other weights
    with torch.no_grad():
        retrained.quantizer.codebook.add_(0.1)
    run_probe(prior, retrained, train, test, out, blocks=[0])
    assert len(extracted) == 2  # another tokenizer: train and test features extracted again
