"""`vqim.nn.linear.linear`: the oneDNN product for many-row fp32 inputs on x86-64 CPUs, with its backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vqim.nn import linear as L

pytestmark = pytest.mark.skipif(not L._onednn, reason="oneDNN's linear is taken on x86-64 CPU builds only")


@pytest.fixture
def calls(monkeypatch):
    """Counts the products that went through oneDNN."""
    n = [0]
    real = L._onednn_product

    def counted(*a):
        n[0] += 1
        return real(*a)

    monkeypatch.setattr(L, "_onednn_product", counted)
    return n


def _grads(fn, x, w, b, g):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = fn(x, w, b)
    y.backward(g)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(300, 48), (2, 150, 48), (3, 2, 40, 48)])
def test_forward_and_gradients_match_f_linear(shape, bias, calls):
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(24, 48)
    b = torch.randn(24) if bias else None
    g = torch.randn(*shape[:-1], 24)
    got = _grads(L.linear, x, w, b, g)
    assert calls[0] == 2  # the forward product and the input gradient's
    want = _grads(F.linear, x, w, b, g)
    for a, e in zip(got, want, strict=True):
        if e is None:
            assert a is None
        else:
            assert a.shape == e.shape
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input(calls):
    torch.manual_seed(0)
    x = torch.randn(48, 256).t()  # (256, 48), column-major
    w, b = torch.randn(32, 48), torch.randn(32)
    torch.testing.assert_close(L.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert calls[0] == 1


def test_second_derivative_matches_f_linear():
    """A gradient penalty differentiates through the backward (R1 does): the same second derivative."""
    torch.manual_seed(0)
    w, b = torch.randn(16, 32, requires_grad=True), torch.randn(16, requires_grad=True)
    x = torch.randn(200, 32)

    def penalty(fn):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(xi, w, b).tanh().sum(), xi, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (w, b))

    for a, e in zip(penalty(L.linear), penalty(F.linear), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_frozen_weight_gets_no_gradient(calls):
    w = torch.randn(8, 16)  # no requires_grad
    x = torch.randn(128, 16, requires_grad=True)
    g = torch.randn(128, 8)
    L.linear(x, w).backward(g)
    assert w.grad is None and calls[0] == 2
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["few rows", "fp64", "bf16 autocast", "plain_products", "width mismatch"],
)
def test_other_inputs_take_f_linear(case, calls):
    w, b = torch.randn(8, 16), torch.randn(8)
    x = torch.randn(L.ONEDNN_MIN_ROWS, 16)
    if case == "few rows":
        L.linear(x[: L.ONEDNN_MIN_ROWS - 1], w, b)
    elif case == "fp64":
        L.linear(x.double(), w.double(), b.double())
    elif case == "bf16 autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert L.linear(x, w, b).dtype == torch.bfloat16
    elif case == "plain_products":
        with L.plain_products():
            L.linear(x, w, b)
    else:
        with pytest.raises(RuntimeError):  # F.linear's own error, not a product over the wrong width
            L.linear(torch.randn(L.ONEDNN_MIN_ROWS, 15), w, b)
    assert calls[0] == 0
    L.linear(x, w, b)
    assert calls[0] == 1


def test_tokenizer_training_step_matches_plain_products(calls):
    """Every linear layer of the ViT tokenizer (blocks, heads, patch embedding, quantizer projections) takes the
    product in training, and the step's loss and gradients are those of F.linear."""
    from vqim import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.from_preset(
        "vit-vqgan-ss", image_size=32, patch_size=4, enc_dim=32, dec_dim=32, enc_depth=1, dec_depth=1,
        enc_heads=2, dec_heads=2, enc_mlp_dim=64, dec_mlp_dim=64, codebook_size=64, lookup_dim=8,
    )  # fmt: skip
    x = torch.rand(2, 3, 32, 32)  # 2 × 64 tokens: 128 rows per product

    def step():
        tok.zero_grad()
        out = tok(x)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in tok.named_parameters() if p.grad is not None}

    seen = set()
    real = L._onednn_product

    def recorded(x, weight, bias, activation=None):
        seen.add(weight.data_ptr())
        return real(x, weight, bias, activation)

    L._onednn_product = recorded
    try:
        loss, grads = step()
    finally:
        L._onednn_product = real
    # every linear layer's forward product went through oneDNN
    assert {m.weight.data_ptr() for m in tok.modules() if isinstance(m, torch.nn.Linear)} <= seen
    calls[0] = 0
    with L.plain_products():
        loss_plain, grads_plain = step()
    assert calls[0] == 0
    torch.testing.assert_close(loss, loss_plain, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_plain.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_plain[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("activation", ["tanh", "gelu"])
@pytest.mark.parametrize("grad", [True, False])
def test_activation_inside_the_product_matches_plain_layers(activation, grad, calls):
    """tanh runs inside oneDNN's product with or without autograd (its backward needs only its output); GELU
    only without (its backward needs its input): outputs and gradients as F.linear then the activation."""
    torch.manual_seed(0)
    act = {"tanh": torch.tanh, "gelu": F.gelu}[activation]
    x, w, b = torch.randn(2, 100, 32), torch.randn(48, 32) * 0.3, torch.randn(48)
    g = torch.randn(2, 100, 48)
    if grad:
        got = _grads(lambda *t: L.linear(*t, activation=activation), x, w, b, g)
        want = _grads(lambda *t: act(F.linear(*t)), x, w, b, g)
        for a, e in zip(got, want, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    else:
        with torch.no_grad():
            torch.testing.assert_close(
                L.linear(x, w, b, activation), act(F.linear(x, w, b)), rtol=1e-5, atol=1e-6
            )
    assert calls[0] == (2 if grad else 1)


def test_tanh_inside_the_product_is_twice_differentiable():
    """Second derivatives through tanh inside the product, against the plain layers in fp64 (fp32's error
    grows with the sums' size, so the tolerance is relative to the largest entry)."""
    torch.manual_seed(0)
    w, b = torch.randn(16, 32, requires_grad=True), torch.randn(16, requires_grad=True)
    x = torch.randn(200, 32)

    def penalty(fn, w, b, x):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(xi, w, b).sum(), xi, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (w, b))

    got = penalty(lambda *t: L.linear(*t, activation="tanh"), w, b, x)
    w64, b64 = (t.detach().double().requires_grad_() for t in (w, b))
    want = penalty(lambda *t: torch.tanh(F.linear(*t)), w64, b64, x.double())
    for a, e in zip(got, want, strict=True):
        assert (a.double() - e).abs().max() <= 2e-5 * e.abs().max()


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="activation"):
        L.linear(torch.randn(4, 3), torch.randn(2, 3), activation="relu")


def test_forward_mode_ad_and_torch_func_take_f_linear(calls):
    """oneDNN's operator has no forward derivative: dual tensors and torch.func transforms go to F.linear."""
    torch.manual_seed(0)
    w, b = torch.randn(8, 16), torch.randn(8)
    x, t = torch.randn(128, 16), torch.randn(128, 16)
    _, tangent = torch.func.jvp(lambda x: L.linear(x, w, b), (x,), (t,))
    torch.testing.assert_close(tangent, t @ w.t())
    grad = torch.func.grad(lambda w: L.linear(x, w, b).square().sum())(w)
    torch.testing.assert_close(grad, torch.func.grad(lambda w: F.linear(x, w, b).square().sum())(w))
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        y = L.linear(fwad.make_dual(x, t), w, b)
        torch.testing.assert_close(fwad.unpack_dual(y).tangent, t @ w.t())
    assert calls[0] == 0


def test_onednn_switched_off_in_torch_backends(calls):
    x, w = torch.randn(128, 16), torch.randn(8, 16)
    torch.backends.mkldnn.enabled = False
    try:
        L.linear(x, w)
    finally:
        torch.backends.mkldnn.enabled = True
    assert calls[0] == 0
    L.linear(x, w)
    assert calls[0] == 1


def test_fused_activation_keeps_hooks_and_wrappers(calls):
    """MLP and the tanh head fuse fc1's product with the activation by skipping fc1's forward; a hook on the
    layer (or a layer that is not a plain Linear) keeps the layer's own forward."""
    from vqim.nn.transformer import MLP

    mlp = MLP(16, 32).eval()
    x = torch.randn(2, 100, 16)
    with torch.no_grad():
        fused = mlp(x)
        assert calls[0] == 2  # fc1 + GELU in one product, then fc2
        fired = []
        handle = mlp.fc1.register_forward_hook(lambda m, i, o: fired.append(o.shape))
        hooked = mlp(x)
        handle.remove()
    assert fired == [(2, 100, 32)]
    torch.testing.assert_close(hooked, fused, rtol=1e-5, atol=1e-6)


def test_tanh_head_slices_and_falls_back_for_other_layouts():
    from vqim.tokenizer import TanhHead

    head = TanhHead(16, 32, 8)
    assert [type(m).__name__ for m in head] == ["Linear", "Tanh", "Linear"]
    assert list(head.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    x = torch.randn(200, 16)
    torch.testing.assert_close(head(x), head[2](torch.tanh(head[0](x))), rtol=1e-5, atol=1e-6)
    first = head[:2]  # nn.Sequential slicing rebuilds the class from modules
    assert isinstance(first, TanhHead) and len(first) == 2
    torch.testing.assert_close(first(x), torch.tanh(head[0](x)), rtol=1e-5, atol=1e-6)
    head[1] = torch.nn.ReLU()  # a replaced middle module is used
    torch.testing.assert_close(head(x), head[2](torch.relu(head[0](x))))
