"""Prior (VIM) training on token shards written by `vqim encode`; Accelerate as for the tokenizer.

Output folder:
    config.json, model.safetensors   the final prior (`Prior.from_pretrained(out)`)
    tokens.json                      what the prior was trained on (tokenizer hash, grid, codebook, classes)
    checkpoints/step-NNNNNNN/        weights + training state
    tb/                              TensorBoard scalars
    train_config.json, metrics.json
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vqim.checkpoint import write_json
from vqim.data import StepSampler
from vqim.prior import Prior
from vqim.tokens import TokenDataset, collate_tokens
from vqim.train import state as st
from vqim.train.common import make_accelerator, param_groups, restore_checkpoint, save_checkpoint, tensorboard

log = logging.getLogger(__name__)


@dataclass
class PriorTrainConfig:
    """Settings of a prior training run.

    Args:
        out: output folder.
        tokens: token folder from `vqim encode`.
        val_tokens: a separate held-out token folder; if None, every `val_every`-th sequence of `tokens` is held out.
        val_every: see val_tokens (0: no validation).
        preset: prior preset.
        model: overrides of the preset's PriorConfig fields.
        unconditional: ignore labels even when the tokens have them.
        steps, batch_size: optimizer steps and global batch (sequences).
        lr: peak learning rate (paper: 4.5e-4).
        warmup_steps: linear warmup (default 5% of steps; paper: 5k).
        decay_start: step where exponential decay to final_lr begins (default: half of steps; paper: 80k).
        final_lr: lr reached at the last step (paper: 1e-5).
        betas: Adam betas (paper: 0.9, 0.96).
        weight_decay: decoupled, on weight matrices only (not embeddings, norms, biases).
        grad_clip: max global gradient norm (0 disables).
        eval_every: validation interval in steps.
        seed, num_workers, log_every, ckpt_every, keep_checkpoints, resume, mixed_precision, progress:
            as for the tokenizer trainer.
    """

    out: str
    tokens: str
    val_tokens: str | None = None
    val_every: int = 20
    preset: str = "vim-tiny"
    model: dict[str, Any] = field(default_factory=dict)
    unconditional: bool = False
    steps: int = 2000
    batch_size: int = 32
    lr: float = 4.5e-4
    warmup_steps: int | None = None
    decay_start: int | None = None
    final_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.96)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 500
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    mixed_precision: str = "auto"
    progress: bool = True


def vim_lr_lambda(step: int, total: int, warmup: int, decay_start: int, final_ratio: float) -> float:
    """Linear warmup to 1, flat, then exponential decay reaching final_ratio at `total` (VIM's schedule)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if step < decay_start:
        return 1.0
    t = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return final_ratio**t


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    return "embed" in name or "pos" in name


@torch.no_grad()
def evaluate_bits_per_token(
    prior: Prior, dataset: TokenDataset, batch_size: int = 64, device: str | torch.device = "cpu"
) -> float:
    """Mean bits per token of the dataset's sequences under the prior (eval mode, labels used if conditional)."""
    was = prior.training
    prior.eval()
    total, count = 0.0, 0
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_tokens)
    for batch in loader:
        tokens = batch["tokens"].to(device)
        labels = batch["label"].to(device) if prior.config.num_classes > 0 else None
        logits = prior(tokens, labels).logits.float()
        total += float(F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="sum"))
        count += tokens.numel()
    prior.train(was)
    return total / count / math.log(2)


def train_prior(cfg: PriorTrainConfig) -> dict[str, Any]:
    """Train a prior; returns the run summary (also in out/metrics.json)."""
    from tqdm.auto import tqdm

    acc = make_accelerator(cfg.mixed_precision)
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"

    if cfg.val_tokens is not None:
        train_set = TokenDataset(cfg.tokens, split="all")
        val_set: TokenDataset | None = TokenDataset(cfg.val_tokens, split="all")
    elif cfg.val_every > 0:
        train_set = TokenDataset(cfg.tokens, split="train", val_every=cfg.val_every)
        val_set = TokenDataset(cfg.tokens, split="val", val_every=cfg.val_every)
    else:
        train_set, val_set = TokenDataset(cfg.tokens, split="all"), None
    conditional = train_set.has_labels and not cfg.unconditional
    num_classes = len(train_set.class_names or []) if conditional else 0
    if conditional and num_classes == 0:
        raise ValueError(f"{cfg.tokens}: the tokens have labels but no class names; pass --unconditional")

    start_step = 0
    resume_from = st.latest_checkpoint(ckpt_root) if cfg.resume else None
    if cfg.resume and resume_from is None:
        log.warning("--resume: no complete checkpoint under %s; starting from scratch", ckpt_root)
    torch.manual_seed(cfg.seed)
    if resume_from is not None:
        model = Prior.from_pretrained(resume_from).train()
    else:
        model = Prior.from_preset(
            cfg.preset,
            vocab_size=train_set.codebook_size,
            grid_size=train_set.grid_size,
            num_classes=num_classes,
            **cfg.model,
        ).train()
    pcfg = model.config
    for ds in (train_set, val_set):
        if ds is not None:
            ds.check_compatible(
                pcfg.vocab_size, tuple(pcfg.grid_size), train_set.manifest["tokenizer_config_hash"]
            )

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.steps // 20
    decay_start = cfg.decay_start if cfg.decay_start is not None else cfg.steps // 2
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, _no_decay), lr=cfg.lr, betas=cfg.betas, fused=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: vim_lr_lambda(s, cfg.steps, warmup, decay_start, cfg.final_lr / cfg.lr)
    )
    if resume_from is not None:
        _, meta = restore_checkpoint(resume_from, rank, optimizer, scheduler)
        start_step = int(meta["step"])
    else:
        torch.manual_seed(cfg.seed + 1000 * rank)

    model, optimizer = acc.prepare(model, optimizer)
    raw: Prior = acc.unwrap_model(model)
    device = acc.device
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "train_config.json", {**dataclasses.asdict(cfg), "prior": pcfg.to_dict()})
        write_json(
            out / "tokens.json",
            {
                "tokens": str(cfg.tokens),
                "tokenizer_config_hash": train_set.manifest["tokenizer_config_hash"],
                "grid_size": list(train_set.grid_size),
                "codebook_size": train_set.codebook_size,
                "class_names": train_set.class_names if conditional else None,
            },
        )
    writer = tensorboard(out, main)
    sampler = StepSampler(len(train_set), cfg.batch_size, rank, world, seed=cfg.seed, start_step=start_step)
    loader = DataLoader(
        train_set, batch_size=cfg.batch_size // world, sampler=sampler, num_workers=cfg.num_workers,
        collate_fn=collate_tokens,
        # Its own generator: creating the iterator must not draw from the global RNG (resume).
        generator=torch.Generator().manual_seed(cfg.seed),
    )  # fmt: skip
    data_iter = iter(loader)
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (main and cfg.progress), desc="train-prior")
    seq_len = train_set.grid_size[0] * train_set.grid_size[1]
    t0 = t_last = time.perf_counter()
    n_last = 0
    step = start_step
    last: dict[str, float] = {}
    val_bits: float | None = None
    while step < cfg.steps:
        batch = next(data_iter)
        tokens = batch["tokens"].to(device)
        labels = batch["label"].to(device) if conditional else None
        logits = model(tokens, labels).logits  # DDP: call the module itself so gradients are synchronised
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        acc.backward(loss)
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        n_last += tokens.shape[0] * seq_len * world
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            loss_value = float(loss.detach())
            last = {
                "loss": loss_value,
                "bits_per_token": loss_value / math.log(2),
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": n_last / (now - t_last),
            }
            t_last, n_last = now, 0
            if writer is not None:
                for k, v in last.items():
                    writer.add_scalar(f"train/{k}", v, step)
            if not cfg.progress and main:
                log.info("step %d/%d bits/token %.3f %.0f tok/s", step, cfg.steps, last["bits_per_token"],
                         last["tokens_per_s"])  # fmt: skip
            bar.set_postfix(bpt=f"{last['bits_per_token']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
        bar.update(1)
        if val_set is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            val_bits = evaluate_bits_per_token(raw, val_set, device=device)
            if writer is not None:
                writer.add_scalar("val/bits_per_token", val_bits, step)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_checkpoint(
                acc, ckpt_root, step, raw, optimizer.optimizer, scheduler, {}, {}, cfg.keep_checkpoints
            )
    bar.close()
    summary = {
        "steps": step,
        "resumed_from": str(resume_from) if resume_from else None,
        "seconds": time.perf_counter() - t0,
        "val_bits_per_token": val_bits,
        "train_bits_per_token": last.get("bits_per_token"),
        "tokens_per_s": last.get("tokens_per_s"),
        "train_sequences": len(train_set),
        "val_sequences": len(val_set) if val_set is not None else 0,
        "num_classes": num_classes,
        "processes": world,
    }
    if main:
        raw.save_pretrained(out)
        write_json(out / "metrics.json", summary)
        if writer is not None:
            writer.close()
    acc.wait_for_everyone()
    acc.end_training()
    return summary
