"""The benchmarks' FLOP count (benchmarks/machine.py) is the model's: fused attention counts what the same
attention written as matrix products counts, forward and backward (no recomputed scores)."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from machine import count_flops  # noqa: E402
from vqim.nn import linear as linear_module  # noqa: E402


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


def test_step_budget_splits_the_step_and_bounds_its_mfu():
    import step_budget

    seconds = {"products_onednn": 0.4, "products_torch_mm": 0.2, "attention": 0.1}
    flops = {"products_onednn": 32e9, "products_torch_mm": 10e9, "attention": 5e9}
    b = step_budget.budget(seconds, flops, step_s=0.8, limit=100.0)
    c = b["classes"]
    assert c["rest"]["seconds_per_step"] == 0.1 and c["rest"]["share_of_step"] == 0.125
    assert c["products_onednn"]["gflops_in_step"] == 80.0 and c["products_onednn"]["share_of_limit"] == 0.8
    assert c["products_torch_mm"]["gflops_in_step"] == 50.0 and c["attention"]["share_of_limit"] == 0.5
    assert b["mfu"] == round(47 / 0.8 / 100, 3)
    assert b["mfu_if_rest_took_no_time"] == round(47 / 0.7 / 100, 3)
    assert b["mfu_if_products_and_attention_ran_at_the_limit"] == round(0.47 / 0.57, 3)
    assert b["mfu_if_all_matrix_work_ran_like_products_onednn"] == round(47 / (47 / 80 + 0.1) / 100, 3)
    assert b["rest_seconds_allowed_for"]["mfu_0.70"] == round(0.47 / 0.7 - 0.7, 4)  # < 0: out of reach
    assert step_budget.budget({}, {}, step_s=0.5, limit=100.0)["mfu_if_rest_took_no_time"] is None
    assert not b["classes_exceed_step"]
    noisy = step_budget.budget(seconds, flops, step_s=0.65, limit=100.0)  # classes 0.7 s > the plain step
    assert noisy["classes_exceed_step"] and noisy["classes"]["rest"]["seconds_per_step"] == 0.0
    assert noisy["mfu_if_products_and_attention_ran_at_the_limit"] == 1.0


def test_step_budget_names_the_operators_a_training_step_runs():
    """Every operator that counts model FLOPs in a real (tiny) tokenizer step falls in a matrix class, and the
    profiler times each class that has FLOPs under the same names."""
    from torch.profiler import ProfilerActivity, profile

    import step_budget
    from vqim import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.from_preset("vit-vqgan-tiny", image_size=64, codebook_size=64).train()
    x = torch.rand(4, 3, 64, 64)  # 4 × 64 tokens: 256 rows, enough for the oneDNN path on x86-64

    def step():
        tok(x).loss.backward()

    keys = [k for k in count_flops(step) if k != "total"]
    assert keys and all(step_budget.flop_class(k) != "rest" for k in keys), keys
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    timed = {step_budget.op_class(e.key) for e in prof.key_averages() if e.self_cpu_time_total > 0}
    assert {step_budget.flop_class(k) for k in keys} <= timed


@pytest.mark.skipif(not linear_module._onednn, reason="oneDNN's linear path is taken on x86-64 CPUs only")
def test_linear_paths_time_the_same_product_on_every_path():
    import linear_paths

    torch.manual_seed(0)
    x, w, b, g = torch.randn(256, 48), torch.randn(32, 48), torch.randn(32), torch.randn(256, 32)
    expected = {"forward": F.linear(x, w, b), "input_gradient": g @ w, "weight_gradient": g.t() @ x}
    paths = linear_paths.product_paths(x, w, b, g)
    assert paths.keys() == expected.keys()
    for kind, calls in paths.items():
        assert len(calls) >= 2, kind
        for path, call in calls.items():
            torch.testing.assert_close(call(), expected[kind], rtol=1e-4, atol=1e-4, msg=f"{kind} {path}")
