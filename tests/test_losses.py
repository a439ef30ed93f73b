"""Tests of vqim.losses against direct float64 evaluations of the formulas in SPEC.md."""

import math

import pytest
import torch

from vqim import losses


def _ref_logit_laplace_nll(mu, log_b, target, eps):
    """−log f(φ(x)), f(y|μ,b) = exp(−|logit(y)−μ|/b) / (2b·y(1−y)), literally, in float64; per element."""
    x, mu, b = target.double(), mu.double(), log_b.double().exp()
    y = (1 - 2 * eps) * x + eps
    logit_y = torch.log(y / (1 - y))
    f = torch.exp(-(logit_y - mu).abs() / b) / (2 * b * y * (1 - y))
    return -torch.log(f)


@pytest.mark.parametrize("eps", [0.1, 0.05])
def test_logit_laplace_nll_matches_direct_formula(eps):
    torch.manual_seed(0)
    shape = (2, 3, 5, 4)
    mu = torch.randn(shape) * 2
    log_b = torch.rand(shape) * 3 - 2  # b in [e^-2, e]
    target = torch.rand(shape)
    target[0, 0, 0] = 0.0  # exact black and white pixels
    target[1, 2, 3] = 1.0
    got = losses.logit_laplace_nll(mu, log_b, target, eps=eps)
    ref = _ref_logit_laplace_nll(mu, log_b, target, eps)
    assert got.ndim == 0
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(ref.mean().item(), rel=1e-5, abs=1e-6)


def test_logit_laplace_nll_default_eps_and_elementwise_values():
    torch.manual_seed(1)
    mu, log_b = torch.randn(6) * 2, torch.randn(6) * 0.5
    target = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.9, 0.01])
    ref = _ref_logit_laplace_nll(mu, log_b, target, 0.1)
    assert losses.LOGIT_LAPLACE_EPS == 0.1
    assert losses.logit_laplace_nll(mu, log_b, target).item() == pytest.approx(ref.mean().item(), rel=1e-5)
    # Element by element (a one-element mean is the element), so errors cannot cancel in the mean.
    for i in range(6):
        one = losses.logit_laplace_nll(mu[i : i + 1], log_b[i : i + 1], target[i : i + 1])
        assert one.item() == pytest.approx(ref[i].item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mu,b", [(0.0, 1.0), (1.5, 0.5), (-2.0, 0.25), (0.5, 0.8), (3.0, 0.1)])
def test_module_density_integrates_to_one(mu, b):
    # exp(−nll) of vqim's loss with ε = 0 (φ = identity), per grid point via vmap: a density on (0, 1) must
    # integrate to 1 (a wrong normaliser, e.g. a missing log 2 or log b, scales it by a constant).
    u = torch.linspace(mu - 8 * b, mu + 8 * b, 20_001, dtype=torch.float64)
    y = torch.sigmoid(u)
    mu_t = torch.tensor([mu])
    log_b_t = torch.tensor([math.log(b)])
    nll = torch.func.vmap(lambda t: losses.logit_laplace_nll(mu_t, log_b_t, t, eps=0.0))(y.float()[:, None])
    integral = torch.trapezoid(torch.exp(-nll.double()) * y * (1 - y), u).item()
    inside = 1 - math.exp(-8)  # Laplace mass within ±8b of μ in logit space
    assert integral == pytest.approx(inside, abs=1e-3)


def test_logit_laplace_mean():
    torch.manual_seed(2)
    mu = torch.randn(3, 4, 5) * 3
    ref = (torch.sigmoid(mu.double()) - 0.1) / 0.8
    torch.testing.assert_close(losses.logit_laplace_mean(mu).double(), ref, rtol=1e-6, atol=1e-7)
    ref05 = (torch.sigmoid(mu.double()) - 0.05) / 0.9
    torch.testing.assert_close(losses.logit_laplace_mean(mu, eps=0.05).double(), ref05, rtol=1e-6, atol=1e-7)
    # μ = logit(φ(x)) reconstructs x.
    x = torch.rand(50)
    y = 0.8 * x + 0.1
    torch.testing.assert_close(losses.logit_laplace_mean(torch.log(y / (1 - y))), x, rtol=1e-5, atol=1e-6)


def test_squash_unsquash():
    torch.manual_seed(3)
    x = torch.rand(100)
    torch.testing.assert_close(losses.squash(x), 0.8 * x + 0.1)
    torch.testing.assert_close(losses.unsquash(losses.squash(x)), x)
    torch.testing.assert_close(losses.squash(losses.unsquash(x)), x)
    torch.testing.assert_close(losses.unsquash(losses.squash(x, eps=0.2), eps=0.2), x)
    ends = losses.squash(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(ends, torch.tensor([0.1, 0.9]))


@pytest.mark.parametrize("beta", [0.25, 0.6])
def test_vq_loss_value_and_gradient_split(beta):
    torch.manual_seed(4)
    z = torch.randn(5, 7, requires_grad=True)
    e = torch.randn(5, 7, requires_grad=True)
    loss = losses.vq_loss(z, e, beta)
    n = z.numel()
    d = (z - e).detach()
    assert loss.item() == pytest.approx((1 + beta) * (d**2).sum().item() / n, rel=1e-6)
    g_z, g_e = torch.autograd.grad(loss, [z, e])
    # Codebook term ‖sg[z]−e‖² moves e only; commitment β‖z−sg[e]‖² moves z only.
    torch.testing.assert_close(g_e, -2 * d / n)
    torch.testing.assert_close(g_z, beta * 2 * d / n)


def test_vq_loss_default_beta():
    torch.manual_seed(5)
    z = torch.randn(4, 3, requires_grad=True)
    e = torch.randn(4, 3)
    (g_z,) = torch.autograd.grad(losses.vq_loss(z, e), [z])
    torch.testing.assert_close(g_z, 0.25 * 2 * (z - e).detach() / z.numel())


def test_l1_l2_are_means_of_elementwise_errors_with_their_gradients():
    torch.manual_seed(6)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    t = torch.rand(2, 3, 8, 8)
    d = (x.detach() - t).double()
    n = d.numel()
    l2, l1 = losses.l2_loss(x, t), losses.l1_loss(x, t)
    assert l2.ndim == 0 and l1.ndim == 0
    assert l2.item() == pytest.approx((d**2).sum().item() / n, rel=1e-6)  # a mean, not a sum
    assert l1.item() == pytest.approx(d.abs().sum().item() / n, rel=1e-6)
    # Gradients: 2(x − t)/n for L2, sign(x − t)/n for L1 (so the arguments' order matters).
    (g2,) = torch.autograd.grad(l2, x)
    (g1,) = torch.autograd.grad(l1, x)
    torch.testing.assert_close(g2.double(), 2 * d / n)
    torch.testing.assert_close(g1.double(), d.sign() / n)


def test_l1_l2_of_half_precision_inputs_are_computed_in_fp32():
    torch.manual_seed(7)
    # A mean over 4096 terms kept in bf16 (8 mantissa bits, about 3 significant digits) would miss the float64
    # value of the same bf16-rounded inputs by far more than 1e-5; fp32 arithmetic meets it.
    t = torch.ones(4096)
    x = t + torch.randn(4096) * 0.05
    xb, tb = x.bfloat16(), t.bfloat16()
    d = xb.double() - tb.double()  # the errors the bf16 inputs hold, in float64
    l2, l1 = losses.l2_loss(xb, tb), losses.l1_loss(xb, tb)
    assert l2.dtype == torch.float32 and l1.dtype == torch.float32
    assert l2.item() == pytest.approx((d**2).mean().item(), rel=1e-5)
    assert l1.item() == pytest.approx(d.abs().mean().item(), rel=1e-5)
