"""vqim.nn.dropout: the rate, scaling, independence and reproducibility of the cheap CPU mask, its gradient, and
the explicit attention used when attention dropout is on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vqim.nn.transformer as T
from vqim.nn.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.03])
def test_rate_and_scale(p):
    torch.manual_seed(0)
    n = 1 << 20
    m = keep_mask((n,), p)
    q = round(p * 65536) / 65536
    dropped = float((m == 0).double().mean())
    assert abs(dropped - q) < 5 * math.sqrt(q * (1 - q) / n)  # within 5 standard errors
    kept = m[m != 0]
    assert torch.all(kept == kept[0]) and float(kept[0]) == pytest.approx(1 / (1 - q), rel=1e-6)
    x = torch.randn(n).abs() + 1  # positive, so the mean of x·mask estimates E[mask] = 1
    assert float((x * m).double().mean() / x.double().mean()) == pytest.approx(1.0, abs=5e-3)


def test_lanes_are_independent():
    """Each 64-bit word gives four elements: every lane drops at the rate, and neighbours are uncorrelated."""
    torch.manual_seed(1)
    n = 1 << 20
    d = (keep_mask((n,), 0.25) == 0).double()
    lanes = d.view(-1, 4).mean(0)
    assert torch.all((lanes - 0.25).abs() < 5 * math.sqrt(0.25 * 0.75 / (n / 4))), lanes
    a, b = d[:-1] - d.mean(), d[1:] - d.mean()
    corr = float((a * b).mean() / (a.square().mean() * b.square().mean()).sqrt())
    assert abs(corr) < 5 / math.sqrt(n), corr


def test_reproducible_and_seed_dependent():
    torch.manual_seed(3)
    a = keep_mask((1000,), 0.2)
    torch.manual_seed(3)
    b = keep_mask((1000,), 0.2)
    c = keep_mask((1000,), 0.2)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_gradient_is_the_same_mask():
    torch.manual_seed(4)
    x = torch.randn(64, 33, requires_grad=True)
    y = dropout(x, 0.3)
    y.backward(torch.ones_like(y))
    mask = y.detach() / x.detach()
    assert torch.allclose(x.grad, mask)
    values = torch.unique(x.grad).tolist()
    assert len(values) == 2 and values[0] == 0.0
    assert values[1] == pytest.approx(1 / (1 - round(0.3 * 65536) / 65536), rel=1e-6)


def test_identity_when_off_and_edges():
    x = torch.randn(10, 10)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError):
        dropout(x, 1.5)
    m = Dropout(0.5).eval()
    assert m(x) is x
    with pytest.raises(ValueError):
        Dropout(-0.1)


def test_bf16_mask():
    torch.manual_seed(5)
    m = keep_mask((4096,), 0.1, dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16 and set(torch.unique(m.float()).tolist()) <= {0.0, float(m.max())}


@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_dropout_is_sdpa_math(monkeypatch, causal):
    """With the mask replaced by the identity, the explicit attention equals SDPA (causal or not, with a mask)."""
    torch.manual_seed(6)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    monkeypatch.setattr(T, "dropout", lambda x, p, training=True: x)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(T._attention_with_dropout(q, k, v, None, causal, 0.1), ref)
    mask = torch.rand(7, 7) > 0.3
    mask[:, 0] = True  # every query sees at least one key
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(T._attention_with_dropout(q, k, v, mask, False, 0.1), ref)


def test_attention_dropout_drops_probabilities():
    """In training with dropout, a causal block's attention output is a masked, rescaled mix of values: with
    every value row equal to 1, each output is (kept probability mass) / (1 − q), whose mean over many rows is 1."""
    torch.manual_seed(7)
    attn = T.Attention(16, 2, dropout=0.5, causal=True).train()
    b, n, hd = 64, 16, 8
    q = torch.randn(b, 2, n, hd)
    k = torch.randn(b, 2, n, hd)
    v = torch.ones(b, 2, n, hd)
    out = T._attention_with_dropout(q, k, v, None, True, 0.5)
    assert not torch.allclose(out, torch.ones_like(out))  # some probability mass was dropped
    assert float(out.mean()) == pytest.approx(1.0, abs=0.05)
    x = torch.randn(2, n, 16)
    assert not torch.equal(attn(x), attn(x))  # different masks per call
    attn.eval()
    assert torch.equal(attn(x), attn(x))
