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
    libraries = len(machine.products(torch.ones(1, 1), torch.ones(1, 1)))
    # Before each call one sample per library, the last the fastest: pair 1 fast machine, pair 2 five times slower
    slower = [3 * 0.2] * (libraries - 1), [3 * 1.0] * (libraries - 1)
    durations = iter([*slower[0], 3 * 0.1, 0.1, *slower[1], 3 * 0.5, 0.5])
    monkeypatch.setattr(machine, "timed", lambda fn, repeats, device: [fn(), next(durations)][1:])
    flops = 2 * machine.SQUARE**3
    out = machine.paired_mfu(lambda: None, flops, repeats=2, device="cpu", sgemm_calls=3)
    assert out["median"] == out["q1"] == out["q3"] == 1.0
    assert out["seconds_per_call"] == {"median": 0.3, "min": 0.1, "max": 0.5}
    assert out["sgemm_gflops_before_each_call"]["max"] == round(flops / 0.1 / 1e9, 1)


def test_the_machines_sgemm_is_the_fastest_library(monkeypatch):
    """vqim's linear layers run oneDNN's product on x86-64 CPUs, so the limit a share is taken of must count
    it: the sgemm limit is the fastest library's figure, before or after, whichever library that is."""
    import machine
    from vqim.nn import linear

    figures = iter([{"torch.mm": 150.0, "onednn": 180.0}, {"torch.mm": 140.0, "onednn": 120.0},  # before
                    {"torch.mm": 190.0, "onednn": 170.0}, {"torch.mm": 100.0, "onednn": 110.0}])  # after # fmt: skip
    monkeypatch.setattr(machine, "matmul_gflops_by_library", lambda *a, **k: next(figures))
    monkeypatch.setattr(machine, "memory_read_gb_per_s", lambda device: 10.0)
    with machine.Limits("cpu", shape=(64, 32, 48)) as limits:
        pass
    assert limits["sgemm_gflops"] == 190.0 and limits["sgemm_gflops_at_workload_shape"] == 140.0
    assert limits.by_library() == {"torch.mm": 190.0, "onednn": 180.0}
    assert limits.report()["limits"] == {
        "sgemm_gflops": 190.0, "memory_read_gb_per_s": 10.0, "sgemm_gflops_at_workload_shape": 140.0,
    }  # fmt: skip
    # The products measured are a @ b, through oneDNN too where vqim's layers use it.
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    fns = machine.products(a, b)
    assert ("onednn" in fns) == linear._onednn
    for f in fns.values():
        torch.testing.assert_close(f(), a @ b)


def test_linear_layers_count_the_same_flops_on_either_product():
    """The FLOP count of a training step does not depend on which library runs the linear layers."""
    from vqim.nn import linear

    layer = linear.Linear(24, 40)
    x = torch.randn(3, linear.ONEDNN_MIN_ROWS, 24, requires_grad=True)

    def step():
        layer(x).square().sum().backward()

    with linear.plain_products():
        plain = count_flops(step)["total"]
    assert plain == 3 * 2 * 3 * linear.ONEDNN_MIN_ROWS * 24 * 40  # forward, input and weight gradients
    assert count_flops(step)["total"] == plain


def test_linear_paths_ab_times_each_path_in_alternating_pairs(monkeypatch):
    """Each pair runs the step once on oneDNN's path and once on plain F.linear, the order alternating, and the
    ratio is oneDNN's time over F.linear's (simulated: oneDNN steps take 1 s, plain ones 2 s)."""
    import machine
    from vqim.nn import linear

    seen = []
    monkeypatch.setattr(machine, "timed", lambda fn, repeats, device: [fn(), 1.0 if seen[-1] else 2.0][1:])
    out = machine.linear_paths_ab(lambda: seen.append(linear._enabled), pairs=4, warmup_pairs=1)
    assert seen == [False, True] + [True, False, False, True, True, False, False, True]
    assert out["median"] == out["q1"] == out["q3"] == 0.5 and out["pairs"] == 4
    assert (
        out["seconds_per_step"]["onednn"]["median"] == 1.0
        and out["seconds_per_step"]["f_linear"]["max"] == 2.0
    )
