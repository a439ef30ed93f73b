"""The CNN VQGAN tokenizer (taming-transformers encoder/decoder) behind the same Tokenizer API."""

from __future__ import annotations

import pytest
import torch

from vqim import Tokenizer
from vqim.config import tokenizer_presets


def test_cnn_presets_construct_with_their_grids():
    grids = {"vqgan-f16-1024": (16, 16), "vqgan-f16-16384": (16, 16), "cnn-vqgan-x1": (32, 32),
             "cnn-vqgan-x2": (32, 32), "vqgan-tiny": (8, 8)}  # fmt: skip
    assert set(grids) <= set(tokenizer_presets())
    for name, grid in grids.items():
        with torch.device("meta"):
            tok = Tokenizer.from_preset(name)
        assert tok.config.arch == "cnn" and tok.config.grid_size == grid
    with torch.device("meta"):
        vanilla = Tokenizer.from_preset("vqgan-f16-1024")
        ours = Tokenizer.from_preset("cnn-vqgan-x1")
    # taming's codebook: vanilla VQ (no factorization, no l2); the ViT-VQGAN comparison uses the paper's codebook.
    assert isinstance(vanilla.quantizer.project_in, torch.nn.Identity) and not vanilla.quantizer.l2_norm
    assert ours.quantizer.codebook.shape == (8192, 32) and ours.quantizer.l2_norm


def test_cnn_tokenizer_round_trip_and_gradients(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("vqgan-tiny")
    x = torch.rand(2, 3, 64, 64)
    out = tok(x)
    assert out.ids.shape == (2, 8, 8) and out.reconstruction.shape == x.shape
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tok.encoder.parameters())
    assert all(p.grad is not None for p in tok.decoder.parameters())
    tok.eval()
    ids = tok.encode(x)
    # Equal up to the rounding of the straight-through sum z + (e − z) in the forward pass.
    torch.testing.assert_close(tok.decode(ids), tok(x).reconstruction, atol=2e-5, rtol=0)
    tok.save_pretrained(tmp_path / "t")
    back = Tokenizer.from_pretrained(tmp_path / "t")
    assert back.config == tok.config  # tuples survive the JSON round trip
    assert torch.equal(back.encode(x), ids)


def test_cnn_config_checks_the_downsampling_factor():
    with pytest.raises(ValueError, match="patch_size=16"):
        Tokenizer.from_preset("vqgan-f16-1024", patch_size=8)


def test_cnn_tokenizer_overfits_a_batch():
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("vqgan-tiny", image_size=32, cnn_attn_resolutions=(4,))
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8), size=32, mode="bilinear")
    tok.init_codebook(x)  # vanilla VQ from a normal init collapses to a code or two on one batch
    opt = torch.optim.Adam(tok.parameters(), lr=1e-3)
    first = None
    for _ in range(100):
        out = tok(x)
        first = first if first is not None else float(out.l1_loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert float(tok(x).l1_loss) < first / 3
