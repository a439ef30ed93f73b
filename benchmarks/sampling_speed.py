"""Prior sampling speed: tokens/s with the KV cache and with full-prefix recomputation, and the share of the
machine's roofline the cached path reaches, printed as JSON.

Configuration: 8 blocks, dim 512, 8 heads, MLP 2048, vocabulary 8192, class-conditional (class token as
prefix), 16×16 grid = 256 new tokens, top-k 100, temperature 1, fp32, 2 threads, batch 1 and 8, random
weights. (docs/reference-figures.md lists public samplers' figures at this configuration, measured
elsewhere; they are references, and nothing here divides by them.)

The slow path (`generate_recompute`) is measured directly over its first `--recompute-tokens` tokens. When that
is fewer than `--tokens`, its rate over all `--tokens` is an ESTIMATE, labelled as such: one recompute step at
prefix length L costs t(L), timed at a few L from 1 to --tokens and interpolated linearly, and the estimate is
Σ_L t(L) (a step's cost grows with L, so extrapolating the first tokens' rate would flatter the slow path).
The same interpolation over the first --recompute-tokens tokens is reported beside the direct measurement
as a check of the estimate. cached ÷ recompute compares two paths timed in this run.

The machine's limits are measured in the same run (benchmarks/machine.py): memory read bandwidth (sum of a
256 MiB tensor) and sgemm 2048², before and after the workload. The bound on cached decoding is (bytes read
per decode step: all weights except the embedding tables, plus the KV cache at its mean length) ÷ bandwidth,
and the matmul FLOPs per step ÷ sgemm speed; the roofline is the lower of the two, and the share of it is
the measured rate ÷ the roofline.

Sliding window: the same prior sampling a canvas --canvas-scale times the training grid on each side (2: 32×32
tokens), batch 1, every token from the 16×16 window around it; keys and values are reused while the window stays
put and recomputed (one prefill of the window so far) when it moves. Reported: tokens/s over the whole canvas,
the share of tokens that needed a prefill, and the ratio to plain cached sampling of the training grid in this
run.

The cached/recompute ratio has a ceiling set by the machine, not the code: a cached step at batch 1 reads the
weights (4·N bytes), a recompute step at prefix L does 2·N·L FLOPs, so even a recompute running at full sgemm
speed gives a ratio of about (T + 1)·bandwidth / (4·sgemm) for T tokens (higher where the recompute runs below
sgemm speed). The recompute path is not slowed to widen it.
Usage:
    python benchmarks/sampling_speed.py [--tokens 256] [--recompute-tokens 64] [--repeats 3] [--threads 2]
                                        [--canvas-scale 2]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from machine import Limits, stats, timed
from vqim import Prior
from vqim.sampling import generate, generate_recompute, sample_logits


@torch.no_grad()
def recompute_step_seconds(
    prior: Prior, batch: int, length: int, top_k: int, reps: int, device: str
) -> float:
    """Time one step of `generate_recompute` at prefix length `length` (condition + length-1 tokens):
    the same operations, on random tokens."""
    v = prior.config.vocab_size
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    prefix = torch.randint(0, v, (batch, length - 1), device=device)
    pos, emb = prior.position_table(), prior.tok_embed.weight
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        cond = prior.embed_start(labels, batch)
        seq = torch.cat([cond, F.embedding(prefix, emb) + pos[: length - 1]], dim=1)
        sample_logits(prior.head(prior.transformer(seq)[:, -1]), 1.0, top_k, None, gen)

    step()
    return statistics.median(timed(step, reps, device))


def estimate_recompute_seconds(
    prior: Prior, batch: int, tokens: int, top_k: int, reps: int, device: str, points: int = 5
) -> tuple[float, dict[int, float]]:
    """Σ_{L=1..tokens} t(L), t linearly interpolated between timed prefix lengths."""
    lengths = sorted({round(1 + (tokens - 1) * i / (points - 1)) for i in range(points)})
    t = {L: recompute_step_seconds(prior, batch, L, top_k, reps, device) for L in lengths}

    def interp(L: int) -> float:
        for a, b in zip(lengths, lengths[1:]):
            if a <= L <= b:
                return t[a] + (t[b] - t[a]) * (L - a) / (b - a)
        return t[lengths[0]]

    return sum(interp(L) for L in range(1, tokens + 1)), t


def time_batch(
    prior: Prior, b: int, tokens: int, rec_tokens: int, top_k: int, repeats: int, warmup: int, dev: str
) -> dict:
    """Cached and recompute rates at batch b, and their ratio (both timed here)."""
    num_classes = max(prior.config.num_classes, 1)
    labels = torch.arange(b, device=dev) % num_classes
    kw = {"labels": labels, "temperature": 1.0, "top_k": top_k}

    def cached(b=b, kw=kw) -> None:
        generate(prior, b, seed=0, num_tokens=tokens, **kw)

    def recompute(b=b, kw=kw) -> None:
        generate_recompute(prior, b, seed=0, num_tokens=rec_tokens, **kw)

    for _ in range(warmup):
        cached()
    c_rates = [b * tokens / t for t in timed(cached, repeats, dev)]
    recompute()
    r_rates = [b * rec_tokens / t for t in timed(recompute, max(1, repeats), dev)]
    row: dict = {
        "cached_tokens_per_s": stats(c_rates),
        f"recompute_tokens_per_s_measured_first_{rec_tokens}_tokens": stats(r_rates),
    }
    if rec_tokens < tokens:
        total_s, per_len = estimate_recompute_seconds(prior, b, tokens, top_k, repeats, dev)
        check_s, _ = estimate_recompute_seconds(prior, b, rec_tokens, top_k, repeats, dev)
        r_full = b * tokens / total_s
        row[f"recompute_tokens_per_s_ESTIMATED_{tokens}_tokens"] = round(r_full, 2)
        row["recompute_estimate_method"] = (
            "sum over prefix lengths L=1..tokens of one timed recompute step t(L), linear interpolation "
            "between timed lengths"
        )
        row["recompute_step_seconds_by_prefix_length"] = {str(k): round(v, 5) for k, v in per_len.items()}
        row[f"recompute_estimate_check_first_{rec_tokens}_tokens"] = {
            "estimated_tokens_per_s": round(b * rec_tokens / check_s, 2),
            "measured_tokens_per_s": round(statistics.median(r_rates), 2),
        }
    else:
        r_full = statistics.median(r_rates)
    c_med = statistics.median(c_rates)
    row["cached_over_recompute"] = round(c_med / r_full, 2)  # both timed in this run
    return row


def time_sliding(prior: Prior, scale: int, top_k: int, dev: str) -> dict:
    """Batch-1 sliding-window sampling of a canvas `scale` times the training grid per side, timed once."""
    from vqim.sampling import window_origin

    h, w = prior.config.grid_size
    canvas = (h * scale, w * scale)
    moves = sum(
        window_origin(p // canvas[1], p % canvas[1], canvas, (h, w))
        != window_origin((p - 1) // canvas[1], (p - 1) % canvas[1], canvas, (h, w))
        for p in range(1, canvas[0] * canvas[1])
    )
    labels = torch.zeros(1, dtype=torch.long, device=dev)
    seconds = timed(lambda: generate(prior, 1, labels, top_k=top_k, seed=0, grid=canvas), 1, dev)[0]
    return {
        "canvas": list(canvas),
        "tokens": canvas[0] * canvas[1],
        "tokens_per_s": round(canvas[0] * canvas[1] / seconds, 2),
        "seconds": round(seconds, 2),
        "share_of_tokens_with_a_window_prefill": round((moves + 1) / (canvas[0] * canvas[1]), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per sample (≤ 256, the 16×16 grid)")
    ap.add_argument("--recompute-tokens", type=int, default=64, help="tokens measured on the slow path")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--canvas-scale", type=int, default=2, help="sliding-window canvas per side (0: skip)")
    args = ap.parse_args()
    if not 1 <= args.tokens <= 256:
        ap.error("--tokens must be in [1, 256]")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = args.device
    batches = [int(b) for b in args.batches.split(",")]
    rec_tokens = min(args.recompute_tokens, args.tokens)

    prior = Prior.from_preset(
        "vim-small", vocab_size=8192, grid_size=(16, 16), num_classes=args.num_classes
    ).to(dev)
    prior.eval()
    counts = prior.num_params()
    d, depth = prior.config.dim, prior.config.depth
    weight_bytes = 4 * (counts["transformer"] + counts["head"])  # read every step; embeddings: one row each
    matmul_params = counts["transformer"] + counts["head"]
    with Limits(dev) as limits:  # measured before and after the timed workload
        results = {
            str(b): time_batch(prior, b, args.tokens, rec_tokens, args.top_k, args.repeats, args.warmup, dev)
            for b in batches
        }
        sliding = time_sliding(prior, args.canvas_scale, args.top_k, dev) if args.canvas_scale > 1 else None
    bw, gflops = limits["memory_read_gb_per_s"], limits["sgemm_gflops"]

    for b in batches:
        row = results[str(b)]
        c_med = row["cached_tokens_per_s"]["median"]
        # Bounds for cached decoding at this batch: bytes and FLOPs per decode step.
        kv_bytes = 4 * 2 * depth * b * d * (args.tokens / 2)  # keys + values at the mean cached length
        step_flops = 2 * matmul_params * b + 4 * depth * b * d * (args.tokens / 2)
        mem_bound = bw * 1e9 / weight_bytes * b
        mem_kv_bound = bw * 1e9 / (weight_bytes + kv_bytes) * b
        flop_bound = gflops * 1e9 / step_flops * b
        roofline = min(mem_kv_bound, flop_bound)
        steps_per_s = c_med / b
        row["per_decode_step"] = {
            "bytes_read": round(weight_bytes + kv_bytes),
            "matmul_flops": round(step_flops),
            "achieved_read_gb_per_s": round(steps_per_s * (weight_bytes + kv_bytes) / 1e9, 2),
            "achieved_gflops": round(steps_per_s * step_flops / 1e9, 2),
        }
        row["bound_tokens_per_s"] = {
            "weights_only_memory": round(mem_bound, 1),
            "weights_and_kv_cache_memory": round(mem_kv_bound, 1),
            "matmul_flops": round(flop_bound, 1),
            "roofline": round(roofline, 1),
        }
        # Above 1 where part of the weights stays in a large last-level cache between steps, or where the
        # 2-thread tensor sum reads memory more slowly than the matrix products do.
        row["cached_share_of_roofline"] = round(c_med / roofline, 3)
        row["cached_share_of_memory_bandwidth"] = round(c_med / mem_kv_bound, 3)
        row["cached_share_of_sgemm"] = round(c_med / flop_bound, 3)

    if sliding is not None and "1" in results:
        plain = results["1"]["cached_tokens_per_s"]["median"]
        sliding["tokens_per_s_over_plain_cached"] = round(sliding["tokens_per_s"] / plain, 3)
    out = {
        "config": {
            "preset": "vim-small",
            **{k: v for k, v in prior.config.to_dict().items() if k not in ("dropout", "class_dropout")},
            "tokens": args.tokens,
            "recompute_tokens": rec_tokens,
            "top_k": args.top_k,
            "temperature": 1.0,
            "dtype": "float32",
        },
        "params": counts,
        "device": dev,
        "threads": args.threads,
        "torch": torch.__version__,
        "weight_bytes_per_decode_step": weight_bytes,
        "batches": results,
        "sliding_window_batch_1": sliding,
        "machine": limits.report(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
