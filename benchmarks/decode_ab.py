"""One cached decode step of the prior, timed against a reference decoder in the same process, alternating.

Separate processes on a shared 2-core machine move by ±10%, more than the differences worth measuring
between two versions of the decode path. This script runs both in one process on the same weights and the
same input, alternating in rounds of `--steps` decode steps, and reports the ratio of each round's time to
the reference round before it (median and quartiles over rounds). A second reference round in each cycle
is the control: its ratio to the first shows how far the alternation itself is from 1.

The reference is a previous version's `vqim/sampling.py` with its hand-written `Decoder` (a checkout of
the commit before the decode path was unified):

    mkdir -p /tmp/ref && git archive 6e906bd^ src | tar -x -C /tmp/ref
    python benchmarks/decode_ab.py --reference /tmp/ref/src/vqim/sampling.py

The machine's memory read bandwidth is measured in the same run: a decode step at batch 1 reads every
weight once, so bytes per step ÷ bandwidth bounds it, and the share of that bound reached is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import Limits  # noqa: E402
from vqim import Prior  # noqa: E402


def load_reference(path: str):
    spec = importlib.util.spec_from_file_location("reference_sampling", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--reference {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "Decoder"):
        raise SystemExit(f"--reference {path}: it has no Decoder class (give the sampling.py of 6e906bd^)")
    return module


def quartiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4)
    return {"median": round(statistics.median(values), 3), "q1": round(q[0], 3), "q3": round(q[2], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="sampling.py of the reference version")
    ap.add_argument("--preset", default="vim-small")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    ref = load_reference(args.reference)
    torch.manual_seed(0)
    grid = (args.grid, args.grid)
    prior = Prior.from_preset(
        args.preset, vocab_size=args.vocab, grid_size=grid, num_classes=args.classes
    ).eval()
    n = args.grid * args.grid + 1
    x = torch.randn(args.batch, prior.config.dim)

    def reference_round() -> float:
        dec = ref.Decoder(prior, args.batch, n)
        t = time.perf_counter()
        for _ in range(args.steps):
            dec.step(x)
        return time.perf_counter() - t

    def current_round() -> float:
        caches = prior.transformer.new_caches(args.batch, n)
        x3 = x[:, None]
        t = time.perf_counter()
        for _ in range(args.steps):
            prior.extend(x3, caches)
        return time.perf_counter() - t

    with torch.inference_mode():
        dec = ref.Decoder(prior, args.batch, n)
        caches = prior.transformer.new_caches(args.batch, n)
        torch.testing.assert_close(prior.extend(x[:, None], caches), dec.step(x), rtol=1e-4, atol=1e-4)
        ratios, control, t_ref, t_cur = [], [], [], []
        with Limits("cpu") as limits:
            for i in range(args.rounds + 1):
                r = reference_round()
                c = current_round()
                r2 = reference_round()
                if i:  # the first cycle warms up
                    ratios.append(c / r)
                    control.append(r2 / r)
                    t_ref.append(r / args.steps)
                    t_cur.append(c / args.steps)
    weight_bytes = sum(p.numel() * p.element_size() for p in prior.transformer.parameters())
    weight_bytes += prior.head.weight.numel() * prior.head.weight.element_size()
    bandwidth = limits["memory_read_gb_per_s"] * 1e9
    bound_s = weight_bytes / bandwidth
    out = {
        "config": vars(args),
        "params": sum(p.numel() for p in prior.parameters()),
        "ms_per_step": {
            "reference": round(statistics.median(t_ref) * 1e3, 3),
            "current": round(statistics.median(t_cur) * 1e3, 3),
        },
        "current_over_reference_time": quartiles(ratios),
        "control_reference_over_reference_time": quartiles(control),
        "weights_read_per_step_mb": round(weight_bytes / 1e6, 1),
        "memory_bound_ms_per_step": round(bound_s * 1e3, 3),
        "share_of_memory_bound": {
            "reference": round(bound_s / statistics.median(t_ref), 3),
            "current": round(bound_s / statistics.median(t_cur), 3),
        },
        "machine": limits.report(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
