"""The ablation study: grid, resumption, the table beside the paper, the direction checks; recipes and --set."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vqim.ablate import AblationConfig, Variant, directions, paper_grid, run_ablation
from vqim.config import parse_overrides, train_recipe
from vqim.train.tokenizer import TokenizerTrainConfig


def test_paper_grid_has_every_row_of_the_table():
    grid = {v.name: v for v in paper_grid()}
    assert set(grid) == {
        "default",
        "cnn",
        "patchgan",
        "dim256",
        "dim128",
        "dim64",
        "dim16",
        "dim8",
        "dim4",
        "no-l2",
    }
    assert grid["dim4"].model == {"lookup_dim": 4} and grid["no-l2"].model == {"l2_norm": False}
    assert grid["cnn"].model["arch"] == "cnn" and grid["patchgan"].train["disc"] == "patchgan"
    assert grid["no-l2"].paper_usage == 0.02 and grid["default"].paper_rfid == 1.55


def test_cnn_variant_matches_the_vit_grid_and_size():
    from vqim import Tokenizer

    grid = {v.name: v for v in paper_grid()}
    vit = Tokenizer.from_preset("vit-vqgan-tiny")
    cnn = Tokenizer.from_preset("vit-vqgan-tiny", **grid["cnn"].model)
    assert cnn.config.grid_size == vit.config.grid_size
    n_vit, n_cnn = (sum(p.numel() for p in t.parameters()) for t in (vit, cnn))
    assert abs(n_cnn - n_vit) / n_vit < 0.05


def _result(usage: float, psnr: float = 20.0) -> dict:
    return {"metrics": {"usage": usage, "psnr": psnr}}


def test_direction_checks_can_hold_and_fail():
    good = {"default": _result(0.9, 21), "dim64": _result(0.6), "dim256": _result(0.1), "no-l2": _result(0.05),
            "cnn": _result(0.8, 19), "patchgan": _result(0.8, 20)}  # fmt: skip
    assert [h for _, h, _ in directions(good)] == [True, True, True, True]
    bad = {"default": _result(0.5, 18), "dim64": _result(0.6), "no-l2": _result(0.4), "cnn": _result(0.8, 19)}
    assert [h for _, h, _ in directions(bad)] == [False, False, False, None]


def test_study_runs_resumes_and_writes_table(tmp_path, monkeypatch):
    cfg = AblationConfig(out=str(tmp_path / "study"), steps=4, batch_size=4, seed=0, progress=False,
                         base_model={"image_size": 32}, eval_batch_size=64)  # fmt: skip
    grid = [Variant("default", "default", paper_rfid=1.55, paper_usage=0.96),
            Variant("dim8", "lookup dim 8", model={"lookup_dim": 8}, paper_rfid=1.52, paper_usage=0.96)]  # fmt: skip
    res = run_ablation(cfg, grid, command="vqim ablate --steps 4")["results"]
    out = tmp_path / "study"
    for name in ("default", "dim8"):
        ev = json.loads((out / "variants" / name / "eval.json").read_text())
        assert ev["steps"] == 4 and 0 < ev["metrics"]["usage"] <= 1 and ev["metrics"]["psnr"] > 0
    assert res["dim8"]["model"]["lookup_dim"] == 8
    md = (out / "results.md").read_text()
    assert "| lookup dim 8 | 1.52 | 96% |" in md and "Command: `vqim ablate --steps 4`" in md
    assert (out / "usage_vs_lookup_dim.png").stat().st_size > 0 and (out / "psnr_per_variant.png").is_file()

    # An evaluated variant is not trained again; an interrupted one resumes from its latest checkpoint.
    (out / "variants" / "dim8" / "eval.json").unlink()
    calls = []
    import vqim.train.tokenizer as trainer

    real = trainer.train_tokenizer
    monkeypatch.setattr(trainer, "train_tokenizer", lambda c: calls.append(c.out) or real(c))
    res2 = run_ablation(cfg, grid)["results"]
    assert calls == [str(out / "variants" / "dim8")]
    assert res2["dim8"]["resumed_from"].endswith("step-0000004")
    assert res2["default"] == res["default"]
    # The same folder with other settings is refused rather than mixing runs in one table.
    with pytest.raises(ValueError, match="other settings"):
        run_ablation(dataclasses.replace(cfg, steps=5), grid)


def test_unknown_variant_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown ablation variants"):
        run_ablation(AblationConfig(out=str(tmp_path), only=["dim3"]))


def test_parse_overrides_reads_field_types():
    o = parse_overrides(["dead_code_window=0", "l2_norm=false", "codebook_init=normal", "cnn_ch_mult=1,1,2,2",
                         "beta=0.5"])  # fmt: skip
    assert o == {"dead_code_window": 0, "l2_norm": False, "codebook_init": "normal", "cnn_ch_mult": (1, 1, 2, 2),
                 "beta": 0.5}  # fmt: skip
    with pytest.raises(ValueError, match="unknown tokenizer config field"):
        parse_overrides(["lookupdim=3"])
    with pytest.raises(ValueError, match="not a valid int"):
        parse_overrides(["lookup_dim=big"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["lookup_dim"])


def test_presets_train_with_their_papers_recipe():
    vit = TokenizerTrainConfig.for_preset("vit-vqgan-ss", out="x")
    assert (vit.disc, vit.adv_weight, vit.perceptual_weight, vit.betas, vit.lr) == (
        "stylegan",
        0.1,
        0.1,
        (0.9, 0.99),
        1e-4,
    )
    taming = TokenizerTrainConfig.for_preset("vqgan-f16-1024", out="x", batch_size=16)
    assert (taming.disc, taming.adaptive_weight, taming.adv_weight, taming.disc_start) == (
        "patchgan",
        True,
        0.8,
        250001,
    )
    assert taming.betas == (0.5, 0.9) and taming.perceptual_weight == 1.0
    assert taming.lr == pytest.approx(4.5e-6 * 16)  # taming scales its base lr by the batch
    # Explicit settings win; the tiny presets train without a discriminator or VGG.
    assert TokenizerTrainConfig.for_preset("vqgan-f16-1024", out="x", lr=1e-4, disc="none").disc == "none"
    tiny = TokenizerTrainConfig.for_preset("vit-vqgan-tiny", out="x")
    assert tiny.disc == "none" and tiny.perceptual_weight == 0.0
    assert train_recipe("no-such-preset") == {}
    # None means "not given"; another discriminator drops the recipe's GAN settings (here StyleGAN's R1).
    assert TokenizerTrainConfig.for_preset("vit-vqgan-ss", out="x", lr=None).lr == 1e-4
    swapped = TokenizerTrainConfig.for_preset("vit-vqgan-ss", out="x", disc="patchgan")
    assert (swapped.r1_gamma, swapped.adaptive_weight, swapped.perceptual_weight) == (0.0, None, 0.1)


def test_paper_preset_without_vgg_weights_says_how_to_proceed(tmp_path, monkeypatch, capsys):
    from vqim.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    with pytest.raises(SystemExit):
        main(["train-tokenizer", "--preset", "vit-vqgan-ss", "--data", "photos", "--out", str(tmp_path / "o"),
              "--steps", "1", "--image-size", "64", "--num-workers", "0", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert "vgg16-397923af.pth" in err and "--perceptual-weight 0" in err
