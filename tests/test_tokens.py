"""Tokenizer identity: token folders and priors name the tokenizer by weights and config, and a prior refuses
to sample (or be scored, or decoded) through another tokenizer, even one of the same configuration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vqim import Prior, Tokenizer
from vqim.checkpoint import read_json, write_json
from vqim.cli import main
from vqim.tokens import (
    DecodeConfig,
    EncodeConfig,
    TokenizerMismatchError,
    check_tokens_match,
    decode_to_folder,
    encode_to_folder,
    tokenizer_identity,
)


def _tokenizer(seed: int, folder: Path, **kw) -> Path:
    torch.manual_seed(seed)
    Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, codebook_size=64, **kw).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Tokenizers a and b (same config, other weights); digits tokens written by a; a prior trained on them."""
    tmp_path = tmp_path_factory.mktemp("pair")
    a, b = _tokenizer(0, tmp_path / "a"), _tokenizer(1, tmp_path / "b")
    tokens = tmp_path / "tokens"
    manifest = encode_to_folder(EncodeConfig(tokenizer=str(a), data="digits", split="eval", out=str(tokens),
                                             progress=False, device="cpu"))  # fmt: skip
    prior_dir = tmp_path / "prior"
    torch.manual_seed(0)
    Prior.from_preset("vim-tiny", vocab_size=64, grid_size=(4, 4), num_classes=10, depth=1).save_pretrained(
        prior_dir
    )
    # What the prior trainer records in tokens.json: the manifest's tokenizer identity.
    write_json(prior_dir / "tokens.json", {"tokens": str(tokens), **tokenizer_identity(manifest)})
    return a, b, tokens, prior_dir


def _sample(prior_dir: Path, tok: Path, out: Path) -> list[str]:
    main(["sample", "--prior", str(prior_dir), "--tokenizer", str(tok), "--out", str(out), "--per-class", "1",
          "--classes", "0,1", "--device", "cpu"])  # fmt: skip
    return sorted(p.name for p in out.iterdir())


def test_manifest_records_weights_and_config_identity(pair):
    a, b, tokens, _ = pair
    m = read_json(tokens / "manifest.json")
    ta, tb = Tokenizer.from_pretrained(a), Tokenizer.from_pretrained(b)
    assert m["tokenizer_id"] == ta.fingerprint() != tb.fingerprint()
    assert m["tokenizer_config_hash"] == ta.config.hash() == tb.config.hash()  # kept for older readers
    assert m["tokenizer_dir"] == str(a)


def test_sampling_through_another_tokenizer_of_the_same_config_is_refused(pair, tmp_path, capsys):
    a, b, _, prior_dir = pair
    with pytest.raises(SystemExit) as e:
        _sample(prior_dir, b, tmp_path / "s_b")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "trained on tokens of tokenizer" in err[0] and "other weights" in err[0]
    assert str(prior_dir) in err[0] and str(b) in err[0]  # names both folders
    assert not (tmp_path / "s_b").exists()
    assert _sample(prior_dir, a, tmp_path / "s_a") == [
        "class0_0000.png",
        "class1_0001.png",
        "grid.png",
        "samples.json",
    ]


def test_eval_prior_and_decode_refuse_tokens_of_another_tokenizer(pair, tmp_path, capsys):
    a, b, tokens, prior_dir = pair
    other = tmp_path / "tokens_b"
    encode_to_folder(EncodeConfig(tokenizer=str(b), data="digits", split="eval", out=str(other), progress=False,
                                  device="cpu"))  # fmt: skip
    with pytest.raises(SystemExit):
        main(["eval-prior", "--prior", str(prior_dir), "--tokens", str(other), "--device", "cpu"])
    assert "were written by tokenizer" in capsys.readouterr().err
    main(["eval-prior", "--prior", str(prior_dir), "--tokens", str(tokens), "--device", "cpu"])
    assert json.loads(capsys.readouterr().out)["sequences"] == 360
    with pytest.raises(TokenizerMismatchError):
        decode_to_folder(
            DecodeConfig(tokenizer=str(b), ids=str(tokens / "tokens-00000.npy"), out=str(tmp_path / "d"))
        )
    res = decode_to_folder(
        DecodeConfig(
            tokenizer=str(a), ids=str(tokens / "tokens-00000.npy"), out=str(tmp_path / "d"), batch_size=200
        )
    )
    assert res["images"] == 360 and (tmp_path / "d" / "000359.png").is_file()


def test_records_without_tokenizer_id_are_checked_by_config(pair, tmp_path, capsys):
    """A tokens.json written before tokenizer_id existed: the config hash is all there is to compare."""
    a, b, _, prior_dir = pair
    record = read_json(prior_dir / "tokens.json")
    write_json(prior_dir / "tokens.json", {k: v for k, v in record.items() if k != "tokenizer_id"})
    try:
        assert _sample(prior_dir, b, tmp_path / "s_b")  # same config: cannot be told apart, accepted
        c = _tokenizer(0, tmp_path / "c", lookup_dim=16)  # another config
        with pytest.raises(SystemExit):
            _sample(prior_dir, c, tmp_path / "s_c")
        assert "trained on tokens of tokenizer" in capsys.readouterr().err
    finally:
        write_json(prior_dir / "tokens.json", record)


def test_check_tokens_match_compares_the_strongest_identity():
    tok = Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, codebook_size=64)
    ident = tokenizer_identity(tok)
    check_tokens_match(ident, tok, "x", "y")
    check_tokens_match({"tokenizer_config_hash": ident["tokenizer_config_hash"]}, tok, "x", "y")
    check_tokens_match({}, tok, "x", "y")  # nothing recorded: nothing to compare
    with pytest.raises(TokenizerMismatchError, match="other weights"):
        check_tokens_match({**ident, "tokenizer_id": "0" * 64}, tok, "the tokens were written by", "t is")
    with pytest.raises(ValueError, match="tokenizer 000000000000, but t is tokenizer"):
        check_tokens_match({"tokenizer_config_hash": "0" * 16}, tok, "the tokens were written by", "t is")


def test_token_dataset_checks_a_second_folder_by_tokenizer_id(pair, tmp_path):
    from vqim.tokens import TokenDataset

    a, b, tokens, _ = pair
    ds = TokenDataset(tokens)
    ds.check_compatible(64, (4, 4), tokenizer_id=ds.manifest["tokenizer_id"])
    with pytest.raises(TokenizerMismatchError, match="re-encode"):
        ds.check_compatible(64, (4, 4), tokenizer_id=Tokenizer.from_pretrained(b).fingerprint())
    assert np.load(tokens / "tokens-00000.npy").dtype == np.uint16
