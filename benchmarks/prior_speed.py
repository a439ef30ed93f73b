"""Prior training speed: tokens/s of a training step and model FLOP utilisation, printed as JSON.

A training step is forward + cross-entropy + backward + AdamW update on random tokens (class-conditional with
label dropout, dropout as in the preset). FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B):

    6·N + 12·depth·dim·T

with N the parameters used in matrix products (the Transformer blocks and the head; the embedding tables are
lookups and are left out) and T the sequence length; the attention term counts the full T×T score matrix,
as PaLM does, although causal attention needs only half. The FLOPs of one step are also counted with
torch.utils.flop_counter over an untimed step (matrix products and attention, forward + backward), as a check
of the formula. MFU = achieved FLOP/s ÷ the machine's matmul speed measured in the same run
(benchmarks/machine.py: sgemm 2048² in fp32, or bf16 with --bf16, before and after the workload, the larger
of the two), beside the share of sgemm at the model's largest product, its MLP over the batch.

Rows, each timed in the same run (tokens/s, MFU and peak memory of the step):
- `plain`: one batch of --batch sequences per optimizer step;
- `grad_accum_2`: the same global batch as two micro-batches of --batch/2 (gradients summed, as `--grad-accum 2`);
- `checkpoint_activations`: every Transformer block recomputed in the backward pass (`--checkpoint-activations`);
- `compile` (with --compile): the step's forward/backward through torch.compile (compile time excluded);
- `torch_dropout`: the plain step with PyTorch's own dropout masks (`vqim.nn.dropout.torch_dropout`), against
  vqim's cheaper CPU masks in every other row; the two are timed in alternating rounds (`dropout_ab`).
On the CPU (fp32) `linear_ab` times the plain step with the linear layers on oneDNN's product (vqim's default on
x86-64, `vqim.nn.linear`) against the same step on plain `F.linear` (MKL), in alternating rounds; the MFU is
against the faster library's sgemm (machine.py), and `mfu_against_each_library` gives it against each.
As `vqim train-prior` does on the CPU, freed memory is kept for reuse (`vqim.nn.memory`).
Peak memory of a row's first step above what the model, optimizer and batch hold before it: on CUDA
`torch.cuda.max_memory_allocated`, on the CPU VmHWM − VmRSS of a fresh process per row. Also printed, computed (not measured): the memory
per device of vim-base and vim-large at the paper's setting under DDP and under FSDP (full shard) on 8 devices.
Usage:
    python benchmarks/prior_speed.py [--preset vim-small] [--batch 8] [--grid 16] [--repeats 5] [--threads 2]
        [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from machine import Limits, count_flops, stats, timed
from vqim import Prior, get_prior_config, prior_presets
from vqim.nn.dropout import torch_dropout
from vqim.nn.linear import plain_products
from vqim.nn.memory import retain_freed_memory


def _status(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build(args: argparse.Namespace):
    """The prior and `make_step(row)`: one optimizer step of a row's configuration."""
    torch.set_num_threads(args.threads)
    if args.device.split(":")[0] == "cpu":
        retain_freed_memory()
    torch.manual_seed(0)
    dev = args.device
    prior = Prior.from_preset(
        args.preset, vocab_size=args.vocab, grid_size=(args.grid, args.grid), num_classes=args.num_classes
    ).to(dev)
    prior.train()
    cfg = prior.config
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=0.01)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_len), device=dev)
    labels = torch.randint(0, max(cfg.num_classes, 1), (args.batch,), device=dev) if cfg.conditional else None
    amp = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16)

    def make_step(row: str):
        if row in ("torch_dropout", "plain_linear"):
            plain, within = make_step("plain"), torch_dropout if row == "torch_dropout" else plain_products

            def in_context() -> float:
                with within():
                    return plain()

            return in_context
        micro = 2 if row == "grad_accum_2" else 1
        prior.transformer.checkpoint_activations = row == "checkpoint_activations"
        loss_fn = torch.compile(prior.loss) if row == "compile" else prior.loss
        chunks = list(zip(tokens.chunk(micro), labels.chunk(micro) if labels is not None else [None] * micro))

        def step() -> float:
            total = 0.0
            for t, lab in chunks:
                with amp:
                    loss = loss_fn(t, lab) / micro
                loss.backward()
                total += float(loss.detach())
            opt.step()
            opt.zero_grad(set_to_none=True)
            return total

        return step

    return prior, make_step


def peak_memory_mib(args: argparse.Namespace, row: str) -> float:
    """Peak memory of the first optimizer step of a row, above what the model, optimizer and batch hold before it.

    On CUDA: the allocator's peak. On the CPU: VmHWM − VmRSS of a fresh process (spawned per row, so that no
    earlier row's freed-but-kept memory hides this one's); it counts Adam's moments (made at the first step),
    the gradients and the activations.
    """
    if args.device.startswith("cuda"):
        _, make_step = build(args)
        step = make_step(row)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_memory_child, args=(vars(args), row, q))
    p.start()
    mib = q.get()
    p.join()
    return mib


def _memory_child(args: dict, row: str, q) -> None:
    _, make_step = build(argparse.Namespace(**args))
    step = make_step(row)
    base = _status("VmRSS")
    step()
    q.put(_status("VmHWM") - base)


def projected_memory(preset: str, devices: int = 8, batch_per_device: int = 8) -> dict:
    """Memory per device (GiB), computed: fp32 weights + gradients + Adam moments (16 bytes per parameter),
    divided over the devices under FSDP full sharding; activations of bf16 training per Korthikanti et al. 2022
    (sbh·(34 + 5·a·s/h) bytes per block), or with activation checkpointing the blocks' inputs (2·sbh per block)
    plus one block's full activations."""
    cfg = get_prior_config(preset, vocab_size=8192, grid_size=(32, 32), num_classes=1000)
    with torch.device("meta"):
        params = sum(p.numel() for p in Prior(cfg).parameters())
    s, b, h, a, L = cfg.seq_len, batch_per_device, cfg.dim, cfg.heads, cfg.depth
    per_block = s * b * h * (34 + 5 * a * s / h)
    acts = L * per_block
    acts_ckpt = L * 2 * s * b * h + per_block
    logits = b * s * cfg.vocab_size * (2 + 4)  # bf16 logits + fp32 for the loss
    gib = 2**30
    states = 16 * params
    return {
        "params": params,
        "batch_per_device": b,
        "devices": devices,
        "ddp_gib": round((states + acts + logits) / gib, 1),
        "ddp_checkpointed_gib": round((states + acts_ckpt + logits) / gib, 1),
        "fsdp_gib": round((states / devices + acts + logits) / gib, 1),
        "fsdp_checkpointed_gib": round((states / devices + acts_ckpt + logits) / gib, 1),
        "computed": "16 bytes/parameter (fp32 weights, grads, Adam m and v) + bf16 activations, not measured",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="vim-small", choices=prior_presets())
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grid", type=int, default=16, help="token grid side (sequence length grid²)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile row")
    args = ap.parse_args()
    dev = args.device
    prior, make_step = build(args)
    cfg = prior.config
    seq = cfg.seq_len
    step = make_step("plain")

    counts = prior.num_params()
    n_matmul = counts["transformer"] + counts["head"]
    flops_per_token = 6 * n_matmul + 12 * cfg.depth * cfg.dim * seq
    counted = count_flops(step)  # one untimed step
    counted_per_token = counted["total"] / (args.batch * seq)
    shape = (args.batch * seq, cfg.dim, cfg.mlp_dim)  # the MLP's first product over the batch
    rows: dict[str, dict] = {}

    def measure(name: str) -> list[float]:
        fn = make_step(name)
        for _ in range(args.warmup):
            fn()
        r = [args.batch * seq / t for t in timed(fn, args.repeats, dev)]
        rows[name] = {"train_tokens_per_s": stats(r, 1)}
        return r

    def alternate(rounds: int, a: tuple[str, str], b: tuple[str, str]) -> dict:
        """Tokens/s of two rows' steps, a = (name, row) and b, alternating one step each (the order alternating
        too), and the per-round ratio a / b."""
        fns = {a[0]: make_step(a[1]), b[0]: make_step(b[1])}
        for fn in fns.values():
            fn()
        r: dict[str, list[float]] = {k: [] for k in fns}
        for i in range(rounds):
            for k in list(fns)[:: 1 if i % 2 == 0 else -1]:
                r[k].append(args.batch * seq / timed(fns[k], 1, dev)[0])
        ratios = [x / y for x, y in zip(r[a[0]], r[b[0]])]
        return {
            **{f"{k}_tokens_per_s": stats(v, 1) for k, v in r.items()},
            f"ratio_{a[0]}_over_{b[0]}": stats(ratios, 3),
            "rounds": rounds,
        }

    names = ["plain", "grad_accum_2", "checkpoint_activations", "torch_dropout"] + (
        ["compile"] if args.compile else []
    )
    with Limits(dev, torch.bfloat16 if args.bf16 else torch.float32, shape) as limits:
        rates = measure("plain")
        for name in names[1:]:
            measure(name)
        ab = (
            alternate(args.repeats, ("vqim_masks", "plain"), ("torch_masks", "torch_dropout"))
            if cfg.dropout > 0
            else None
        )
        # Linear layers on oneDNN's product (vqim.nn.linear, x86-64 CPUs) against plain F.linear (MKL)
        linear_ab = (
            alternate(args.repeats, ("onednn", "plain"), ("f_linear", "plain_linear"))
            if dev == "cpu" and not args.bf16
            else None
        )
    for name in names:  # after the timing: memory runs in child processes on the CPU
        rows[name]["peak_memory_mib"] = round(peak_memory_mib(args, name), 1)
    median = statistics.median(rates)
    achieved = median * flops_per_token / 1e9
    achieved_counted = median * counted_per_token / 1e9
    print(
        json.dumps(
            {
                "config": {**cfg.to_dict(), "preset": args.preset, "batch": args.batch, "bf16": args.bf16},
                "params": counts,
                "device": dev,
                "threads": args.threads,
                "torch": torch.__version__,
                "train_tokens_per_s": stats(rates, 1),
                "flops_per_token": flops_per_token,
                "flops_formula": "PaLM: 6*N + 12*depth*dim*T, N = Transformer + head parameters (no embeddings)",
                "flops_per_token_counted": round(counted_per_token),
                "flops_counted_by_op": counted,
                "achieved_gflops": round(achieved, 2),
                "achieved_gflops_counted": round(achieved_counted, 2),
                "mfu": round(achieved / limits["sgemm_gflops"], 4),
                "mfu_counted": round(achieved_counted / limits["sgemm_gflops"], 4),
                "share_of_workload_shape_sgemm": round(
                    achieved / limits["sgemm_gflops_at_workload_shape"], 4
                ),
                "rows": {
                    k: {
                        **v,
                        "mfu": round(
                            v["train_tokens_per_s"]["median"]
                            * flops_per_token
                            / 1e9
                            / limits["sgemm_gflops"],
                            4,
                        ),
                        "ratio_to_plain": round(v["train_tokens_per_s"]["median"] / median, 3),
                    }
                    for k, v in rows.items()
                },  # fmt: skip
                "mfu_against_each_library": {
                    lib: round(achieved / v, 4) for lib, v in limits.by_library().items()
                },
                "dropout_ab": ab,
                "linear_ab": linear_ab,
                "projected_memory_per_device": {p: projected_memory(p) for p in ("vim-base", "vim-large")},
                "machine": limits.report(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
