"""The shared trainer skeleton: non-finite steps, clean stops, weight-decay groups, no host syncs in the step."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vqim.train.common import param_groups
from vqim.train.trainer import StepOutput, TrainConfig, Trainer, TrainingStopped


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.emb = nn.Embedding(3, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.norm(x + self.emb.weight[0]))

    def save_pretrained(self, d) -> None:
        from vqim.checkpoint import save_tensors

        save_tensors(f"{d}/model.safetensors", self.state_dict())


class _ToyTrainer(Trainer):
    """Regression on fixed batches; the batches at `bad_steps` hold a NaN."""

    def __init__(self, cfg: TrainConfig, bad_steps: set[int]) -> None:
        super().__init__(cfg)
        self.bad_steps = bad_steps
        self.weights_after: dict[int, torch.Tensor] = {}

    def setup(self) -> nn.Module:
        return _Toy()

    def lr_lambda(self, step: int) -> float:
        return 1.0

    def batches(self, start_step: int) -> Iterator[dict[str, Any]]:
        step = start_step
        while True:
            g = torch.Generator().manual_seed(step)
            x = torch.randn(8, 4, generator=g)
            if step in self.bad_steps:
                x[0, 0] = float("nan")
            yield {"x": x, "y": x.sum(1, keepdim=True)}
            step += 1

    def compute_loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        return StepOutput(loss, {}, 8)

    def periodic(self, step: int) -> None:
        self.weights_after[step] = self.raw.lin.weight.detach().clone()

    def config_record(self) -> dict[str, Any]:
        return {}


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = {"out": str(tmp_path), "steps": 6, "batch_size": 8, "lr": 0.05, "num_workers": 0, "progress": False,
            "log_every": 1, "ckpt_every": 2, "mixed_precision": "no"}  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_a_non_finite_step_changes_nothing_and_the_run_goes_on(tmp_path):
    trainer = _ToyTrainer(_cfg(tmp_path), bad_steps={3})
    summary = trainer.fit()
    w = trainer.weights_after
    assert torch.equal(w[4], w[3])  # step index 3 (the 4th step) was skipped
    assert not torch.equal(w[3], w[2]) and not torch.equal(w[5], w[4])  # its neighbours trained
    assert summary["nonfinite_steps"] == 1 and summary["completed"]
    assert torch.isfinite(trainer.raw.lin.weight).all()
    # Adam's moments and step count were left as they were before the bad step.
    state = trainer.optimizer.optimizer.state[trainer.raw.lin.weight]
    assert int(state["step"]) == 5


def test_repeated_non_finite_steps_stop_cleanly_with_a_summary(tmp_path):
    trainer = _ToyTrainer(_cfg(tmp_path, steps=20, max_nonfinite=3), bad_steps=set(range(5, 20)))
    with pytest.raises(TrainingStopped, match="non-finite.*step-0000006"):
        trainer.fit()
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["stopped"] == "non-finite gradients" and not summary["completed"]
    assert summary["last_good_checkpoint"].endswith("step-0000006")  # skipped steps keep good weights
    assert summary["steps"] == 8  # 3 bad steps in a row after step index 5, read at the logging step
    assert not (tmp_path / "model.safetensors").exists()


def test_weight_decay_only_on_linear_and_conv_weights():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Embedding(5, 4), nn.Conv2d(3, 3, 3))
    model.register_parameter("table", nn.Parameter(torch.zeros(5, 4)))
    decay, keep = param_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    assert len(keep["params"]) == len(list(model.parameters())) - 2


class _SyncCounter(TorchDispatchMode):
    """Records ops that make the host wait for a value computed on the device."""

    SYNC = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero"}

    def __init__(self, trainer: Trainer, steps: int) -> None:
        super().__init__()
        self.trainer, self.steps, self.found = trainer, steps, []
        self.active = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if self.active and name in self.SYNC and self.trainer.step < self.steps - 1:
            self.found.append((self.trainer.step, func.__name__))
        return func(*args, **(kwargs or {}))


def _count_syncs(trainer: Trainer, steps: int) -> list[tuple[int, str]]:
    """Run the trainer with batches made in advance; return the sync ops met in steps 1..steps-2."""
    counter = _SyncCounter(trainer, steps)
    original_batches, original_before = trainer.batches, trainer.before_loop

    def batches(start: int):
        counter.active = False  # data loading is host work
        made = list(itertools.islice(original_batches(start), steps - start))
        counter.active = True
        return iter(made)

    def before_loop() -> None:
        original_before()
        counter.active = True

    trainer.batches, trainer.before_loop = batches, before_loop
    with counter:
        trainer.fit()
    # The first step may allocate optimizer state lazily; every later step must run without a sync.
    return [f for f in counter.found if f[0] >= 1]


def test_tokenizer_step_makes_no_host_sync_between_logging_steps(tmp_path):
    from vqim.train.tokenizer import TokenizerTrainConfig, TokenizerTrainer

    steps = 5
    cfg = TokenizerTrainConfig(
        out=str(tmp_path), data="photos", steps=steps, batch_size=4, lr=1e-3, num_workers=0, progress=False,
        log_every=steps, ckpt_every=steps, image_every=steps, mixed_precision="no", disc="patchgan",
        disc_channels=8, r1_gamma=1.0, r1_interval=2, model={"image_size": 32, "dead_code_window": 2},
    )  # fmt: skip
    trainer = TokenizerTrainer(cfg)
    assert _count_syncs(trainer, steps) == []
    assert trainer.counters["restarted_codes"] > 0  # restarts ran, without syncing


def test_prior_step_makes_no_host_sync_between_logging_steps(tmp_path):
    import numpy as np

    from vqim.train.prior import PriorTrainConfig, PriorTrainer

    rng = np.random.default_rng(0)
    folder = tmp_path / "tok"
    folder.mkdir()
    np.save(folder / "tokens-00000.npy", rng.integers(0, 16, (40, 4, 4)).astype(np.uint16))
    np.save(folder / "labels-00000.npy", rng.integers(0, 3, 40).astype(np.int64))
    manifest = {
        "format": "vqim-tokens/1", "grid_size": [4, 4], "codebook_size": 16, "count": 40, "has_labels": True,
        "class_names": ["a", "b", "c"], "tokenizer_config_hash": "x",
        "shards": [{"tokens": "tokens-00000.npy", "labels": "labels-00000.npy", "count": 40}],
    }  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    steps = 5
    cfg = PriorTrainConfig(
        out=str(tmp_path / "p"), tokens=str(tmp_path / "tok"), steps=steps, batch_size=8, progress=False,
        log_every=steps, ckpt_every=steps, eval_every=steps, mixed_precision="no",
    )  # fmt: skip
    assert _count_syncs(PriorTrainer(cfg), steps) == []


def test_clipping_in_the_fused_step_equals_clip_grad_norm():
    from vqim.train.trainer import clip_scale, grad_norm, nonfinite_flag, optimizer_step

    torch.manual_seed(0)
    ref, ours = nn.Linear(4, 2), nn.Linear(4, 2)
    ours.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=0.1, fused=True)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=0.1, fused=True)
    clipped = 0
    for step in range(4):
        x = torch.randn(8, 4) * (10 if step % 2 else 0.01)  # alternately above and below the limit
        for m in (ref, ours):
            (m(x) ** 2).mean().backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        clipped += int(norm > 1.0)
        opt_ref.step()
        n = grad_norm(ours.parameters())
        torch.testing.assert_close(n, norm)
        optimizer_step(opt_ours, nonfinite_flag(n), clip_scale(n, 1.0))
        for opt in (opt_ref, opt_ours):
            opt.zero_grad(set_to_none=True)
    assert clipped == 2
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b)
    assert clip_scale(torch.tensor(5.0), 0.0) is None
