"""Config helpers: sampling settings, the preset table, architecture-specific fields."""

from __future__ import annotations

import dataclasses

import pytest

from vqim.config import SamplingConfig, TokenizerConfig, get_tokenizer_config, preset_table
from vqim.errors import InputError


def test_sampling_config_validates_and_feeds_generate():
    s = SamplingConfig(temperature=0.5, top_k=10, cfg_scale=2.0, seed=3)
    assert s.kwargs() == {"temperature": 0.5, "top_k": 10, "top_p": None, "cfg_scale": 2.0, "seed": 3}
    for bad in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_arch_only_fields():
    vit, cnn = get_tokenizer_config("vit-vqgan-tiny"), get_tokenizer_config("vqgan-tiny")
    assert "cnn_ch_mult" in vit.to_dict() and "cnn_ch_mult" not in vit.to_dict(arch_only=True)
    assert {"enc_depth", "dec_heads", "pos_embed"}.isdisjoint(cnn.to_dict(arch_only=True))
    assert cnn.to_dict(arch_only=True)["enc_dim"] == 64  # the CNN's latent width


def test_preset_table_counts_every_preset():
    rows = preset_table()
    assert rows["tokenizers"]["vit-vqgan-bb"]["params_M"]["encoder"] == pytest.approx(90.7, abs=0.1)
    assert rows["priors"]["vim-base"]["params_M"] == pytest.approx(706.8, abs=0.1)
    assert rows["tokenizers"]["vqgan-f16-1024"]["train_recipe"]["betas"] == [0.5, 0.9]


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"qkv_bias": "false"}, "qkv_bias must be true or false"),
        ({"quant_proj": 1}, "quant_proj must be true or false"),
        ({"enc_head_dim": "64"}, "enc_head_dim must be an int"),
        ({"dec_head_dim": True}, "dec_head_dim must be an int"),
    ],
)
def test_new_tokenizer_options_are_type_checked(bad, match):
    d = get_tokenizer_config("vit-vqgan-tiny").to_dict()
    with pytest.raises(InputError, match=match):
        TokenizerConfig.from_dict({**d, **bad})


def test_vit_options_on_a_cnn_are_refused():
    cnn = get_tokenizer_config("vqgan-tiny")
    with pytest.raises(InputError, match="qkv_bias, mlp_act: ViT options"):
        dataclasses.replace(cnn, mlp_act="tanh", qkv_bias=False)
