"""The ViT-VQGAN ablation study (paper Table 4) at a budget one machine can run.

Every variant trains from the same seed on the same data for the same number of steps, then is evaluated on
the same held-out images. The study writes, under `out`:

    variants/<name>/        the variant's training run (checkpoints, samples, TensorBoard) and eval.json
    results.json            every variant's settings and metrics
    results.md              a Markdown table beside the paper's numbers, and the directions it checks
    usage_vs_lookup_dim.png, psnr_per_variant.png

A variant whose eval.json exists is not run again; one with checkpoints resumes from the latest, so an
interrupted study continues where it stopped.

The base recipe is the tiny ViT-VQGAN preset as it ships (data-dependent codebook init, dead-code restarts) with
the StyleGAN discriminator; `base_model` (CLI: `--set key=value`) changes it for every variant, e.g.
`--set codebook_init=normal dead_code_window=0` for the paper's plain quantizer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vqim.checkpoint import atomic_write, read_json, resolve_device, write_json
from vqim.config import parse_overrides, tokenizer_presets
from vqim.errors import InputError
from vqim.options import option

log = logging.getLogger(__name__)

# A CNN encoder/decoder (taming-transformers' architecture) with the tiny ViT's token grid (8×8 at 64 px:
# 3 downsamplings), quantizer and parameter count (1.25M each).
CNN_TINY = {
    "arch": "cnn",
    "enc_dim": 128,
    "dec_dim": 128,
    "enc_heads": 1,
    "dec_heads": 1,
    "cnn_channels": 32,
    "cnn_ch_mult": (1, 1, 2, 2),
    "cnn_num_res_blocks": 1,
    "cnn_attn_resolutions": (8,),
}


@dataclass(frozen=True)
class Variant:
    """One row of the study.

    Args:
        name: folder name and row label.
        label: what the row changes, as the paper's table words it.
        model: TokenizerConfig overrides on top of the study's base.
        train: TokenizerTrainConfig overrides on top of the study's base.
        paper_rfid, paper_usage: the paper's numbers for this row (ImageNet, BB, 256 px), or None.
    """

    name: str
    label: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    paper_rfid: float | None = None
    paper_usage: float | None = None


DEFAULT_LOOKUP_DIM = 32


def paper_grid() -> list[Variant]:
    """The rows of the paper's ablation table (docs/papers.md), in its order."""
    rows = [
        Variant("default", "default (dim 32, l2-norm, StyleGAN disc)", paper_rfid=1.55, paper_usage=0.96),
        Variant("cnn", "CNN encoder/decoder", model=dict(CNN_TINY), paper_rfid=2.26, paper_usage=0.63),
        # PatchGAN as taming-transformers trains it: hinge loss, adaptive weight, no R1.
        Variant("patchgan", "PatchGAN discriminator", train={"disc": "patchgan", "r1_gamma": 0.0}, paper_rfid=3.88,
                paper_usage=0.89),
    ]  # fmt: skip
    paper = {
        256: (3.68, 0.04),
        128: (2.77, 0.14),
        64: (2.50, 0.37),
        16: (1.50, 0.95),
        8: (1.52, 0.96),
        4: (3.68, 0.96),
    }
    for d in (256, 128, 64, 16, 8, 4):
        rfid, usage = paper[d]
        rows.append(
            Variant(f"dim{d}", f"lookup dim {d}", model={"lookup_dim": d}, paper_rfid=rfid, paper_usage=usage)
        )
    rows.append(
        Variant(
            "no-l2", "dim 32 without l2-norm", model={"l2_norm": False}, paper_rfid=5.44, paper_usage=0.02
        )
    )
    return rows


@dataclass
class AblationConfig:
    """Settings shared by every variant.

    The base loss is vqim's ViT-VQGAN recipe: StyleGAN2 discriminator, non-saturating loss, lazy R1 with γ = 10.

    Args:
        out: study folder (re-running resumes).
        data: dataset (its training split trains, its held-out split evaluates).
        steps: training steps per variant.
        batch_size: global batch per step.
        lr: peak learning rate (short budgets need more than the paper's 1e-4).
        min_lr_ratio: the cosine decay ends at lr × this.
        seed: the seed every variant trains from.
        preset: base tokenizer preset.
        base_model: tokenizer config overrides for every variant, e.g. dead_code_window=0 codebook_init=normal.
        disc: discriminator of the base recipe.
        disc_start: step from which the discriminator trains (default: a quarter of the steps).
        adv_weight: weight of the generator's GAN term.
        r1_gamma: lazy R1 penalty γ (0: off).
        perceptual_weight: LPIPS weight (0: no VGG weights needed).
        vgg_weights: VGG16 weights for LPIPS (default: torch hub cache).
        lpips_weights: LPIPS linear heads (default: the lpips package's).
        inception_weights: torch-fidelity InceptionV3 weights for rFID/IS, measured when available.
        only: run only these variants (names as in results.md; default: all).
        eval_batch_size: evaluation batch.
        num_workers: DataLoader workers.
        progress: show progress bars.
        device: where variants are evaluated: cpu, cuda, or auto (cuda when available).
    """

    out: str
    data: str = "photos"
    steps: int = 400
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.02
    seed: int = 0
    preset: str = option("vit-vqgan-tiny", choices=tokenizer_presets())
    base_model: dict[str, Any] = option(
        default_factory=dict, flag="--set", metavar="KEY=VALUE", nargs="+", parse=parse_overrides
    )
    disc: Literal["none", "stylegan", "patchgan"] = "stylegan"
    disc_start: int | None = None
    adv_weight: float = 0.1
    r1_gamma: float = 10.0
    perceptual_weight: float = 0.0
    vgg_weights: str | None = None
    lpips_weights: str | None = None
    inception_weights: str | None = None
    only: tuple[str, ...] | None = None
    eval_batch_size: int = 64
    num_workers: int = 0
    progress: bool = True
    device: str = "auto"


def _train_config(cfg: AblationConfig, v: Variant, out: Path):
    from vqim.train.tokenizer import TokenizerTrainConfig

    base = dict(
        out=str(out), data=cfg.data, preset=cfg.preset, model={**cfg.base_model, **v.model}, steps=cfg.steps,
        batch_size=cfg.batch_size, lr=cfg.lr, min_lr_ratio=cfg.min_lr_ratio, seed=cfg.seed,
        num_workers=cfg.num_workers, progress=cfg.progress, log_every=max(1, cfg.steps // 20),
        image_every=cfg.steps, ckpt_every=max(1, cfg.steps // 4), resume=True, disc=cfg.disc,
        # The paper does not give a discriminator start; the study starts it after a quarter of the budget.
        disc_start=cfg.disc_start if cfg.disc_start is not None else cfg.steps // 4,
        adv_weight=cfg.adv_weight, r1_gamma=cfg.r1_gamma, perceptual_weight=cfg.perceptual_weight, vgg_weights=cfg.vgg_weights,
        lpips_weights=cfg.lpips_weights,
    )  # fmt: skip
    base.update(v.train)
    return TokenizerTrainConfig(**base)


def run_variant(cfg: AblationConfig, v: Variant) -> dict[str, Any]:
    """Train (or resume) and evaluate one variant; returns its eval.json content."""
    from vqim.evaluate import evaluate_tokenizer, optional_metric_models
    from vqim.train.tokenizer import train_tokenizer

    vdir = Path(cfg.out) / "variants" / v.name
    done = vdir / "eval.json"
    tcfg = _train_config(cfg, v, vdir)
    # What decides the variant's result; a resumed or skipped variant must have been run with the same.
    settings = _jsonable(
        {
            k: x
            for k, x in dataclasses.asdict(tcfg).items()
            if k not in ("out", "progress", "num_workers", "resume")
        }
    )
    settings_file = vdir / "variant_settings.json"
    if settings_file.is_file() and read_json(settings_file) != settings:
        raise InputError(
            f"{vdir} was trained with other settings than this study's ({settings_file}); use a new --out, or "
            "delete that variant's folder to retrain it"
        )
    if done.is_file():
        log.info("ablation: %s already evaluated, skipping", v.name)
        return read_json(done)
    write_json(settings_file, settings)
    log.info("ablation: training %s (%s)", v.name, v.label)
    summary = train_tokenizer(tcfg)

    from vqim.data import build_dataset
    from vqim.tokenizer import Tokenizer

    device = resolve_device(cfg.device)
    tok = Tokenizer.from_pretrained(vdir, device=device)
    ds = build_dataset(cfg.data, tok.config.image_size, train=False, seed=cfg.seed)
    lpips_model, inception, notes = optional_metric_models(
        cfg.vgg_weights, cfg.lpips_weights, cfg.inception_weights, device=device
    )
    metrics = evaluate_tokenizer(
        tok, ds, cfg.eval_batch_size, device=device, lpips_model=lpips_model, inception=inception
    )
    result = {
        "name": v.name,
        "label": v.label,
        "model": {
            k: list(x) if isinstance(x, tuple) else x for k, x in {**cfg.base_model, **v.model}.items()
        },
        "train": dict(v.train),
        "lookup_dim": tok.config.lookup_dim,
        "params": sum(p.numel() for p in tok.parameters()),
        "train_seconds": summary["seconds"],
        "steps": summary["steps"],
        "resumed_from": summary["resumed_from"],
        "metrics": metrics,
        "not_measured": notes,
        "paper_rfid": v.paper_rfid,
        "paper_usage": v.paper_usage,
    }
    write_json(done, result)
    return result


def _jsonable(obj: Any) -> Any:
    """Tuples to lists, recursively, so settings compare equal to their JSON round trip."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _dim_of(name: str, r: dict[str, Any]) -> int | None:
    """Lookup dim of a lookup-dim row (the default row and dimN rows), None for other rows."""
    if name != "default" and not (name.startswith("dim") and name[3:].isdigit()):
        return None
    return int(r.get("lookup_dim", DEFAULT_LOOKUP_DIM if name == "default" else int(name[3:])))


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def directions(results: dict[str, dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """The paper's directions, checked on the study's numbers: (claim, holds (None: not run), evidence)."""

    def usage(name: str) -> float | None:
        r = results.get(name)
        return None if r is None else r["metrics"]["usage"]

    def needs(*names: str) -> str:
        """Why a check could not be made: the rows it compares that the study did not run."""
        missing = [n for n in names if n not in results]
        return f"needs the {' and '.join(missing)} row{'s' if len(missing) > 1 else ''}, not in this study"

    checks: list[tuple[str, bool | None, str]] = []
    dims = sorted((d, r["metrics"]["usage"]) for n, r in results.items() if (d := _dim_of(n, r)) is not None)
    base = _dim_of("default", results["default"]) if "default" in results else DEFAULT_LOOKUP_DIM
    big = [(d, u) for d, u in dims if d >= base]
    if len(big) >= 2:
        falls = all(b[1] <= a[1] for a, b in zip(big, big[1:]))
        ev = ", ".join(f"dim {d}: {100 * u:.1f}%" for d, u in big)
        checks.append((f"usage falls as the lookup dim grows beyond {base}", falls, ev))
    else:
        checks.append(
            (
                f"usage falls as the lookup dim grows beyond {base}",
                None,
                f"needs two lookup-dim rows from {base} up",
            )
        )
    d, n = usage("default"), usage("no-l2")
    if d is not None and n is not None:
        checks.append(
            ("usage collapses without l2-norm", n < 0.5 * d, f"{100 * n:.1f}% without vs {100 * d:.1f}% with")
        )
    else:
        checks.append(("usage collapses without l2-norm", None, needs("default", "no-l2")))
    rv, rc = results.get("default"), results.get("cnn")
    if rv is not None and rc is not None:
        pv, pc = rv["metrics"]["psnr"], rc["metrics"]["psnr"]
        checks.append(("ViT ≥ CNN at a matched budget (PSNR)", pv >= pc, f"{pv:.2f} dB vs {pc:.2f} dB"))
    else:
        checks.append(("ViT ≥ CNN at a matched budget (PSNR)", None, needs("default", "cnn")))
    rp = results.get("patchgan")
    if rv is not None and rp is not None:
        pv, pp = rv["metrics"]["psnr"], rp["metrics"]["psnr"]
        checks.append(("StyleGAN ≥ PatchGAN discriminator (PSNR)", pv >= pp, f"{pv:.2f} dB vs {pp:.2f} dB"))
    else:
        checks.append(("StyleGAN ≥ PatchGAN discriminator (PSNR)", None, needs("default", "patchgan")))
    return checks


def markdown_table(results: dict[str, dict[str, Any]], order: Sequence[str], command: str = "") -> str:
    """The study's table beside the paper's numbers, then the directions."""
    any_r = next(iter(results.values()), None)
    key256 = next((k for k in any_r["metrics"] if k.startswith("usage_per_")), None) if any_r else None
    lines = [
        "| variant | paper rFID | paper usage | PSNR (dB) | SSIM | LPIPS | rFID | usage (eval set) | "
        f"{key256 or 'usage_per_256'} | codes used | params |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in order:
        r = results.get(name)
        if r is None:
            continue
        m = r["metrics"]
        pu = r.get("paper_usage")
        u256 = m.get(key256) if key256 else None
        lines.append(
            f"| {r['label']} | {_fmt(r.get('paper_rfid'), '.2f')} | {'–' if pu is None else f'{100 * pu:.0f}%'} | "
            f"{m['psnr']:.2f} | {m['ssim']:.3f} | {_fmt(m.get('lpips'), '.3f')} | {_fmt(m.get('rfid'), '.2f')} | "
            f"{100 * m['usage']:.1f}% | {'–' if u256 is None else f'{100 * u256:.1f}%'} | "
            f"{m['codes_used']} / {m['codebook_size']} | {r['params'] / 1e6:.2f}M |"
        )
    lines.append("")
    lines.append("Directions from the paper, checked on these numbers:")
    lines.append("")
    for claim, holds, ev in directions(results):
        mark = "not run" if holds is None else ("holds" if holds else "does NOT hold")
        lines.append(f"- {claim}: **{mark}** ({ev})")
    if command:
        lines += ["", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def plots(results: dict[str, dict[str, Any]], order: Sequence[str], out: Path) -> None:
    """usage_vs_lookup_dim.png and psnr_per_variant.png, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(((d, r) for n, r in results.items() if (d := _dim_of(n, r)) is not None), key=lambda t: t[0])
    if pts:
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        ax.plot(
            [d for d, _ in pts],
            [100 * r["metrics"]["usage"] for _, r in pts],
            "o-",
            label="vqim (this study)",
        )
        paper = [(d, r["paper_usage"]) for d, r in pts if r["paper_usage"] is not None]
        if paper:
            ax.plot(
                [d for d, _ in paper],
                [100 * u for _, u in paper],
                "s--",
                color="gray",
                label="paper (ImageNet)",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("lookup dim")
        ax.set_ylabel("codebook usage (%)")
        ax.set_ylim(0, 105)
        ax.legend()
        ax.set_title("codebook usage vs lookup dim (l2-normalised codes)")
        fig.tight_layout()
        atomic_write(out / "usage_vs_lookup_dim.png", lambda tmp: fig.savefig(tmp, format="png"))
        plt.close(fig)
    names = [n for n in order if n in results]
    if names:
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
        vals = [results[n]["metrics"]["psnr"] for n in names]
        ax.bar(range(len(names)), vals, color=["#c0504d" if n == "default" else "#3b6ea8" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("PSNR on held-out images (dB)")
        ax.set_ylim(min(vals) - 1, max(vals) + 0.5)
        ax.set_title("reconstruction quality per variant")
        fig.tight_layout()
        atomic_write(out / "psnr_per_variant.png", lambda tmp: fig.savefig(tmp, format="png"))
        plt.close(fig)


def run_ablation(
    cfg: AblationConfig, variants: Sequence[Variant] | None = None, command: str = ""
) -> dict[str, Any]:
    """Run every variant (resuming), then write results.json, results.md and the plots; returns the results."""
    grid = list(variants) if variants is not None else paper_grid()
    known = {v.name for v in grid}
    if cfg.only:
        bad = sorted(set(cfg.only) - known)
        if bad:
            raise InputError(f"unknown ablation variants {bad}; choose from {sorted(known)}")
        grid = [v for v in grid if v.name in set(cfg.only)]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    write_json(out / "study_config.json", settings)
    results: dict[str, dict[str, Any]] = {}
    for i, v in enumerate(grid):
        log.info("ablation: variant %d/%d: %s", i + 1, len(grid), v.name)
        results[v.name] = run_variant(cfg, v)
    order = [v.name for v in grid]
    write_json(out / "results.json", {"config": settings, "results": results})
    md = markdown_table(results, order, command)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(md))
    plots(results, order, out)
    return {"results": results, "markdown": md}


__all__ = [
    "AblationConfig",
    "Variant",
    "paper_grid",
    "run_ablation",
    "run_variant",
    "markdown_table",
    "directions",
]
