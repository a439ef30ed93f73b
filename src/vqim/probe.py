"""Linear probe on the frozen prior's features (ViT-VQGAN paper, section 4.2).

Protocol:
- Images are tokenized; the frozen prior (eval mode, no dropout, no gradients) reads each token sequence.
  A class-conditional prior is given its null class, so the true label never enters the features.
- Each chosen block's output (before the final LayerNorm) is average-pooled over all token positions → (N, D).
- Per block, a linear softmax classifier is trained on standardised features (statistics of the rows it is
  fitted on) with full-batch L-BFGS; its L2 weight is chosen on a validation split carved from the training
  data (never the test split), then it is refitted on all training data and evaluated once on the test split.
- The block to report is chosen by validation accuracy as well; test accuracy is reported for every block.
Optional baselines from the same protocol (`baselines=`): the tokenizer encoder's pooled features ("encoder")
and raw pixels ("pixels").

Fitting: the L2 weights form a path, strongest first; each fit (scipy's L-BFGS-B, exact gradient) starts from
the previous weight's solution, and the refit on all training data starts from the chosen weight's solution.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vqim.checkpoint import read_json, save_tensors, write_json
from vqim.data import collate
from vqim.errors import InputError
from vqim.prior import Prior
from vqim.tokenizer import Tokenizer

log = logging.getLogger(__name__)

WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
BASELINES = ("encoder", "pixels")
GTOL = 1e-4  # L-BFGS stops when every gradient component of the mean loss is below this (scikit-learn's tol)


def check_baselines(baselines: Collection[str]) -> tuple[str, ...]:
    """The baseline names in canonical order; a ValueError for anything but a list/tuple/set of known names."""
    known = isinstance(baselines, list | tuple | set | frozenset) and all(
        isinstance(b, str) and b in BASELINES for b in baselines
    )
    if not known:
        raise InputError(f"baselines must be a list of names from {list(BASELINES)}, got {baselines!r}")
    return tuple(b for b in BASELINES if b in baselines)


@torch.no_grad()
def extract_features(
    prior: Prior,
    tokenizer: Tokenizer,
    dataset: Dataset,
    blocks: list[int] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    baselines: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """Average-pooled features of every image in dataset.

    Args:
        prior: the frozen prior (put in eval mode here; its parameters are not changed).
        tokenizer: the tokenizer whose tokens the prior was trained on.
        dataset: labelled images (eval-mode dataset).
        blocks: 0-based prior block indices (None: all).
        batch_size: images per batch.
        device: where to run.
        baselines: names from BASELINES to return as well: "encoder" (the tokenizer encoder's pooled outputs),
            "pixels" (raw pixels).

    Returns:
        {"block{k}": (N, D) float32 for each block, "labels": (N,) int64, and if asked "encoder": (N, enc_dim),
         "pixels": (N, 3·H·W)}, all on the CPU.
    """
    baselines = check_baselines(baselines)
    blocks = list(range(prior.config.depth)) if blocks is None else sorted(set(blocks))
    was_prior, was_tok = prior.training, tokenizer.training
    prior.eval().to(device)
    tokenizer.eval().to(device)
    out: dict[str, list[torch.Tensor]] = {f"block{k}": [] for k in blocks}
    out["labels"] = []
    out.update({name: [] for name in baselines})
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        x = batch["image"].to(device)
        if x.numel() == 0:
            continue
        z = tokenizer.encode_latents(x)  # (B, N, D_enc)
        ids = tokenizer.quantizer(z).ids.reshape(x.shape[0], -1)  # (B, N)
        labels = prior.null_class if prior.config.num_classes > 0 else None
        res = prior(ids, labels, return_blocks=blocks)
        for k in blocks:
            out[f"block{k}"].append(res.blocks[k].float().mean(1).cpu())  # (B, D): mean over positions
        if "encoder" in baselines:
            out["encoder"].append(z.float().mean(1).cpu())
        if "pixels" in baselines:
            out["pixels"].append(x.flatten(1).float().cpu())
        out["labels"].append(batch["label"])
    prior.train(was_prior)
    tokenizer.train(was_tok)
    feats = {k: torch.cat(v) for k, v in out.items()}
    if (feats["labels"] < 0).any():
        raise InputError("the probe needs labelled images: class sub-folders, --labels-csv, or digits")
    return feats


@dataclass
class LinearProbe:
    """A linear softmax classifier over standardised features."""

    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weight_decay: float

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return ((feats - self.mean) / self.std) @ self.weight.t() + self.bias

    def accuracy(self, feats: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.logits(feats).argmax(1) == labels).float().mean())

    def save(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        directory = Path(directory)
        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}
        save_tensors(directory / "probe.safetensors", tensors)
        write_json(directory / "probe.json", {"weight_decay": self.weight_decay, **(extra or {})})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LinearProbe:
        from vqim.checkpoint import load_tensors

        t = load_tensors(Path(directory) / "probe.safetensors")
        cfg = read_json(Path(directory) / "probe.json", "probe config")
        return cls(t["weight"], t["bias"], t["mean"], t["std"], float(cfg["weight_decay"]))


def _fit_softmax(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int,
    init: np.ndarray | None = None,
) -> tuple[LinearProbe, np.ndarray]:
    """Softmax regression on x standardised by its own statistics, by L-BFGS-B from `init` (default: zeros).

    Minimises mean cross-entropy + weight_decay/2 · ‖W‖² (the bias is not penalised) with the exact gradient:
    products with the features in float32, the rest in float64, on one thread (the many small sequential steps
    gain nothing from threads, and lose much on a busy machine). Returns the probe and its flat float64
    parameters [W (C·D), b (C)], to start a related fit from.
    """
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = ((x - mean) / std).float().numpy()
    labels = y.numpy()
    n, d, c = xs.shape[0], xs.shape[1], num_classes
    rows = np.arange(n)

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: c * d].reshape(c, d), theta[c * d :]
        z = (xs @ w.T.astype(np.float32)).astype(np.float64) + b
        z -= z.max(1, keepdims=True)
        err = np.exp(z)
        norm = err.sum(1, keepdims=True)
        loss = (np.log(norm[:, 0]) - z[rows, labels]).mean() + 0.5 * weight_decay * (w * w).sum()
        err /= norm  # softmax; minus one-hot, over n: d(mean loss)/d(logits)
        err[rows, labels] -= 1
        err /= n
        grad_w = (err.T.astype(np.float32) @ xs).astype(np.float64) + weight_decay * w
        return float(loss), np.concatenate([grad_w.ravel(), err.sum(0)])

    x0 = np.zeros(c * (d + 1)) if init is None else init
    with threadpool_limits(limits=1, user_api="blas"):
        res = minimize(
            loss_and_grad,
            x0,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": max_iter, "maxcor": 20, "gtol": GTOL},
        )
    theta = torch.from_numpy(res.x).float()
    return LinearProbe(theta[: c * d].view(c, d), theta[c * d :], mean, std, weight_decay), res.x


def _validation_mask(y: torch.Tensor, num_classes: int, val_fraction: float, seed: int) -> torch.Tensor:
    """A seeded, class-stratified `val_fraction` of the rows (at least one per class present)."""
    g = torch.Generator().manual_seed(seed)
    val = torch.zeros(len(y), dtype=torch.bool)
    for k in range(num_classes):
        idx = (y == k).nonzero().flatten()
        if len(idx) == 0:
            continue
        idx = idx[torch.randperm(len(idx), generator=g)]
        val[idx[: max(1, int(round(val_fraction * len(idx))))]] = True
    return val


def fit_linear_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int | None = None,
    weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    steps: int = 500,
    seed: int = 0,
) -> tuple[LinearProbe, dict[str, Any]]:
    """Fit a linear softmax probe on (x, y), choosing the L2 weight on a validation split of the training data.

    The validation split is a seeded, class-stratified `val_fraction` of the rows. The candidate weights are
    fitted on the other rows, strongest first, each fit starting from the previous solution; the one with the
    best validation accuracy is chosen (ties: the stronger), and the probe is refitted with it on all rows,
    starting from its solution. Returns the probe and a report {"weight_decay", "val_accuracy",
    "val_by_weight_decay"}.

    Args:
        x: training features (N, D).
        y: labels (N,) in [0, num_classes).
        num_classes: C (default: max label + 1).
        weight_decays: candidate L2 weights (on the mean cross-entropy of standardised features).
        val_fraction: share of each class held out for the choice.
        steps: L-BFGS iterations at most, per fit.
        seed: makes the split deterministic (the fits are deterministic given it).
    """
    x, y = x.detach().float().cpu(), y.long().cpu()
    c = int(y.max()) + 1 if num_classes is None else num_classes
    val = _validation_mask(y, c, val_fraction, seed)
    scores: dict[float, float] = {}
    solutions: dict[float, np.ndarray] = {}
    start = None
    for wd in sorted(set(weight_decays), reverse=True):  # the regularisation path, strongest first
        probe, start = _fit_softmax(x[~val], y[~val], c, wd, steps, start)
        scores[wd], solutions[wd] = probe.accuracy(x[val], y[val]), start
    best = max(scores, key=lambda wd: (scores[wd], wd))  # ties: the stronger regularisation
    probe, _ = _fit_softmax(x, y, c, best, steps, solutions[best])
    report = {
        "weight_decay": best,
        "val_accuracy": scores[best],
        "val_by_weight_decay": {wd: scores[wd] for wd in weight_decays},
    }
    return probe, report


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()


def run_probe(
    prior: Prior,
    tokenizer: Tokenizer,
    train_set: Dataset,
    test_set: Dataset,
    out: str | os.PathLike,
    blocks: list[int] | None = None,
    class_names: list[str] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    baselines: Collection[str] = (),
) -> dict[str, Any]:
    """The whole protocol; writes features (cache), probe.json results, a plot and the best probe under out.

    Args:
        prior, tokenizer: the frozen pair.
        train_set, test_set: labelled images; the probe is fitted (and validated) on train_set only.
        out: output folder.
        blocks: 0-based prior blocks to probe (None: all).
        class_names: names for reports and the saved probe.
        device: where to extract features.
        seed: validation split seed.
        baselines: a list of names from BASELINES fitted by the same protocol besides the blocks: "encoder"
            (the tokenizer encoder's pooled features), "pixels" (raw pixels); default none. The summary
            records them under "baselines_requested" and their test accuracies under "baselines".
    """
    baselines = check_baselines(baselines)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "features"
    key = {
        # Models by fingerprint (config + every weight): a retrained model never reuses stale features.
        "prior": prior.fingerprint(),
        "tokenizer": tokenizer.fingerprint(),
        "blocks": blocks,
        "n": [len(train_set), len(test_set)],
    }
    feats = _load_cache(cache, key)
    if feats is not None and any(f"train.{b}" not in feats or f"test.{b}" not in feats for b in baselines):
        feats = None  # cached without a baseline asked for now
    if feats is None:
        tr = extract_features(prior, tokenizer, train_set, blocks, device=device, baselines=baselines)
        te = extract_features(prior, tokenizer, test_set, blocks, device=device, baselines=baselines)
        feats = {**{f"train.{k}": v for k, v in tr.items()}, **{f"test.{k}": v for k, v in te.items()}}
        save_tensors(cache / "features.safetensors", feats)
        write_json(cache / "key.json", key)
    unasked = {f"{split}.{b}" for split in ("train", "test") for b in BASELINES if b not in baselines}
    feats = {k: v for k, v in feats.items() if k not in unasked}  # a cache may hold baselines not asked for
    summary, probes = probe_features(feats, class_names, seed)
    summary["depth"] = prior.config.depth
    summary["baselines_requested"] = list(baselines)
    chosen = f"block{summary['chosen_block']}"
    names = class_names or [str(i) for i in range(len(summary["class_counts"]["train"]))]
    probes[chosen].save(out / "probe", {"block": summary["chosen_block"], "classes": names})
    write_json(out / "probe_results.json", summary)
    plot_accuracy(summary, out / "accuracy_by_block.png")
    return summary


def probe_features(
    feats: dict[str, torch.Tensor], class_names: list[str] | None = None, seed: int = 0
) -> tuple[dict[str, Any], dict[str, LinearProbe]]:
    """Fit a probe per feature source in feats ("blockK", and "encoder", "pixels" where present); choose the
    block on validation.

    Args:
        feats: "train.<source>" / "test.<source>" features and "train.labels" / "test.labels".
        class_names: names for error messages.
        seed: validation split seed.
    """
    y_tr, y_te = feats["train.labels"], feats["test.labels"]
    c = int(max(y_tr.max(), y_te.max())) + 1
    counts_tr, counts_te = class_counts(y_tr, c), class_counts(y_te, c)
    names = class_names or [str(i) for i in range(c)]
    missing = [names[k] for k in range(c) if counts_tr[k] == 0 or counts_te[k] == 0]
    if missing:
        raise InputError(
            f"classes {missing} are missing from the training or test split; every class needs both"
        )
    imbalance = max(counts_tr) / max(1, min(counts_tr))
    if imbalance > 2:
        log.warning("class imbalance in the training split: largest / smallest class = %.1f", imbalance)

    sources = sorted(
        (k.split(".", 1)[1] for k in feats if k.startswith("train.block")), key=lambda s: int(s[5:])
    )
    sources += [s for s in ("encoder", "pixels") if f"train.{s}" in feats]
    results: dict[str, Any] = {}
    probes: dict[str, LinearProbe] = {}
    for s in sources:
        probe, rep = fit_linear_probe(feats[f"train.{s}"], y_tr, c, seed=seed)
        probes[s] = probe
        results[s] = {"test_accuracy": probe.accuracy(feats[f"test.{s}"], y_te), **rep}
    block_keys = [s for s in sources if s.startswith("block")]
    chosen = max(block_keys, key=lambda s: results[s]["val_accuracy"])
    summary = {
        "per_block_test_accuracy": {int(s[5:]): results[s]["test_accuracy"] for s in block_keys},
        "per_block_val_accuracy": {int(s[5:]): results[s]["val_accuracy"] for s in block_keys},
        "chosen_block": int(chosen[5:]),
        "chosen_block_test_accuracy": results[chosen]["test_accuracy"],
        "best_test_block": int(max(block_keys, key=lambda s: results[s]["test_accuracy"])[5:]),
        "baselines": {s: results[s]["test_accuracy"] for s in ("encoder", "pixels") if s in results},
        "details": results,
        "class_counts": {"train": counts_tr, "test": counts_te},
        "chance": max(counts_te) / sum(counts_te),
    }
    return summary, probes


def _load_cache(cache: Path, key: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    from vqim.checkpoint import load_tensors

    try:
        if read_json(cache / "key.json") == key:
            log.info("using cached features in %s", cache)
            return load_tensors(cache / "features.safetensors")
    except (FileNotFoundError, ValueError):
        pass
    return None


def plot_accuracy(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vqim.checkpoint import atomic_write

    acc = summary["per_block_test_accuracy"]
    ks = sorted(acc)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([k + 1 for k in ks], [100 * acc[k] for k in ks], "o-", label="prior block (test)")
    colours = {"encoder": "tab:green", "pixels": "tab:gray"}
    for name, v in summary["baselines"].items():
        ax.axhline(100 * v, ls="--", color=colours.get(name, "k"), label=f"{name} (test)")
    ax.axvline(summary["chosen_block"] + 1, color="tab:red", alpha=0.3, label="chosen on validation")
    ax.set_xticks([k + 1 for k in ks])
    ax.set_xlabel(f"block (1 … {summary['depth']})")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


__all__ = ["BASELINES", "check_baselines", "extract_features", "fit_linear_probe", "LinearProbe", "run_probe"]


def probe_splits(
    data: str, image_size: int, test_data: str | None = None, labels_csv: str | None = None
) -> tuple[Dataset, Dataset, list[str] | None]:
    """(train set, test set, class names) for the probe, all without augmentation.

    A built-in dataset (digits) gives its own train and test splits; otherwise `test_data` is the test set,
    or, without it, every fifth image of `data` (indices 0, 5, 10, ...) is held out for testing.

    Args:
        data: labelled data: a built-in name, a folder with class sub-folders (or `labels_csv`), or a .npz.
        image_size: the tokenizer's image size.
        test_data: a separate labelled test set (same forms as data).
        labels_csv: labels for image folders: a CSV with columns path,label.
    """
    from torch.utils.data import Subset

    from vqim.data import BUILTIN, build_dataset

    kw = {"augment": False, "labels_csv": labels_csv}
    if data in BUILTIN:
        train = build_dataset(data, image_size, train=True, augment=False)
        return train, build_dataset(data, image_size, train=False), train.class_names
    if test_data is not None:
        train = build_dataset(data, image_size, train=True, **kw)
        return train, build_dataset(test_data, image_size, train=False, **kw), train.class_names
    full = build_dataset(data, image_size, train=False, **kw)
    idx = range(len(full))
    train = Subset(full, [i for i in idx if i % 5 != 0])
    return train, Subset(full, [i for i in idx if i % 5 == 0]), full.class_names
