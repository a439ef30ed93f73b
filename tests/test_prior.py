"""Tests of vqim.Prior and vqim.sampling with tiny configurations (CPU, well under a second each)."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from vqim import (
    Prior,
    PriorConfig,
    Tokenizer,
    generate,
    generate_images,
    generate_recompute,
    get_prior_config,
    prior_presets,
    sample_logits,
)
from vqim.nn import linear
from vqim.nn.transformer import KVCache

V = 64
GRID = (3, 4)  # h ≠ w, so a transposed position table would show


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(num_classes: int = 0, **overrides) -> Prior:
    kw = {"dim": 32, "depth": 2, "heads": 4, "mlp_dim": 64}
    kw.update(overrides)
    return Prior.from_preset("vim-tiny", vocab_size=V, grid_size=GRID, num_classes=num_classes, **kw)


def random_tokens(b: int, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- config


def test_config_json_round_trip_and_presets():
    cfg = get_prior_config("vim-small", vocab_size=8192, grid_size=(16, 16), num_classes=1000)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["grid_size"] == [16, 16]
    assert PriorConfig.from_dict(d) == cfg
    assert PriorConfig.from_dict(d).grid_size == (16, 16)
    assert set(prior_presets()) >= {"vim-base", "vim-large", "vim-small", "vim-tiny"}
    base, large = get_prior_config("vim-base"), get_prior_config("vim-large")
    assert (base.depth, base.heads, base.dim, base.mlp_dim) == (24, 16, 1536, 6144)
    assert (large.depth, large.heads, large.dim, large.mlp_dim) == (36, 32, 2048, 8192)
    assert get_prior_config("vim-base", depth=2).depth == 2
    with pytest.raises(ValueError, match="unknown prior preset"):
        get_prior_config("vim-huge")
    with pytest.raises(ValueError, match="unknown prior config fields"):
        get_prior_config("vim-tiny", widht=3)
    with pytest.raises(ValueError, match="unknown prior config keys"):
        PriorConfig.from_dict({**d, "extra": 1})


@pytest.mark.parametrize(
    "bad",
    [
        {"dim": 30, "heads": 4},
        {"grid_size": (4,)},
        {"grid_size": (0, 4)},
        {"vocab_size": 1},
        {"num_classes": -1},
        {"dropout": 1.0},
        {"class_dropout": -0.1},
        {"depth": 0},
    ],
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        PriorConfig(**bad)


# ---------------------------------------------------------------------- forward, cache, causality


@pytest.fixture
def split_tiny(monkeypatch):
    """Let the tiny test models' small weights take the row-split product too (it is kept for large weights)."""
    monkeypatch.setattr(linear, "SPLIT_MIN_WEIGHT", 1)


@pytest.mark.parametrize(("rows", "split", "num_classes"), [(3, False, 5), (3, True, 5), (1, True, 5),
                                                          (1, False, 5), (3, True, 0)])  # fmt: skip
def test_cached_steps_match_uncached_forward(rows, split, num_classes, monkeypatch):
    """The prior's own network, fed one position at a time through its KV caches (`Prior.extend`, with plain
    F.linear or the row-split product), computes Prior.forward's logits at every position.

    Not bit-exact on CPU: a one-row product and the same row inside a (T, D) × (D, D') product go through
    different BLAS blockings, and single-query attention sums in another order than the causal kernel, so
    results differ in the last bits (~1e-7 here). Hence a 1e-5 absolute tolerance."""
    monkeypatch.setattr(linear, "SPLIT_MIN_WEIGHT", 1 if split else 10**12)
    torch.manual_seed(16)
    prior = tiny(num_classes).eval()
    tokens = random_tokens(3, seed=16)[:rows]
    labels = torch.tensor([0, 4, 5])[:rows] if num_classes else None  # 5 = the null class
    with torch.no_grad():
        full = prior(tokens, labels).logits
        caches = prior.transformer.new_caches(rows, 12)
        pos = prior.position_table()
        x = prior.embed_prefix(labels, None, rows)
        steps = []
        for i in range(12):
            steps.append(prior.extend(x, caches))
            x = (prior.tok_embed(tokens[:, i]) + pos[i])[:, None]
    assert all(cache.length == 12 for cache in caches)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=0, atol=1e-5)
    assert torch.equal(torch.stack(steps, dim=1).argmax(-1), full.argmax(-1))
    blocked = [isinstance(m._blocks, tuple) for m in prior.modules() if isinstance(m, linear.Linear)]
    assert all(blocked) if split else not any(blocked)


def test_prefill_in_chunks_matches_uncached_forward(split_tiny):
    """A multi-position chunk after cached positions (the masked attention path) gives the forward's logits."""
    torch.manual_seed(17)
    prior = tiny(5).eval()
    tokens, labels = random_tokens(2, seed=17), torch.tensor([1, 2])
    with torch.no_grad():
        full = prior(tokens, labels).logits
        caches = prior.transformer.new_caches(2, 12)
        pos = prior.position_table()
        emb = prior.tok_embed(tokens) + pos
        first = prior.extend(torch.cat([prior.embed_prefix(labels, None, 2), emb[:, :4]], 1), caches)
        second = prior.extend(emb[:, 4:9], caches)  # positions 5 .. 9: each must not see the ones after it
    torch.testing.assert_close(first, full[:, 4], rtol=0, atol=1e-5)
    torch.testing.assert_close(second, full[:, 9], rtol=0, atol=1e-5)


def _split_used(layer: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether layer(x) runs the batched row-block product (a torch.bmm / baddbmm call), and that it computes
    F.linear's result either way."""
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        for name in ("bmm", "baddbmm"):
            op = getattr(torch, name)
            mp.setattr(torch, name, lambda *a, op=op, **k: calls.append(1) or op(*a, **k))
        y = layer(x)
    # The same sums in another order: float32 rounding of a 256-term sum of values near 1 reaches ~1e-5.
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    return bool(calls)


def test_cpu_decoding_uses_split_products_for_large_weights_only():
    layer = linear.Linear(256, 512)
    x = torch.randn(1, 256)
    with torch.no_grad():
        assert _split_used(layer, x)
        assert not _split_used(layer, torch.randn(64, 256))  # many rows: plain GEMM
        assert not _split_used(linear.Linear(256, 512).double(), x.double())  # fp64: plain F.linear
        assert not _split_used(linear.Linear(8, 16), torch.randn(1, 8))  # a small weight stays in cache
        with linear.plain_products():
            assert not _split_used(layer, x)
    assert not _split_used(layer, x)  # autograd records: plain F.linear
    assert isinstance(layer._blocks, tuple)
    with torch.no_grad():
        layer.weight.data = torch.randn(512, 256)  # new storage under the same Parameter: no stale views
        assert _split_used(layer, x)
        layer.weight.mul_(2)  # in place: the views see it
        assert _split_used(layer, x)
        layer.weight = torch.nn.Parameter(torch.randn(512, 256))  # a new Parameter: new views
        assert _split_used(layer, x)
    layer.double()
    assert layer._blocks is None  # moved: the views of the old storage are dropped


def test_kv_cache_appends_in_order_and_refuses_overflow():
    cache = KVCache(1, 3, 2, 4)
    k1, k2 = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 1, 4)
    keys, values = cache.append(k1, -k1)
    assert cache.length == 2 and torch.equal(keys, k1) and torch.equal(values, -k1)
    keys, values = cache.append(k2, -k2)
    assert cache.length == 3 and torch.equal(keys, torch.cat([k1, k2], dim=2))
    assert torch.equal(values, -torch.cat([k1, k2], dim=2))
    with pytest.raises(ValueError, match="overflow"):
        cache.append(k2, k2)


@pytest.mark.parametrize("num_classes", [0, 5])
def test_causality(num_classes):
    """logits[:, i] depends on tokens[:, :i] only: changing tokens[:, t] leaves logits[:, :t+1] unchanged."""
    torch.manual_seed(2)
    prior = tiny(num_classes).eval()
    tokens = random_tokens(2, seed=2)
    labels = torch.tensor([1, 3]) if num_classes else None
    with torch.no_grad():
        base = prior(tokens, labels).logits
        for t in (0, 5, 11):
            other = tokens.clone()
            other[:, t] = (other[:, t] + 1) % V
            changed = prior(other, labels).logits
            torch.testing.assert_close(changed[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
            if t + 1 < tokens.shape[1]:
                assert not torch.allclose(changed[:, t + 1], base[:, t + 1])


def test_shorter_sequences_and_grids():
    torch.manual_seed(3)
    prior = tiny().eval()
    tokens = random_tokens(2)
    with torch.no_grad():
        full = prior(tokens).logits
        assert prior(tokens.view(2, *GRID)).logits.shape == (2, 12, V)  # a (B, h, w) grid is flattened
        for t in (1, 5):
            torch.testing.assert_close(prior(tokens[:, :t]).logits, full[:, :t], rtol=0, atol=1e-6)


def test_return_blocks():
    torch.manual_seed(4)
    prior = tiny(5, depth=3).eval()
    tokens, labels = random_tokens(2, t=7), torch.tensor([0, 1])
    with torch.no_grad():
        out = prior(tokens, labels, return_blocks=[0, 2])
        plain = prior(tokens, labels)
    assert sorted(out.blocks) == [0, 2]
    for h in out.blocks.values():
        assert h.shape == (2, 7, 32)
    assert plain.blocks is None
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)
    # The last block's output, through the final LayerNorm and the head, is the logits.
    last = prior.head(prior.transformer.norm(out.blocks[2]))
    torch.testing.assert_close(last, out.logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="return_blocks"):
        prior(tokens, labels, return_blocks=[3])


# ---------------------------------------------------------------------- loss and training


def test_loss_at_initialisation_is_ln_vocab():
    torch.manual_seed(5)
    prior = Prior.from_preset("vim-tiny", vocab_size=512, grid_size=(4, 4), num_classes=10).eval()
    tokens = torch.randint(0, 512, (8, 16))
    with torch.no_grad():
        loss = prior.loss(tokens, torch.arange(8))
    assert loss.ndim == 0
    assert abs(loss.item() - math.log(512)) < 0.05 * math.log(512)


def test_tiny_prior_overfits_one_batch():
    torch.manual_seed(6)
    prior = tiny(3, dropout=0.0, class_dropout=0.0).train()
    tokens, labels = random_tokens(4, seed=6), torch.tensor([0, 1, 2, 0])
    opt = torch.optim.Adam(prior.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = prior.loss(tokens, labels)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 0.9 * math.log(V)
    assert loss.item() < 0.1 * math.log(V)


@pytest.mark.parametrize("num_classes", [0, 5])
def test_every_parameter_gets_a_finite_gradient(num_classes):
    torch.manual_seed(7)
    prior = tiny(num_classes, class_dropout=0.0).train()
    labels = torch.tensor([0, 4, 5]) if num_classes else None
    loss = prior.loss(random_tokens(3, seed=7), labels)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in prior.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_dropout_only_in_training():
    torch.manual_seed(8)
    prior = tiny(dropout=0.5).eval()
    tokens = random_tokens(2)
    with torch.no_grad():
        assert torch.equal(prior(tokens).logits, prior(tokens).logits)
        prior.train()
        assert not torch.equal(prior(tokens).logits, prior(tokens).logits)


def test_label_dropout_uses_the_null_class_in_training_only():
    torch.manual_seed(9)
    prior = tiny(5, dropout=0.0, class_dropout=0.5)
    tokens = random_tokens(1).expand(64, -1)
    labels = torch.full((64,), 2)
    with torch.no_grad():
        prior.eval()
        cond = prior(tokens[:1], labels[:1]).logits
        null = prior(tokens[:1], torch.tensor([5])).logits
        assert not torch.allclose(cond, null)  # the class token changes the output
        assert torch.equal(prior(tokens, labels).logits, cond.expand(64, -1, -1))  # no label dropout in eval
        prior.train()
        out = prior(tokens, labels).logits
    is_cond = (out - cond).abs().amax(dim=(1, 2)) < 1e-5
    is_null = (out - null).abs().amax(dim=(1, 2)) < 1e-5
    assert torch.all(is_cond ^ is_null)
    assert 10 < int(is_null.sum()) < 54


# ---------------------------------------------------------------------- sampling


def test_sample_logits_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_logits(logits, top_k=1), greedy)
    assert torch.equal(sample_logits(logits, temperature=0.0), greedy)
    assert torch.equal(sample_logits(logits, temperature=1e-4, generator=g), greedy)
    # Top-k = 2: only the two highest ids ever come out.
    top2 = logits.topk(2).indices
    for _ in range(20):
        s = sample_logits(logits, top_k=2, generator=g)
        assert torch.all((s[:, None] == top2).any(-1))


def test_top_p_on_a_hand_made_distribution():
    # Probabilities 0.5, 0.3, 0.15, 0.05 at ids 3, 0, 2, 1 (ids shuffled, so the mapping back is checked).
    probs = torch.tensor([0.3, 0.05, 0.15, 0.5])
    logits = probs.log().expand(4000, -1)
    g = torch.Generator().manual_seed(1)
    s = sample_logits(logits, top_p=0.7, generator=g)  # keeps 0.5 + 0.3 (0.8 ≥ 0.7), drops the rest
    assert set(s.tolist()) == {0, 3}
    assert (s == 3).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    assert set(sample_logits(logits, top_p=0.5, generator=g).tolist()) == {3}  # 0.5 alone reaches 0.5
    assert set(sample_logits(logits, top_p=0.85, generator=g).tolist()) == {0, 2, 3}
    assert set(sample_logits(logits, top_p=0.83, generator=g).tolist()) == {0, 2, 3}  # 0.8 < 0.83
    # Top-p acts on the distribution that top-k left: after top-3, mass before id 2 is 0.8 / 0.95 ≥ 0.83.
    assert set(sample_logits(logits, top_k=3, top_p=0.83, generator=g).tolist()) == {0, 3}
    assert set(sample_logits(logits, top_p=1.0, generator=g).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("num_classes", [0, 5])
def test_seeds(num_classes):
    torch.manual_seed(10)
    prior = tiny(num_classes)
    labels = 2 if num_classes else None
    a = prior.generate(3, labels, seed=123)
    assert a.shape == (3, *GRID) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < V
    assert torch.equal(a, prior.generate(3, labels, seed=123))
    assert not torch.equal(a, prior.generate(3, labels, seed=124))


@pytest.mark.parametrize(
    "num_classes, kw",
    [
        (0, {"top_k": 1}),
        (0, {"temperature": 1.0}),
        (5, {"top_k": 1, "cfg_scale": 2.0}),
        (5, {"top_k": 10, "top_p": 0.9, "temperature": 0.8}),
        (5, {"cfg_scale": 3.0}),
    ],
)
@pytest.mark.parametrize("n", [1, 4])
def test_cached_generate_equals_recompute(num_classes, kw, n):
    torch.manual_seed(11)
    prior = tiny(num_classes)
    labels = torch.tensor([0, 1, 4, 2][:n]) if num_classes else None
    cached = generate(prior, n, labels, seed=7, **kw)
    assert torch.equal(cached, generate_recompute(prior, n, labels, seed=7, **kw))
    part = generate(prior, n, labels, seed=7, num_tokens=5, **kw)
    assert torch.equal(part, cached.view(n, -1)[:, :5])
    # An ordinary tensor, not an inference-mode one: the caller may write into it.
    assert not cached.is_inference() and not cached.requires_grad
    cached[0, 0, 0] = 1


def test_guidance_uses_the_null_class():
    """Greedy guided sampling equals a loop by hand over the uncached forward with labels and the null class."""
    torch.manual_seed(12)
    prior = tiny(5).eval()
    labels, s = torch.tensor([1, 3]), 3.0
    ids = torch.zeros(2, 0, dtype=torch.long)
    with torch.no_grad():
        for i in range(12):
            step = torch.cat([ids, torch.zeros(2, 1, dtype=torch.long)], dim=1)  # the last id is not read
            c = prior(step, labels).logits[:, i]
            u = prior(step, torch.full((2,), 5)).logits[:, i]
            ids = torch.cat([ids, (u + s * (c - u)).argmax(-1, keepdim=True)], dim=1)
    guided = prior.generate(2, labels, top_k=1, cfg_scale=s)
    assert torch.equal(guided.view(2, -1), ids)
    # s = 1 is plain conditional sampling; another scale changes the samples.
    plain = prior.generate(2, labels, seed=3)
    assert torch.equal(prior.generate(2, labels, seed=3, cfg_scale=1.0), plain)
    assert not torch.equal(prior.generate(2, labels, seed=3, cfg_scale=4.0), plain)
    assert not torch.equal(guided, prior.generate(2, labels, top_k=1))


def test_generate_leaves_the_mode_and_ignores_dropout():
    torch.manual_seed(13)
    prior = tiny(5, dropout=0.5)
    prior.train()
    a = prior.generate(2, 1, seed=0)
    assert prior.training
    prior.eval()
    assert torch.equal(a, prior.generate(2, 1, seed=0))
    assert not prior.training


def test_generate_images():
    torch.manual_seed(14)
    tok = Tokenizer.from_preset("vit-vqgan-tiny", image_size=32).eval()  # 4×4 tokens, 512 codes
    prior = Prior.from_preset("vim-tiny", vocab_size=512, grid_size=(4, 4), num_classes=3, depth=1, dim=32)
    images = generate_images(tok, prior, 2, labels=[0, 2], top_k=50, seed=0)
    assert images.shape == (2, 3, 32, 32)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    with pytest.raises(ValueError, match="512 codes.*vocabulary 64"):
        generate_images(tok, Prior.from_preset("vim-tiny", vocab_size=64, grid_size=(4, 4), depth=1), 1)
    with pytest.raises(ValueError, match=r"grid \(8, 8\)"):
        generate_images(tok, Prior.from_preset("vim-tiny", vocab_size=512, grid_size=(8, 8), depth=1), 1)
    with pytest.raises(ValueError, match="unknown sampling arguments"):
        generate_images(tok, prior, 1, labels=0, topk=3)


# ---------------------------------------------------------------------- checkpoints


def test_save_load_gives_bit_identical_logits(tmp_path):
    torch.manual_seed(15)
    prior = tiny(5).eval()
    prior.save_pretrained(tmp_path / "prior")
    cfg = json.loads((tmp_path / "prior" / "config.json").read_text())
    assert cfg["vqim_type"] == "prior" and cfg["grid_size"] == list(GRID)
    loaded = Prior.from_pretrained(tmp_path / "prior")
    assert loaded.config == prior.config and not loaded.training
    tokens, labels = random_tokens(2), torch.tensor([0, 5])
    with torch.no_grad():
        assert torch.equal(loaded(tokens, labels).logits, prior(tokens, labels).logits)
    assert torch.equal(loaded.generate(2, labels, seed=1), prior.generate(2, labels, seed=1))
    with pytest.raises(ValueError, match="tokenizer"):
        Tokenizer.from_pretrained(tmp_path / "prior")


# ---------------------------------------------------------------------- errors


def test_errors_are_value_errors():
    cond, uncond = tiny(5).eval(), tiny().eval()
    tokens = random_tokens(2)
    cases = [
        lambda: uncond(tokens.clone().fill_(V)),  # id out of range
        lambda: uncond(tokens - 1 - tokens.max()),  # negative ids
        lambda: uncond(tokens.float()),  # not integers
        lambda: uncond(torch.zeros(2, 13, dtype=torch.long)),  # T > h·w
        lambda: uncond(torch.zeros(2, 0, dtype=torch.long)),  # T = 0
        lambda: uncond(torch.zeros(2, 4, 3, dtype=torch.long)),  # wrong grid
        lambda: uncond(tokens, labels=torch.tensor([0, 1])),  # labels for an unconditional prior
        lambda: cond(tokens),  # no labels for a conditional prior
        lambda: cond(tokens, labels=torch.tensor([0, 6])),  # label out of range (5 is the null class)
        lambda: cond(tokens, labels=torch.tensor([0, -1])),
        lambda: cond(tokens, labels=torch.tensor([0, 1, 2])),  # wrong length
        lambda: cond(tokens, labels=torch.tensor([0.0, 1.0])),
        lambda: uncond.generate(2, cfg_scale=2.0),  # guidance needs classes
        lambda: cond.generate(0, 1),
        lambda: cond.generate(1, 1, top_p=0.0),
        lambda: cond.generate(1, 1, top_k=0),
        lambda: cond.generate(1, 1, temperature=-1.0),
        lambda: generate(cond, 1, 1, num_tokens=13),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(ValueError):
            case()
            pytest.fail(f"case {i} raised nothing")


def test_presets_build():
    for name in ("vim-tiny", "vim-small"):
        cfg = get_prior_config(name, vocab_size=16, grid_size=(2, 2), num_classes=2)
        prior = Prior(dataclasses.replace(cfg, depth=1))
        assert prior.num_params()["total"] == sum(p.numel() for p in prior.parameters())


def test_split_products_fall_back_for_odd_widths(split_tiny):
    assert tuple(map(linear.split_count, (8192, 24, 6, 37))) == (16, 8, 2, 0)
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert not _split_used(linear.Linear(8, 37), x)  # no block count divides 37: F.linear
        assert _split_used(linear.Linear(8, 24, bias=False), x)  # 8 blocks, no bias: bmm


@pytest.mark.parametrize("shape", [(8,), (1, 8), (1, 1, 8), (1, 1, 1, 8), (3, 8), (2, 1, 8), (2, 2, 1, 8)])
def test_split_products_keep_the_input_shape(split_tiny, shape):
    """The row-split product returns F.linear's result in F.linear's shape for inputs of any rank."""
    x = torch.randn(shape)
    with torch.no_grad():
        assert _split_used(linear.Linear(8, 24), x)
        assert linear.Linear(8, 24)(x).shape == (*shape[:-1], 24)


def test_split_products_refuse_a_wrong_input_width_as_f_linear_does(split_tiny):
    layer = linear.Linear(8, 24)
    with torch.no_grad():
        for shape in ((1, 9), (2, 4), (4, 2), (1, 1, 16)):  # element counts a width-8 input could have
            with pytest.raises(RuntimeError):
                layer(torch.randn(shape))


def test_split_products_read_any_input_layout(split_tiny):
    """Inputs that are not contiguous, or start inside their storage, give F.linear's values (the contiguous
    operand is a strided view of the input's own memory)."""
    layer = linear.Linear(8, 24)
    base = torch.randn(4, 3, 8)
    with torch.no_grad():
        for x in (
            base[:, 1],
            base[2, 1:],
            base[1:2, 2],
            base.transpose(0, 1)[1],
            base[:, :, ::2].repeat(1, 1, 2)[0],
            torch.randn(8, 2)[:, 0][None],  # one row, its elements 2 apart
            torch.randn(8, 2)[:, 0][None, None],
        ):
            assert _split_used(layer, x)
            assert layer(x).shape == (*x.shape[:-1], 24)
