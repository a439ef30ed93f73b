"""Fixtures shared by several test modules."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from vqim.checkpoint import write_json


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and a busy machine makes OpenMP threads wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write_token_folder(
    folder: Path, grid: tuple[int, int] = (4, 4), codes: int = 32, count: int = 48
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(folder / "tokens-00000.npy", rng.integers(0, codes, (count, *grid)).astype(np.uint16))
    np.save(folder / "labels-00000.npy", (np.arange(count) % 2).astype(np.int64))
    write_json(folder / "manifest.json", {
        "format": "vqim-tokens/1", "grid_size": list(grid), "codebook_size": codes, "count": count,
        "shards": [{"tokens": "tokens-00000.npy", "labels": "labels-00000.npy", "count": count}],
        "has_labels": True, "class_names": ["a", "b"],
    })  # fmt: skip
    return folder


@pytest.fixture(scope="session")
def token_folder() -> Callable[..., Path]:
    """`token_folder(folder, grid=(4, 4), codes=32, count=48)` writes a labelled token folder there (random
    grids seeded with 0, alternating two classes) and returns it."""
    return _write_token_folder
