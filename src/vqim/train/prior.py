"""Prior (VIM) training on token shards written by `vqim encode`, on the shared trainer skeleton.

Output folder:
    config.json, model.safetensors   the final prior (`Prior.from_pretrained(out)`)
    tokens.json                      what the prior was trained on (tokenizer identity, grid, codebook, classes,
                                     and the spatial condition with its tokenizer's identity)
    checkpoints/step-NNNNNNN/        weights + training state
    tb/                              TensorBoard scalars
    train_config.json, metrics.json
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vqim.checkpoint import write_json
from vqim.data import StepSampler
from vqim.errors import InputError, check_settings
from vqim.options import option
from vqim.prior import Prior, bits_per_token, nats_to_bits
from vqim.tokens import TokenDataset, collate_tokens
from vqim.train.trainer import StepOutput, TrainConfig, Trainer

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PriorTrainConfig(TrainConfig):
    """Settings of a prior training run (besides those every run has, see `TrainConfig`).

    Args:
        tokens: token folder written by `vqim encode`.
        val_tokens: held-out token folder (default: every --val-every-th sequence of --tokens).
        val_every: without --val-tokens, hold out every N-th sequence of --tokens (0: no validation).
        preset: prior preset (see `vqim presets`).
        model: overrides of the preset's PriorConfig fields.
        dropout: override the preset's dropout.
        class_dropout: probability of training on the null class (for classifier-free guidance).
        unconditional: ignore labels even when the tokens have them (a spatial condition in the tokens is
            always used).
        lr: peak learning rate (paper: 4.5e-4).
        betas: Adam betas (paper: 0.9, 0.96).
        warmup_steps: linear warmup steps (default: 5% of --steps; paper: 5k).
        decay_start: step where exponential decay to --final-lr begins (default: half of --steps; paper: 80k).
        final_lr: lr reached at the last step (paper: 1e-5).
        eval_every: validation interval in steps.
    """

    tokens: str
    val_tokens: str | None = None
    val_every: int = 20
    preset: str = "vim-tiny"
    model: dict[str, Any] = option(default_factory=dict, cli=False)
    dropout: float | None = None
    class_dropout: float | None = None
    unconditional: bool = option(False, negatable=False)
    steps: int = 2000
    batch_size: int = 32
    lr: float = 4.5e-4
    betas: tuple[float, float] = option((0.9, 0.96), metavar=("B1", "B2"))
    weight_decay: float = 0.01
    num_workers: int = 0
    decay_start: int | None = None
    final_lr: float = 1e-5
    eval_every: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        check_settings(
            self,
            positive=("eval_every", "final_lr"),
            non_negative=("val_every", "decay_start"),
            unit=("dropout", "class_dropout"),
        )


def vim_lr_lambda(step: int, total: int, warmup: int, decay_start: int, final_ratio: float) -> float:
    """Linear warmup to 1, flat, then exponential decay reaching final_ratio at `total` (VIM's schedule)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if step < decay_start:
        return 1.0
    t = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return final_ratio**t


class PriorTrainer(Trainer):
    """Trains a VIM prior: next-token cross-entropy over raster-order tokens, validation in bits per token."""

    desc = "train-prior"
    rate_name = "tokens_per_s"
    summary_file = "metrics.json"
    outputs = (*Trainer.outputs, "tokens.json")
    fixed_settings = ("preset", "model", "dropout", "class_dropout", "unconditional")
    supports_fsdp = True
    cfg: PriorTrainConfig

    def setup(self) -> Prior:
        cfg = self.cfg
        if cfg.val_tokens is not None:
            self.train_set = TokenDataset(cfg.tokens, split="all")
            self.val_set: TokenDataset | None = TokenDataset(cfg.val_tokens, split="all")
        elif cfg.val_every > 0:
            self.train_set = TokenDataset(cfg.tokens, split="train", val_every=cfg.val_every)
            self.val_set = TokenDataset(cfg.tokens, split="val", val_every=cfg.val_every)
        else:
            self.train_set, self.val_set = TokenDataset(cfg.tokens, split="all"), None
        ds = self.train_set
        self.conditional = ds.has_labels and not cfg.unconditional
        self.num_classes = len(ds.class_names or []) if self.conditional else 0
        if self.conditional and self.num_classes == 0:
            raise InputError(f"{cfg.tokens}: the tokens have labels but no class names; pass --unconditional")
        if self.resume_from is not None:
            model = Prior.from_pretrained(self.resume_from).train()
        else:
            overrides = {
                k: v for k, v in {"dropout": cfg.dropout, "class_dropout": cfg.class_dropout}.items() if v is not None
            }  # fmt: skip
            if ds.condition is not None:  # paired condition tokens: a spatially conditioned prior
                overrides["cond_vocab_size"] = int(ds.condition["codebook_size"])
                overrides["cond_grid_size"] = tuple(ds.cond_grid_size)
            model = Prior.from_preset(
                cfg.preset, vocab_size=ds.codebook_size, grid_size=ds.grid_size, num_classes=self.num_classes,
                **{**cfg.model, **overrides},
            ).train()  # fmt: skip
        pcfg = model.config
        for d in (self.train_set, self.val_set):
            if d is not None:
                d.check_compatible(
                    pcfg.vocab_size, tuple(pcfg.grid_size), ds.manifest.get("tokenizer_config_hash"),
                    tokenizer_id=ds.manifest.get("tokenizer_id"),
                )  # fmt: skip
                d.check_condition(pcfg, ds.condition)
        self.seq_len = ds.grid_size[0] * ds.grid_size[1]
        self.val_bits: float | None = None
        return model

    def lr_lambda(self, step: int) -> float:
        cfg = self.cfg
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.steps // 20
        decay_start = cfg.decay_start if cfg.decay_start is not None else cfg.steps // 2
        return vim_lr_lambda(step, cfg.steps, warmup, decay_start, cfg.final_lr / cfg.lr)

    def batches(self, start_step: int) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        sampler = StepSampler(
            len(self.train_set), cfg.batch_size, self.rank, self.world, cfg.seed, start_step
        )
        loader = DataLoader(
            self.train_set, batch_size=cfg.batch_size // self.world, sampler=sampler,
            num_workers=cfg.num_workers, collate_fn=collate_tokens,
            # Its own generator: creating the iterator must not draw from the global RNG (resume).
            generator=torch.Generator().manual_seed(cfg.seed),
        )  # fmt: skip
        for batch in loader:
            batch["tokens"] = batch["tokens"].to(self.device)
            batch["label"] = batch["label"].to(self.device) if self.conditional else None
            batch["condition"] = batch["condition"].to(self.device) if "condition" in batch else None
            yield batch

    def write_records(self) -> None:
        ds = self.train_set
        write_json(
            self.out / "tokens.json",
            {
                "tokens": str(self.cfg.tokens),
                **{k: ds.manifest[k] for k in ("tokenizer_config_hash", "tokenizer_id") if k in ds.manifest},
                "grid_size": list(ds.grid_size),
                "codebook_size": ds.codebook_size,
                "class_names": ds.class_names if self.conditional else None,
                "condition": ds.condition,
            },
        )

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        tokens = batch["tokens"]
        # DDP: call the module so gradients are synchronised. No range check here (a host sync per step): an id
        # outside the vocabulary still fails in the embedding lookup.
        logits = model(tokens, batch["label"], check_values=False, condition=batch["condition"]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        return StepOutput(loss, {}, tokens.shape[0] * self.seq_len)

    def log_terms(self, out: StepOutput, batch: dict[str, Any]) -> dict[str, float]:
        return {"bits_per_token": float(nats_to_bits(float(out.loss.detach())))}

    def periodic(self, step: int) -> None:
        if self.val_set is not None and (step % self.cfg.eval_every == 0 or step == self.cfg.steps):
            # In the run's mixed precision: Accelerate patches the prepared model's forward with it, a model sharded
            # by vqim (--fsdp) has no such patch.
            with self.acc.autocast():
                self.val_bits = bits_per_token(self.raw, self.val_set, device=self.device)
            if self.writer is not None:
                self.writer.add_scalar("val/bits_per_token", self.val_bits, step)

    def summary_extra(self) -> dict[str, Any]:
        return {
            "val_bits_per_token": self.val_bits,
            "train_bits_per_token": self.last.get("bits_per_token"),
            "tokens_per_s": self.last.get("tokens_per_s"),
            "train_sequences": len(self.train_set),
            "val_sequences": len(self.val_set) if self.val_set is not None else 0,
            "num_classes": self.num_classes,
        }

    def config_record(self) -> dict[str, Any]:
        return {"prior": self.raw.config.to_dict()}


def train_prior(cfg: PriorTrainConfig) -> dict[str, Any]:
    """Train a prior; returns the run summary (also in out/metrics.json)."""
    return PriorTrainer(cfg).fit()
