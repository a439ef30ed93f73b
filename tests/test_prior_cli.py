"""Stage 2 end to end through the CLI on tiny models: encode labelled data, train a prior, resume, sample,
evaluate; token datasets and their compatibility checks."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vqim import Tokenizer
from vqim.cli import main
from vqim.prior import Prior
from vqim.tokens import TokenDataset, encode_dataset
from vqim.train.prior import vim_lr_lambda

PRIOR = ["--preset", "vim-tiny", "--batch-size", "8", "--no-progress", "--log-every", "1", "--lr", "1e-3",
         "--eval-every", "2"]  # fmt: skip


def _run(args: list[str], capsys) -> str:
    main(args)
    return capsys.readouterr().out


@pytest.fixture()
def tokenizer_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, codebook_size=64)
    tok.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


@pytest.fixture()
def token_dir(tmp_path, tokenizer_dir, capsys) -> Path:
    out = tmp_path / "tokens"
    _run(["encode", "--tokenizer", str(tokenizer_dir), "--data", "digits", "--out", str(out), "--no-progress",
          "--image-size", "32", "--shard-size", "500"], capsys)  # fmt: skip
    return out


def test_token_dataset_streams_shards_and_splits(token_dir):
    full = TokenDataset(token_dir)
    assert len(full) == 1437 and full.grid_size == (4, 4) and full.codebook_size == 64
    assert len(full.manifest["shards"]) == 3
    # Shards are memory-mapped, not loaded.
    assert all(isinstance(t, np.memmap) for t in full._tokens)
    train, val = TokenDataset(token_dir, "train", val_every=10), TokenDataset(token_dir, "val", val_every=10)
    assert len(train) + len(val) == len(full)
    seen = sorted([train._global(i) for i in range(len(train))] + [val._global(i) for i in range(len(val))])
    assert seen == list(range(len(full)))
    item = full[501]
    assert item["tokens"].shape == (16,) and item["tokens"].dtype == torch.long
    assert 0 <= item["label"] < 10
    labels = [full[i]["label"] for i in range(len(full))]
    assert sorted(set(labels)) == list(range(10))


def test_token_dataset_compatibility_errors(token_dir):
    ds = TokenDataset(token_dir)
    with pytest.raises(ValueError, match="codebook of 64 codes"):
        ds.check_compatible(512, (4, 4))
    with pytest.raises(ValueError, match="grid"):
        ds.check_compatible(64, (8, 8))
    with pytest.raises(ValueError, match="re-encode"):
        ds.check_compatible(64, (4, 4), tokenizer_hash="0" * 16)
    with pytest.raises(FileNotFoundError, match="vqim encode"):
        TokenDataset(token_dir.parent / "nothing")


def test_encode_dataset_respects_shard_size(tmp_path, tokenizer_dir):
    from vqim.data import build_dataset

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    m = encode_dataset(
        tok, build_dataset("digits", 32, train=False), tmp_path / "t", batch_size=64, shard_size=100
    )
    assert [s["count"] for s in m["shards"]] == [100, 100, 100, 60]
    assert m["class_names"] == [str(i) for i in range(10)]


def test_vim_schedule_shape():
    total, warm, start = 100, 10, 50
    lrs = [vim_lr_lambda(s, total, warm, start, 0.01) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:51])
    assert lrs[100] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(lrs[50:], lrs[51:]))


def test_prior_cli_end_to_end(tmp_path, tokenizer_dir, token_dir, capsys):
    run = tmp_path / "prior"
    common = ["--tokens", str(token_dir), "--out", str(run), "--steps", "4", "--ckpt-every", "2", *PRIOR]
    summary = json.loads(_run(["train-prior", *common], capsys))
    assert summary["steps"] == 4 and summary["num_classes"] == 10
    assert summary["val_sequences"] == 72 and summary["train_sequences"] == 1437 - 72  # every 20th held out
    assert np.isfinite(summary["val_bits_per_token"])
    prior = Prior.from_pretrained(run)
    assert prior.config.vocab_size == 64 and tuple(prior.config.grid_size) == (4, 4)
    assert prior.config.num_classes == 10
    assert (
        json.loads((run / "tokens.json").read_text())["tokenizer_config_hash"]
        == Tokenizer.from_pretrained(tokenizer_dir).config.hash()
    )

    # Resume from the step-2 checkpoint of a copy equals the uninterrupted run.
    other = tmp_path / "prior2"
    shutil.copytree(run / "checkpoints" / "step-0000002", other / "checkpoints" / "step-0000002")
    _run(["train-prior", *[str(other) if v == str(run) else v for v in common], "--resume"], capsys)
    wa, wb = load_file(run / "model.safetensors"), load_file(other / "model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6

    # Sample: a grid with a row per class and single PNGs; deterministic with a seed.
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    args = ["sample", "--prior", str(run), "--tokenizer", str(tokenizer_dir), "--classes", "0,3,7", "--per-class", "2",
            "--top-k", "10", "--cfg-scale", "1.5", "--seed", "5"]  # fmt: skip
    res = json.loads(_run([*args, "--out", str(s1)], capsys))
    _run([*args, "--out", str(s2)], capsys)
    assert res["images"] == 6 and res["classes"] == [0, 3, 7]
    assert (s1 / "grid.png").is_file() and (s1 / "class3_0004.png").is_file()
    assert np.array_equal(np.asarray(Image.open(s1 / "grid.png")), np.asarray(Image.open(s2 / "grid.png")))

    # Evaluate: bits per token of the held-out split (every 20th sequence, as train-prior held it out) equal the
    # cross-entropy of Prior.forward's logits computed here, as does train-prior's own validation figure.
    tokens, labels = _held_out(token_dir, 20)
    expected_bits = _bits_by_hand(prior, tokens, labels)
    assert summary["val_bits_per_token"] == pytest.approx(expected_bits, rel=1e-5)
    ev = json.loads(_run(["eval-prior", "--prior", str(run), "--tokens", str(token_dir), "--val-every", "20",
                          "--tokenizer", str(tokenizer_dir), "--data", "digits", "--samples-per-class", "2"],
                         capsys))  # fmt: skip
    assert ev["sequences"] == 72
    assert ev["bits_per_token"] == pytest.approx(expected_bits, rel=1e-5)
    assert ev["classifier_real_test_accuracy"] > 0.9


def _held_out(token_dir: Path, every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every `every`-th sequence (0, every, 2·every, …) and its label, read from the shards directly."""
    tokens = np.concatenate([np.load(f) for f in sorted(token_dir.glob("tokens-*.npy"))])
    labels = np.concatenate([np.load(f) for f in sorted(token_dir.glob("labels-*.npy"))])
    assert len(tokens) == len(labels) == 1437
    return torch.from_numpy(tokens[::every].astype(np.int64)), torch.from_numpy(
        labels[::every].astype(np.int64)
    )


def _bits_by_hand(prior: Prior, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean −log2 p(token) under the logits of Prior.forward, with the softmax written out, in float64."""
    with torch.no_grad():
        logits = prior.eval()(tokens, labels).logits.double()  # (N, T, V)
    target = tokens.reshape(len(tokens), -1)
    log_p = logits.gather(-1, target[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
    return float(-log_p.mean() / math.log(2))


def test_eval_prior_sample_accuracy_on_a_known_case(tmp_path, tokenizer_dir, token_dir, capsys, monkeypatch):
    """A prior that has memorised one token grid per class, sampled greedily, yields that grid for every sample
    of the class; a classifier that maps each grid's image to a chosen label then makes the per-class accuracy
    known: 1 where the chosen label is the class, 0 where it is not."""
    from sklearn.neighbors import KNeighborsClassifier

    import vqim.classifier

    run = tmp_path / "p"
    _run(["train-prior", "--tokens", str(token_dir), "--out", str(run), "--steps", "1", *PRIOR], capsys)
    prior = Prior.from_pretrained(run)
    grids = torch.randint(0, 64, (10, 4, 4), generator=torch.Generator().manual_seed(0))
    classes = torch.arange(10)
    torch.manual_seed(0)
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for _ in range(300):  # eval mode: no dropout and no label dropout while memorising
        loss = prior.loss(grids, classes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    assert torch.equal(prior.generate(10, classes, top_k=1), grids)
    prior.save_pretrained(run)

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    with torch.no_grad():
        images = tok.decode(grids)
    chosen = torch.tensor([0, 1, 2, 3, 4, 5, 6, 8, 9, 7])  # classes 7, 8 and 9 get another class's label
    knn = KNeighborsClassifier(n_neighbors=1).fit(vqim.classifier.features(images), chosen.numpy())
    monkeypatch.setattr(
        vqim.classifier, "digits_classifier", lambda size, seed=0: vqim.classifier.SampleClassifier(knn, 1.0)
    )
    ev = json.loads(_run(["eval-prior", "--prior", str(run), "--tokens", str(token_dir), "--tokenizer",
                          str(tokenizer_dir), "--data", "digits", "--samples-per-class", "3", "--top-k", "1"],
                         capsys))  # fmt: skip
    expected = {str(c): float(chosen[c] == c) for c in range(10)}
    assert {str(k): v for k, v in ev["sample_accuracy_per_class"].items()} == expected
    assert ev["sample_accuracy"] == pytest.approx(0.7)


def test_prior_cli_errors(tmp_path, tokenizer_dir, token_dir, capsys):
    run = tmp_path / "p"
    _run(["train-prior", "--tokens", str(token_dir), "--out", str(run), "--steps", "1", *PRIOR], capsys)
    with pytest.raises(SystemExit):
        main(["sample", "--prior", str(run), "--tokenizer", str(tokenizer_dir), "--classes", "12", "--out",
              str(tmp_path / "s")])  # fmt: skip
    assert "out of range" in capsys.readouterr().err
    # A tokenizer other than the one that wrote the tokens is refused.
    torch.manual_seed(1)
    Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, codebook_size=64, lookup_dim=16).save_pretrained(
        tmp_path / "tok2"
    )
    with pytest.raises(SystemExit):
        main(
            [
                "sample",
                "--prior",
                str(run),
                "--tokenizer",
                str(tmp_path / "tok2"),
                "--out",
                str(tmp_path / "s"),
            ]
        )
    assert "trained on tokens of tokenizer" in capsys.readouterr().err
