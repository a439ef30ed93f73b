"""GPU checks; they run only where CUDA is present (never in CI, which has no GPU)."""

from __future__ import annotations

import pytest
import torch

from vqim import Tokenizer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_bf16_autocast_training_step_and_fp32_lookup():
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("vit-vqgan-tiny").cuda().train()
    x = torch.rand(8, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = tok(x)
        z = tok.encode_latents(x)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tok.parameters())
    # The lookup runs in fp32 under autocast: same ids as a lookup of the same latents without autocast.
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ids_amp = tok.quantizer(z).ids
    ids_fp32 = tok.quantizer(z.float()).ids
    assert torch.equal(ids_amp, ids_fp32)


@cuda
def test_gpu_matches_cpu_in_fp32():
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("vit-vqgan-tiny").eval()
    x = torch.rand(4, 3, 64, 64)
    ids_cpu = tok.encode(x)
    torch.backends.cuda.matmul.allow_tf32 = False
    ids_gpu = tok.cuda().encode(x.cuda()).cpu()
    assert (ids_cpu == ids_gpu).float().mean() > 0.99
    rec = tok.decode(ids_cpu.cuda()).cpu()
    torch.testing.assert_close(rec, tok.cpu().decode(ids_cpu), atol=1e-4, rtol=1e-4)
