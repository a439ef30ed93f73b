"""The training loop every vqim trainer runs: one skeleton, extended by the tokenizer and prior trainers.

`Trainer.fit()` owns what is the same for every model: Accelerate (CPU, one GPU, or `accelerate launch`),
seeding, AdamW with decoupled weight decay on weight matrices only, the lr schedule, gradient clipping,
skipping of non-finite steps, resumable atomic checkpoints, TensorBoard scalars, the progress bar, the
time budget and the run summary. A subclass supplies the model, the data stream and the loss (`setup`,
`lr_lambda`, `batches`, `compute_loss`) and, where it has any, extra updates after the optimizer step and
extra checkpoint state.

The step makes no host-device synchronisation between logging steps: loss terms stay tensors until a
logging step reads them, and a step whose gradient norm is not finite is skipped on the device (the fused
AdamW step reads a `found_inf` flag, as under a gradient scaler), so no process has to stop and agree.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vqim.checkpoint import EMA_NAME, read_json, save_tensors, write_json
from vqim.errors import InputError, check_settings
from vqim.nn import memory
from vqim.options import option
from vqim.train import rundir, sharding
from vqim.train import state as st
from vqim.train.common import (
    gather_names,
    make_accelerator,
    param_groups,
    restore_checkpoint,
    save_checkpoint,
    tensorboard,
)

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """A run stopped before its last step for a reason the user must act on (e.g. repeated non-finite losses).

    The run summary (with the last good checkpoint) is written before this is raised.
    """


@dataclass(kw_only=True)
class TrainConfig:
    """Settings every training run shares.

    Args:
        out: output folder (weights, checkpoints, TensorBoard logs, summary).
        steps: optimizer steps.
        batch_size: global batch, summed over processes.
        lr: peak learning rate.
        warmup_steps: linear warmup steps (default: a fraction of --steps, see the trainer).
        weight_decay: decoupled weight decay on weight matrices (never on embeddings, position tables, norms,
            biases or the codebook).
        betas: Adam betas.
        grad_clip: max global gradient norm (0: no clipping).
        seed: initialisation, shuffling and augmentation seed.
        num_workers: DataLoader workers per process.
        log_every: logging interval in steps (loss terms are read from the device only then).
        ckpt_every: checkpoint interval in steps.
        keep_checkpoints: complete checkpoints kept on disk (0: keep all).
        resume: continue from the latest complete checkpoint under OUT/checkpoints (a new run if none); the
            settings must match the saved run's (see --override).
        overwrite: replace the run already in OUT; nothing of it is deleted before this run's first checkpoint.
        override: on --resume, settings that may differ from the saved run's (e.g. lr batch_size); recorded in
            train_config.json. Settings that define the model cannot be overridden.
        mixed_precision: "auto" (bf16 autocast on GPU, fp32 on CPU), "no" or "bf16".
        progress: show a progress bar.
        max_minutes: stop (with a checkpoint) after this much training time; the lr schedule still follows
            --steps.
        compile: torch.compile the model with this mode (e.g. default, max-autotune-no-cudagraphs); eager if
            not given. On x86-64 CPUs eager can be faster: compiled graphs run the linear layers on F.linear,
            not on oneDNN's product (vqim.nn.linear).
        max_nonfinite: stop after this many consecutive steps with a non-finite gradient (checked at logging
            steps).
        grad_accum: micro-batches of --batch-size per optimizer step (gradients summed, DDP synchronised once):
            the step of an N× larger batch with the memory of one.
        ema_decay: keep an exponential moving average of the weights with this decay per optimizer step (0: off;
            e.g. 0.999); saved as ema.safetensors beside model.safetensors, which from_pretrained then loads.
        checkpoint_activations: recompute each Transformer block in the backward pass instead of keeping its
            activations (less memory, about one more forward of compute).
        fsdp: shard weights, gradients and Adam moments over the processes (PyTorch FSDP2, one unit per
            Transformer block) instead of replicating them (DDP): for priors that do not fit one device. Also
            taken when `accelerate launch` is configured for FSDP. Checkpoints hold the whole state either way.
    """

    out: str
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    warmup_steps: int | None = None
    weight_decay: float = 1e-4
    betas: tuple[float, float] = option((0.9, 0.99), metavar=("B1", "B2"))
    grad_clip: float = 1.0
    seed: int = 0
    num_workers: int = 2
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = option(False, negatable=False)
    overwrite: bool = option(False, negatable=False)
    override: list[str] = option(default_factory=list, metavar="SETTING")
    mixed_precision: str = option("auto", choices=("auto", "no", "bf16"))
    progress: bool = True
    max_minutes: float | None = None
    compile: str | None = option(None, metavar="MODE")
    max_nonfinite: int = 20
    grad_accum: int = 1
    ema_decay: float = 0.0
    checkpoint_activations: bool = False
    fsdp: bool = option(False, negatable=False)

    def __post_init__(self) -> None:
        check_settings(
            self,
            positive=("steps", "batch_size", "lr", "log_every", "ckpt_every", "max_nonfinite", "grad_accum"),
            non_negative=("warmup_steps", "weight_decay", "grad_clip", "num_workers", "keep_checkpoints"),
        )
        if self.max_minutes is not None and not (self.max_minutes > 0):
            raise InputError(f"--max-minutes must be a positive number of minutes, got {self.max_minutes}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise InputError(f"--betas must be two numbers in [0, 1), got {' '.join(map(str, self.betas))}")
        if not 0 <= self.ema_decay < 1:
            raise InputError(f"--ema-decay must be in [0, 1) (0: no weight average), got {self.ema_decay}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise InputError(
                f"--compile: unknown mode {self.compile!r}; choose one of {', '.join(COMPILE_MODES)}"
            )


# torch.compile's modes (torch._inductor.list_mode_options(), and "default").
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class StepOutput:
    """What `compute_loss` returns for one batch.

    Attributes:
        loss: the scalar to minimise.
        terms: detached scalar tensors to log (read from the device only on logging steps).
        items: samples in this process's batch (images, or sequences).
        extra: anything the subclass's `after_update` needs (e.g. the reconstruction for a discriminator).
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    items: int
    extra: Any = None


def grad_norm(parameters) -> torch.Tensor:
    """Global l2 norm of the gradients of parameters, as a tensor on their device (no host sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # One multi-tensor kernel per device and dtype instead of one norm per parameter (as clip_grad_norm_ does).
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))


def clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor | None:
    """The divisor that clips gradients of global norm `norm` to max_norm (None: no clipping).

    Same rule as `torch.nn.utils.clip_grad_norm_` (gradients × max_norm / (norm + 1e-6) when that is < 1), but
    applied by the fused Adam kernel as its `grad_scale` instead of a separate pass over every gradient.
    """
    if max_norm <= 0:
        return None
    return ((norm + 1e-6) / max_norm).clamp_min(1.0).to(torch.float32)


def optimizer_step(
    optimizer: torch.optim.Optimizer, found_inf: torch.Tensor, grad_scale: torch.Tensor | None = None
) -> None:
    """One fused Adam(W) step that divides gradients by grad_scale and leaves weights and moments untouched
    where found_inf is 1.

    The fused kernels read both on the device (as GradScaler uses them), so a non-finite step is skipped and
    gradients are clipped without the host waiting for the gradient norm.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    inner.found_inf, inner.grad_scale = found_inf, grad_scale
    try:
        optimizer.step()
    finally:
        inner.found_inf = inner.grad_scale = None


def nonfinite_flag(norm: torch.Tensor) -> torch.Tensor:
    """1.0 where the gradient norm is NaN or inf, else 0.0 (float32, on the norm's device)."""
    return (~torch.isfinite(norm)).to(torch.float32).reshape(())


class EMA:
    """Exponential moving average of a model's parameters: shadow ← decay·shadow + (1 − decay)·weights.

    One fused `_foreach_lerp_` per optimizer step; buffers are not averaged (the model's own are saved).

    Args:
        model: the unwrapped model whose parameters are averaged.
        decay: weight of the old average per update.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names, self.params = zip(*[(n, p) for n, p in model.named_parameters()], strict=True)
        self.shadow = [p.detach().clone() for p in self.params]  # sharded like the weights under FSDP

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    def tensors(self, prefix: str = "ema.") -> dict[str, torch.Tensor]:
        """The whole averaged tensors by parameter name (under FSDP a collective: every process calls it)."""
        # Gathered one at a time and moved to the CPU: a sharded model never holds all whole tensors on the device.
        return {
            prefix + n: sharding.full_tensor(t).cpu() if hasattr(t, "full_tensor") else t
            for n, t in zip(self.names, self.shadow, strict=True)
        }

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], prefix: str = "ema.") -> None:
        missing = [n for n in self.names if prefix + n not in tensors]
        if missing:
            raise InputError(f"the checkpoint has no weight average for {', '.join(missing[:3])}")
        for n, t in zip(self.names, self.shadow, strict=True):
            local = t.to_local() if hasattr(t, "to_local") else t
            local.copy_(sharding.local_shard(tensors[prefix + n], t))

    def state_dict(self, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A model state dict (the whole one) with the averaged parameters in place of the current ones."""
        return {**model_state, **self.tensors(prefix="")}


class Trainer(abc.ABC):
    """One training run. Subclasses implement the hooks below; `fit()` runs the loop.

    Args:
        cfg: the run's settings (a `TrainConfig` subclass).
    """

    desc = "train"
    rate_name = "items_per_s"
    summary_file = "train_summary.json"
    warmup_fraction = 0.1
    # What a run writes into its folder (besides summary_file): how a folder holding a run is recognised.
    outputs: tuple[str, ...] = (
        "train_config.json",
        "config.json",
        "model.safetensors",
        EMA_NAME,
        "checkpoints",
        "tb",
    )
    # Settings that define the model: a resumed run takes them from its checkpoint, so they must match.
    fixed_settings: tuple[str, ...] = ("preset", "model")
    # Whether the model may be sharded (--fsdp): a trainer that edits whole weights in place cannot be.
    supports_fsdp = False

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.acc = make_accelerator(cfg.mixed_precision)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.main = self.acc.is_main_process
        self.device = self.acc.device
        if self.device.type == "cpu":
            # Reuse freed activations instead of page-faulting fresh ones in every step (vqim.nn.memory).
            memory.retain_freed_memory()
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        self.step = 0
        self.resume_from: Path | None = None
        self.run_id = uuid.uuid4().hex
        self.replacement: rundir.Replacement | None = None
        self.overrides: list[dict[str, Any]] = []  # --override records, this run's and earlier ones
        self.skipped: set[str] = set()  # unreadable input files met so far
        self.counters: dict[str, int] = {"nonfinite_steps": 0}
        self.writer = None
        self.ema: EMA | None = None
        self.sharded = False  # FSDP: the weights, gradients and optimizer state are split over the processes
        if self._fsdp_requested() and not self.supports_fsdp:
            raise InputError(
                f"--fsdp: {self.desc} does not shard its model (it edits whole weights in place); train it with "
                f"DDP (leave out --fsdp and any FSDP accelerate config)"
            )
        # Called on every process at the end of a completed run with (unwrapped model, accelerator).
        self.on_end: Callable[[nn.Module, Any], None] | None = None

    # ------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def setup(self) -> nn.Module:
        """Build the data and the model (from `self.resume_from` when resuming); return the model."""

    @abc.abstractmethod
    def lr_lambda(self, step: int) -> float:
        """Multiplier of the peak lr at this step."""

    @abc.abstractmethod
    def batches(self, start_step: int) -> Iterator[dict[str, Any]]:
        """This process's batches from global step start_step on (resumable, split over processes)."""

    @abc.abstractmethod
    def compute_loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        """Forward pass and loss for one batch (model is the prepared, possibly DDP-wrapped module)."""

    def prepare_extra(self) -> None:  # noqa: B027 - optional hook
        """Move or prepare extra modules (discriminator, perceptual network) once the model is prepared."""

    def before_loop(self) -> None:  # noqa: B027 - optional hook
        """Work done once before the first step of a run or a resumed run (e.g. codebook initialisation)."""

    def after_update(self, out: StepOutput, batch: dict[str, Any], found_inf: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """Updates after the optimizer step (discriminator step, codebook restarts); may add to out.terms."""

    def log_terms(self, out: StepOutput, batch: dict[str, Any]) -> dict[str, float]:
        """Extra values to log on a logging step (computed only then)."""
        return {}

    def periodic(self, step: int) -> None:  # noqa: B027 - optional hook
        """Work after step `step` (image grids, validation); called every step."""

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Extra checkpoint content: (tensors, JSON-able metadata)."""
        return {}, {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what `extra_state` saved."""

    def config_record(self) -> dict[str, Any]:
        """What train_config.json records besides the settings (e.g. the model config)."""
        return {"model": self.raw.config.to_dict()}

    def summary_extra(self) -> dict[str, Any]:
        """Extra entries of the run summary."""
        return {}

    def write_records(self) -> None:  # noqa: B027 - optional hook
        """Write what describes the run besides train_config.json (e.g. the prior's tokens.json); main process."""

    def model_state(self) -> dict[str, torch.Tensor] | None:
        """The whole weights for writing (None: the model's own state_dict). Every process calls it: a sharded
        model's weights are gathered onto the main process."""
        return sharding.full_model_state(self.raw) if self.sharded else None

    def save_final(self) -> None:
        """Write the final model into the output folder, and its weight average if kept. Every process calls it
        (a sharded model is gathered); the main process writes."""
        state = self.model_state()
        ema = None
        if self.ema is not None:
            ema = self.ema.state_dict(state if state is not None else self.raw.state_dict())
        if not self.main:
            return
        if state is None:
            self.raw.save_pretrained(self.out)
        else:
            self.raw.save_pretrained(self.out, state_dict=state)
        if ema is not None:
            save_tensors(self.out / EMA_NAME, ema, metadata={"ema_decay": str(self.ema.decay)})

    # ------------------------------------------------------------------ the loop
    def no_decay(self, name: str, param: nn.Parameter) -> bool:
        """Extra parameters kept out of weight decay (besides those of non-matrix layers)."""
        return False

    def _resume_point(self) -> Path | None:
        """Check the output folder; the checkpoint to resume from (None: a new run)."""
        cfg = self.cfg
        self.replacement = rundir.check_out(
            self.out, (*self.outputs, self.summary_file), cfg.resume, cfg.overwrite
        )
        if self.main:
            rundir.clean_leftovers(self.ckpt_root)
        self.acc.wait_for_everyone()
        if not cfg.resume:
            return None
        found = st.latest_checkpoint(self.ckpt_root)
        if found is None:
            log.info("no checkpoint under %s yet: starting a new run", self.ckpt_root)
            return None
        step = int(read_json(found / "training_state.json", "training state")["step"])
        if step > cfg.steps:
            raise InputError(
                f"--steps {cfg.steps}: the run in {self.out} is already at step {step}; give a larger --steps to "
                f"train further"
            )
        saved_file = self.out / "train_config.json"
        if saved_file.is_file():
            saved = read_json(saved_file, "training settings")
            if not isinstance(saved, dict):
                raise InputError(f"{saved_file} is not a JSON object: it is not a vqim training record")
            if "grad_accum" in cfg.override:
                raise InputError(
                    "--override grad_accum: where the saved run is in its data stream depends on it; resume with "
                    "the saved --grad-accum"
                )
            given = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
            fixed = tuple(k for k in self.fixed_settings if k in given)
            records = rundir.check_resume(saved, given, cfg.override, fixed, self.out)
            self.overrides = [*saved.get("overrides", []), *({**r, "step": step} for r in records)]
        else:
            log.warning("%s is missing: the settings of the resumed run cannot be checked", saved_file)
        return found

    def _make_ema(self, saved: dict[str, torch.Tensor]) -> EMA:
        """The weight average of the prepared model: resumed from the checkpoint's, or started from the weights."""
        ema = EMA(self.raw, self.cfg.ema_decay)
        if saved:
            ema.load(saved)
        elif self.resume_from is not None:
            log.warning(
                "the resumed checkpoint has no weight average: --ema-decay starts one from the current weights"
            )
        return ema

    def _write_config(self) -> None:
        """train_config.json (the settings, the model, the --override history) and the subclass's records."""
        record = {**dataclasses.asdict(self.cfg), **self.config_record(), "overrides": self.overrides}
        write_json(self.out / "train_config.json", record)
        self.write_records()

    def _before_commit(self) -> None:
        """An --overwrite run's first complete checkpoint is about to be renamed into place: from here on the
        folder is this run's, so its records are written first (a resume then checks against them)."""
        if self.replacement is not None:
            self._write_config()

    def _after_commit(self) -> None:
        """After a checkpoint is in place: an --overwrite run replaces the old run at its first checkpoint."""
        if self.replacement is not None:
            self.replacement.apply()
            self.replacement = None

    def fit(self) -> dict[str, Any]:
        """Train; returns the run summary (also written to OUT/<summary_file>)."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        self.resume_from = self._resume_point()
        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        model = self.setup()
        self.raw = model
        self.sharded = self._use_fsdp()
        if cfg.checkpoint_activations:
            self._checkpoint_activations(model)
        if self.sharded:  # before the optimizer is built: it holds this process's shards only
            model = sharding.shard_model(model.to(self.device), self._reshard_after_forward())
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay, self.no_decay), lr=cfg.lr, betas=cfg.betas, fused=True
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_lambda)
        meta: dict[str, Any] = {}
        if self.resume_from is not None:
            tensors, meta = restore_checkpoint(
                self.resume_from, self.rank, self.optimizer, self.scheduler, model if self.sharded else None
            )
            self.step = int(meta["step"])
            self.run_id = str(meta.get("run_id", ""))
            self.skipped = set(meta.get("skipped", []))
            self.counters.update({k: int(v) for k, v in meta.get("counters", {}).items()})
            self.load_extra_state(tensors, meta)
            ema_tensors = {k: v for k, v in tensors.items() if k.startswith("ema.")}
        else:
            ema_tensors = {}
            torch.manual_seed(cfg.seed + 1000 * self.rank)  # per-process randomness (dropout, noise)

        if self.sharded:
            # Sharded by vqim itself, on any device: Accelerate launches the processes and places the data, and
            # is not given the model or optimizer (it would wrap them again).
            self.model = self.raw = model
        else:
            self.model, self.optimizer = acc.prepare(model, self.optimizer)
            self.raw = acc.unwrap_model(self.model)
        if cfg.ema_decay > 0:  # after prepare: the average lives where the weights now are
            self.ema = self._make_ema(ema_tensors)
        self.prepare_extra()
        if cfg.compile:
            # Compile the (possibly DDP-wrapped) module; weights and checkpoints go through self.raw.
            self.model = torch.compile(self.model, mode=cfg.compile)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.replacement is None:  # an --overwrite run writes its records at its first checkpoint
                self._write_config()
        self.writer = tensorboard(self.out, self.main)
        self.before_loop()

        accum = cfg.grad_accum
        data = self.batches(self.step * accum)  # the stream counts micro-batches
        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not (self.main and cfg.progress), desc=self.desc,
            dynamic_ncols=True,
        )  # fmt: skip
        t0 = t_last = time.perf_counter()
        items_since = 0
        zero = torch.zeros((), device=self.device)
        bad_total, bad_run = zero.clone(), zero.clone()  # non-finite steps, on the device
        self.last: dict[str, float] = {}
        stop_reason: str | None = None
        start_step = self.step
        while self.step < cfg.steps:
            items, loss_sum = 0, None
            for micro in range(accum):
                batch = next(data)
                self.skipped.update(batch.get("skipped", ()))
                # Gradients are all-reduced on the last micro-batch only.
                last = micro == accum - 1
                if self.sharded:
                    if accum > 1:
                        self.model.set_requires_gradient_sync(last)
                    sync = acc.autocast()  # the model is not prepared by Accelerate, so autocast here
                else:
                    sync = contextlib.nullcontext() if last else acc.no_sync(self.model)
                with sync:
                    out = self.compute_loss(self.model, batch)
                    acc.backward(out.loss / accum if accum > 1 else out.loss)
                items += out.items
                loss_sum = out.loss.detach() if loss_sum is None else loss_sum + out.loss.detach()
            if accum > 1:  # what is logged: the mean loss of the step's micro-batches
                out.loss, out.items = loss_sum / accum, items
            norm, scale = self._clip()
            found_inf = nonfinite_flag(norm)
            optimizer_step(self.optimizer, found_inf, scale)
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.after_update(out, batch, found_inf)
            if self.ema is not None:
                self.ema.update()
            bad_total += found_inf
            bad_run = (bad_run + 1) * found_inf
            self.step += 1
            items_since += out.items * self.world
            bar.update(1)

            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                self.last = {k: float(v) for k, v in out.terms.items()}
                self.last["loss"] = float(out.loss.detach())
                self.last.update(self.log_terms(out, batch))
                self.last["lr"] = self.scheduler.get_last_lr()[0]
                self.last[self.rate_name] = items_since / (now - t_last)
                self.last["nonfinite_steps"] = float(self.counters["nonfinite_steps"] + bad_total)
                t_last, items_since = now, 0
                if self.writer is not None:
                    for k, v in self.last.items():
                        self.writer.add_scalar(f"train/{k}", v, self.step)
                self._show(bar)
                if float(bad_run) >= cfg.max_nonfinite:
                    stop_reason = "nonfinite"
            self.periodic(self.step)
            out_of_time = False
            if cfg.max_minutes is not None and self.step % cfg.log_every == 0:
                # Every process must stop at the same step: the main process's clock decides.
                late = float(time.perf_counter() - t0 > 60 * cfg.max_minutes) if self.main else 0.0
                out_of_time = float(acc.reduce(torch.tensor(late, device=self.device), "sum")) > 0
            if stop_reason is not None:
                break
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or out_of_time:
                self.counters["nonfinite_steps"] += int(bad_total)
                bad_total.zero_()
                self.checkpoint()
            if out_of_time:
                log.info("time budget of %.1f min reached at step %d", cfg.max_minutes, self.step)
                break
        bar.close()
        self.counters["nonfinite_steps"] += int(bad_total)
        return self._finish(t0, start_step, stop_reason)

    def _clip(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(gradient norm, clipping divisor for the optimizer step) of the model's gradients."""
        if self.sharded:  # the norm of the whole gradient, from every process's shards
            norm = sharding.total_grad_norm(self.raw.parameters())
        else:  # DDP: gradients are already all-reduced, equal everywhere
            norm = grad_norm(self.model.parameters())
        return norm, clip_scale(norm, self.cfg.grad_clip)

    def _use_fsdp(self) -> bool:
        """Whether to shard the model: --fsdp, or an Accelerate launch configured for FSDP."""
        if not self._fsdp_requested():
            return False
        if self.world == 1:
            log.info("--fsdp on one process: nothing to shard; training unsharded")
            return False
        return True

    def _fsdp_requested(self) -> bool:
        from accelerate.utils import DistributedType

        return self.cfg.fsdp or self.acc.distributed_type == DistributedType.FSDP

    def _reshard_after_forward(self) -> bool:
        plugin = getattr(self.acc.state, "fsdp_plugin", None)
        value = getattr(plugin, "reshard_after_forward", True)
        if isinstance(value, bool):
            return value
        # An FSDP1-style config names a sharding strategy: SHARD_GRAD_OP keeps whole weights from forward to
        # backward (reshard_after_forward=False); FSDP2 always shards, so NO_SHARD / HYBRID_* become full sharding.
        name = getattr(value, "name", str(value)).upper()
        if "SHARD_GRAD_OP" in name:
            return False
        if "FULL_SHARD" not in name:
            log.warning("fsdp sharding strategy %s: vqim's FSDP2 sharding shards fully instead", name)
        return True

    def _checkpoint_activations(self, model: nn.Module) -> None:
        from vqim.nn.transformer import Transformer

        stacks = [m for m in model.modules() if isinstance(m, Transformer)]
        for m in stacks:
            m.checkpoint_activations = True
        if not stacks:
            log.warning("--checkpoint-activations: the model has no Transformer blocks; nothing to recompute")

    def _show(self, bar) -> None:
        keys = [k for k in ("loss", "psnr", "usage", "bits_per_token") if k in self.last]
        post = {k: f"{self.last[k]:.4g}" for k in keys}
        post[self.rate_name] = f"{self.last[self.rate_name]:.1f}"
        bar.set_postfix(post)
        if not self.cfg.progress and self.main:
            log.info(
                "step %d/%d %s", self.step, self.cfg.steps, " ".join(f"{k} {v}" for k, v in post.items())
            )

    def checkpoint(self) -> None:
        """Write a complete checkpoint of the run at the current step (all processes take part)."""
        tensors, meta = self.extra_state()
        if self.ema is not None:
            tensors = {**tensors, **self.ema.tensors()}
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        if self.sharded:  # gathered onto the main process, numbered like an unsharded run's
            optimizer = sharding.full_optimizer_state(self.raw, optimizer)
        meta = {
            **meta,
            "skipped": sorted(self.skipped),
            "counters": dict(self.counters),
            "run_id": self.run_id,
        }
        save_checkpoint(
            self.acc, self.ckpt_root, self.step, self.raw, optimizer, self.scheduler, tensors, meta,
            self.cfg.keep_checkpoints, after_commit=self._after_commit, before_commit=self._before_commit,
            model_state=self.model_state(),
        )  # fmt: skip

    def _finish(self, t0: float, start_step: int, stop_reason: str | None) -> dict[str, Any]:
        all_skipped = gather_names(self.acc, self.skipped)
        if self.sharded:
            sharding.reshard(self.raw)  # count shards, not weights a forward without backward left gathered
        summary: dict[str, Any] = {
            "steps": self.step,
            "steps_this_run": self.step - start_step,
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            "seconds": time.perf_counter() - t0,
            "skipped_files": len(all_skipped),
            "skipped": all_skipped,
            **self.counters,
            "last": self.last,
            "processes": self.world,
            "sharded": self.sharded,
            # Weights this process holds (the main process's shard under FSDP; the whole model otherwise).
            "weight_bytes_per_process": sum(
                (p.to_local() if hasattr(p, "to_local") else p).nbytes for p in self.raw.parameters()
            ),
            "completed": stop_reason is None and self.step >= self.cfg.steps,
            **self.summary_extra(),
        }
        message = None
        if stop_reason == "nonfinite":
            good = st.latest_checkpoint(self.ckpt_root)
            summary["stopped"] = "non-finite gradients"
            summary["last_good_checkpoint"] = str(good) if good else None
            message = (
                f"{self.cfg.max_nonfinite} or more consecutive steps had non-finite gradients (up to step "
                f"{self.step}); training stopped. Last good checkpoint: {good or 'none'}; resume from it "
                f"with a lower --lr (or --grad-clip)."
            )
        if stop_reason is None:
            self.save_final()
        if self.main:
            if self.replacement is None:
                write_json(self.out / self.summary_file, summary)
            else:  # stopped before its first checkpoint: the run it was to replace stays as it was
                log.warning("this run made no checkpoint: %s still holds the previous run", self.out)
            if self.writer is not None:
                self.writer.close()
            if all_skipped:
                log.warning(
                    "%d unreadable files were skipped: %s", len(all_skipped), ", ".join(all_skipped[:10])
                )
        if self.on_end is not None and stop_reason is None:
            self.on_end(self.raw, self.acc)
        self.acc.wait_for_everyone()
        self.acc.end_training()
        if message is not None:
            raise TrainingStopped(message)
        return summary
