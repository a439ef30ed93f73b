"""`vqim convert`: a taming-transformers VQGAN becomes a vqim tokenizer that gives taming's codes and decoder output
(fixture made by taming's own modules, tests/fixtures/make_taming_fixture.py), and no checkpoint runs code."""

from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open

from vqim import InputError, Tokenizer
from vqim.cli import main
from vqim.convert import ConvertConfig, convert
from vqim.convert.safe_pickle import Placeholder, load_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "taming"


def _matches_fixture(tok_dir: Path, outputs: Path):
    """The converted tokenizer gives the source's codes, and its decoder output within 1e-5 (2 images, 8×8 tokens)."""
    ref = load_file(outputs)
    tok = Tokenizer.from_pretrained(tok_dir)
    ids = tok.encode(ref["images"])
    assert torch.equal(ids, ref["codes"])
    with torch.no_grad():
        raw = tok.decode_latents(tok.quantizer.decode_ids(ids.reshape(2, -1)), (8, 8))
    assert (raw - ref["decoded"]).abs().max() < 1e-5
    return tok, ids, ref


def test_converted_taming_vqgan_gives_tamings_codes_and_reconstruction(tmp_path):
    res = convert(ConvertConfig(source="taming", checkpoint=str(FIXTURE / "taming_tiny.ckpt"),
                                config=str(FIXTURE / "taming_tiny.yaml"), out=str(tmp_path / "tok")))  # fmt: skip
    assert res["kind"] == "tokenizer" and res["config"]["quant_proj"] is True
    with safe_open(FIXTURE / "taming_tiny_outputs.safetensors", "pt") as f:
        assert f.metadata()["commit"] == "3ba01b241669f5ade541ce990f7650a3b8f65318"
    tok, ids, ref = _matches_fixture(tmp_path / "tok", FIXTURE / "taming_tiny_outputs.safetensors")
    assert (tok.decode(ids) - ((ref["decoded"] + 1) / 2).clamp(0, 1)).abs().max() < 1e-5


def test_convert_command_and_vqim_tools_on_the_result(tmp_path, capsys):
    main(["convert", "--source", "taming", "--checkpoint", str(FIXTURE / "taming_tiny.ckpt"), "--config",
          str(FIXTURE / "taming_tiny.yaml"), "--out", str(tmp_path / "tok")])  # fmt: skip
    assert json.loads(capsys.readouterr().out)["params"]["total"] > 0
    main(["encode", "--tokenizer", str(tmp_path / "tok"), "--data", "digits", "--split", "eval", "--out",
          str(tmp_path / "tokens"), "--image-size", "16", "--no-progress", "--device", "cpu"])  # fmt: skip
    m = json.loads(capsys.readouterr().out)
    assert m["count"] == 360 and m["grid_size"] == [8, 8] and m["codebook_size"] == 16


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_checkpoint_that_would_run_a_command_is_read_without_running_it(tmp_path, zip_format):
    marker = tmp_path / "it_ran"
    path = tmp_path / "evil.ckpt"
    obj = {"state_dict": {"w": torch.ones(2)}, "hyper_parameters": _Evil(marker)}
    if zip_format:
        torch.save(obj, path)
    else:  # a bare pickle (no tensors: torch pickles those by calling torch.load again)
        path.write_bytes(pickle.dumps({"epoch": 3, "hyper_parameters": _Evil(marker)}))
    loaded = load_checkpoint(path)
    assert not marker.exists()  # os.system was never called
    assert isinstance(loaded["hyper_parameters"], Placeholder) and "system" in repr(
        loaded["hyper_parameters"]
    )
    if not zip_format:
        assert loaded["epoch"] == 3
    else:
        assert torch.equal(loaded["state_dict"]["w"], torch.ones(2))
        with pytest.raises(InputError, match="the checkpoint lacks encoder.conv_in.weight"):
            convert(ConvertConfig(source="taming", checkpoint=str(path), config=str(FIXTURE / "taming_tiny.yaml"),
                                  out=str(tmp_path / "o")))  # fmt: skip


def test_bad_inputs_are_refused(tmp_path):
    (tmp_path / "broken.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match="broken.ckpt"):
        load_checkpoint(tmp_path / "broken.ckpt")
    gumbel = tmp_path / "gumbel.yaml"
    gumbel.write_text((FIXTURE / "taming_tiny.yaml").read_text().replace("vqgan.VQModel", "vqgan.GumbelVQ"))
    with pytest.raises(InputError, match="only taming's VQModel"):
        convert(ConvertConfig(source="taming", checkpoint=str(FIXTURE / "taming_tiny.ckpt"), config=str(gumbel),
                              out=str(tmp_path / "o")))  # fmt: skip
    with pytest.raises(InputError, match="--config is needed"):
        convert(
            ConvertConfig(
                source="taming", checkpoint=str(FIXTURE / "taming_tiny.ckpt"), out=str(tmp_path / "o")
            )
        )


def test_converted_llamagen_vq_gives_llamagens_codes_and_reconstruction(tmp_path):
    lg = Path(__file__).parent / "fixtures" / "llamagen"
    res = convert(ConvertConfig(source="llamagen", checkpoint=str(lg / "llamagen_tiny.pt"), image_size=16,
                                out=str(tmp_path / "tok")))  # fmt: skip
    c = res["config"]
    assert (c["l2_norm"], c["lookup_dim"], c["codebook_size"], c["cnn_ch_mult"]) == (True, 8, 16, (1, 2))
    with safe_open(lg / "llamagen_tiny_outputs.safetensors", "pt") as f:
        assert f.metadata()["commit"] == "ce98ec41803a74a90ce68c40ababa9eaeffeb4ec"
    _matches_fixture(tmp_path / "tok", lg / "llamagen_tiny_outputs.safetensors")
    with pytest.raises(InputError, match="not a multiple of the tokenizer's downsampling 2"):
        convert(ConvertConfig(source="llamagen", checkpoint=str(lg / "llamagen_tiny.pt"), image_size=15,
                              out=str(tmp_path / "o")))  # fmt: skip


def test_converted_taming_transformer_gives_tamings_logits_and_greedy_samples(tmp_path, capsys):
    convert(ConvertConfig(source="taming", checkpoint=str(FIXTURE / "taming_tiny.ckpt"),
                          config=str(FIXTURE / "taming_tiny.yaml"), out=str(tmp_path / "tok")))  # fmt: skip
    res = convert(ConvertConfig(source="taming", checkpoint=str(FIXTURE / "taming_prior_tiny.ckpt"),
                                config=str(FIXTURE / "taming_prior_tiny.yaml"), tokenizer=str(tmp_path / "tok"),
                                out=str(tmp_path / "gpt")))  # fmt: skip
    assert res["kind"] == "prior" and res["config"]["pos_embed"] == "1d" and res["config"]["num_classes"] == 3
    ref = load_file(FIXTURE / "taming_prior_tiny_outputs.safetensors")
    from vqim import Prior

    prior = Prior.from_pretrained(tmp_path / "gpt" / "prior")
    with torch.no_grad():
        logits = prior(ref["tokens"], ref["labels"]).logits
    assert (logits - ref["logits"]).abs().max() < 1e-5
    # vqim's cached sampler, greedy, continues exactly as taming's GPT does from the class token.
    assert torch.equal(prior.generate(2, labels=ref["labels"], temperature=0.0).reshape(2, -1), ref["greedy"])
    # The converted pair works with vqim's tools (tokens.json ties the prior to the converted first stage).
    main(["sample", "--prior", str(tmp_path / "gpt" / "prior"), "--tokenizer", str(tmp_path / "tok"), "--per-class",
          "1", "--out", str(tmp_path / "s"), "--no-progress", "--device", "cpu"])  # fmt: skip
    assert json.loads(capsys.readouterr().out)["images"] == 3
    with pytest.raises(InputError, match="not the first stage of this transformer"):
        convert(ConvertConfig(source="taming", checkpoint=str(FIXTURE / "taming_prior_tiny.ckpt"),
                              config=str(FIXTURE / "taming_prior_tiny.yaml"), out=str(tmp_path / "gpt2"),
                              tokenizer=_other_tokenizer(tmp_path)))  # fmt: skip


def _other_tokenizer(tmp_path: Path) -> str:
    lg = Path(__file__).parent / "fixtures" / "llamagen"
    convert(ConvertConfig(source="llamagen", checkpoint=str(lg / "llamagen_tiny.pt"), image_size=32,
                          out=str(tmp_path / "lg")))  # fmt: skip
    return str(tmp_path / "lg")  # 16 codes, but a 16×16 grid at 32 pixels: not this transformer's 8×8


def test_the_options_added_for_conversion_leave_existing_identities_unchanged():
    from vqim import PriorConfig, TokenizerConfig

    assert "quant_proj" not in TokenizerConfig().to_dict() and "pos_embed" not in PriorConfig().to_dict()
    assert TokenizerConfig(quant_proj=True).to_dict()["quant_proj"] is True
    assert PriorConfig(pos_embed="1d").to_dict()["pos_embed"] == "1d"
    assert TokenizerConfig.from_dict(TokenizerConfig(quant_proj=True).to_dict()).quant_proj


def test_what_a_pickle_names_is_never_reached_or_changed(tmp_path):
    import torch._utils

    before = torch._utils._rebuild_tensor_v2.__name__
    # GLOBAL torch._utils._rebuild_tensor_v2, then BUILD {"__name__": "hacked"} on it.
    (tmp_path / "build.pkl").write_bytes(b"ctorch._utils\n_rebuild_tensor_v2\n(dS'__name__'\nS'hacked'\nsb.")
    try:
        load_checkpoint(tmp_path / "build.pkl")
    except InputError:
        pass
    assert torch._utils._rebuild_tensor_v2.__name__ == before
    # A dotted name would reach an attribute of the module: it stays a placeholder.
    (tmp_path / "dotted.pkl").write_bytes(b"ctorch\nstorage.TypedStorage\n.")
    assert isinstance(load_checkpoint(tmp_path / "dotted.pkl")(), Placeholder)
    # torch's legacy format is read only when it holds tensors alone (weights_only); else refused.
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy_ok.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(tmp_path / "legacy_ok.pt")["w"], torch.ones(2))
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(a=1)}, tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)  # fmt: skip
    with pytest.raises(InputError, match="legacy"):
        load_checkpoint(tmp_path / "legacy.pt")
