"""Tests of vqim.quantize.VectorQuantizer against brute-force references written out here."""

import copy
import math

import pytest
import torch
from torch import nn

from vqim.quantize import VectorQuantizer


def _project(q: VectorQuantizer, z: torch.Tensor) -> torch.Tensor:
    """project_in by hand: z W^T + b for a Linear, z itself for an Identity."""
    if isinstance(q.project_in, nn.Linear):
        return z @ q.project_in.weight.t() + q.project_in.bias
    return z


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their Euclidean norm (explicit, not F.normalize)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True))


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact pairwise Euclidean distances by broadcasting (cdist's matmul path is off by ~1e-4 at 0)."""
    return (a[:, None, :] - b[None, :, :]).norm(dim=-1)


def _cosine_ids(q: VectorQuantizer, z: torch.Tensor) -> torch.Tensor:
    ze = _project(q, z.reshape(-1, z.shape[-1])).double()
    c = q.codebook.double()
    cos = (ze @ c.t()) / (ze.norm(dim=1)[:, None] * c.norm(dim=1)[None, :])
    return cos.argmax(1).reshape(z.shape[:-1])


def _euclid_ids(q: VectorQuantizer, z: torch.Tensor) -> torch.Tensor:
    ze = _project(q, z.reshape(-1, z.shape[-1])).double()
    return (
        torch.cdist(ze, q.codebook.double(), compute_mode="donot_use_mm_for_euclid_dist")
        .argmin(1)
        .reshape(z.shape[:-1])
    )


# ---------------------------------------------------------------------- lookup


def test_l2_norm_lookup_is_argmax_cosine():
    torch.manual_seed(0)
    q = VectorQuantizer(in_dim=16, codebook_size=32, lookup_dim=8, l2_norm=True)
    # Codes of very different norms, so that ignoring the code normalisation would change the choice.
    with torch.no_grad():
        q.codebook.mul_(torch.logspace(-1, 1, 32)[:, None])
    z = torch.randn(3, 20, 16)
    with torch.no_grad():
        out = q(z)
    assert out.ids.shape == (3, 20)
    assert out.ids.dtype == torch.int64
    assert torch.equal(out.ids, _cosine_ids(q, z))


def test_euclidean_lookup_without_l2_norm():
    torch.manual_seed(1)
    q = VectorQuantizer(in_dim=16, codebook_size=32, lookup_dim=8, l2_norm=False)
    z = torch.randn(2, 25, 16)
    with torch.no_grad():
        out = q(z)
    assert torch.equal(out.ids, _euclid_ids(q, z))


def test_cosine_and_euclidean_choices_differ_on_constructed_case():
    # Identity projection (lookup_dim == in_dim): code 0 is short and close, code 1 long but better aligned.
    codebook = torch.tensor([[1.0, 0.0], [10.0, 10.0], [-1.0, 0.2]])
    z = torch.tensor([[2.0, 1.5], [1.5, 1.0], [-1.0, 0.1]])
    ids = {}
    for l2 in (True, False):
        q = VectorQuantizer(in_dim=2, codebook_size=3, lookup_dim=2, l2_norm=l2)
        with torch.no_grad():
            q.codebook.copy_(codebook)
            ids[l2] = q(z).ids
        ref = _cosine_ids(q, z) if l2 else _euclid_ids(q, z)
        assert torch.equal(ids[l2], ref)
    assert ids[True].tolist() == [1, 1, 2]
    assert ids[False].tolist() == [0, 0, 2]


# ---------------------------------------------------------------------- structure


def test_factorized_projections_and_codebook_shape():
    q = VectorQuantizer(in_dim=24, codebook_size=10, lookup_dim=4, out_dim=12)
    assert isinstance(q.project_in, nn.Linear) and isinstance(q.project_out, nn.Linear)
    assert q.project_in.weight.shape == (4, 24)
    assert q.project_out.weight.shape == (12, 4)
    assert isinstance(q.codebook, nn.Parameter)
    assert q.codebook.shape == (10, 4)
    out = q(torch.randn(2, 5, 24))
    assert out.quantized.shape == (2, 5, 12)

    q_default_out = VectorQuantizer(in_dim=24, codebook_size=10, lookup_dim=4)
    assert q_default_out.project_out.weight.shape == (24, 4)


def test_no_factorization_gives_identity_projections():
    q = VectorQuantizer(in_dim=6, codebook_size=10, lookup_dim=6)
    assert isinstance(q.project_in, nn.Identity)
    assert isinstance(q.project_out, nn.Identity)
    assert isinstance(q.codebook, nn.Parameter)
    assert q.codebook.shape == (10, 6)
    q2 = VectorQuantizer(in_dim=6, codebook_size=10, lookup_dim=6, out_dim=6)
    assert isinstance(q2.project_in, nn.Identity) and isinstance(q2.project_out, nn.Identity)


# ---------------------------------------------------------------------- loss and gradients


@pytest.mark.parametrize("l2_norm", [True, False])
def test_vq_loss_value_and_gradient_split(l2_norm):
    torch.manual_seed(2)
    beta = 0.7
    q = VectorQuantizer(in_dim=12, codebook_size=16, lookup_dim=4, l2_norm=l2_norm, beta=beta)
    z = torch.randn(3, 10, 12, requires_grad=True)
    out = q(z)

    # Reference by hand, with the brute-force ids.
    ids = (_cosine_ids if l2_norm else _euclid_ids)(q, z.detach()).reshape(-1)
    assert torch.equal(out.ids.reshape(-1), ids)
    ze = _project(q, z.reshape(-1, 12))
    codes = q.codebook
    if l2_norm:
        ze, codes = _unit(ze), _unit(codes)
    e = codes[ids]
    codebook_term = ((ze.detach() - e) ** 2).mean()
    commit_term = beta * ((ze - e.detach()) ** 2).mean()
    torch.testing.assert_close(out.loss, codebook_term + commit_term, rtol=1e-5, atol=1e-7)

    g_code, g_z, g_w = torch.autograd.grad(out.loss, [q.codebook, z, q.project_in.weight])
    ref_code = torch.autograd.grad(codebook_term, q.codebook)[0]
    ref_z, ref_w = torch.autograd.grad(commit_term, [z, q.project_in.weight])
    # The codebook term alone reaches the codebook; only β times the commitment term reaches z (and W_in).
    torch.testing.assert_close(g_code, ref_code, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(g_z, ref_z, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(g_w, ref_w, rtol=1e-4, atol=1e-8)
    assert g_code.abs().sum() > 0 and g_z.abs().sum() > 0
    # Rows of codes that were not chosen get no gradient.
    unused = torch.ones(16, dtype=torch.bool)
    unused[ids] = False
    assert unused.any()
    assert torch.all(g_code[unused] == 0)


def test_straight_through_gradient_is_identity_through_lookup():
    torch.manual_seed(3)
    q = VectorQuantizer(in_dim=10, codebook_size=8, lookup_dim=4, out_dim=4, l2_norm=False)
    assert isinstance(q.project_out, nn.Identity)
    z = torch.randn(2, 7, 10, requires_grad=True)
    out = q(z)
    # Forward value is the chosen code ...
    torch.testing.assert_close(out.quantized.reshape(-1, 4), q.codebook[out.ids.reshape(-1)].detach())
    (g,) = torch.autograd.grad(out.quantized.sum(), z)
    # ... backward is d(project_in(z)).sum()/dz = column sums of W_in for every row.
    expected = q.project_in.weight.detach().sum(0).expand_as(z)
    assert g.abs().sum() > 0
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-7)


def test_straight_through_with_l2_norm_and_project_out():
    torch.manual_seed(4)
    q = VectorQuantizer(in_dim=10, codebook_size=8, lookup_dim=4, out_dim=6, l2_norm=True)
    z = torch.randn(2, 7, 10, requires_grad=True)
    w_out = torch.randn(2, 7, 6)
    (g,) = torch.autograd.grad((q(z).quantized * w_out).sum(), z)
    # As if quantization were the identity: project_out(normalise(project_in(z))).
    z2 = z.detach().clone().requires_grad_(True)
    ident = q.project_out(_unit(_project(q, z2)))
    (g_ref,) = torch.autograd.grad((ident * w_out).sum(), z2)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------- statistics


def _hand_stats(ids: list[int], k: int) -> tuple[float, float]:
    counts: dict[int, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    n = len(ids)
    entropy = -sum(c / n * math.log(c / n) for c in counts.values())
    return len(counts) / k, math.exp(entropy)


def test_usage_and_perplexity_random():
    torch.manual_seed(5)
    q = VectorQuantizer(in_dim=8, codebook_size=32, lookup_dim=4)
    with torch.no_grad():
        out = q(torch.randn(50, 8))
    ids = out.ids.tolist()
    assert 1 < len(set(ids)) < 32  # a non-trivial histogram: repeats and unused codes
    usage, perplexity = _hand_stats(ids, 32)
    assert out.usage.item() == pytest.approx(usage, abs=1e-6)
    assert out.perplexity.item() == pytest.approx(perplexity, rel=1e-5)


def test_usage_and_perplexity_constructed():
    q = VectorQuantizer(in_dim=2, codebook_size=4, lookup_dim=2, l2_norm=False)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]]))
        out = q(torch.tensor([[0.1, 0.0], [0.0, 0.2], [-0.1, 0.1], [4.9, 0.1]]))
    assert out.ids.tolist() == [0, 0, 0, 1]
    assert out.usage.item() == pytest.approx(0.5)
    assert out.perplexity.item() == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


# ---------------------------------------------------------------------- precision


def test_lookup_runs_in_fp32_under_autocast():
    torch.manual_seed(6)
    q = VectorQuantizer(in_dim=32, codebook_size=512, lookup_dim=8)
    z = torch.randn(4, 64, 32)
    with torch.no_grad():
        ref = q(z).ids
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = q(z)
            # Sensitivity: the same lookup done in bf16 does pick other codes for this data.
            ze16 = q.project_in(z)
            sim16 = (
                torch.nn.functional.normalize(ze16, dim=-1)
                @ torch.nn.functional.normalize(q.codebook.bfloat16(), dim=-1).t()
            )
        assert ze16.dtype == torch.bfloat16
        assert not torch.equal(sim16.argmax(-1), ref)
    assert out.quantized.dtype == torch.float32
    assert torch.equal(out.ids, ref)
    assert torch.equal(ref, _cosine_ids(q, z))


def test_decode_ids_range_checked():
    torch.manual_seed(7)
    q = VectorQuantizer(in_dim=8, codebook_size=10, lookup_dim=4)
    out = q.decode_ids(torch.tensor([[0, 9]]))
    assert out.shape == (1, 2, 8)
    with pytest.raises(ValueError, match="token ids"):
        q.decode_ids(torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="token ids"):
        q.decode_ids(torch.tensor([10, 3]))


def test_decode_ids_matches_forward_value():
    torch.manual_seed(8)
    q = VectorQuantizer(in_dim=8, codebook_size=10, lookup_dim=4, out_dim=6).eval()
    z = torch.randn(3, 5, 8)
    with torch.no_grad():
        out = q(z)
        dec = q.decode_ids(out.ids)
    torch.testing.assert_close(dec, out.quantized, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- dead codes


def _cone_quantizer(window: int) -> VectorQuantizer:
    """Projected encodings all lie near +x; codes 0..3 near +x, codes 4..15 near -x (never chosen)."""
    torch.manual_seed(9)
    q = VectorQuantizer(in_dim=6, codebook_size=16, lookup_dim=4, l2_norm=True, dead_code_window=window)
    v = torch.tensor([5.0, 0.0, 0.0, 0.0])
    with torch.no_grad():
        q.project_in.weight.mul_(0.5)
        q.project_in.bias.copy_(v)
        q.codebook[:4] = v + 2.0 * torch.randn(4, 4)
        q.codebook[4:] = -v + 0.5 * torch.randn(12, 4)
    return q.train()


def _cone_batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randn(2, 20, 6, generator=g) for _ in range(n)]


def test_dead_code_restart():
    q = _cone_quantizer(window=2)
    batches = _cone_batches(4)
    before = q.codebook.detach().clone()

    with torch.no_grad():
        ids0 = q(batches[0]).ids
    assert set(ids0.flatten().tolist()) <= {0, 1, 2, 3}
    assert not q.update_and_restart(0).any()  # age 1 < window 2
    assert torch.equal(q.codebook, before)

    with torch.no_grad():
        ids1 = q(batches[1]).ids
    assert set(ids1.flatten().tolist()) <= {0, 1, 2, 3}
    mask = q.update_and_restart(1)
    assert mask.dtype == torch.bool and mask.shape == (16,)
    restarted = mask.nonzero().flatten()
    hit = set(ids0.flatten().tolist()) | set(ids1.flatten().tolist())
    assert set(range(4, 16)) <= set(restarted.tolist())
    assert set(restarted.tolist()) == set(range(16)) - hit

    after = q.codebook.detach()
    kept = torch.tensor([i for i in range(16) if i not in set(restarted.tolist())])
    assert torch.equal(after[kept], before[kept])
    assert not torch.isclose(after[restarted], before[restarted]).all(dim=1).any()

    # Restarted rows are (l2-normalised) projected encodings of the latest batch, drawn without repetition.
    recent = _unit(_project(q, batches[1].reshape(-1, 6))).detach()
    dist = _pairwise(after[restarted], recent)
    assert dist.min(dim=1).values.max() < 1e-5
    assert len(set(dist.argmin(dim=1).tolist())) == restarted.numel()

    # The restarted codes are now in the data's cone and get chosen.
    with torch.no_grad():
        ids2 = q(batches[2]).ids
    assert set(ids2.flatten().tolist()) & set(restarted.tolist())


def test_restart_with_more_dead_codes_than_pool_rows():
    q = _cone_quantizer(window=1)
    z = _cone_batches(1)[0].reshape(-1, 6)[:3]  # a pool of 3 encodings for 12+ dead codes
    with torch.no_grad():
        q(z)
    mask = q.update_and_restart(5)
    dead = mask.nonzero().flatten()
    assert dead.numel() >= 12
    after = q.codebook.detach()[dead]
    assert torch.isfinite(after).all()
    pool = _unit(_project(q, z)).detach()
    dist = _pairwise(after, pool)
    # The first three dead codes take the three pool rows exactly, once each; the rest are noisy copies.
    assert dist[:3].min(dim=1).values.max() < 1e-5
    assert sorted(dist[:3].argmin(dim=1).tolist()) == [0, 1, 2]
    assert 0 < dist[3:].min(dim=1).values.min() and dist[3:].min(dim=1).values.max() < 0.1


def test_no_restart_when_window_is_zero():
    q = _cone_quantizer(window=0)
    before = q.codebook.detach().clone()
    for step, z in enumerate(_cone_batches(5)):
        with torch.no_grad():
            q(z)
        assert not q.update_and_restart(step).any()
    assert torch.equal(q.codebook, before)


def test_restart_is_deterministic_and_ignores_global_rng():
    base = _cone_quantizer(window=2)
    batches = _cone_batches(2)
    results = []
    for k in range(2):
        q = copy.deepcopy(base)
        torch.manual_seed(1000 + k)  # different global RNG state per run
        torch.rand(7 * (k + 1))
        restarted = torch.empty(0, dtype=torch.long)
        for step, z in enumerate(batches):
            with torch.no_grad():
                q(z)
            restarted = q.update_and_restart(step + 40).nonzero().flatten()
        results.append((restarted, q.codebook.detach().clone()))
    assert results[0][0].numel() > 0
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


# ---------------------------------------------------------------------- data init


def test_init_from_data_uses_projected_encodings():
    torch.manual_seed(10)
    q = VectorQuantizer(in_dim=12, codebook_size=8, lookup_dim=4, l2_norm=True)
    z = torch.randn(2, 15, 12)
    with torch.no_grad():
        q.codebook.fill_(float("nan"))
    q.init_from_data(z, generator=torch.Generator().manual_seed(0))
    cb = q.codebook.detach()
    assert torch.isfinite(cb).all()
    data = _unit(_project(q, z.reshape(-1, 12))).detach()
    dist = _pairwise(cb, data)
    assert dist.min(dim=1).values.max() < 1e-5
    assert len(set(dist.argmin(dim=1).tolist())) == 8  # distinct data rows


def test_init_from_data_without_l2_norm():
    torch.manual_seed(11)
    q = VectorQuantizer(in_dim=12, codebook_size=8, lookup_dim=4, l2_norm=False)
    z = torch.randn(20, 12)
    q.init_from_data(z)
    data = _project(q, z).detach()
    assert _pairwise(q.codebook.detach(), data).min(dim=1).values.max() < 1e-5


def test_init_from_data_with_fewer_rows_than_codes():
    torch.manual_seed(12)
    q = VectorQuantizer(in_dim=12, codebook_size=16, lookup_dim=4, l2_norm=True)
    z = torch.randn(1, 3, 12)
    with torch.no_grad():
        q.codebook.fill_(float("nan"))
    q.init_from_data(z, generator=torch.Generator().manual_seed(0))
    cb = q.codebook.detach()
    assert cb.shape == (16, 4)
    assert torch.isfinite(cb).all()
    torch.testing.assert_close(cb.norm(dim=1), torch.ones(16))
    # Each code is a (slightly perturbed) copy of one of the 3 projected encodings.
    data = _unit(_project(q, z.reshape(-1, 12))).detach()
    assert (cb @ data.t()).max(dim=1).values.min() > 0.99
