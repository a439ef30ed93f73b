"""Evaluation: what `vqim reconstruct`, `eval-tokenizer`, `eval-prior` and `probe` run.

- Tokenizer: reconstruction quality and codebook usage over a fixed evaluation set (`evaluate_tokenizer`),
  on one process or shared by the processes of `accelerate launch` (`evaluation_processes`); side-by-side
  reconstructions of single image files with their PSNR (`reconstruct_files`).
- Prior: bits per token on held-out token sequences and the accuracy of a real-image classifier on samples
  (`evaluate_prior`); the linear probe on its block features (`linear_probe`, protocol in `vqim.probe`).

Each command has a config dataclass here (its fields are the command's options) and one function taking it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from vqim import losses
from vqim.checkpoint import atomic_write, resolve_device, write_json
from vqim.config import SamplingConfig
from vqim.errors import InputError, check_output, check_settings, output_dir
from vqim.metrics import CodebookStats, psnr, ssim
from vqim.options import option
from vqim.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_tokenizer(
    tok: Tokenizer,
    dataset: Dataset,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    return_counts: bool = False,
    lpips_model: torch.nn.Module | None = None,
    inception: torch.nn.Module | None = None,
    distributed: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], torch.Tensor]:
    """Mean per-image PSNR, SSIM, L1, L2 (and logit-Laplace NLL) plus code usage over the dataset.

    Usage is reported over the whole set (`usage`, `codes_used`) and per chunk of 256 images as the
    ViT-VQGAN paper measures it (`usage_per_256`); unreadable files are skipped and counted. With the
    optional networks it adds the mean LPIPS distance (`lpips`) and rFID / Inception Score of the
    reconstructions (`rfid`, `inception_score`, `inception_score_std`; see vqim.fid).

    Args:
        tok: the tokenizer (put in eval mode here).
        dataset: an evaluation dataset from `vqim.data.build_dataset(..., train=False)`.
        batch_size, num_workers: loader settings.
        device: where to run.
        progress: show a progress bar.
        return_counts: also return the code histogram over the whole set, (K,) float64 (for plots).
        lpips_model: a `vqim.perceptual.LPIPS` (None: no LPIPS).
        inception: a network from `vqim.fid.load_inception` (None: no rFID / IS).
        distributed: split the set across the processes of the initialised torch.distributed group (e.g. under
            `accelerate launch`); every process must then call this, with the same optional networks.

    Distributed, each process evaluates a contiguous share of the set and the results are combined before
    anything is computed from them: sums and feature statistics are all-reduced, and the code ids and Inception
    logits are gathered in dataset order, so usage (also per 256 images) and IS equal a one-process run's.
    Every process returns the same result.
    """
    from tqdm.auto import tqdm

    from vqim.data import collate

    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise InputError("distributed=True needs an initialised torch.distributed process group")
    rank, world = (
        (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    )
    if world > 1:
        # Every process must run the same collectives below: the same optional metrics everywhere.
        mine = (lpips_model is not None, inception is not None)
        if len(set(_all_gather_objects(mine))) > 1:
            raise InputError(
                "processes disagree on which of LPIPS / Inception metrics to compute (weights found on some "
                "nodes only?); pass the weight paths explicitly or turn the metric off"
            )
        from torch.utils.data import Subset

        share = -(-len(dataset) // world)
        dataset = Subset(dataset, range(rank * share, min(len(dataset), (rank + 1) * share)))
    tok.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    stats = CodebookStats(tok.config.codebook_size)
    # Distributed, the ids are kept (int16 where the codebook allows) and counted in dataset order at the end,
    # so the chunks of 256 images are the same on any number of processes; in one process they stream.
    all_ids: list[torch.Tensor] = []
    id_dtype = torch.int16 if tok.config.codebook_size <= 2**15 else torch.int32
    sums: dict[str, float] = {"psnr": 0.0, "ssim": 0.0, "l1": 0.0, "l2": 0.0, "logit_laplace": 0.0}
    if lpips_model is not None:
        lpips_model = lpips_model.to(device).eval()
        sums["lpips"] = 0.0
    incep = None
    if inception is not None:
        from vqim.fid import InceptionMetrics

        incep = InceptionMetrics(inception.to(device))
    n, skipped = 0, []
    for batch in tqdm(loader, disable=not progress, desc="eval", leave=False):
        skipped += batch["skipped"]
        x = batch["image"].to(device)
        if x.numel() == 0:
            continue
        b = x.shape[0]
        grid = (x.shape[2] // tok.config.patch_size, x.shape[3] // tok.config.patch_size)
        q = tok.quantizer(tok.encode_latents(x))
        raw = tok.decode_latents(q.quantized, grid)
        rec = tok.to_image(raw).clamp(0, 1)
        sums["psnr"] += float(psnr(rec, x).sum())
        sums["ssim"] += float(ssim(rec, x).sum())
        sums["l1"] += float((rec - x).abs().flatten(1).mean(1).sum())
        sums["l2"] += float((rec - x).pow(2).flatten(1).mean(1).sum())
        if tok.config.logit_laplace:
            # Images share one size, so batch mean × b adds up to the mean of per-image means.
            c = tok.config.channels
            sums["logit_laplace"] += b * float(losses.logit_laplace_nll(raw[:, :c], raw[:, c:], x))
        if lpips_model is not None:
            sums["lpips"] += float(lpips_model(rec, x).sum())
        if incep is not None:
            incep.update(x, rec)
        if world > 1:
            all_ids.append(q.ids.detach().cpu().to(id_dtype))
        else:
            stats.update(q.ids)
        n += b
    if world > 1:
        ids = torch.cat(all_ids) if all_ids else torch.zeros(0, dtype=id_dtype)
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys] + [float(n)], dtype=torch.float64)
        t = _all_reduce_sum(t, device)
        sums, n = dict(zip(keys, t[:-1].tolist())), int(t[-1])
        ids = torch.cat([part for part in _all_gather_objects(ids) if part.numel()] or [ids])
        if ids.numel():
            stats.update(ids.long())
        skipped = [f for part in _all_gather_objects(skipped) for f in part]
        if incep is not None:
            for fs in (incep.real, incep.fake):
                fs.n = int(_all_reduce_sum(torch.tensor([float(fs.n)], dtype=torch.float64), device)[0])
                fs.sum, fs.outer = _all_reduce_sum(fs.sum, device), _all_reduce_sum(fs.outer, device)
            incep.logits = [
                torch.cat(incep.logits) if incep.logits else torch.zeros(0, 1008, dtype=torch.float64)
            ]
            incep.logits = _all_gather_objects(incep.logits[0])
    if n == 0:
        raise InputError("the evaluation set holds no readable image")
    result: dict[str, Any] = {k: v / n for k, v in sums.items()}
    if not tok.config.logit_laplace:
        result.pop("logit_laplace")
    result.update(stats.summary())
    if incep is not None:
        result.update(incep.compute())
    result.update(
        {
            "images": n,
            "codebook_size": tok.config.codebook_size,
            "skipped_files": len(skipped),
            "processes": world,
        }
    )
    if skipped:
        result["skipped"] = skipped
    return (result, stats.counts) if return_counts else result


def _all_reduce_sum(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """Sum over processes: on the CPU under gloo, on the evaluation device otherwise (nccl: CUDA only)."""
    dev = torch.device("cpu") if torch.distributed.get_backend() == "gloo" else torch.device(device)
    x = t.to(dev).clone()
    torch.distributed.all_reduce(x)
    return x.cpu()


def _all_gather_objects(obj: Any) -> list[Any]:
    """Every process's obj, in rank order (tensors of ids/logits and file names: internal traffic only)."""
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def optional_metric_models(
    vgg_weights: str | None = None,
    lpips_weights: str | None = None,
    inception_weights: str | None = None,
    lpips: str = "auto",
    fid: str = "auto",
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module | None, torch.nn.Module | None, dict[str, str]]:
    """(LPIPS network, InceptionV3, {metric: why it is not measured}) for `evaluate_tokenizer`.

    Each of `lpips` / `fid` is "on" (a missing weight file is an error), "off", or "auto" (measured when the
    weights are found, else left out with the reason recorded). A weight path given explicitly counts as "on".
    """
    for name, mode in (("lpips", lpips), ("fid", fid)):
        if mode not in ("auto", "on", "off"):
            raise InputError(f"--{name} must be auto, on or off, got {mode!r}")
    notes: dict[str, str] = {}
    lp = inc = None
    if lpips != "off":
        from vqim.perceptual import LPIPS

        try:
            lp = LPIPS(vgg_weights, lpips_weights).to(device)
        except (FileNotFoundError, ValueError) as e:
            if lpips == "on" or vgg_weights is not None or lpips_weights is not None:
                raise
            notes["lpips"] = str(e)
    if fid != "off":
        from vqim.fid import load_inception

        try:
            inc = load_inception(inception_weights, device)
        except (FileNotFoundError, ImportError, ValueError) as e:
            if fid == "on" or inception_weights is not None:
                if isinstance(e, ImportError):
                    raise InputError(f"rFID / Inception Score need torch-fidelity: {e}") from e
                raise
            notes["rfid"] = notes["inception_score"] = str(e)
    for k, why in {"lpips": notes.get("lpips"), "rfid, inception_score": notes.get("rfid")}.items():
        if why:
            log.info("not measured: %s (%s)", k, why)
    return lp, inc, notes


def usage_histogram_png(counts: torch.Tensor, path: str | os.PathLike, title: str = "") -> None:
    """Plot code counts sorted by frequency (log scale) and save as PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = counts.double().sort(descending=True).values.numpy()
    used = int((c > 0).sum())
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.bar(range(len(c)), c + 1e-9, width=1.0, color="#3b6ea8")
    ax.set_yscale("log")
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("count")
    ax.set_title(title or f"codebook usage: {used} / {len(c)} codes used ({100 * used / len(c):.1f}%)")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class Processes:
    """Where this process evaluates and whether it shares the work with others.

    Attributes:
        device: this process's device.
        main: whether this process writes results (the only one that does).
        distributed: whether an initialised process group splits the evaluation set.
    """

    device: torch.device
    main: bool = True
    distributed: bool = False


def evaluation_processes(device: str | torch.device = "auto") -> Processes:
    """One process on `device`, or, under a launch (`accelerate launch`, torchrun; mpirun on CPU), this process's
    share.

    Launched, every process joins the group (gloo on CPU-only machines, as the trainers do: Accelerate's
    `cpu=True`) and evaluates on the device the launcher gave it; only the main process should write.
    """
    from vqim import distributed

    if distributed.launched():
        state = distributed.process_state()
        if state.num_processes == 1:  # every process would evaluate everything and write the same files
            raise InputError(
                "this process was launched as one of several, but the processes did not join one group (mpirun "
                "with GPUs, which Accelerate does not support); launch with `accelerate launch` or torchrun"
            )
        return Processes(torch.device(state.device), state.is_main_process, state.num_processes > 1)
    return Processes(resolve_device(device))


# ---------------------------------------------------------------------------------------------- commands
@dataclass(kw_only=True)
class ReconstructConfig:
    """What `vqim reconstruct` does.

    Args:
        tokenizer: tokenizer folder (written by save_pretrained / train-tokenizer).
        images: image files.
        out: folder for the side-by-side PNGs (NAME_reconstruction.png: input left, reconstruction right).
        size: side of the centre crop (default: the tokenizer's image size).
        device: cpu, cuda, or auto (cuda when available).
    """

    tokenizer: str
    images: list[str] = option(positional=True)
    out: str
    size: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        check_output(self.out)
        check_settings(self, positive=("size",))


def load_center_crop(path: str | os.PathLike, size: int) -> torch.Tensor:
    """An image file as (3, size, size) in [0, 1]: shorter side resized to size (bicubic), central square crop.

    The evaluation sets' preprocessing (`vqim.data`, without augmentation). Raises FileNotFoundError for a
    missing file and another exception for an unreadable one.
    """
    import numpy as np

    from vqim.data import _crop, load_rgb, resize_shorter, to_tensor

    if not Path(path).is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return to_tensor(
        _crop(np.asarray(resize_shorter(load_rgb(path, min_side=size), size)), size, None, False)
    )


@torch.no_grad()
def reconstruct_files(
    tok: Tokenizer, paths: list[str], out: str | os.PathLike, size: int | None = None
) -> dict[str, dict[str, Any]]:
    """Reconstruct image files; write NAME_reconstruction.png (input | reconstruction) per file under out.

    A missing or unreadable file is an error naming it (the user named each file), raised before anything
    is written.

    Args:
        tok: the tokenizer (eval mode); images go to its device.
        paths: image files.
        out: output folder.
        size: centre-crop side (default: the tokenizer's image size).

    Returns:
        path → {"psnr": dB (3 decimals), "png": the written file}.
    """
    from torchvision.utils import save_image

    size = size or tok.config.image_size
    device = next(tok.parameters()).device
    images = []
    for path in paths:
        try:
            images.append(load_center_crop(path, size)[None])
        except (FileNotFoundError, InputError):
            raise
        except Exception as e:  # noqa: BLE001 - any decoding error: a file the user named cannot be used
            raise InputError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    out = output_dir(out)
    result: dict[str, dict[str, Any]] = {}
    for path, x in zip(paths, images, strict=True):
        x = x.to(device)
        rec = tok.decode(tok.encode(x))
        png = out / f"{Path(path).stem}_reconstruction.png"
        pair = torch.cat([x, rec], dim=3)[0].cpu()
        atomic_write(png, lambda tmp, pair=pair: save_image(pair, tmp, format="png"))
        result[str(path)] = {"psnr": round(float(psnr(rec, x)[0]), 3), "png": str(png)}
    return result


def reconstruct(cfg: ReconstructConfig) -> dict[str, dict[str, Any]]:
    """Load cfg.tokenizer and `reconstruct_files` cfg.images into cfg.out."""
    tok = Tokenizer.from_pretrained(cfg.tokenizer, device=cfg.device)
    return reconstruct_files(tok, cfg.images, cfg.out, cfg.size)


@dataclass(kw_only=True)
class EvalTokenizerConfig:
    """What `vqim eval-tokenizer` does.

    Args:
        tokenizer: tokenizer folder (written by save_pretrained / train-tokenizer).
        data: image folder, .npy/.npz array, or built-in (photos, digits: their held-out split).
        out: also write metrics.json and usage_histogram.png here.
        image_size: evaluation image size (default: the tokenizer's).
        batch_size: images per batch (per process).
        num_workers: DataLoader workers.
        progress: show a progress bar.
        lpips: LPIPS distance: auto (measured when the VGG16 and LPIPS weights are found), on (a missing file
            is an error) or off.
        fid: rFID and Inception Score: auto, on or off, as for lpips.
        vgg_weights: VGG16 weights for LPIPS (default: torch hub cache).
        lpips_weights: LPIPS linear heads (default: the lpips package's).
        inception_weights: torch-fidelity InceptionV3 weights (.pth or .safetensors; default: torch hub cache).
        device: cpu, cuda, or auto (cuda when available); under accelerate launch, each process's own.
    """

    tokenizer: str
    data: str
    out: str | None = None
    image_size: int | None = None
    batch_size: int = 32
    num_workers: int = 0
    progress: bool = True
    lpips: Literal["auto", "on", "off"] = "auto"
    fid: Literal["auto", "on", "off"] = "auto"
    vgg_weights: str | None = None
    lpips_weights: str | None = None
    inception_weights: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        check_output(self.out)
        check_settings(self, positive=("batch_size", "image_size"), non_negative=("num_workers",))


def run_eval_tokenizer(cfg: EvalTokenizerConfig) -> dict[str, Any] | None:
    """Evaluate on one process or all launched ones; the main process writes cfg.out and gets the metrics.

    Returns the metrics (with `not_measured`: metric → why, for what the weights did not allow) on the main
    process, None on the others.
    """
    from vqim.data import build_dataset

    procs = evaluation_processes(cfg.device)
    tok = Tokenizer.from_pretrained(cfg.tokenizer, device=procs.device)
    ds = build_dataset(cfg.data, cfg.image_size or tok.config.image_size, train=False)
    lp, inc, notes = optional_metric_models(
        cfg.vgg_weights, cfg.lpips_weights, cfg.inception_weights, cfg.lpips, cfg.fid, procs.device
    )
    res, counts = evaluate_tokenizer(
        tok, ds, cfg.batch_size, cfg.num_workers, procs.device, progress=cfg.progress and procs.main,
        return_counts=True, lpips_model=lp, inception=inc, distributed=procs.distributed,
    )  # fmt: skip
    if notes:
        res["not_measured"] = notes
    if not procs.main:
        return None
    if cfg.out:
        out = Path(cfg.out)
        write_json(out / "metrics.json", res)
        usage_histogram_png(counts, out / "usage_histogram.png")
    return res


@dataclass(kw_only=True)
class EvalPriorConfig:
    """What `vqim eval-prior` does.

    Args:
        prior: prior folder (written by train-prior).
        tokens: token folder to score (written by `vqim encode` with the prior's tokenizer).
        val_every: score only the held-out sequences of --tokens, every N-th one, as train-prior holds them
            out (its --val-every, 20 by default); 0 scores every sequence.
        batch_size: sequences per forward pass.
        tokenizer: with --data digits, also sample every class and score the samples with a classifier of
            real digits (the tokenizer whose tokens the prior was trained on).
        data: labelled built-in data for the sample classifier: digits.
        samples_per_class: samples generated and scored per class.
        sampling: sampling settings for the scored samples.
        device: cpu, cuda, or auto (cuda when available).
    """

    prior: str
    tokens: str
    val_every: int = 0
    batch_size: int = 64
    tokenizer: str | None = None
    data: Literal["digits"] | None = None
    samples_per_class: int = 20
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    device: str = "auto"

    def __post_init__(self) -> None:
        check_settings(self, positive=("batch_size", "samples_per_class"), non_negative=("val_every",))


def evaluate_prior(cfg: EvalPriorConfig) -> dict[str, Any]:
    """Bits per image token of cfg.tokens under the prior (given their condition tokens when the prior is
    spatially conditioned); with a tokenizer and digits, sample accuracy too."""
    from vqim.classifier import digits_classifier, sample_accuracy
    from vqim.prior import Prior, bits_per_token, load_prior_and_tokenizer
    from vqim.tokens import TokenDataset, check_tokens_match, read_prior_tokens

    if (cfg.tokenizer is None) != (cfg.data is None):
        raise InputError("sample accuracy needs both a tokenizer and --data digits (or neither)")
    device = resolve_device(cfg.device)
    if cfg.tokenizer is not None:
        prior, tok = load_prior_and_tokenizer(cfg.prior, cfg.tokenizer, device)
    else:
        prior, tok = Prior.from_pretrained(cfg.prior, device=device), None
    ds = TokenDataset(cfg.tokens, split="val" if cfg.val_every > 0 else "all", val_every=cfg.val_every)
    ds.check_compatible(prior.config.vocab_size, tuple(prior.config.grid_size))
    trained_on = read_prior_tokens(cfg.prior)
    if trained_on is not None:
        check_tokens_match(
            trained_on, ds.manifest, f"the prior in {cfg.prior} was trained on tokens of",
            f"the tokens in {cfg.tokens} were written by", "score tokens written by the prior's tokenizer",
        )  # fmt: skip
    ds.check_condition(prior.config, None if trained_on is None else trained_on.get("condition"))
    result = {
        "bits_per_token": bits_per_token(prior, ds, cfg.batch_size, device=device),
        "sequences": len(ds),
    }
    if tok is not None:
        clf = digits_classifier(tok.config.image_size)
        result.update(sample_accuracy(tok, prior, clf, cfg.samples_per_class, cfg.sampling))
    return result


@dataclass(kw_only=True)
class ProbeConfig:
    """What `vqim probe` does (the protocol: `vqim.probe`).

    Args:
        prior: prior folder (written by train-prior).
        tokenizer: the tokenizer folder whose tokens the prior was trained on.
        data: labelled data: digits, a folder with class sub-folders, or .npz.
        out: folder for probe_results.json, accuracy_by_block.png, the chosen probe and cached features.
        test_data: labelled test images (default: the built-in test split, or every fifth image of --data).
        labels_csv: labels for an image folder: CSV with columns path,label.
        blocks: 'all' or comma-separated 0-based block indices.
        baselines: baselines fitted by the same protocol, any of: encoder (the tokenizer encoder's pooled
            features), pixels (raw pixels); none by default.
        seed: validation split and probe initialisation seed.
        device: cpu, cuda, or auto (cuda when available).
    """

    prior: str
    tokenizer: str
    data: str
    out: str
    test_data: str | None = None
    labels_csv: str | None = None
    blocks: str = "all"
    baselines: tuple[Literal["encoder", "pixels"], ...] = option((), nargs="*")
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        check_output(self.out)


def linear_probe(cfg: ProbeConfig) -> dict[str, Any]:
    """Load the checked prior + tokenizer pair, split the data, run `vqim.probe.run_probe`; the summary."""
    from vqim.prior import load_prior_and_tokenizer
    from vqim.probe import probe_splits, run_probe

    device = resolve_device(cfg.device)
    prior, tok = load_prior_and_tokenizer(cfg.prior, cfg.tokenizer, device)
    try:
        blocks = None if cfg.blocks == "all" else [int(v) for v in cfg.blocks.split(",")]
    except ValueError:
        raise InputError(f"blocks must be 'all' or comma-separated integers, got {cfg.blocks!r}") from None
    if blocks is not None and any(not 0 <= b < prior.config.depth for b in blocks):
        raise InputError(f"blocks must be in [0, {prior.config.depth}), got {blocks}")
    train, test, names = probe_splits(cfg.data, tok.config.image_size, cfg.test_data, cfg.labels_csv)
    res = run_probe(
        prior, tok, train, test, cfg.out, blocks=blocks, class_names=names, device=device, seed=cfg.seed,
        baselines=cfg.baselines,
    )  # fmt: skip
    res.pop("details", None)
    return res
