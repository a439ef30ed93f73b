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
