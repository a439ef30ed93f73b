"""`vqim convert`: a taming-transformers VQGAN becomes a vqim tokenizer that gives taming's codes and decoder output
(fixture made by taming's own modules, tests/fixtures/make_taming_fixture.py), and no checkpoint runs code."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, safe_open

from vqim import InputError, Tokenizer
from vqim.cli import main
from vqim.convert import ConvertConfig, convert, enhancing, llamagen, taming
from vqim.convert.safe_pickle import Placeholder, load_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "taming"


def _matches_fixture(tok_dir: Path, outputs: Path, pixels: bool = False):
    """The converted tokenizer gives the source's codes, and its decoder output within 1e-5 (with pixels: its
    unclamped image of the codes, for a source that decodes to [0, 1])."""
    ref = load_file(outputs)
    tok = Tokenizer.from_pretrained(tok_dir)
    ids = tok.encode(ref["images"])
    assert torch.equal(ids, ref["codes"])
    with torch.no_grad():
        raw = tok.decode_latents(tok.quantizer.decode_ids(ids.reshape(len(ids), -1)), tuple(ids.shape[1:]))
    assert ((tok.to_image(raw) if pixels else raw) - ref["decoded"]).abs().max() < 1e-5
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
    assert (c["l2_norm"], c["lookup_dim"], c["codebook_size"], c["cnn_ch_mult"]) == (True, 8, 16, (1, 1))
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
    added = ("vit_head", "enc_head_dim", "dec_head_dim", "qkv_bias", "mlp_act")
    assert not set(added) & set(TokenizerConfig().to_dict())
    changed = TokenizerConfig(
        vit_head="linear", enc_head_dim=64, dec_head_dim=64, qkv_bias=False, mlp_act="tanh"
    )
    assert TokenizerConfig.from_dict(changed.to_dict()) == changed and set(added) <= set(changed.to_dict())
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


# ---------------------------------------------------------------------------------------------- enhancing
ENH = Path(__file__).parent / "fixtures" / "enhancing"


def _enhancing_ckpt(tmp_path: Path, sd: dict[str, torch.Tensor]) -> Path:
    """sd in a Lightning checkpoint as ViTVQ's are saved: with loss.* keys and non-tensor hyper-parameters."""
    state = {**sd, "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4)}
    path = tmp_path / "vitvq.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 100,
                "hyper_parameters": {"args": argparse.Namespace(base=["configs/imagenet_vitvq_small.yaml"])}},
               path)  # fmt: skip
    return path


def test_converted_enhancing_vitvqgan_gives_its_codes_and_reconstruction(tmp_path):
    sd = load_file(ENH / "enhancing_tiny.safetensors")
    res = convert(ConvertConfig(source="enhancing", checkpoint=str(_enhancing_ckpt(tmp_path, sd)),
                                config=str(ENH / "enhancing_tiny.yaml"), out=str(tmp_path / "tok")))  # fmt: skip
    c = res["config"]
    assert (c["vit_head"], c["qkv_bias"], c["mlp_act"], c["pos_embed"]) == ("linear", False, "tanh", "sincos")
    assert (c["enc_head_dim"], c["dec_head_dim"], c["lookup_dim"], c["l2_norm"]) == (16, 64, 8, True)
    with safe_open(ENH / "enhancing_tiny_outputs.safetensors", "pt") as f:
        assert f.metadata()["commit"] == "e1c185da5cc0eeefdded68cbff888d5b9c248372"
    tok, ids, ref = _matches_fixture(
        tmp_path / "tok", ENH / "enhancing_tiny_outputs.safetensors", pixels=True
    )
    assert (tok.decode(ids) - ref["decoded"].clamp(0, 1)).abs().max() < 1e-5
    # The source's trained parameters, one for one (its fixed position tables are not trained; vqim's are buffers).
    assert res["params"]["total"] == sum(v.numel() for k, v in sd.items() if "pos_embedding" not in k)
    # Straight from the weights file too, and with the tables kept as learned ones (what a checkpoint whose tables
    # are not the sine-cosine ones gets): the same codes and images.
    convert(ConvertConfig(source="enhancing", checkpoint=str(ENH / "enhancing_tiny.safetensors"),
                          config=str(ENH / "enhancing_tiny.yaml"), out=str(tmp_path / "tok2")))  # fmt: skip
    _matches_fixture(tmp_path / "tok2", ENH / "enhancing_tiny_outputs.safetensors", pixels=True)
    config = yaml.safe_load((ENH / "enhancing_tiny.yaml").read_text())
    moved = {**sd, "decoder.de_pos_embedding": sd["decoder.de_pos_embedding"] + 0.01}
    assert enhancing.tokenizer_config(config, moved, "x").pos_embed == "learned"
    learned = enhancing.tokenizer_config(config, {**sd, "encoder.en_pos_embedding": torch.zeros(1)}, "x")
    assert learned.pos_embed == "learned"
    model = Tokenizer(learned)
    model.load_state_dict(enhancing.tokenizer_state(sd, learned, "x"))
    model.save_pretrained(tmp_path / "tok3")
    _matches_fixture(tmp_path / "tok3", ENH / "enhancing_tiny_outputs.safetensors", pixels=True)


def test_half_precision_checkpoints_convert_to_the_float32_models_of_their_values(tmp_path):
    """A half-precision checkpoint converts to what its values give at float32: the taming and LlamaGen fixtures
    are stored in half precision (the sources ran on those values), and the enhancing converter's folded patch
    embedding is computed from half-precision weights without rounding the sums back to half precision."""
    assert (
        load_checkpoint(FIXTURE / "taming_tiny.ckpt")["state_dict"]["encoder.conv_in.weight"].dtype
        == torch.half
    )
    convert(ConvertConfig(source="taming", checkpoint=str(FIXTURE / "taming_tiny.ckpt"),
                          config=str(FIXTURE / "taming_tiny.yaml"), out=str(tmp_path / "tok")))  # fmt: skip
    assert {p.dtype for p in Tokenizer.from_pretrained(tmp_path / "tok").parameters()} == {torch.float32}
    sd = load_file(ENH / "enhancing_tiny.safetensors")
    config = yaml.safe_load((ENH / "enhancing_tiny.yaml").read_text())
    cfg = enhancing.tokenizer_config(config, sd, "x")
    half = enhancing.tokenizer_state({k: v.half() for k, v in sd.items()}, cfg, "x")
    rounded = enhancing.tokenizer_state({k: v.half().float() for k, v in sd.items()}, cfg, "x")
    assert half.keys() == rounded.keys()
    for k in ("encoder.patch_embed.bias", "decoder.head.bias"):
        assert half[k].dtype == torch.float32 and torch.equal(half[k], rounded[k]), k
    assert all(torch.equal(half[k].float(), rounded[k].float()) for k in half)


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_full_size_enhancing_vitvqgans_convert_with_the_sources_parameter_counts(size):
    """The released small / base / large ViT-VQGANs: state dicts of the shapes the source's own modules make from
    its configs (tests/fixtures/make_enhancing_full_size_shapes.py, enhancing-transformers e1c185d) convert to
    vqim tokenizers of the same shapes and the source's trained parameter count."""
    from vqim.nn.transformer import sincos_2d

    record = json.loads((ENH / "full_size_shapes.json").read_text())["models"][size]
    params, shapes = record["params"], _expand(record["shapes"])
    g, ed, dd = (
        params["image_size"] // params["patch_size"],
        params["encoder"]["dim"],
        params["decoder"]["dim"],
    )
    # Weights on the meta device (shapes, no memory); the fixed tables as the source makes them, in vqim's layout.
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items() if k not in record["untrained"]}
    sd["encoder.en_pos_embedding"] = sincos_2d(g, g, ed)[None]
    sd["decoder.de_pos_embedding"] = sincos_2d(g, g, dd)[None]
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    cfg = enhancing.tokenizer_config({"model": {"target": "enhancing.modules.stage1.vitvqgan.ViTVQ", "params": params}},
                                     sd, f"imagenet_vitvq_{size}.yaml")  # fmt: skip
    assert cfg.pos_embed == "sincos" and cfg.dec_head_dim == 64
    state = enhancing.tokenizer_state(sd, cfg, "x")
    with torch.device("meta"):
        tok = Tokenizer(cfg)
    shape = lambda d: {k: tuple(v.shape) for k, v in d.items()}
    assert shape(state) == shape(tok.state_dict())
    assert tok.num_params()["total"] == record["trained_parameters"]


def test_enhancing_configs_it_cannot_convert_are_refused(tmp_path):
    config = yaml.safe_load((ENH / "enhancing_tiny.yaml").read_text())
    sd = load_file(ENH / "enhancing_tiny.safetensors")
    config["model"]["params"]["quantizer"]["use_residual"] = True
    with pytest.raises(InputError, match="residual quantizers are not converted"):
        enhancing.tokenizer_config(config, sd, "x.yaml")
    with pytest.raises(InputError, match="only enhancing-transformers' ViTVQ"):
        enhancing.tokenizer_config(
            {"model": {"target": "enhancing.modules.stage1.vitvqgan.ViTVQGumbel"}}, sd, "x"
        )
    with pytest.raises(InputError, match="--config is needed for --source enhancing"):
        convert(ConvertConfig(source="enhancing", checkpoint=str(ENH / "enhancing_tiny.safetensors"),
                              out=str(tmp_path / "o")))  # fmt: skip
    with pytest.raises(InputError, match="lacks encoder.to_patch_embedding.0.weight"):
        convert(ConvertConfig(source="enhancing", checkpoint=str(FIXTURE / "taming_tiny.ckpt"),
                              config=str(ENH / "enhancing_tiny.yaml"), out=str(tmp_path / "o")))  # fmt: skip
    # A --config whose widths differ from the weights' is blamed on the two files given, not on the output folder.
    wide = yaml.safe_load((ENH / "enhancing_tiny.yaml").read_text())
    wide["model"]["params"]["encoder"]["mlp_dim"] *= 2
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump(wide))
    with pytest.raises(InputError, match=r"the weights do not fit the model --config .*wide\.yaml describes"):
        convert(ConvertConfig(source="enhancing", checkpoint=str(ENH / "enhancing_tiny.safetensors"),
                              config=str(tmp_path / "wide.yaml"), out=str(tmp_path / "o")))  # fmt: skip
    # A --config shallower than the weights would silently drop blocks: refused, naming both depths.
    config = yaml.safe_load((ENH / "enhancing_tiny.yaml").read_text())
    depth = config["model"]["params"]["decoder"]["depth"]
    config["model"]["params"]["decoder"]["depth"] = depth - 1
    cfg = enhancing.tokenizer_config(config, sd, "x.yaml")
    with pytest.raises(InputError, match=f"{depth} blocks in the checkpoint, {depth - 1} in the config"):
        enhancing.tokenizer_state(sd, cfg, "x.ckpt")


# ------------------------------------------------------------------------------------ full size: taming, LlamaGen
def _expand(shapes: dict[str, list[int]]) -> dict[str, tuple[int, ...]]:
    """Keys as tests/fixtures/make_full_size_shapes.py writes them: "{a-b}" stands for each index a..b."""
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        m = re.search(r"\{(\d+)-(\d+)\}", key)
        if m is None:
            out[key] = tuple(shape)
            continue
        for i in range(int(m[1]), int(m[2]) + 1):
            out.update(_expand({key[: m.start()] + str(i) + key[m.end() :]: shape}))
    return out


def _full_size(source: str, name: str) -> tuple[dict, int, dict[str, tuple[int, ...]], set[str]]:
    """(config, parameter count, key → shape, buffer keys) of a released model, recorded from the source's own
    modules on the meta device (tests/fixtures/make_full_size_shapes.py)."""
    data = json.loads((Path(__file__).parent / "fixtures" / source / "full_size_shapes.json").read_text())
    assert data["commit"] == {"taming": "3ba01b241669f5ade541ce990f7650a3b8f65318",
                              "llamagen": "ce98ec41803a74a90ce68c40ababa9eaeffeb4ec"}[source]  # fmt: skip
    m = data["models"][name]
    return m["config"], m["params"], _expand(m["shapes"]), set(_expand(dict.fromkeys(m["buffers"], [])))


def _meta(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A state dict of these shapes on the meta device (no memory)."""
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _trained(shapes: dict[str, tuple[int, ...]], buffers: set[str]) -> int:
    return sum(torch.Size(s).numel() for k, s in shapes.items() if k not in buffers)


@pytest.mark.parametrize("name", ["vqgan_imagenet_f16_1024", "vqgan_imagenet_f16_16384"])
def test_full_size_taming_vqgans_convert_with_the_sources_parameter_counts(name):
    config, params, shapes, buffers = _full_size("taming", name)
    assert not buffers and _trained(shapes, buffers) == params  # every entry of taming's VQModel is trained
    # Released checkpoints also hold the loss's discriminator and LPIPS weights (loss.*): training only, left out.
    sd = _meta({**shapes, "loss.discriminator.main.0.weight": (64, 3, 4, 4)})
    cfg = taming.tokenizer_config({"model": config}, f"{name}.yaml")
    assert (cfg.codebook_size, cfg.lookup_dim, cfg.patch_size) == (config["params"]["n_embed"], 256, 16)
    state = taming.tokenizer_state(sd, cfg, name)
    with torch.device("meta"):
        tok = Tokenizer.build_checked(cfg, state, name)
    assert _shapes(state) == _shapes(tok.state_dict())
    assert tok.num_params()["total"] == params  # 72.1M (f16-1024), 76.1M (f16-16384)


def test_full_size_taming_cin_transformer_converts_with_the_sources_parameter_counts():
    from vqim import Prior

    config, params, shapes, buffers = _full_size("taming", "cin_transformer")
    _, first_params, first, _ = _full_size("taming", "vqgan_imagenet_f16_16384")
    # minGPT's causal masks (blocks.*.attn.mask) are buffers; the transformer's trained parameters: 1.41B, the
    # README's "1.4B transformer". Its checkpoint holds the f16-16384 VQGAN as first_stage_model.* (and no cond
    # stage weights: a Labelator has none).
    assert buffers == {f"transformer.blocks.{i}.attn.mask" for i in range(48)}
    assert _trained(shapes, buffers) == params and round(params / 1e8) == 14
    sd = _meta({**shapes, **{f"first_stage_model.{k}": s for k, s in first.items()}})
    pcfg, tcfg, sos = taming.prior_config({"model": config}, "cin_transformer.yaml")
    assert (pcfg.vocab_size, pcfg.grid_size, pcfg.num_classes, pcfg.depth, pcfg.dim, sos) == (
        16384, (16, 16), 1000, 48, 1536, None
    )  # fmt: skip
    # On the meta device, where the weights are: prior_state adds tables of its own (zero head bias, last position).
    with torch.device("meta"):
        state = taming.prior_state(sd, pcfg, sos, "cin")
        prior = Prior.build_checked(pcfg, state, "cin")
    assert _shapes(state) == _shapes(prior.state_dict())
    # vqim's prior is taming's trained tensors, except: the class vectors are rows of minGPT's one token table (vqim:
    # its own class table, 1000 rows + a null class); minGPT's head has no bias (vqim's: zero); of minGPT's
    # block_size positions the sequence (class, z_0 .. z_254) uses 256, vqim's cond_pos + 256 image positions (the
    # last, z_255's, is never an input: zero).
    d, hw, block = pcfg.dim, 16 * 16, config["params"]["transformer_config"]["params"]["block_size"]
    extra = (pcfg.num_classes + 1) * d + pcfg.vocab_size + (hw + 1 - block) * d
    assert prior.num_params()["total"] == params + extra
    first_sd = {
        k[len("first_stage_model.") :]: v for k, v in sd.items() if k.startswith("first_stage_model.")
    }
    tstate = taming.tokenizer_state(first_sd, tcfg, "cin")
    with torch.device("meta"):
        tok = Tokenizer.build_checked(tcfg, tstate, "cin")
    assert _shapes(tstate) == _shapes(tok.state_dict()) and tok.num_params()["total"] == first_params


@pytest.mark.parametrize("name", ["VQ-16", "VQ-8"])
def test_full_size_llamagen_vqs_convert_with_the_sources_parameter_counts(name):
    config, params, shapes, buffers = _full_size("llamagen", name)
    # quantize.codebook_used is a buffer (the recent codes, a training statistic), left out; the trained
    # parameters are the README's 72M (VQ-16) and 70M (VQ-8).
    assert buffers == {"quantize.codebook_used"} and _trained(shapes, buffers) == params
    assert round(params / 1e6) == {"VQ-16": 72, "VQ-8": 70}[name]
    sd = _meta(shapes)
    cfg = llamagen.tokenizer_config(sd, 256, f"vq_ds{name[3:]}_c2i.pt")
    assert (cfg.codebook_size, cfg.lookup_dim, cfg.cnn_ch_mult, cfg.cnn_num_res_blocks, cfg.enc_dim) == (
        config["codebook_size"], config["codebook_embed_dim"], tuple(config["encoder_ch_mult"]), 2,
        config["z_channels"],
    )  # fmt: skip
    state = llamagen.tokenizer_state(sd, cfg, name)
    with torch.device("meta"):
        tok = Tokenizer.build_checked(cfg, state, name)
    assert _shapes(state) == _shapes(tok.state_dict())
    assert tok.num_params()["total"] == params
