"""Linear probe on the frozen prior's features (ViT-VQGAN paper, section 4.2).

Protocol:
- Images are tokenized; the frozen prior (eval mode, no dropout, no gradients) reads each token sequence.
  A class-conditional prior is given its null class, so the true label never enters the features.
- Each chosen block's output (before the final LayerNorm) is average-pooled over all token positions → (N, D).
- Per block, a linear softmax classifier is trained on standardised features (statistics of the training
  part only) with full-batch L-BFGS; its L2 weight is chosen on a validation split carved from the training
  data (never the test split), then it is refitted on all training data and evaluated once on the test split.
- The block to report is chosen by validation accuracy as well; test accuracy is reported for every block.
Baselines from the same protocol: the tokenizer encoder's pooled features, and raw pixels.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vqim.checkpoint import read_json, save_tensors, write_json
from vqim.data import collate
from vqim.prior import Prior
from vqim.tokenizer import Tokenizer

log = logging.getLogger(__name__)

WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@torch.no_grad()
def extract_features(
    prior: Prior,
    tokenizer: Tokenizer,
    dataset: Dataset,
    blocks: list[int] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    baselines: bool = True,
) -> dict[str, torch.Tensor]:
    """Average-pooled features of every image in dataset.

    Args:
        prior: the frozen prior (put in eval mode here; its parameters are not changed).
        tokenizer: the tokenizer whose tokens the prior was trained on.
        dataset: labelled images (eval-mode dataset).
        blocks: 0-based prior block indices (None: all).
        batch_size: images per batch.
        device: where to run.
        baselines: also return "encoder" (the tokenizer encoder's pooled outputs) and "pixels" (raw pixels).

    Returns:
        {"block{k}": (N, D) float32 for each block, "encoder": (N, enc_dim), "pixels": (N, 3·H·W),
         "labels": (N,) int64}, all on the CPU.
    """
    blocks = list(range(prior.config.depth)) if blocks is None else sorted(set(blocks))
    was_prior, was_tok = prior.training, tokenizer.training
    prior.eval().to(device)
    tokenizer.eval().to(device)
    out: dict[str, list[torch.Tensor]] = {f"block{k}": [] for k in blocks}
    out["labels"] = []
    if baselines:
        out["encoder"], out["pixels"] = [], []
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
        if baselines:
            out["encoder"].append(z.float().mean(1).cpu())
            out["pixels"].append(x.flatten(1).float().cpu())
        out["labels"].append(batch["label"])
    prior.train(was_prior)
    tokenizer.train(was_tok)
    feats = {k: torch.cat(v) for k, v in out.items()}
    if (feats["labels"] < 0).any():
        raise ValueError("the probe needs labelled images: class sub-folders, --labels-csv, or digits")
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


def _train(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, steps: int, seed: int
) -> LinearProbe:
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(num_classes, x.shape[1], generator=g) * 0.01).requires_grad_()
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w.t() + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearProbe(w.detach(), b.detach(), mean, std, weight_decay)


def fit_linear_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int | None = None,
    weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    steps: int = 200,
    seed: int = 0,
) -> tuple[LinearProbe, dict[str, Any]]:
    """Fit a linear softmax probe on (x, y), choosing the L2 weight on a validation split of the training data.

    The validation split is a seeded, class-stratified `val_fraction` of the rows; after the choice the probe is
    refitted on all rows. Returns the probe and a report {"weight_decay", "val_accuracy", "val_by_weight_decay"}.

    Args:
        x: training features (N, D).
        y: labels (N,) in [0, num_classes).
        num_classes: C (default: max label + 1).
        weight_decays: candidate L2 weights.
        val_fraction: share of each class held out for the choice.
        steps: L-BFGS iterations.
        seed: makes the split and the initialisation deterministic.
    """
    x, y = x.float(), y.long()
    c = int(y.max()) + 1 if num_classes is None else num_classes
    g = torch.Generator().manual_seed(seed)
    val_mask = torch.zeros(len(y), dtype=torch.bool)
    for k in range(c):
        idx = (y == k).nonzero().flatten()
        if len(idx) == 0:
            continue
        idx = idx[torch.randperm(len(idx), generator=g)]
        val_mask[idx[: max(1, int(round(val_fraction * len(idx))))]] = True
    scores = {}
    for wd in weight_decays:
        probe = _train(x[~val_mask], y[~val_mask], c, wd, steps, seed)
        scores[wd] = probe.accuracy(x[val_mask], y[val_mask])
    best = max(weight_decays, key=lambda wd: (scores[wd], wd))  # ties: the stronger regularisation
    probe = _train(x, y, c, best, steps, seed)
    report = {"weight_decay": best, "val_accuracy": scores[best], "val_by_weight_decay": scores}
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
) -> dict[str, Any]:
    """The whole protocol; writes features (cache), probe.json results, a plot and the best probe under out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "features"
    key = {
        "prior": prior.config.to_dict(),
        "tokenizer": tokenizer.config.hash(),
        "blocks": blocks,
        "n": [len(train_set), len(test_set)],
        "prior_weights": float(sum(p.detach().double().sum() for p in prior.parameters())),
    }
    feats = _load_cache(cache, key)
    if feats is None:
        tr = extract_features(prior, tokenizer, train_set, blocks, device=device)
        te = extract_features(prior, tokenizer, test_set, blocks, device=device)
        feats = {**{f"train.{k}": v for k, v in tr.items()}, **{f"test.{k}": v for k, v in te.items()}}
        save_tensors(cache / "features.safetensors", feats)
        write_json(cache / "key.json", key)
    summary, probes = probe_features(feats, class_names, seed)
    summary["depth"] = prior.config.depth
    chosen = f"block{summary['chosen_block']}"
    names = class_names or [str(i) for i in range(len(summary["class_counts"]["train"]))]
    probes[chosen].save(out / "probe", {"block": summary["chosen_block"], "classes": names})
    write_json(out / "probe_results.json", summary)
    plot_accuracy(summary, out / "accuracy_by_block.png")
    return summary


def probe_features(
    feats: dict[str, torch.Tensor], class_names: list[str] | None = None, seed: int = 0
) -> tuple[dict[str, Any], dict[str, LinearProbe]]:
    """Fit a probe per feature source ("blockK", "encoder", "pixels") and choose the block on validation.

    Args:
        feats: "train.<source>" / "test.<source>" features and "train.labels" / "test.labels".
        class_names: names for error messages.
        seed: split and initialisation seed.
    """
    y_tr, y_te = feats["train.labels"], feats["test.labels"]
    c = int(max(y_tr.max(), y_te.max())) + 1
    counts_tr, counts_te = class_counts(y_tr, c), class_counts(y_te, c)
    names = class_names or [str(i) for i in range(c)]
    missing = [names[k] for k in range(c) if counts_tr[k] == 0 or counts_te[k] == 0]
    if missing:
        raise ValueError(
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


__all__ = ["extract_features", "fit_linear_probe", "LinearProbe", "run_probe"]


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
