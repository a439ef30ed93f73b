"""`make demo`: the two-stage pipeline on built-in data, on a CPU, in about twelve minutes.

1. Train the tiny ViT-VQGAN on the built-in photos; evaluate on held-out photographs.
2. Tokenize the built-in labelled digits with it; train a tiny class-conditional VIM prior; sample every class;
   measure bits per token on held-out digits and the accuracy of a classifier (trained on real digits) on samples.
3. Linear probe on the frozen prior.
4. Conditional synthesis on the photos (Taming Transformers' tasks): condition tokenizers for lowres:4 and
   edges, spatially conditioned priors, super-resolution and edges → photo of held-out photographs, completion
   of held-out photographs from their top half, and a wide sliding-window sample.
A report with every figure and picture goes to runs/demo/index.html. A re-run resumes from checkpoints.
"""

from __future__ import annotations

import html
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqim.checkpoint import atomic_write, write_json
from vqim.data import build_dataset, collate
from vqim.evaluate import evaluate_tokenizer, usage_histogram_png
from vqim.tokenizer import Tokenizer
from vqim.train.tokenizer import TokenizerTrainConfig, save_grid, train_tokenizer

log = logging.getLogger(__name__)

# Stage 1 recipe. The paper's lr (1e-4 over 500k steps) is far too slow for a few CPU minutes, so the demo
# raises it to 1e-3, keeps the paper's warmup share and cosine shape, and decays to 2% of the peak (instead
# of the paper's 50%) so the short run ends on settled weights.
DEMO_STEPS = 2500
DEMO_LR = 1e-3
DEMO_MIN_LR_RATIO = 0.02
DEMO_BATCH = 16
# Codebook-health comparison: the same recipe with and without data init + dead-code restarts, short runs.
HEALTH_STEPS = 600
# Stage 2 recipe: vim-tiny, class-conditional on digits.
PRIOR_STEPS = 1000
PRIOR_BATCH = 64
PRIOR_LR = 1e-3
SAMPLE_CFG_SCALE = 2.0
SAMPLE_TOP_K = 50
# Stage 4 recipe: small condition tokenizers and priors on photo crops, a few CPU minutes in all.
COND_TOK_STEPS = {"sr": 500, "edges": 200}  # the low-resolution colours need the longer run
COND_TOK_BATCH = 8
COND_CODES = 128
COND_PRIOR_STEPS = 600
COND_PRIOR_BATCH = 16
COND_PRIOR_LR = 2e-3
COND_PRIOR_MODEL = {"dim": 64, "depth": 2, "heads": 2, "mlp_dim": 256}
COND_TRAIN_CROPS = 1024
SR_FACTOR = 4


def run_demo(
    out: str | Path = "runs/demo",
    steps: int | None = None,
    prior_steps: int | None = None,
    progress: bool = True,
    conditional_steps: int | None = None,
) -> dict[str, Any]:
    """Run every stage and write the report; returns the metrics (also in out/metrics.json).

    Args:
        out: output folder; the report is OUT/index.html.
        steps: tokenizer training steps (default: the demo's recipe, DEMO_STEPS).
        prior_steps: prior training steps (default: the demo's recipe, PRIOR_STEPS).
        progress: show progress bars.
        conditional_steps: training steps of the conditional-synthesis stage's condition tokenizers and priors
            (default: the demo's recipe, COND_TOK_STEPS and COND_PRIOR_STEPS).
    """
    out = Path(out)
    metrics: dict[str, Any] = {"tokenizer": stage1(out, steps, progress)}
    metrics["prior"] = stage2(out, prior_steps, progress)
    metrics["probe"] = stage3(out)
    metrics["conditional"] = stage4(out, progress, conditional_steps)
    write_json(out / "metrics.json", metrics)
    write_index(out, metrics)
    log.info("demo written to %s (open %s)", out, out / "index.html")
    return metrics


def stage1(out: Path, steps: int | None, progress: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    tok_dir = out / "tokenizer"
    cfg = TokenizerTrainConfig(
        out=str(tok_dir), data="photos", preset="vit-vqgan-tiny", steps=steps or DEMO_STEPS,
        batch_size=DEMO_BATCH, lr=DEMO_LR, min_lr_ratio=DEMO_MIN_LR_RATIO, image_every=500, ckpt_every=500,
        resume=True, progress=progress,
    )  # fmt: skip
    summary = train_tokenizer(cfg)
    train_seconds = time.perf_counter() - t0

    tok = Tokenizer.from_pretrained(tok_dir)
    eval_set = build_dataset("photos", tok.config.image_size, train=False)
    m, counts = evaluate_tokenizer(tok, eval_set, batch_size=32, progress=progress, return_counts=True)
    usage_histogram_png(counts, out / "usage_histogram.png")
    batch = collate([eval_set[i] for i in range(0, len(eval_set), max(1, len(eval_set) // 16))][:16])
    with torch.no_grad():
        rec = tok(batch["image"]).reconstruction
    save_grid(batch["image"], rec, out / "reconstructions.png")
    m["codebook_health"] = codebook_health(out, min(HEALTH_STEPS, steps or DEMO_STEPS), progress)
    m.update(
        {
            "path": str(tok_dir),
            "preset": "vit-vqgan-tiny",
            "train_steps": summary["steps"],
            "train_seconds": round(train_seconds, 1),
            "restarted_codes": summary["restarted_codes"],
            "eval_set": "photos: held-out photographs (chelsea, rocket, camera) tiled into 64×64 crops",
        }
    )
    return m


def codebook_health(out: Path, steps: int, progress: bool) -> dict[str, Any]:
    """Train vit-vqgan-tiny twice for `steps` with the same seed and data: with vqim's codebook-health switches
    (data init, restarts after 20 idle steps) and with the paper's plain recipe (normal init, no restarts)."""
    variants = {
        "with data init + restarts": {},
        "paper-plain (normal init, no restarts)": {"codebook_init": "normal", "dead_code_window": 0},
    }
    eval_set = None
    res = {}
    for i, (name, model) in enumerate(variants.items()):
        d = out / "codebook_health" / f"variant{i}"
        cfg = TokenizerTrainConfig(
            out=str(d), data="photos", preset="vit-vqgan-tiny", model=model, steps=steps, batch_size=DEMO_BATCH,
            lr=DEMO_LR, min_lr_ratio=DEMO_MIN_LR_RATIO, image_every=10**9, ckpt_every=steps, resume=True,
            progress=progress,
        )  # fmt: skip
        summary = train_tokenizer(cfg)
        tok = Tokenizer.from_pretrained(d)
        eval_set = eval_set or build_dataset("photos", tok.config.image_size, train=False)
        m = evaluate_tokenizer(tok, eval_set, batch_size=32)
        res[name] = {
            "psnr": round(m["psnr"], 2),
            "codes_used": m["codes_used"],
            "usage": round(m["usage"], 3),
            "perplexity": round(m["perplexity"], 1),
            "restarted_codes": summary["restarted_codes"],
            "steps": summary["steps"],
        }
    return res


def stage2(out: Path, steps: int | None, progress: bool) -> dict[str, Any]:
    from torchvision.utils import make_grid, save_image

    from vqim.classifier import fit_sample_classifier, sample_accuracy
    from vqim.config import SamplingConfig
    from vqim.prior import Prior, bits_per_token
    from vqim.sampling import generate_images
    from vqim.tokens import encode_dataset
    from vqim.train.prior import PriorTrainConfig, train_prior

    t0 = time.perf_counter()
    tok = Tokenizer.from_pretrained(out / "tokenizer")
    size = tok.config.image_size
    train_digits = build_dataset("digits", size, train=True)
    test_digits = build_dataset("digits", size, train=False)
    encode_dataset(tok, train_digits, out / "digits_tokens", batch_size=128)
    encode_dataset(tok, test_digits, out / "digits_tokens_test", batch_size=128)

    prior_dir = out / "prior"
    cfg = PriorTrainConfig(
        out=str(prior_dir), tokens=str(out / "digits_tokens"), val_tokens=str(out / "digits_tokens_test"),
        preset="vim-tiny", steps=steps or PRIOR_STEPS, batch_size=PRIOR_BATCH, lr=PRIOR_LR, eval_every=500,
        ckpt_every=500, resume=True, progress=progress,
    )  # fmt: skip
    summary = train_prior(cfg)
    prior = Prior.from_pretrained(prior_dir)
    from vqim.tokens import TokenDataset

    test_tokens = TokenDataset(out / "digits_tokens_test")
    bits = bits_per_token(prior, test_tokens)

    # Samples: a row per class.
    per_row = 8
    labels = torch.arange(10).repeat_interleave(per_row)
    kw = {"top_k": SAMPLE_TOP_K, "cfg_scale": SAMPLE_CFG_SCALE, "seed": 0}
    samples = generate_images(tok, prior, len(labels), labels=labels, **kw)
    grid = make_grid(samples, nrow=per_row, padding=2)
    atomic_write(out / "samples.png", lambda tmp: save_image(grid, tmp, format="png"))

    # A classifier trained on real digits scores real test digits, their reconstructions, and the samples.
    clf = fit_sample_classifier(train_digits, test_digits)
    test = collate([test_digits[i] for i in range(len(test_digits))])
    with torch.no_grad():
        recon = tok.decode(tok.encode(test["image"]))
    recon_acc = float((clf.predict(recon) == test["label"].numpy()).mean())
    n_eval = 20
    scored = sample_accuracy(tok, prior, clf, n_eval, SamplingConfig(**{**kw, "seed": 1}))
    return {
        "path": str(prior_dir),
        "preset": "vim-tiny",
        "params": sum(p.numel() for p in prior.parameters()),
        "train_steps": summary["steps"],
        "train_sequences": summary["train_sequences"],
        "test_bits_per_token": bits,
        "uniform_bits_per_token": float(np.log2(prior.config.vocab_size)),
        "sample_accuracy": scored["sample_accuracy"],
        "sample_accuracy_per_class": scored["sample_accuracy_per_class"],
        "classifier_accuracy_real_test": clf.real_test_accuracy,
        "classifier_accuracy_reconstructions": recon_acc,
        "sampling": {**kw, "samples_per_class_scored": n_eval},
        "seconds": round(time.perf_counter() - t0, 1),
        "eval_set": "digits: every 5th of scikit-learn's 1,797 digits, held out from tokens and classifier training",
    }


def stage3(out: Path) -> dict[str, Any]:
    """Linear probe on the frozen prior's blocks (digits: train split → test split), with baselines."""
    from vqim.prior import Prior
    from vqim.probe import run_probe

    t0 = time.perf_counter()
    tok = Tokenizer.from_pretrained(out / "tokenizer")
    prior = Prior.from_pretrained(out / "prior")
    size = tok.config.image_size
    train, test = build_dataset("digits", size, train=True), build_dataset("digits", size, train=False)
    res = run_probe(
        prior, tok, train, test, out / "probe", class_names=train.class_names, baselines=["encoder", "pixels"]
    )
    res.pop("details")
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def stage4(out: Path, progress: bool, steps: int | None = None) -> dict[str, Any]:
    """Conditional synthesis on photos with the stage-1 tokenizer: super-resolution, edges → photo, completion
    and a wide sliding-window sample, with held-out bits per image token with and without each condition and
    the PSNR of super-resolved photographs against bicubic upsampling of the same low-resolution input."""
    import torch.nn.functional as F
    from torch.utils.data import Subset
    from torchvision.utils import make_grid, save_image

    from vqim.conditions import parse_condition
    from vqim.metrics import psnr
    from vqim.prior import Prior, bits_per_token
    from vqim.sampling import generate
    from vqim.tokens import TokenDataset, encode_dataset
    from vqim.train.prior import PriorTrainConfig, train_prior

    t0 = time.perf_counter()
    tok_steps = dict.fromkeys(COND_TOK_STEPS, steps) if steps else COND_TOK_STEPS
    prior_steps = steps or COND_PRIOR_STEPS
    root = out / "conditional"
    tok = Tokenizer.from_pretrained(out / "tokenizer")
    size = tok.config.image_size
    train_crops = Subset(build_dataset("photos", size, train=True), range(COND_TRAIN_CROPS))
    held_out = build_dataset("photos", size, train=False)
    specs = {"sr": f"lowres:{SR_FACTOR}", "edges": "edges"}
    ctoks: dict[str, Tokenizer] = {}
    for name, spec in specs.items():
        cfg = TokenizerTrainConfig(
            out=str(root / f"tokenizer_{name}"), data="photos", preset="vit-vqgan-tiny", condition=spec,
            model={"codebook_size": COND_CODES}, steps=tok_steps[name], batch_size=COND_TOK_BATCH, lr=DEMO_LR,
            min_lr_ratio=DEMO_MIN_LR_RATIO, image_every=10**9, ckpt_every=tok_steps[name], resume=True,
            progress=progress,
        )  # fmt: skip
        train_tokenizer(cfg)
        ctoks[name] = Tokenizer.from_pretrained(root / f"tokenizer_{name}")

    # Token folders: plain, and paired with each condition; training crops and the held-out tiles.
    for name in ("plain", *specs):
        kw = {} if name == "plain" else {"condition": specs[name], "condition_tokenizer": ctoks[name]}
        encode_dataset(tok, train_crops, root / f"tokens_{name}", batch_size=128, **kw)
        encode_dataset(tok, held_out, root / f"tokens_{name}_test", batch_size=128, **kw)

    priors: dict[str, Prior] = {}
    bits: dict[str, float] = {}
    for name in ("plain", *specs):
        cfg = PriorTrainConfig(
            out=str(root / f"prior_{name}"), tokens=str(root / f"tokens_{name}"),
            val_tokens=str(root / f"tokens_{name}_test"), preset="vim-tiny", model=COND_PRIOR_MODEL,
            steps=prior_steps, batch_size=COND_PRIOR_BATCH, lr=COND_PRIOR_LR, eval_every=prior_steps,
            ckpt_every=prior_steps, resume=True, progress=progress,
        )  # fmt: skip
        train_prior(cfg)
        priors[name] = Prior.from_pretrained(root / f"prior_{name}")
        bits[name] = bits_per_token(priors[name], TokenDataset(root / f"tokens_{name}_test"))

    images = collate([held_out[i] for i in range(len(held_out))])["image"]  # (64, 3, 64, 64)
    show = list(range(0, len(images), max(1, len(images) // 6)))[:6]
    kw = {"top_k": SAMPLE_TOP_K, "seed": 0}

    # Super-resolution: every held-out tile from its 16×16 version; one sample each for PSNR, several shown.
    low = F.avg_pool2d(images, SR_FACTOR)
    low_shown = parse_condition(specs["sr"]).from_input(low, (size, size))  # enlarged by nearest neighbour
    with torch.no_grad():
        cond_sr = ctoks["sr"].encode(low_shown)
        one = tok.decode(generate(priors["sr"], len(images), condition=cond_sr, **kw))
        recon = tok.decode(tok.encode(images))
    bicubic = F.interpolate(low, scale_factor=SR_FACTOR, mode="bicubic", align_corners=False).clamp(0, 1)
    psnr_sr, psnr_bicubic, psnr_recon = (float(psnr(a, images).mean()) for a in (one, bicubic, recon))

    def panel(name: str, conds: torch.Tensor, shown: torch.Tensor, n: int = 3) -> None:
        rows = []
        for i in show:
            with torch.no_grad():
                ids = generate(priors[name], n, condition=conds[i], **{**kw, "seed": i})
                rows.append(torch.cat([shown[i : i + 1], tok.decode(ids), images[i : i + 1]]))
        grid = make_grid(torch.cat(rows), nrow=n + 2, padding=2)
        atomic_write(root / f"{name}.png", lambda tmp: save_image(grid, tmp, format="png"))

    panel("sr", cond_sr, low_shown)
    edge_maps = parse_condition(specs["edges"]).derive(images)
    with torch.no_grad():
        cond_edges = ctoks["edges"].encode(edge_maps)
    panel("edges", cond_edges, edge_maps)

    # Completion: keep the top half of each shown held-out tile's tokens, sample the rest.
    h, w = tok.grid_size
    rows = []
    with torch.no_grad():
        known = tok.encode(images[show])
        for k, i in enumerate(show):
            ids = generate(
                priors["plain"], 3, prefix=known[k].reshape(-1)[: (h // 2) * w], **{**kw, "seed": i}
            )
            top = images[i : i + 1].clone()
            top[:, :, size // 2 :] = 0.5
            rows.append(torch.cat([top, tok.decode(ids), images[i : i + 1]]))
        grid = make_grid(torch.cat(rows), nrow=5, padding=2)
        atomic_write(root / "completion.png", lambda tmp: save_image(grid, tmp, format="png"))
        # A wide canvas: 8×32 tokens (64×256 pixels), every token from the 8×8 window around it.
        wide = tok.decode(generate(priors["plain"], 1, grid=(h, 4 * w), **kw))
    atomic_write(root / "wide.png", lambda tmp: save_image(wide, tmp, format="png"))
    return {
        "held_out_bits_per_image_token": {
            "no condition": bits["plain"],
            f"lowres:{SR_FACTOR}": bits["sr"],
            "edges": bits["edges"],
        },
        "sr_psnr_one_sample": round(psnr_sr, 2),
        "sr_psnr_bicubic": round(psnr_bicubic, 2),
        "tokenizer_reconstruction_psnr": round(psnr_recon, 2),
        "held_out_tiles": len(images),
        "train_crops": COND_TRAIN_CROPS,
        "prior_steps": prior_steps,
        "condition_tokenizer_steps": tok_steps,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _table(d: dict[str, Any]) -> str:
    return "\n".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in d.items()
        if not isinstance(v, list | dict)
    )


def write_index(out: Path, metrics: dict[str, Any]) -> None:
    tb = html.escape(str(out))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vqim demo</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto}}td{{padding:2px 12px}}
img{{max-width:100%;image-rendering:pixelated}}</style></head>
<body>
<h1>vqim demo</h1>
<h2>Stage 1: ViT-VQGAN tokenizer (vit-vqgan-tiny) on built-in photos</h2>
<p>Held-out photographs, never seen in training. Top row: input; bottom row: reconstruction from 8×8 tokens.</p>
<img src="reconstructions.png" alt="reconstructions">
<h3>Metrics (held-out set)</h3>
<table>{_table(metrics["tokenizer"])}</table>
<h3>Codebook usage</h3>
<img src="usage_histogram.png" alt="usage histogram">
<h3>What the codebook-health switches change</h3>
<p>The same tiny tokenizer, seed and data, trained for a short equal budget with and without data-dependent
codebook initialisation and dead-code restarts (held-out metrics):</p>
<table><tr><td></td><td>PSNR (dB)</td><td>codes used</td><td>perplexity</td><td>restarted codes</td></tr>
{_health_rows(metrics["tokenizer"].get("codebook_health", {}))}</table>
<h2>Stage 2: class-conditional VIM prior (vim-tiny) on digits tokens</h2>
<p>Samples, a row per class 0–9 (top-k {SAMPLE_TOP_K}, classifier-free guidance scale {SAMPLE_CFG_SCALE}).</p>
<img src="samples.png" alt="samples">
<h3>Metrics</h3>
<p>The classifier is a logistic regression that vqim trains on the real training digits (grey, 8×8); it is
applied to real test digits, to their reconstructions by the tokenizer, and to generated samples.</p>
<table>{_table(metrics["prior"])}</table>
<p>Sample accuracy per class: {html.escape(_fmt(metrics["prior"]["sample_accuracy_per_class"]))}</p>
<h2>Image understanding: linear probe on the frozen prior</h2>
<p>Each block's features, average-pooled over tokens (the prior reads the null class, never the label), feed
a linear softmax classifier; its L2 weight and the reported block are chosen on a validation split of the
training digits; accuracy is on the held-out test digits. Baselines: the tokenizer encoder's pooled features
and raw pixels.</p>
<img src="probe/accuracy_by_block.png" alt="probe accuracy by block">
<table>
<tr><td>test accuracy per block (0-based)</td><td>{html.escape(_fmt(metrics["probe"]["per_block_test_accuracy"]))}</td></tr>
<tr><td>block chosen on validation</td><td>{metrics["probe"]["chosen_block"]}</td></tr>
<tr><td>its test accuracy</td><td>{_fmt(metrics["probe"]["chosen_block_test_accuracy"])}</td></tr>
<tr><td>baselines (test)</td><td>{html.escape(_fmt(metrics["probe"]["baselines"]))}</td></tr>
<tr><td>chance (largest class)</td><td>{_fmt(metrics["probe"]["chance"])}</td></tr>
</table>
{_conditional_section(metrics.get("conditional"))}
<p>Training curves: <code>tensorboard --logdir {tb}</code></p>
</body></html>
"""
    atomic_write(out / "index.html", lambda tmp: Path(tmp).write_text(page))


def _conditional_section(c: dict[str, Any] | None) -> str:
    if not c:
        return ""
    b = c["held_out_bits_per_image_token"]
    return f"""<h2>Conditional synthesis on photos (Taming Transformers' tasks)</h2>
<p>Small priors (2 blocks, width 64, {c["prior_steps"]} steps on {c["train_crops"]} training crops) over the
stage-1 tokenizer's 8×8 tokens; condition tokenizers (128 codes; steps: {html.escape(_fmt(c["condition_tokenizer_steps"]))})
trained on each photo's condition. Rows are held-out photographs, never seen in training.</p>
<h3>Super-resolution ×{SR_FACTOR}: the 16×16 input, three samples, the original</h3>
<img src="conditional/sr.png" alt="super-resolution">
<p>PSNR over the {c["held_out_tiles"]} held-out tiles, one sample each: {c["sr_psnr_one_sample"]} dB; bicubic
upsampling of the same input: {c["sr_psnr_bicubic"]} dB; the tokenizer's own reconstruction (the ceiling of any
sample): {c["tokenizer_reconstruction_psnr"]} dB.</p>
<h3>Edges → photo: the edge map, three samples, the original</h3>
<img src="conditional/edges.png" alt="edges to photo">
<h3>Completion from the top half: the kept half, three completions, the original</h3>
<img src="conditional/completion.png" alt="completion">
<h3>A wide sample: 8×32 tokens from a prior trained on 8×8, by the sliding window</h3>
<img src="conditional/wide.png" alt="wide sample">
<p>Held-out bits per image token: {html.escape(_fmt(b))}.</p>
"""


def _health_rows(h: dict[str, Any]) -> str:
    return "\n".join(
        f"<tr><td>{html.escape(k)}</td><td>{v['psnr']}</td><td>{v['codes_used']}</td><td>{v['perplexity']}</td>"
        f"<td>{v['restarted_codes']}</td></tr>"
        for k, v in h.items()
    )


def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return f"{v:.4g}" if isinstance(v, float) else str(v)
