"""The benchmarks' FLOP count (benchmarks/machine.py) is the model's: fused attention counts what the same
attention written as matrix products counts, forward and backward (no recomputed scores)."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from machine import count_flops  # noqa: E402


@pytest.mark.parametrize("causal", [False, True])
def test_fused_attention_counts_the_models_flops(causal):
    b, h, n, d = 2, 3, 16, 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))

    def fused():
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()

    def products():
        s = (q @ k.transpose(-2, -1)) * d**-0.5
        if causal:
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        (s.softmax(-1) @ v).sum().backward()

    counted = count_flops(fused)
    assert counted["total"] == count_flops(products)["total"] == 3 * (2 * 2 * b * h * n * n * d)
    backward = sum(v for op, v in counted.items() if op.endswith("_backward"))
    assert backward == 2 * (2 * 2 * b * h * n * n * d)  # four products: twice the forward's two
