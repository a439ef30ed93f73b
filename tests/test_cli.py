"""End to end through the real CLI on a tiny model: train, resume, encode, decode, reconstruct, evaluate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vqim import Tokenizer
from vqim.cli import main
from vqim.train import state as st

TINY = ["--preset", "vit-vqgan-tiny", "--image-size", "32", "--batch-size", "4", "--num-workers", "0",
        "--no-progress", "--log-every", "1", "--lr", "1e-3"]  # fmt: skip


@pytest.fixture()
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            arr = rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    (root / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return root


def _run(args: list[str], capsys) -> str:
    main(args)
    return capsys.readouterr().out


def test_cli_end_to_end(tmp_path, folder, capsys):
    run = tmp_path / "run"
    _run(["train-tokenizer", "--data", str(folder), "--out", str(run), "--steps", "4", "--ckpt-every", "2",
          "--image-every", "2", *TINY], capsys)  # fmt: skip
    assert (run / "config.json").is_file() and (run / "model.safetensors").is_file()
    assert [p.name for p in st.list_checkpoints(run / "checkpoints")] == ["step-0000002", "step-0000004"]
    assert (run / "samples" / "step-0000004.png").is_file()
    assert any((run / "tb").iterdir())
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["skipped_files"] == 1 and summary["skipped"][0].endswith("broken.jpg")

    # Resume continues from step 4 to 6, with the optimizer state restored (Adam's step count moves on).
    _run(["train-tokenizer", "--data", str(folder), "--out", str(run), "--steps", "6", "--ckpt-every", "2",
          "--image-every", "100", "--resume", *TINY], capsys)  # fmt: skip
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["resumed_from"].endswith("step-0000004")
    opt = load_file(run / "checkpoints" / "step-0000006" / "training_state.safetensors")
    assert float(opt["opt.state.0.step"]) == 6.0

    tok = Tokenizer.from_pretrained(run)
    assert tok.config.image_size == 32

    # Encode → manifest + shards with labels (class sub-folders); the broken file is skipped and counted.
    tokens = tmp_path / "tokens"
    out = json.loads(_run(["encode", "--tokenizer", str(run), "--data", str(folder), "--out", str(tokens),
                           "--no-progress", "--shard-size", "4"], capsys))  # fmt: skip
    assert out["count"] == 10 and out["skipped_files"] == 1
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert manifest["grid_size"] == [4, 4] and manifest["codebook_size"] == 512
    assert manifest["tokenizer_config_hash"] == tok.config.hash()
    assert manifest["class_names"] == ["cats", "dogs"] and manifest["has_labels"]
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    ids = np.concatenate([np.load(tokens / s["tokens"]) for s in manifest["shards"]])
    labels = np.concatenate([np.load(tokens / s["labels"]) for s in manifest["shards"]])
    assert ids.shape == (10, 4, 4) and labels.tolist() == [0] * 5 + [1] * 5
    assert ids.max() < 512

    # Decode the ids back to images; they equal the library's decode.
    dec = tmp_path / "decoded"
    np.save(tmp_path / "ids.npy", ids[:3])
    res = json.loads(
        _run(["decode", "--tokenizer", str(run), str(tmp_path / "ids.npy"), "--out", str(dec)], capsys)
    )
    assert res["images"] == 3
    png = np.asarray(Image.open(dec / "000001.png")).astype(np.float32) / 255
    ref = tok.decode(torch.from_numpy(ids[1:2].astype(np.int64)))[0].permute(1, 2, 0).numpy()
    assert np.abs(png - ref).max() <= 1 / 255 + 1e-6

    # Reconstruct: side-by-side PNG and a PSNR per image.
    rec = tmp_path / "rec"
    img = folder / "dogs" / "0.png"
    res = json.loads(_run(["reconstruct", "--tokenizer", str(run), str(img), "--out", str(rec)], capsys))
    assert Image.open(res[str(img)]["png"]).size == (64, 32)
    assert 0 < res[str(img)]["psnr"] < 100

    # Evaluate: JSON metrics and a usage histogram.
    ev = tmp_path / "eval"
    m = json.loads(_run(["eval-tokenizer", "--tokenizer", str(run), "--data", str(folder), "--out", str(ev),
                         "--no-progress"], capsys))  # fmt: skip
    for key in ("psnr", "ssim", "l1", "l2", "logit_laplace", "usage", "usage_per_256", "perplexity"):
        assert key in m and np.isfinite(m[key]), key
    assert m["images"] == 10 and m["skipped_files"] == 1
    assert 0 < m["usage"] <= 1 and m["codes_used"] == round(m["usage"] * 512)
    assert (ev / "usage_histogram.png").is_file() and (ev / "metrics.json").is_file()


def test_resume_equals_uninterrupted_run(tmp_path, folder, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--data", str(folder), "--steps", "6", "--ckpt-every", "3", "--image-every", "100", *TINY]
    _run(["train-tokenizer", "--out", str(a), *common], capsys)
    # b holds only what a run interrupted after step 4 would have left: the step-3 checkpoint, and a
    # half-written later one.
    shutil.copytree(a / "checkpoints" / "step-0000003", b / "checkpoints" / "step-0000003")
    (b / "checkpoints" / ".step-0000006.partial").mkdir()
    _run(["train-tokenizer", "--out", str(b), "--resume", *common], capsys)
    assert json.loads((b / "train_summary.json").read_text())["resumed_from"].endswith("step-0000003")
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    diffs = {k: float((wa[k] - wb[k]).abs().max()) for k in wa}
    assert max(diffs.values()) < 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]


def test_partial_checkpoint_is_ignored_and_cleaned_at_the_next_start(tmp_path):
    from vqim.train.rundir import clean_leftovers

    root = tmp_path / "checkpoints"
    for step, files in ((2, st.COMPLETE), (6, ["training_state.json"])):  # 6: a prune killed half-way
        (root / f"step-{step:07d}").mkdir(parents=True)
        for name in files:
            (root / f"step-{step:07d}" / name).write_text("{}")
    (root / ".step-0000004.partial").mkdir()
    (root / ".step-0000001.deleting").mkdir()
    assert st.latest_checkpoint(root).name == "step-0000002"
    removed = clean_leftovers(root)
    assert sorted(removed) == [".step-0000001.deleting", ".step-0000004.partial", "step-0000006"]
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002"]


def test_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval-tokenizer", "--tokenizer", str(tmp_path / "nope"), "--data", "photos"])
    assert e.value.code == 2
    assert "tokenizer directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train-tokenizer", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *TINY])
    assert "neither a built-in dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            ["train-tokenizer", "--data", "photos", "--out", str(tmp_path / "o"), *TINY, "--image-size", "30"]
        )
    assert "not divisible by patch_size" in capsys.readouterr().err


def test_compiled_training_matches_eager(tmp_path, folder, capsys):
    """--compile trains the same model as eager mode (up to float rounding)."""
    common = ["--data", str(folder), "--steps", "3", "--ckpt-every", "3", "--image-every", "100", *TINY]
    _run(["train-tokenizer", "--out", str(tmp_path / "eager"), *common], capsys)
    _run(["train-tokenizer", "--out", str(tmp_path / "compiled"), "--compile", *common], capsys)
    wa = load_file(tmp_path / "eager" / "model.safetensors")
    wb = load_file(tmp_path / "compiled" / "model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


def test_patchgan_training_respects_disc_start(tmp_path, folder, capsys):
    run = tmp_path / "gan"
    _run(["train-tokenizer", "--data", str(folder), "--out", str(run), "--steps", "4", "--ckpt-every", "2",
          "--image-every", "100", "--disc", "patchgan", "--disc-start", "2", *TINY], capsys)  # fmt: skip
    s2 = load_file(run / "checkpoints" / "step-0000002" / "training_state.safetensors")
    s4 = load_file(run / "checkpoints" / "step-0000004" / "training_state.safetensors")
    # Before disc_start the discriminator is not trained: no optimizer state, same weights.
    assert not any(k.startswith("dopt.state.") for k in s2)
    assert float(s4["dopt.state.0.step"]) == 2.0
    moved = [k for k in s2 if k.startswith("disc.") and "weight" in k and not torch.equal(s2[k], s4[k])]
    assert moved
    last = json.loads((run / "train_summary.json").read_text())["last"]
    assert {"g_loss", "d_loss", "adaptive_weight"} <= set(last) and all(np.isfinite(v) for v in last.values())


def test_stylegan_r1_lpips_training_resumes_exactly(tmp_path, folder, capsys):
    import lpips

    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    vgg = {
        f"features.{k}": v for s in range(1, 6) for k, v in getattr(ref.net, f"slice{s}").state_dict().items()
    }
    torch.save(vgg, tmp_path / "vgg16.pth")
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--data", str(folder), "--steps", "4", "--ckpt-every", "2", "--image-every", "100", "--disc",
              "stylegan", "--r1-gamma", "1", "--r1-interval", "2", "--perceptual-weight", "0.1", "--vgg-weights",
              str(tmp_path / "vgg16.pth"), *TINY]  # fmt: skip
    _run(["train-tokenizer", "--out", str(a), *common], capsys)
    last = json.loads((a / "train_summary.json").read_text())["last"]
    assert {"g_loss", "d_loss", "perceptual_loss"} <= set(last)
    shutil.copytree(a / "checkpoints" / "step-0000002", b / "checkpoints" / "step-0000002")
    _run(["train-tokenizer", "--out", str(b), "--resume", *common], capsys)
    for f in ("model.safetensors", "checkpoints/step-0000004/training_state.safetensors"):
        wa, wb = load_file(a / f), load_file(b / f)
        assert max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) < 1e-5, f
    with pytest.raises(SystemExit):
        main(["train-tokenizer", "--out", str(tmp_path / "c"), *common[:-len(TINY) - 2], *TINY,
              "--vgg-weights", str(tmp_path / "none.pth")])  # fmt: skip
    assert "--perceptual-weight 0" in capsys.readouterr().err


def _subparsers(parser):
    import argparse

    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_option_of_every_command_has_help():
    from vqim.cli import COMMANDS, build_parser

    commands = _subparsers(build_parser())
    assert set(commands) == set(COMMANDS)
    for name, p in commands.items():
        for action in p._actions:
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}"


def test_help_shows_defaults_choices_and_todays_flag_forms(capsys):
    from vqim.cli import build_parser
    from vqim.config import prior_presets, tokenizer_presets

    commands = _subparsers(build_parser())
    text = " ".join(commands["train-tokenizer"].format_help().split())
    assert "--steps STEPS optimizer steps. (default: 1000)" in text
    assert "{" + ",".join(tokenizer_presets()) + "}" in text  # --preset lists its choices
    for flag in ("--no-progress", "--max-minutes", "--compile [MODE]", "--betas B1 B2", "--l2-norm, --no-l2-norm",
                 "--lr LR peak learning rate", "--image-size", "--disc {none,stylegan,patchgan}"):  # fmt: skip
        assert flag in text, flag
    assert "(default: the preset's recipe" in text
    prior = " ".join(commands["train-prior"].format_help().split())
    assert "{" + ",".join(prior_presets()) + "}" in prior and "--class-dropout" in prior
    sample = " ".join(commands["sample"].format_help().split())
    assert (
        "balanced over the classes" in sample
        and "--per-class PER_CLASS" in sample
        and "--cfg-scale" in sample
    )
    ev = " ".join(commands["eval-prior"].format_help().split())
    assert "--val-every VAL_EVERY score only the held-out sequences" in ev and "--top-k" in ev
    assert "--set KEY=VALUE [KEY=VALUE ...]" in " ".join(commands["ablate"].format_help().split())


def test_bad_input_exits_2_with_one_error_line(tmp_path, capsys):
    cases = [
        (["sample", "--prior", str(tmp_path / "none"), "--tokenizer", str(tmp_path / "t"), "--out", str(tmp_path)],
         "prior directory not found"),
        (["reconstruct", "--tokenizer", str(tmp_path / "none"), "a.png", "--out", str(tmp_path)],
         "tokenizer directory not found"),
        (["ablate", "--out", str(tmp_path / "study"), "--only", "dim3"], "unknown ablation variants"),
        (["sample", "--prior", "p", "--tokenizer", "t", "--out", "o", "--top-p", "2"], "top_p (--top-p) must be"),
    ]  # fmt: skip
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
    # A malformed --set is a usage error of the option itself.
    with pytest.raises(SystemExit) as e:
        main(["ablate", "--out", str(tmp_path / "s"), "--set", "lookup_dim=big"])
    assert e.value.code == 2 and "not a valid int" in capsys.readouterr().err


def test_ablate_records_the_argv_it_was_given(tmp_path, monkeypatch, capsys):
    import vqim.ablate

    seen = {}

    def fake(cfg, command=""):
        seen.update(cfg=cfg, command=command)
        return {"markdown": "table"}

    monkeypatch.setattr(vqim.ablate, "run_ablation", fake)
    monkeypatch.setattr("sys.argv", ["pytest", "something", "else"])
    main(["ablate", "--out", str(tmp_path / "my study"), "--steps", "3", "--set", "dead_code_window=0", "--only",
          "default", "dim8", "--no-progress"])  # fmt: skip
    assert capsys.readouterr().out.strip() == "table"
    assert seen["command"] == (f"vqim ablate --out '{tmp_path / 'my study'}' --steps 3 --set dead_code_window=0 "
                               "--only default dim8 --no-progress")  # fmt: skip
    cfg = seen["cfg"]
    assert (cfg.steps, cfg.base_model, cfg.only, cfg.progress) == (3, {"dead_code_window": 0}, ("default", "dim8"),
                                                                    False)  # fmt: skip


def test_presets_show_the_fields_of_their_architecture(capsys):
    main(["presets"])
    rows = json.loads(capsys.readouterr().out)
    cnn, vit = rows["tokenizers"]["vqgan-tiny"], rows["tokenizers"]["vit-vqgan-tiny"]
    assert "enc_depth" not in cnn and "pos_embed" not in cnn and cnn["cnn_channels"] == 32
    assert "cnn_channels" not in vit and vit["enc_depth"] == 2
    # Each prior preset is counted at the setting it is meant for.
    tiny, base = rows["priors"]["vim-tiny"], rows["priors"]["vim-base"]
    assert (tiny["vocab_size"], tiny["grid_size"], tiny["num_classes"]) == (512, [8, 8], 10)
    assert tiny["params_M"] == pytest.approx(0.93, abs=0.01)
    assert (base["vocab_size"], base["grid_size"], base["num_classes"]) == (8192, [32, 32], 1000)
