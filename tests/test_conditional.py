"""Spatial conditioning, completion, inpainting and sliding-window sampling of `vqim.Prior` (tiny models, CPU)."""

import json

import pytest
import torch
import torch.nn.functional as F

from vqim import Prior, PriorConfig, generate, generate_recompute
from vqim.nn.transformer import KVCache
from vqim.sampling import window_origin

V, CV = 48, 7  # image and condition vocabularies
GRID = (3, 4)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(num_classes: int = 0, cond_grid=None, seed: int = 0, **kw) -> Prior:
    torch.manual_seed(seed)
    spatial = {} if cond_grid is None else {"cond_vocab_size": CV, "cond_grid_size": cond_grid}
    return Prior.from_preset(
        "vim-tiny", vocab_size=V, grid_size=GRID, num_classes=num_classes, dim=32, depth=2, heads=4,
        mlp_dim=64, dropout=0.0, **spatial, **kw,
    ).eval()  # fmt: skip


def ids(*shape: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- the spatially conditioned forward


def test_config_round_trip_and_validation():
    cfg = PriorConfig(vocab_size=V, grid_size=GRID, cond_vocab_size=CV, cond_grid_size=(2, 2))
    back = PriorConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.cond_grid_size == (2, 2) and back.cond_len == 4 and back.spatial
    assert PriorConfig().cond_len == 0 and not PriorConfig().spatial
    with pytest.raises(ValueError, match="both cond_vocab_size and cond_grid_size"):
        PriorConfig(cond_vocab_size=CV)
    with pytest.raises(ValueError, match="both cond_vocab_size and cond_grid_size"):
        PriorConfig(cond_grid_size=(2, 2))
    with pytest.raises(ValueError, match="cond_grid_size"):
        PriorConfig(cond_vocab_size=CV, cond_grid_size=(2, 0))


@pytest.mark.parametrize("num_classes", [0, 3])
def test_likelihood_is_over_image_tokens_only(num_classes):
    """Logits exist for the T image positions only, and the loss is their cross-entropy: nothing models r."""
    prior = tiny(num_classes, cond_grid=(2, 3))
    tokens, cond = ids(2, 12), ids(2, 2, 3, vocab=CV, seed=1)
    labels = torch.tensor([0, 2]) if num_classes else None
    with torch.no_grad():
        logits = prior(tokens, labels, condition=cond).logits
        loss = prior.loss(tokens, labels, condition=cond)
    assert logits.shape == (2, 12, V)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, V), tokens.reshape(-1)))
    assert prior.num_params()["total"] == sum(p.numel() for p in prior.parameters())


def test_condition_tokens_change_image_logits_and_causality_holds():
    prior = tiny(cond_grid=(2, 3))
    tokens, cond = ids(2, 12), ids(2, 2, 3, vocab=CV, seed=1)
    with torch.no_grad():
        base = prior(tokens, condition=cond).logits
        other = cond.clone()
        other[:, 1, 2] = (other[:, 1, 2] + 1) % CV  # the condition's last token
        moved = prior(tokens, condition=other).logits
        assert not torch.allclose(moved[:, 0], base[:, 0])  # even the first image token sees all of r
        for t in (0, 6, 10):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % V
            out = prior(changed, condition=cond).logits
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
            assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_return_blocks_cover_the_image_positions():
    prior = tiny(2, cond_grid=(2, 2))
    with torch.no_grad():
        out = prior(ids(2, 5), [0, 1], return_blocks=[1], condition=ids(2, 2, 2, vocab=CV))
    assert out.blocks[1].shape == (2, 5, 32)
    torch.testing.assert_close(prior.head(prior.transformer.norm(out.blocks[1])), out.logits, rtol=0, atol=0)


def test_condition_errors():
    prior = tiny(cond_grid=(2, 3))
    tokens = ids(2, 12)
    with pytest.raises(ValueError, match=r"pass condition, a LongTensor \(B, 2, 3\)"):
        prior(tokens)
    with pytest.raises(ValueError, match=r"condition tokens of shape \(2, 2, 3\).*got \(2, 3, 2\)"):
        prior(tokens, condition=ids(2, 3, 2, vocab=CV))
    with pytest.raises(ValueError, match=r"in \[0, 7\)"):
        prior(tokens, condition=torch.full((2, 2, 3), CV))
    with pytest.raises(ValueError, match="integers"):
        prior(tokens, condition=torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match="no spatial condition"):
        tiny()(tokens, condition=ids(2, 2, 3, vocab=CV))


# ---------------------------------------------------------------------- sampling with a condition


@pytest.mark.parametrize("kw", [{"top_k": 1}, {"temperature": 1.0}, {"cfg_scale": 2.5, "top_k": 5}])
def test_cached_sampling_with_a_condition_equals_recompute(kw):
    num_classes = 3 if "cfg_scale" in kw else 0
    prior = tiny(num_classes, cond_grid=(2, 3))
    cond = ids(3, 2, 3, vocab=CV, seed=2)
    labels = [0, 1, 2] if num_classes else None
    a = generate(prior, 3, labels, condition=cond, seed=5, **kw)
    assert torch.equal(a, generate_recompute(prior, 3, labels, condition=cond, seed=5, **kw))
    one = generate(prior, 3, labels, condition=cond[0], seed=5, **kw)  # one grid for every row
    assert torch.equal(one, generate(prior, 3, labels, condition=cond[:1].expand(3, -1, -1), seed=5, **kw))


def greedy_reference(
    prior: Prior, canvas: torch.Tensor, cond: torch.Tensor | None, labels=None, kept=None
) -> None:
    """Check every token of a greedy canvas (but the `kept` ones) against argmax of Prior.forward over its own
    window."""
    h, w = prior.grid_size
    hh, ww = canvas.shape[1:]
    with torch.no_grad():
        for i in range(hh):
            for j in range(ww):
                r0, c0 = window_origin(i, j, (hh, ww), (h, w))
                window = canvas[:, r0 : r0 + h, c0 : c0 + w].reshape(canvas.shape[0], -1)
                c = None if cond is None else cond[:, r0 : r0 + h, c0 : c0 + w]
                here = (i - r0) * w + (j - c0)
                logits = prior(window[:, : here + 1], labels, condition=c).logits[:, here]
                sampled = torch.ones(canvas.shape[0], dtype=torch.bool) if kept is None else ~kept[:, i, j]
                assert torch.equal(logits.argmax(-1)[sampled], canvas[sampled, i, j]), (i, j)


# ---------------------------------------------------------------------- sliding window


def test_window_origin():
    assert window_origin(0, 0, (3, 4), (3, 4)) == (0, 0)
    assert window_origin(2, 3, (3, 4), (3, 4)) == (0, 0)
    # An 8×8 window on a 16×20 canvas: centred where it can be, pushed inside at the edges.
    assert window_origin(0, 0, (16, 20), (8, 8)) == (0, 0)
    assert window_origin(4, 4, (16, 20), (8, 8)) == (0, 0)
    assert window_origin(5, 9, (16, 20), (8, 8)) == (1, 5)
    assert window_origin(15, 19, (16, 20), (8, 8)) == (8, 12)
    for i in range(16):
        for j in range(20):
            r0, c0 = window_origin(i, j, (16, 20), (8, 8))
            assert r0 <= i < r0 + 8 and c0 <= j < c0 + 8 and 0 <= r0 <= 8 and 0 <= c0 <= 12


@pytest.mark.parametrize("num_classes", [0, 3])
def test_sliding_canvas_tokens_come_from_their_windows(num_classes):
    """On a canvas twice the training grid and more, each greedy token is the argmax of the prior over the
    window around it (checked with the uncached forward), and the cached and recompute samplers agree."""
    prior = tiny(num_classes)
    labels = torch.tensor([1, 2]) if num_classes else None
    canvas = generate(prior, 2, labels, top_k=1, grid=(6, 9))
    assert canvas.shape == (2, 6, 9)
    greedy_reference(prior, canvas, None, labels)
    sampled = generate(prior, 2, labels, seed=3, grid=(7, 8))
    assert torch.equal(sampled, generate_recompute(prior, 2, labels, seed=3, grid=(7, 8)))


def test_sliding_on_the_training_grid_is_the_plain_sampler():
    prior = tiny(3)
    plain = generate(prior, 2, [0, 1], seed=9, top_k=10)
    assert torch.equal(plain, generate(prior, 2, [0, 1], seed=9, top_k=10, grid=GRID))


def test_sliding_never_holds_more_than_a_window(monkeypatch):
    prior = tiny(cond_grid=GRID)
    longest = []
    append = KVCache.append

    def spy(self, k, v):
        out = append(self, k, v)
        longest.append(self.length)
        return out

    monkeypatch.setattr(KVCache, "append", spy)
    cond = ids(1, 9, 12, vocab=CV, seed=4)
    canvas = generate(prior, 1, top_k=1, condition=cond, grid=(9, 12))
    assert max(longest) <= prior.config.cond_len + 1 + GRID[0] * GRID[1] - 1
    greedy_reference(prior, canvas, cond)  # a large condition map gives a large image, window by window


def test_sliding_errors():
    prior = tiny()
    with pytest.raises(ValueError, match="smaller than the prior's 3×4 training grid"):
        generate(prior, 1, grid=(2, 8))
    with pytest.raises(ValueError, match="two ints"):
        generate(prior, 1, grid=(6,))
    spatial = tiny(cond_grid=(2, 2))
    with pytest.raises(ValueError, match="condition grid .* to equal the image grid"):
        generate(spatial, 1, condition=ids(1, 6, 8, vocab=CV), grid=(6, 8))
    same = tiny(cond_grid=GRID)
    with pytest.raises(ValueError, match=r"condition must be a token grid of the same size, \(1, 6, 8\)"):
        generate(same, 1, condition=ids(1, 3, 4, vocab=CV), grid=(6, 8))


# ---------------------------------------------------------------------- completion and inpainting


@pytest.mark.parametrize("grid", [None, (5, 6)])
def test_prefix_is_kept_and_the_rest_sampled(grid):
    prior = tiny(3)
    prefix = ids(2, 7, seed=6)
    out = generate(prior, 2, [0, 2], seed=1, prefix=prefix, grid=grid)
    flat = out.reshape(2, -1)
    assert torch.equal(flat[:, :7], prefix)
    assert torch.equal(out, generate_recompute(prior, 2, [0, 2], seed=1, prefix=prefix, grid=grid))
    greedy = generate(prior, 2, [0, 2], top_k=1, prefix=prefix[0], grid=grid)  # one prefix for all rows
    assert torch.equal(greedy.reshape(2, -1)[:, :7], prefix[:1].expand(2, -1))
    kept = torch.zeros(2, greedy[0].numel(), dtype=torch.bool)
    kept[:, :7] = True
    greedy_reference(prior, greedy, None, torch.tensor([0, 2]), kept.view_as(greedy))


def test_inpainting_keeps_masked_tokens_and_samples_the_rest_in_raster_order():
    prior = tiny()
    known = ids(2, *GRID, seed=7)
    keep = torch.zeros(2, *GRID, dtype=torch.bool)
    keep[0, 1, :] = True  # row 1 of the first sample
    keep[:, 0, 0] = True  # the first token of both
    keep[1, 2, 3] = True  # the last token of the second
    out = generate(prior, 2, top_k=1, known=known, keep=keep)
    assert torch.equal(out[keep], known[keep])
    greedy_reference(prior, out, None, kept=keep)  # every token, kept ones included, feeds the ones after it
    sampled = generate(prior, 2, seed=2, known=known, keep=keep)
    assert torch.equal(sampled[keep], known[keep])
    assert torch.equal(sampled, generate_recompute(prior, 2, seed=2, known=known, keep=keep))


def test_completion_errors():
    prior = tiny()
    with pytest.raises(ValueError, match=r"prefix length 13 must be in \[1, 12\]"):
        generate(prior, 1, prefix=ids(13))
    with pytest.raises(ValueError, match="prefix ids must be in"):
        generate(prior, 1, prefix=torch.tensor([V]))
    with pytest.raises(ValueError, match="not both"):
        generate(prior, 1, prefix=ids(3), known=ids(*GRID), keep=torch.ones(GRID, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs both known"):
        generate(prior, 1, known=ids(*GRID))
    with pytest.raises(ValueError, match=r"keep must have shape \(3, 4\)"):
        generate(prior, 1, known=ids(*GRID), keep=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        generate(prior, 1, known=ids(*GRID), keep=torch.ones(GRID))
