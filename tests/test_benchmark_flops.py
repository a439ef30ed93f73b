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


def test_paired_mfu_divides_each_call_by_the_sgemm_sample_before_it(monkeypatch):
    """A workload exactly as fast as the sgemm sample before it has MFU 1, however the machine's speed moves
    between pairs (simulated: the timer reports each sgemm product and each workload call at a speed that
    changes from pair to pair)."""
    import machine

    monkeypatch.setattr(machine, "SQUARE", 8)  # the products really run; only their timing is simulated
    durations = iter([3 * 0.1, 0.1, 3 * 0.5, 0.5])  # pair 1: fast machine, pair 2: five times slower
    monkeypatch.setattr(machine, "timed", lambda fn, repeats, device: [fn(), next(durations)][1:])
    flops = 2 * machine.SQUARE**3
    out = machine.paired_mfu(lambda: None, flops, repeats=2, device="cpu", sgemm_calls=3)
    assert out["median"] == out["q1"] == out["q3"] == 1.0
    assert out["seconds_per_call"] == {"median": 0.3, "min": 0.1, "max": 0.5}
    assert out["sgemm_gflops_before_each_call"]["max"] == round(flops / 0.1 / 1e9, 1)
