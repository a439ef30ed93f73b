"""Conditional synthesis end to end through the CLI on tiny models: condition tokenizers, paired condition
tokens, a spatially conditioned prior, sampling from condition images, completion, sliding windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqim import Tokenizer
from vqim.cli import main
from vqim.conditions import ConditionImages, DerivedImages, parse_condition, upsample
from vqim.data import build_dataset
from vqim.prior import Prior
from vqim.tokens import TokenDataset

PRIOR = ["--preset", "vim-tiny", "--batch-size", "8", "--no-progress", "--log-every", "1", "--lr", "1e-3",
         "--eval-every", "2", "--steps", "3"]  # fmt: skip


def _run(args: list[str], capsys) -> dict:
    main(args)
    return json.loads(capsys.readouterr().out or "{}")


def _tok(path: Path, seed: int, codes: int = 64) -> Path:
    torch.manual_seed(seed)
    Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, codebook_size=codes).save_pretrained(path)
    return path


# ---------------------------------------------------------------------- conditions


def test_builtin_conditions():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 12)
    low = parse_condition("lowres:4").derive(images)
    assert low.shape == images.shape
    torch.testing.assert_close(low[:, :, :4, :4].mean((2, 3)), images[:, :, :4, :4].mean((2, 3)))
    assert torch.equal(low[:, :, 0, 0], low[:, :, 3, 3])  # 4×4 blocks of one colour
    small = torch.rand(1, 3, 2, 3)
    assert torch.equal(parse_condition("lowres:4").from_input(small, (8, 12)), upsample(small, 4))
    with pytest.raises(ValueError, match="2×3 .* or of the full 8×12"):
        parse_condition("lowres:4").from_input(torch.rand(1, 3, 4, 4), (8, 12))
    square = torch.zeros(1, 3, 32, 32)
    square[:, :, 8:24, 8:24] = 1.0
    edges = parse_condition("edges:1").derive(square)
    assert set(edges.unique().tolist()) == {0.0, 1.0} and edges[0, 0, 8, 16] == 1 and edges[0, 0, 16, 16] == 0
    assert parse_condition("edges").spec == "edges" and parse_condition("edges:1").spec == "edges:1"
    for bad in ("lowres", "lowres:1", "lowres:x", "edges:-1", "nowhere/at/all"):
        with pytest.raises(ValueError):
            parse_condition(bad)


def test_folder_conditions_pair_by_relative_path(tmp_path):
    images, conds = tmp_path / "images", tmp_path / "conds"
    for k in range(3):
        (images / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40, 3), 40 * k, np.uint8)).save(images / "a" / f"{k}.png")
    (conds / "a").mkdir(parents=True)
    for k in (0, 2):  # no condition for image 1: skipped and counted
        Image.fromarray(np.full((40, 40, 3), 200 - k, np.uint8)).save(conds / "a" / f"{k}.jpg")
    ds = ConditionImages(build_dataset(str(images), 32, train=False), parse_condition(str(conds)))
    assert (
        ds[0]["condition"].shape == (3, 32, 32) and abs(float(ds[0]["condition"].mean()) - 200 / 255) < 0.02
    )
    assert ds[1]["image"] is None and ds[1]["skipped"]
    with pytest.raises(ValueError, match="deterministic crops"):
        ConditionImages(build_dataset(str(images), 32, train=True), parse_condition(str(conds)))
    with pytest.raises(ValueError, match="pass it as --data"):
        DerivedImages(build_dataset(str(images), 32), parse_condition(str(conds)))


# ---------------------------------------------------------------------- the whole path


@pytest.fixture(scope="module")
def conditioned_run(tmp_path_factory):
    """A tokenizer, a lowres:2 condition tokenizer trained for 2 steps by the CLI, paired tokens, a prior."""
    root = tmp_path_factory.mktemp("cond")
    tok = _tok(root / "tok", 0)
    ctok = root / "ctok"
    main(["train-tokenizer", "--data", "photos", "--condition", "lowres:2", "--preset", "vit-vqgan-tiny",
          "--image-size", "32", "--codebook-size", "32", "--steps", "2", "--batch-size", "4", "--out", str(ctok),
          "--no-progress", "--image-every", "100"])  # fmt: skip
    tokens = root / "tokens"
    main(["encode", "--tokenizer", str(tok), "--data", "photos", "--out", str(tokens), "--no-progress",
          "--condition", "lowres:2", "--condition-tokenizer", str(ctok)])  # fmt: skip
    prior = root / "prior"
    main(["train-prior", "--tokens", str(tokens), "--out", str(prior), "--val-every", "4", *PRIOR])
    return {"root": root, "tok": tok, "ctok": ctok, "tokens": tokens, "prior": prior}


def test_condition_tokenizer_learns_the_condition_images(conditioned_run):
    record = json.loads((conditioned_run["ctok"] / "train_config.json").read_text())
    assert record["condition"] == "lowres:2"


def test_encode_writes_paired_condition_tokens(conditioned_run):
    ds = TokenDataset(conditioned_run["tokens"])
    ctok = Tokenizer.from_pretrained(conditioned_run["ctok"])
    cond = ds.manifest["condition"]
    assert cond["spec"] == "lowres:2" and cond["grid_size"] == [4, 4] and cond["codebook_size"] == 32
    assert cond["tokenizer_id"] == ctok.fingerprint()
    item = ds[3]
    assert item["condition"].shape == (16,) and int(item["condition"].max()) < 32
    # The paired tokens are the condition tokenizer's tokens of the derived condition of the same image.
    image = build_dataset("photos", 32, train=True, augment=False)[3]["image"]
    expected = ctok.encode(parse_condition("lowres:2").derive(image[None]))
    assert torch.equal(item["condition"], expected.reshape(-1))


def test_prior_trains_on_paired_tokens_and_records_the_condition(conditioned_run):
    prior = Prior.from_pretrained(conditioned_run["prior"])
    assert prior.config.cond_vocab_size == 32 and prior.config.cond_grid_size == (4, 4)
    record = json.loads((conditioned_run["prior"] / "tokens.json").read_text())
    assert record["condition"]["spec"] == "lowres:2"
    metrics = json.loads((conditioned_run["prior"] / "metrics.json").read_text())
    assert metrics["val_bits_per_token"] is not None


def test_sample_from_condition_images(conditioned_run, tmp_path, capsys):
    r = conditioned_run
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)).save(photo)
    small = tmp_path / "small.png"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(small)  # a real 1/2-size image: enlarged ×2
    args = ["sample", "--prior", str(r["prior"]), "--tokenizer", str(r["tok"]), "--condition-tokenizer",
            str(r["ctok"]), "--n", "2", "--device", "cpu"]  # fmt: skip
    out = _run([*args, "--out", str(tmp_path / "s"), "--condition", str(photo), str(small)], capsys)
    assert out["images"] == 4 and out["conditions"] == 2 and out["canvas"] == [4, 4]
    assert Image.open(tmp_path / "s" / "grid.png").size[0] == 3 * 32 + 4 * 2
    assert (tmp_path / "s" / "cond001_condition.png").is_file() and (
        tmp_path / "s" / "cond001_0001.png"
    ).is_file()
    # A larger canvas: a large condition map gives a large image, by the sliding window.
    out = _run(
        [*args, "--out", str(tmp_path / "big"), "--condition", str(photo), "--image-size", "48x64"], capsys
    )
    assert out["canvas"] == [6, 8]
    assert Image.open(tmp_path / "big" / "cond000_0000.png").size == (64, 48)


def test_sample_condition_errors(conditioned_run, tmp_path, capsys):
    r = conditioned_run
    base = ["sample", "--prior", str(r["prior"]), "--tokenizer", str(r["tok"]), "--out", str(tmp_path / "x"),
            "--device", "cpu"]  # fmt: skip
    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(photo)
    cases = [
        ([], "pass --condition IMAGE"),
        (["--condition", str(photo)], "pass --condition-tokenizer"),
        (["--condition", str(photo), "--condition-tokenizer", str(r["tok"])], "condition tokens of"),
        (["--condition", str(tmp_path / "none.png"), "--condition-tokenizer", str(r["ctok"])], "not found"),
        (["--condition", str(photo), "--condition-tokenizer", str(r["ctok"]), "--grid", "2x2"], "smaller"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            main([*base, *extra])
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_encode_refuses_a_half_given_condition(conditioned_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["encode", "--tokenizer", str(conditioned_run["tok"]), "--data", "photos", "--out",
              str(tmp_path / "t"), "--condition", "edges"])  # fmt: skip
    assert "both --condition and --condition-tokenizer" in capsys.readouterr().err


def test_complete_and_wide_samples(tmp_path, capsys):
    """`vqim complete` keeps the top rows of held-out photos; `vqim sample --grid` draws a wide canvas."""
    tok = _tok(tmp_path / "tok", 1)
    main(
        [
            "encode",
            "--tokenizer",
            str(tok),
            "--data",
            "photos",
            "--out",
            str(tmp_path / "tokens"),
            "--no-progress",
        ]
    )
    main(["train-prior", "--tokens", str(tmp_path / "tokens"), "--out", str(tmp_path / "prior"), "--val-every", "0",
          *PRIOR])  # fmt: skip
    capsys.readouterr()
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)).save(photo)
    common = ["--prior", str(tmp_path / "prior"), "--tokenizer", str(tok), "--device", "cpu"]
    out = _run(
        ["complete", str(photo), str(photo), *common, "--out", str(tmp_path / "c"), "--n", "3"], capsys
    )
    assert out == {"images": 6, "kept_tokens": 8, "grid": str(tmp_path / "c" / "grid.png")}
    # The kept half decodes from the photo's own tokens: the same top rows in every completion.
    a = np.asarray(Image.open(tmp_path / "c" / "image000_0000.png"))
    b = np.asarray(Image.open(tmp_path / "c" / "image001_0002.png"))
    assert np.abs(a[:8].astype(int) - b[:8].astype(int)).mean() < 8
    mask = tmp_path / "mask.png"
    m = np.zeros((32, 32), np.uint8)
    m[:, :16] = 255  # keep the left half
    Image.fromarray(m).save(mask)
    out = _run(["complete", str(photo), *common, "--out", str(tmp_path / "m"), "--mask", str(mask)], capsys)
    assert out["kept_tokens"] == 8
    out = _run(["sample", *common, "--out", str(tmp_path / "wide"), "--n", "1", "--grid", "4x12"], capsys)
    assert Image.open(tmp_path / "wide" / "0000.png").size == (96, 32)
    for extra, message in [
        (["--rows", "4"], "--rows must be in [0, 3]"),
        (["--label", "1"], "unconditional"),
    ]:
        with pytest.raises(SystemExit):
            main(["complete", str(photo), *common, "--out", str(tmp_path / "e"), *extra])
        assert message in capsys.readouterr().err


def test_eval_prior_scores_image_tokens_given_their_condition(conditioned_run, tmp_path, capsys):
    from vqim.prior import bits_per_token

    r = conditioned_run
    out = _run(
        ["eval-prior", "--prior", str(r["prior"]), "--tokens", str(r["tokens"]), "--device", "cpu"], capsys
    )
    prior = Prior.from_pretrained(r["prior"])
    assert out["bits_per_token"] == pytest.approx(bits_per_token(prior, TokenDataset(r["tokens"])), rel=1e-6)
    # Without the condition tokens the same image tokens cannot be scored by this prior.
    main(["encode", "--tokenizer", str(r["tok"]), "--data", "photos", "--out", str(tmp_path / "plain"),
          "--no-progress"])  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(
            ["eval-prior", "--prior", str(r["prior"]), "--tokens", str(tmp_path / "plain"), "--device", "cpu"]
        )
    assert "carry no condition tokens" in capsys.readouterr().err
