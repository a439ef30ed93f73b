"""Token shards: what `vqim encode` writes and the prior reads.

Layout of a token folder:
    manifest.json                 grid size, codebook size, tokenizer config hash, count, shard list
    tokens-00000.npy ...          ids, (n, h, w), uint16 when the codebook fits, else int32
    labels-00000.npy ...          int64 labels (only when the data has labels)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vqim.checkpoint import atomic_write, write_json
from vqim.tokenizer import Tokenizer

MANIFEST = "manifest.json"


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
    """
    from tqdm.auto import tqdm

    from vqim.data import collate

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.eval().to(device)
    dtype = np.uint16 if tok.config.codebook_size <= 65536 else np.int32
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    shards: list[dict[str, Any]] = []
    ids_buf: list[np.ndarray] = []
    lab_buf: list[np.ndarray] = []
    has_labels = getattr(dataset, "class_names", None) is not None or any(
        lab >= 0 for lab in getattr(dataset, "labels", [])
    )
    skipped: list[str] = []
    count = 0
    grid: tuple[int, int] | None = None

    def write_shard(ids: np.ndarray, labels: np.ndarray) -> None:
        k = len(shards)
        entry = {"tokens": f"tokens-{k:05d}.npy", "count": int(ids.shape[0])}
        _save_npy(out / entry["tokens"], ids.astype(dtype))
        if has_labels:
            entry["labels"] = f"labels-{k:05d}.npy"
            _save_npy(out / entry["labels"], labels.astype(np.int64))
        shards.append(entry)

    def flush(final: bool) -> None:
        nonlocal ids_buf, lab_buf
        if not ids_buf:
            return
        ids, labels = np.concatenate(ids_buf), np.concatenate(lab_buf)
        while len(ids) >= shard_size or (final and len(ids)):
            write_shard(ids[:shard_size], labels[:shard_size])
            ids, labels = ids[shard_size:], labels[shard_size:]
        ids_buf, lab_buf = ([ids], [labels]) if len(ids) else ([], [])

    for batch in tqdm(loader, disable=not progress, desc="encode"):
        skipped += batch["skipped"]
        if batch["image"].numel() == 0:
            continue
        ids = tok.encode(batch["image"].to(device)).cpu().numpy()
        grid = ids.shape[1:]
        ids_buf.append(ids)
        lab_buf.append(batch["label"].numpy())
        count += ids.shape[0]
        flush(final=False)
    flush(final=True)
    if count == 0:
        raise ValueError("no readable image to encode")
    manifest: dict[str, Any] = {
        "format": "vqim-tokens/1",
        "grid_size": list(grid),
        "codebook_size": tok.config.codebook_size,
        "tokenizer_config_hash": tok.config.hash(),
        "tokenizer_config": tok.config.to_dict(),
        "image_size": tok.config.image_size,
        "count": count,
        "dtype": np.dtype(dtype).name,
        "shards": shards,
        "has_labels": bool(has_labels),
        "class_names": getattr(dataset, "class_names", None),
        "skipped_files": len(skipped),
    }
    write_json(out / MANIFEST, manifest)
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
        raise ValueError(
            f"{path}: expected integer token ids of shape (n, h, w), got {arr.dtype} {arr.shape}"
        )
    return arr


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check a token folder's manifest.json."""
    from vqim.checkpoint import read_json

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"token folder not found: {directory} (write one with `vqim encode`)")
    m = read_json(directory / MANIFEST, what="token manifest")
    if m.get("format") != "vqim-tokens/1":
        raise ValueError(
            f"{directory / MANIFEST}: unknown format {m.get('format')!r}; expected 'vqim-tokens/1'"
        )
    return m


class TokenDataset(Dataset):
    """Token sequences from a `vqim encode` folder, memory-mapped so memory does not grow with its size.

    Items are {"tokens": LongTensor (h·w,) in raster order, "label": int (-1 without labels)}. A held-out
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
            raise ValueError(f"split must be 'all', 'train' or 'val', got {split!r}")
        if split == "val" and val_every <= 0:
            raise ValueError("a 'val' split needs val_every > 0")
        self.split, self.val_every = split, val_every
        self.grid_size = tuple(self.manifest["grid_size"])
        self.codebook_size = int(self.manifest["codebook_size"])
        self.class_names = self.manifest.get("class_names")
        self.has_labels = bool(self.manifest.get("has_labels"))
        self._tokens, self._labels, starts = [], [], [0]
        for shard in self.manifest["shards"]:
            path = self.directory / shard["tokens"]
            if not path.is_file():
                raise FileNotFoundError(f"token shard listed in the manifest is missing: {path}")
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.ndim != 3 or tuple(arr.shape[1:]) != self.grid_size or arr.shape[0] != shard["count"]:
                raise ValueError(f"{path}: shape {arr.shape} disagrees with the manifest")
            self._tokens.append(arr)
            self._labels.append(
                np.load(self.directory / shard["labels"], mmap_mode="r", allow_pickle=False)
                if self.has_labels
                else None
            )
            starts.append(starts[-1] + arr.shape[0])
        self._starts = np.array(starts)
        self.total = int(starts[-1])
        if self.total == 0:
            raise ValueError(f"{self.directory}: the token folder holds no sequences")

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
        return {"tokens": tokens, "label": label}

    def check_compatible(
        self, vocab_size: int, grid_size: tuple[int, int], tokenizer_hash: str | None = None
    ) -> None:
        """Raise a clear ValueError when these tokens cannot feed a prior of this vocabulary and grid."""
        if self.codebook_size != vocab_size:
            raise ValueError(
                f"tokens in {self.directory} come from a codebook of {self.codebook_size} codes, but the prior's "
                f"vocabulary is {vocab_size}; train the prior with --vocab matching the tokenizer"
            )
        if tuple(grid_size) != self.grid_size:
            raise ValueError(
                f"tokens in {self.directory} have grid {self.grid_size}, but the prior expects {tuple(grid_size)}"
            )
        found = self.manifest.get("tokenizer_config_hash")
        if tokenizer_hash is not None and found != tokenizer_hash:
            raise ValueError(
                f"tokens in {self.directory} were written by tokenizer {found}, not by {tokenizer_hash}; "
                "re-encode the data with the tokenizer the prior is trained for"
            )


def collate_tokens(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "tokens": torch.stack([it["tokens"] for it in items]),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
    }
