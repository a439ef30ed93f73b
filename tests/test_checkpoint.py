"""Atomic writes: all or nothing, with ordinary file permissions."""

from __future__ import annotations

import os
import stat

import pytest

from vqim.checkpoint import atomic_write, read_json, write_json


def test_written_file_has_umask_permissions_not_owner_only(tmp_path):
    old = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640  # as open() makes it, not 0o600
    assert read_json(tmp_path / "a.json") == {"x": 1}
    # Replacing a file keeps its permissions.
    os.chmod(tmp_path / "a.json", 0o604)
    write_json(tmp_path / "a.json", {"x": 2})
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o604 and read_json(tmp_path / "a.json") == {
        "x": 2
    }


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "a.json", boom)
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_load_tensors_accepts_an_indexed_cpu_device(tmp_path):
    import torch

    from vqim.checkpoint import load_tensors, save_tensors

    save_tensors(tmp_path / "w.safetensors", {"a": torch.arange(3.0)})
    out = load_tensors(tmp_path / "w.safetensors", torch.device("cpu", 0))  # Accelerate's CPU device
    assert torch.equal(out["a"], torch.arange(3.0))


def test_tokenizer_and_prior_round_trip_through_save_pretrained(tmp_path):
    import json

    import pytest
    import torch

    from vqim import Prior, Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, codebook_size=64)
    prior = Prior.from_preset("vim-tiny", vocab_size=64, grid_size=(4, 4), num_classes=3, depth=2)
    tok.save_pretrained(tmp_path / "tok")
    prior.save_pretrained(tmp_path / "prior")
    for d, kind in (("tok", "tokenizer"), ("prior", "prior")):
        assert sorted(p.name for p in (tmp_path / d).iterdir()) == ["config.json", "model.safetensors"]
        assert json.loads((tmp_path / d / "config.json").read_text())["vqim_type"] == kind
    tok2, prior2 = Tokenizer.from_pretrained(tmp_path / "tok"), Prior.from_pretrained(tmp_path / "prior")
    assert tok2.config == tok.config and prior2.config == prior.config  # tuples survive the JSON round trip
    assert not tok2.training and not prior2.training and tok2.pretrained_dir == tmp_path / "tok"
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(tok.eval().encode(x), tok2.encode(x))
    ids = torch.randint(0, 64, (2, 16))
    assert torch.equal(prior.eval()(ids, 1).logits, prior2(ids, 1).logits)
    with pytest.raises(ValueError, match="describes a 'prior' checkpoint, not a 'tokenizer'"):
        Tokenizer.from_pretrained(tmp_path / "prior")


def test_fingerprint_covers_weights_and_config(tmp_path):
    import torch

    from vqim import Tokenizer

    torch.manual_seed(0)
    a = Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, codebook_size=64)
    torch.manual_seed(1)
    b = Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, codebook_size=64)
    assert a.config.hash() == b.config.hash()  # the config alone cannot tell them apart
    assert a.fingerprint() != b.fingerprint()
    a.save_pretrained(tmp_path / "a")
    assert Tokenizer.from_pretrained(tmp_path / "a").fingerprint() == a.fingerprint()
    # One weight nudged, or one config field that does not touch the weights, changes it.
    before = a.fingerprint()
    with torch.no_grad():
        a.quantizer.codebook[0, 0] += 1e-3
    assert a.fingerprint() != before
    c = Tokenizer(a.config.__class__(**{**a.config.to_dict(), "beta": 0.5}))
    c.load_state_dict(a.state_dict())
    assert c.fingerprint() != a.fingerprint()
