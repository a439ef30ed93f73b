"""The probe's data split (README: built-in test split, --test-data, or every fifth image held out)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from vqim.probe import probe_splits


def _folder(root, n=12):
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / ("cats" if i % 2 else "dogs")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    return root


def test_every_fifth_image_is_held_out(tmp_path):
    train, test, names = probe_splits(str(_folder(tmp_path / "im")), 16)
    assert names == ["cats", "dogs"]
    assert list(test.indices) == [0, 5, 10] and list(train.indices) == [1, 2, 3, 4, 6, 7, 8, 9, 11]
    # Deterministic centre crops in both splits: the same item twice is the same image.
    assert np.array_equal(train[0]["image"].numpy(), train[0]["image"].numpy())


def test_builtin_splits_and_a_given_test_set(tmp_path):
    train, test, names = probe_splits("digits", 16)
    assert (len(train), len(test), names) == (1437, 360, [str(i) for i in range(10)])
    folder = str(_folder(tmp_path / "im"))
    train, test, names = probe_splits(folder, 16, test_data=str(_folder(tmp_path / "test", 4)))
    assert (len(train), len(test), names) == (12, 4, ["cats", "dogs"])
