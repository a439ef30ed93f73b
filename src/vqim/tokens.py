"""Token shards: what `vqim encode` writes and the prior reads.

Layout of a token folder:
    manifest.json                 grid size, codebook size, tokenizer identity, count, shard list
    tokens-00000.npy ...          ids, (n, h, w), uint16 when the codebook fits, else int32
    labels-00000.npy ...          int64 labels (only when the data has labels)
    cond-00000.npy ...            condition token ids, (n, hc, wc) (only with a spatial condition: the manifest's
                                  "condition" records its spec, grid, codebook and condition tokenizer)

Tokenizer identity. Token ids mean something only to the tokenizer that wrote them, so the manifest records
`tokenizer_id` (`Tokenizer.fingerprint()`: a hash of the weights and the config) beside the older
`tokenizer_config_hash` (the config alone: a retrained tokenizer of the same config hashes equal). A prior's
`tokens.json` copies both. `check_tokens_match` compares the strongest identity both sides carry, so folders
written before `tokenizer_id` existed are still read (and checked by config only).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vqim.checkpoint import atomic_write, read_json, read_json_object, resolve_device, write_json
from vqim.errors import InputError, check_output, check_settings
from vqim.options import option
from vqim.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PRIOR_TOKENS = "tokens.json"  # in a prior's folder: what it was trained on


class TokenizerMismatchError(ValueError):
    """Token ids (or a prior trained on them) meet a tokenizer other than the one that wrote them."""


def tokenizer_identity(source: Tokenizer | Mapping[str, Any]) -> dict[str, str]:
    """{"tokenizer_id", "tokenizer_config_hash"} of a tokenizer, or those a manifest / tokens.json records."""
    if isinstance(source, Tokenizer):
        return {"tokenizer_id": source.fingerprint(), "tokenizer_config_hash": source.config.hash()}
    return {k: source[k] for k in ("tokenizer_id", "tokenizer_config_hash") if source.get(k)}


def check_tokens_match(
    expected: Tokenizer | Mapping[str, Any],
    found: Tokenizer | Mapping[str, Any],
    expected_desc: str,
    found_desc: str,
    advice: str = "pass the tokenizer that `vqim encode` used for these tokens",
) -> None:
    """Raise TokenizerMismatchError unless both sides name the same tokenizer.

    Each side is a `Tokenizer`, a token manifest or a prior's tokens.json. The weights-and-config identity
    (`tokenizer_id`) is compared when both sides have it; otherwise the config hash (records written before
    `tokenizer_id` existed), with a warning that other weights of the same config would pass.

    Args:
        expected, found: the two sides.
        expected_desc, found_desc: how the message names them, each completed by "tokenizer <id>", e.g.
            "the prior in runs/prior was trained on tokens of" and "runs/tok is".
        advice: what the user should do, appended to the message.
    """
    a, b = tokenizer_identity(expected), tokenizer_identity(found)
    key = next((k for k in ("tokenizer_id", "tokenizer_config_hash") if k in a and k in b), None)
    if key is None:
        return  # one side records nothing (a prior saved without tokens.json): nothing to compare
    if key == "tokenizer_config_hash":
        log.warning(
            "tokenizer checked by its configuration only (a record written before vqim identified tokenizers by "
            "their weights): a retrained tokenizer of the same configuration would pass"
        )
    if a[key] == b[key]:
        return
    same_config = a.get("tokenizer_config_hash") == b.get("tokenizer_config_hash")
    why = " (the same configuration with other weights: a retrained tokenizer?)" if same_config else ""
    raise TokenizerMismatchError(
        f"{expected_desc} tokenizer {a[key][:12]}, but {found_desc} tokenizer {b[key][:12]}{why}; {advice}"
    )


def read_prior_tokens(prior_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A prior folder's tokens.json (what the prior was trained on), or None for a prior saved without one."""
    path = Path(prior_dir) / PRIOR_TOKENS
    return read_json(path, what="prior tokens record") if path.is_file() else None


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def _w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)

    atomic_write(path, _w)


@torch.no_grad()
def encode_dataset(
    tok: Tokenizer,
    dataset: Dataset,
    out: str | os.PathLike,
    batch_size: int = 64,
    shard_size: int = 8192,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    condition: str | None = None,
    condition_tokenizer: Tokenizer | None = None,
) -> dict[str, Any]:
    """Encode every image of dataset into token shards under out; returns the manifest.

    Args:
        tok: the tokenizer.
        dataset: an evaluation-mode dataset (deterministic crops).
        out: output folder.
        batch_size, num_workers: loader settings.
        shard_size: images per shard file.
        device: where to run the encoder.
        progress: show a progress bar.
        condition: a spatial condition spec (`vqim.conditions`): each image's condition image is encoded by
            `condition_tokenizer` into paired condition tokens.
        condition_tokenizer: the tokenizer of the condition modality (required with `condition`).

    Under `accelerate launch` (N processes) each process encodes a contiguous 1/N of the dataset into its own
    shards (`tokens-pRRR-KKKKK.npy`); the main process writes the one manifest, listing the shards in dataset
    order, so the folder holds the same sequences in the same order as a one-process run.
    """
    from accelerate.utils import gather_object
    from torch.utils.data import Subset
    from tqdm.auto import tqdm

    from vqim.conditions import ConditionImages, collate_conditioned, parse_condition
    from vqim.data import collate
    from vqim.distributed import process_state

    if (condition is None) != (condition_tokenizer is None):
        raise InputError("a spatial condition needs both --condition and --condition-tokenizer")
    state = process_state()
    rank, world = state.process_index, state.num_processes
    class_names = getattr(dataset, "class_names", None)
    has_labels = class_names is not None or any(lab >= 0 for lab in getattr(dataset, "labels", []))
    cond = None
    if condition is not None:
        cond = parse_condition(condition)
        dataset = ConditionImages(dataset, cond)
        condition_tokenizer.eval().to(device)
    if world > 1:  # this process's contiguous share, in dataset order
        n = len(dataset)
        dataset = Subset(dataset, range(rank * n // world, (rank + 1) * n // world))
    prefix = f"p{rank:03d}-" if world > 1 else ""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.eval().to(device)
    dtype = np.uint16 if tok.config.codebook_size <= 65536 else np.int32
    cdtype = (
        None
        if cond is None
        else (np.uint16 if condition_tokenizer.config.codebook_size <= 65536 else np.int32)
    )
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers,
        collate_fn=collate if cond is None else collate_conditioned,
    )  # fmt: skip
    shards: list[dict[str, Any]] = []
    ids_buf: list[np.ndarray] = []
    lab_buf: list[np.ndarray] = []
    cond_buf: list[np.ndarray] = []
    skipped: list[str] = []
    count = 0
    grid: tuple[int, int] | None = None
    cond_grid: tuple[int, int] | None = None

    def write_shard(ids: np.ndarray, labels: np.ndarray, cids: np.ndarray | None) -> None:
        k = len(shards)
        entry = {"tokens": f"tokens-{prefix}{k:05d}.npy", "count": int(ids.shape[0])}
        _save_npy(out / entry["tokens"], ids.astype(dtype))
        if has_labels:
            entry["labels"] = f"labels-{prefix}{k:05d}.npy"
            _save_npy(out / entry["labels"], labels.astype(np.int64))
        if cids is not None:
            entry["condition"] = f"cond-{prefix}{k:05d}.npy"
            _save_npy(out / entry["condition"], cids.astype(cdtype))
        shards.append(entry)

    def flush(final: bool) -> None:
        nonlocal ids_buf, lab_buf, cond_buf
        if not ids_buf:
            return
        ids, labels = np.concatenate(ids_buf), np.concatenate(lab_buf)
        cids = np.concatenate(cond_buf) if cond_buf else None
        while len(ids) >= shard_size or (final and len(ids)):
            write_shard(ids[:shard_size], labels[:shard_size], None if cids is None else cids[:shard_size])
            ids, labels = ids[shard_size:], labels[shard_size:]
            cids = None if cids is None else cids[shard_size:]
        keep = len(ids) > 0
        ids_buf, lab_buf = ([ids], [labels]) if keep else ([], [])
        cond_buf = [cids] if keep and cids is not None else []

    for batch in tqdm(loader, disable=not (progress and state.is_main_process), desc="encode"):
        skipped += batch["skipped"]
        if batch["image"].numel() == 0:
            continue
        ids = tok.encode(batch["image"].to(device)).cpu().numpy()
        grid = ids.shape[1:]
        ids_buf.append(ids)
        lab_buf.append(batch["label"].numpy())
        if cond is not None:
            cids = condition_tokenizer.encode(batch["condition"].to(device)).cpu().numpy()
            cond_grid = cids.shape[1:]
            cond_buf.append(cids)
        count += ids.shape[0]
        flush(final=False)
    flush(final=True)
    if world > 1:  # every process's shards, in rank (= dataset) order
        parts = gather_object([(shards, count, skipped, grid, cond_grid)])
        shards = [sh for p in parts for sh in p[0]]
        count = sum(p[1] for p in parts)
        skipped = [f for p in parts for f in p[2]]
        grid = next((p[3] for p in parts if p[3] is not None), None)
        cond_grid = next((p[4] for p in parts if p[4] is not None), None)
    if count == 0:
        raise InputError("no readable image to encode")
    manifest: dict[str, Any] = {
        "format": "vqim-tokens/1",
        "grid_size": list(grid),
        "codebook_size": tok.config.codebook_size,
        **tokenizer_identity(tok),
        "tokenizer_dir": str(tok.pretrained_dir) if tok.pretrained_dir is not None else None,
        "tokenizer_config": tok.config.to_dict(),
        "image_size": tok.config.image_size,
        "count": count,
        "dtype": np.dtype(dtype).name,
        "shards": shards,
        "has_labels": bool(has_labels),
        "class_names": class_names,
        "skipped_files": len(skipped),
    }
    if cond is not None:
        ct = condition_tokenizer
        manifest["condition"] = {
            "spec": cond.spec,
            "grid_size": list(cond_grid),
            "codebook_size": ct.config.codebook_size,
            **tokenizer_identity(ct),
            "tokenizer_dir": str(ct.pretrained_dir) if ct.pretrained_dir is not None else None,
            "dtype": np.dtype(cdtype).name,
        }
    if state.is_main_process:
        write_json(out / MANIFEST, manifest)
    state.wait_for_everyone()
    return manifest


def load_ids(path: str | os.PathLike) -> np.ndarray:
    """Load a (n, h, w) or (h, w) integer id array from .npy without pickle."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    arr = np.load(path, allow_pickle=False)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(
            f"{path}: expected integer token ids of shape (n, h, w), got {arr.dtype} {arr.shape}"
        )
    return arr


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check a token folder's manifest.json."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"token folder not found: {directory} (write one with `vqim encode`)")
    path = directory / MANIFEST
    m = read_json_object(path, what="token manifest")
    if m.get("format") != "vqim-tokens/1":
        raise InputError(f"{path}: unknown format {m.get('format')!r}; expected 'vqim-tokens/1'")
    missing = [k for k in ("grid_size", "codebook_size", "shards") if k not in m]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}: write the folder again with `vqim encode`")
    grid, codes, shards = m["grid_size"], m["codebook_size"], m["shards"]
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid)):
        raise InputError(f"{path}: grid_size must be two positive ints, got {grid!r}")
    if not (isinstance(codes, int) and codes > 0):
        raise InputError(f"{path}: codebook_size must be a positive int, got {codes!r}")
    if not isinstance(shards, list) or not all(
        isinstance(sh, dict) and isinstance(sh.get("tokens"), str) and isinstance(sh.get("count"), int)
        for sh in shards
    ):
        raise InputError(f"{path}: shards must be a list of objects with a tokens path and a count")
    return m


def shard_file(directory: Path, rel: Any, what: str) -> Path:
    """The file a manifest names, refused unless it is a relative path inside the token folder."""
    where = directory / MANIFEST
    if not isinstance(rel, str) or not rel:
        raise InputError(f"{where}: a shard lacks its {what} file")
    p = Path(rel)
    inside = not p.is_absolute() and ".." not in p.parts
    full = directory / p
    if inside:
        try:
            full.resolve().relative_to(directory.resolve())
        except ValueError:
            inside = False
    if not inside:
        raise InputError(
            f"{where}: the {what} file {rel!r} lies outside the token folder; shard paths must be relative "
            f"paths inside {directory}"
        )
    if not full.is_file():
        raise FileNotFoundError(f"{what} shard listed in the manifest is missing: {full}")
    return full


def _load_ids(path: Path, what: str, low: int, high: int | None, ndim: int) -> np.ndarray:
    """A shard memory-mapped, refused (naming it) unless it holds integers of ndim dims in [low, high)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path} is not a readable .npy {what} file ({e}): write the folder again") from e
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{path}: {what} must be integers, found {arr.dtype}")
    if arr.ndim != ndim:
        raise InputError(f"{path}: {what} must have {ndim} dimensions, found shape {tuple(arr.shape)}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < low or (high is not None and hi >= high):
            bound = f"[{low}, {high})" if high is not None else f">= {low}"
            raise InputError(f"{path}: {what} must lie in {bound}, found values in [{lo}, {hi}]")
    return arr


class TokenDataset(Dataset):
    """Token sequences from a `vqim encode` folder, memory-mapped so memory does not grow with its size.

    Items are {"tokens": LongTensor (h·w,) in raster order, "label": int (-1 without labels)}, and with a spatial
    condition also "condition": LongTensor (hc·wc,), the paired condition tokens. A held-out
    split can be carved deterministically: with `val_every=k`, every k-th sequence is validation.

    Args:
        directory: the token folder.
        split: "all", "train" (sequences not held out) or "val" (held out).
        val_every: hold out every val_every-th sequence (0: no hold-out; then split must be "all" or "train").
    """

    def __init__(self, directory: str | os.PathLike, split: str = "all", val_every: int = 0) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(directory)
        if split not in ("all", "train", "val"):
            raise InputError(f"split must be 'all', 'train' or 'val', got {split!r}")
        if split == "val" and val_every <= 0:
            raise InputError("a 'val' split needs val_every > 0")
        self.split, self.val_every = split, val_every
        self.grid_size = tuple(self.manifest["grid_size"])
        self.codebook_size = int(self.manifest["codebook_size"])
        self.class_names = self.manifest.get("class_names")
        self.has_labels = bool(self.manifest.get("has_labels"))
        self.condition: dict[str, Any] | None = self.manifest.get("condition")
        self.cond_grid_size = None if self.condition is None else tuple(self.condition["grid_size"])
        self._tokens, self._labels, self._conds, starts = [], [], [], [0]
        # Every shard is checked whole here (dtype, shape, id range, labels), so a bad value names its file
        # at load time instead of failing in some later batch.
        n_classes = len(self.class_names) if self.class_names else None
        cond_codes = None if self.condition is None else int(self.condition["codebook_size"])
        for shard in self.manifest["shards"]:
            path = shard_file(self.directory, shard["tokens"], "token")
            arr = _load_ids(path, "token ids", 0, self.codebook_size, 3)
            if tuple(arr.shape[1:]) != self.grid_size or arr.shape[0] != shard["count"]:
                raise InputError(
                    f"{path}: shape {tuple(arr.shape)} disagrees with the manifest ({shard['count']} sequences "
                    f"of {self.grid_size})"
                )
            self._tokens.append(arr)
            labels = None
            if self.has_labels:
                lpath = shard_file(self.directory, shard.get("labels"), "label")
                labels = _load_ids(lpath, "labels", 0, n_classes, 1)
                if labels.shape[0] != arr.shape[0]:
                    raise InputError(
                        f"{lpath}: {labels.shape[0]} labels for the {arr.shape[0]} sequences of {path}"
                    )
            self._labels.append(labels)
            if self.condition is not None:
                cpath = shard_file(self.directory, shard.get("condition"), "condition")
                carr = _load_ids(cpath, "condition token ids", 0, cond_codes, 3)
                if tuple(carr.shape[1:]) != self.cond_grid_size or carr.shape[0] != arr.shape[0]:
                    raise InputError(f"{cpath}: shape {tuple(carr.shape)} disagrees with the manifest")
                self._conds.append(carr)
            starts.append(starts[-1] + arr.shape[0])
        self._starts = np.array(starts)
        self.total = int(starts[-1])
        if self.total == 0:
            raise InputError(f"{self.directory}: the token folder holds no sequences")

    def __len__(self) -> int:
        if self.split == "all" or self.val_every <= 0:
            return self.total
        n_val = (self.total + self.val_every - 1) // self.val_every
        return n_val if self.split == "val" else self.total - n_val

    def _global(self, i: int) -> int:
        if self.split == "all" or self.val_every <= 0:
            return i
        k = self.val_every
        if self.split == "val":
            return i * k
        return (i // (k - 1)) * k + 1 + i % (k - 1)  # skip every k-th

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i = key if isinstance(key, int) else key[0]
        g = self._global(int(i))
        s = int(np.searchsorted(self._starts, g, side="right") - 1)
        row = g - self._starts[s]
        tokens = torch.from_numpy(np.asarray(self._tokens[s][row], dtype=np.int64).reshape(-1))
        label = int(self._labels[s][row]) if self._labels[s] is not None else -1
        if self.condition is None:
            return {"tokens": tokens, "label": label}
        cond = torch.from_numpy(np.asarray(self._conds[s][row], dtype=np.int64).reshape(-1))
        return {"tokens": tokens, "label": label, "condition": cond}

    def check_condition(self, prior_config: Any, condition: Mapping[str, Any] | None) -> None:
        """Raise a clear ValueError unless these tokens carry the spatial condition a prior reads: the same
        grid and codebook as `prior_config`'s, written by the condition tokenizer `condition` records (another
        token folder's or a prior's tokens.json "condition"; None: compare with the prior config only)."""
        mine = self.condition
        if not prior_config.spatial:
            if mine is not None:
                raise InputError(
                    f"the tokens in {self.directory} carry a spatial condition ({mine['spec']}), but the prior "
                    "has none: train a new prior on them"
                )
            return
        if mine is None:
            raise InputError(
                f"the prior is conditioned on a {tuple(prior_config.cond_grid_size)} condition grid, but the "
                f"tokens in {self.directory} carry no condition tokens: encode with --condition and "
                "--condition-tokenizer"
            )
        if tuple(mine["grid_size"]) != tuple(prior_config.cond_grid_size) or int(
            mine["codebook_size"]
        ) != int(prior_config.cond_vocab_size):
            raise InputError(
                f"the condition tokens in {self.directory} ({mine['codebook_size']} codes, grid "
                f"{tuple(mine['grid_size'])}) do not fit the prior's condition ({prior_config.cond_vocab_size} "
                f"codes, grid {tuple(prior_config.cond_grid_size)})"
            )
        if condition is not None:
            check_tokens_match(
                condition, mine, "the prior's condition tokens were written by condition",
                f"the condition tokens in {self.directory} were written by condition",
                "encode with the condition tokenizer the prior was trained with",
            )  # fmt: skip

    def check_compatible(
        self,
        vocab_size: int,
        grid_size: tuple[int, int],
        tokenizer_hash: str | None = None,
        tokenizer_id: str | None = None,
    ) -> None:
        """Raise a clear ValueError when these tokens cannot feed a prior of this vocabulary and grid, or were
        written by another tokenizer than the one given (by `tokenizer_id`, else by config hash)."""
        if tokenizer_id is not None and self.manifest.get("tokenizer_id"):
            check_tokens_match(
                {"tokenizer_id": tokenizer_id},
                self.manifest,
                "the other token folder was written by",
                f"the tokens in {self.directory} were written by",
                "re-encode the data with the tokenizer the prior is trained for",
            )
            tokenizer_hash = None
        if self.codebook_size != vocab_size:
            raise InputError(
                f"tokens in {self.directory} come from a codebook of {self.codebook_size} codes, but the prior's "
                f"vocabulary is {vocab_size}; train the prior with --vocab matching the tokenizer"
            )
        if tuple(grid_size) != self.grid_size:
            raise InputError(
                f"tokens in {self.directory} have grid {self.grid_size}, but the prior expects {tuple(grid_size)}"
            )
        found = self.manifest.get("tokenizer_config_hash")
        if tokenizer_hash is not None and found != tokenizer_hash:
            raise InputError(
                f"tokens in {self.directory} were written by tokenizer {found}, not by {tokenizer_hash}; "
                "re-encode the data with the tokenizer the prior is trained for"
            )


@dataclass(kw_only=True)
class EncodeConfig:
    """What `vqim encode` does: a dataset to token shards + manifest.

    Args:
        tokenizer: tokenizer folder (written by save_pretrained / train-tokenizer).
        data: image folder (class sub-folders become labels), .npy/.npz array, or built-in: photos, digits.
        out: token folder to write.
        split: split of a built-in dataset to encode (folders and arrays: all of it).
        image_size: centre-crop side (default: the tokenizer's image size).
        labels_csv: labels for an image folder: CSV with columns path,label.
        batch_size: images per encoder batch.
        shard_size: sequences per shard file.
        num_workers: DataLoader workers.
        progress: show a progress bar.
        device: cpu, cuda, or auto (cuda when available).
        condition: a spatial condition to pair with every image: lowres:F, edges, edges:SIGMA, or a folder of
            condition images at the images' relative paths (see vqim.conditions).
        condition_tokenizer: tokenizer folder of the condition modality, trained on condition images
            (`train-tokenizer --condition SPEC`); it encodes the condition tokens.
    """

    tokenizer: str
    data: str
    out: str
    split: Literal["train", "eval"] = "train"
    image_size: int | None = None
    labels_csv: str | None = None
    batch_size: int = 64
    shard_size: int = 8192
    num_workers: int = 0
    progress: bool = True
    device: str = "auto"
    condition: str | None = None
    condition_tokenizer: str | None = None

    def __post_init__(self) -> None:
        check_output(self.out)
        check_settings(
            self, positive=("batch_size", "shard_size", "image_size"), non_negative=("num_workers",)
        )


def encode_to_folder(cfg: EncodeConfig) -> dict[str, Any]:
    """Encode cfg.data (centre crops, no augmentation) with the tokenizer in cfg.tokenizer; returns the manifest."""
    from vqim.data import build_dataset
    from vqim.distributed import process_state

    state = process_state()  # several processes under `accelerate launch`: each encodes its share
    device = state.device if state.num_processes > 1 and cfg.device == "auto" else resolve_device(cfg.device)
    tok = Tokenizer.from_pretrained(cfg.tokenizer, device=device)
    size = cfg.image_size or tok.config.image_size
    ds = build_dataset(cfg.data, size, train=cfg.split == "train", augment=False, labels_csv=cfg.labels_csv)
    ctok = None
    if cfg.condition_tokenizer is not None:
        ctok = Tokenizer.from_pretrained(cfg.condition_tokenizer, device=device)
    return encode_dataset(
        tok, ds, cfg.out, batch_size=cfg.batch_size, shard_size=cfg.shard_size, num_workers=cfg.num_workers,
        device=device, progress=cfg.progress, condition=cfg.condition, condition_tokenizer=ctok,
    )  # fmt: skip


@dataclass(kw_only=True)
class DecodeConfig:
    """What `vqim decode` does: a .npy of token ids to one PNG per image.

    Args:
        tokenizer: tokenizer folder (written by save_pretrained / train-tokenizer).
        ids: .npy file of integer ids, (n, h, w) or (h, w); in a `vqim encode` folder, its manifest must name
            this tokenizer.
        out: folder for the PNGs (000000.png, ...).
        batch_size: token grids per decoder batch.
        device: cpu, cuda, or auto (cuda when available).
    """

    tokenizer: str
    ids: str = option(positional=True)
    out: str
    batch_size: int = 64
    device: str = "auto"

    def __post_init__(self) -> None:
        check_output(self.out)
        check_settings(self, positive=("batch_size",))


@torch.no_grad()
def decode_to_folder(cfg: DecodeConfig) -> dict[str, Any]:
    """Decode every token grid of cfg.ids to a PNG in cfg.out; returns {"images": count, "out": folder}."""
    from torchvision.utils import save_image

    device = resolve_device(cfg.device)
    tok = Tokenizer.from_pretrained(cfg.tokenizer, device=device)
    ids = torch.from_numpy(load_ids(cfg.ids).astype(np.int64))
    folder = Path(cfg.ids).parent
    if (folder / MANIFEST).is_file():
        check_tokens_match(
            read_manifest(folder), tok, f"the tokens in {folder} were written by", f"{cfg.tokenizer} is"
        )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for start in range(0, ids.shape[0], cfg.batch_size):
        images = tok.decode(ids[start : start + cfg.batch_size].to(device)).cpu()
        for i, im in enumerate(images):
            atomic_write(out / f"{start + i:06d}.png", lambda tmp, im=im: save_image(im, tmp, format="png"))
            n += 1
    return {"images": n, "out": str(out)}


def collate_tokens(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    out = {
        "tokens": torch.stack([it["tokens"] for it in items]),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
    }
    if "condition" in items[0]:
        out["condition"] = torch.stack([it["condition"] for it in items])
    return out
