"""Datasets: folders, arrays, built-in photos, corrupt files, the resumable sampler."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vqim.data import (
    PHOTOS_EVAL,
    PHOTOS_TRAIN,
    ArrayDataset,
    ImageFolderDataset,
    PhotosDataset,
    StepSampler,
    build_dataset,
    collate,
)


def _write_images(folder: Path, n: int, size=(40, 30), mode="RGB", ext=".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        im = Image.fromarray(arr).convert(mode)
        p = folder / f"img{i}{ext}"
        im.save(p)
        paths.append(p)
    return paths


def test_folder_recursive_modes_and_extensions(tmp_path):
    _write_images(tmp_path / "a", 2, ext=".png")
    _write_images(tmp_path / "a" / "deeper", 1, mode="L", ext=".jpg")
    _write_images(tmp_path / "b", 1, mode="RGBA", ext=".webp")
    _write_images(tmp_path / "b", 1, mode="P", ext=".bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, 16, train=True)
    assert len(ds) == 5
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 16, 16)
        assert item["image"].dtype == torch.float32
        assert 0 <= item["image"].min() and item["image"].max() <= 1
    # Not every image sits in a class sub-folder (notes aside, all do) → classes a and b.
    assert ds.class_names == ["a", "b"]


def test_eval_crop_is_deterministic_and_centered(tmp_path):
    arr = np.zeros((30, 50, 3), dtype=np.uint8)
    arr[:, 25:] = 255  # right half white
    Image.fromarray(arr).save(tmp_path / "x.png")
    ds = ImageFolderDataset(tmp_path, 30, train=False)
    a, b = ds[0]["image"], ds[0]["image"]
    assert torch.equal(a, b)
    # Shorter side 30 already: the centre 30×30 crop spans columns 10..40, half black half white.
    assert abs(float(a.mean()) - 0.5) < 0.05


def test_training_augmentation_depends_on_stream_position_only(tmp_path):
    _write_images(tmp_path, 1, size=(64, 48))
    ds = ImageFolderDataset(tmp_path, 16, train=True, seed=3)
    x1, x2, x3 = ds[(0, 5)]["image"], ds[(0, 5)]["image"], ds[(0, 6)]["image"]
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, x3)


def test_corrupt_files_are_skipped_and_counted(tmp_path, caplog):
    good = _write_images(tmp_path, 3)
    (tmp_path / "zz_garbage.png").write_bytes(b"definitely not a png")
    data = good[0].read_bytes()
    (tmp_path / "zz_truncated.png").write_bytes(data[: len(data) // 2])
    ds = ImageFolderDataset(tmp_path, 16, train=True)
    assert len(ds) == 5
    with caplog.at_level(logging.WARNING):
        batch = collate([ds[(i, i)] for i in range(len(ds))])
    # Training keeps the batch size: unreadable files are replaced by the next readable image.
    assert batch["image"].shape[0] == 5
    assert sorted({Path(p).name for p in batch["skipped"]}) == ["zz_garbage.png", "zz_truncated.png"]
    assert "skipping unreadable image" in caplog.text
    # Evaluation drops them instead, so no image is counted twice.
    ev = ImageFolderDataset(tmp_path, 16, train=False)
    batch = collate([ev[i] for i in range(len(ev))])
    assert batch["image"].shape[0] == 3
    assert len(batch["skipped"]) == 2


def test_no_readable_image_is_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    (tmp_path / "b.jpg").write_bytes(b"more junk")
    with pytest.raises(ValueError, match="no readable image"):
        ImageFolderDataset(tmp_path, 16)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(empty, 16)


def test_build_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a built-in dataset"):
        build_dataset(str(tmp_path / "missing"), 16)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="expected a folder"):
        build_dataset(str(tmp_path / "x.txt"), 16)


@pytest.mark.parametrize("layout", ["nhwc_uint8", "nchw_float", "gray"])
def test_array_dataset_layouts(tmp_path, layout):
    # Image i is one flat colour, different per channel and per image, so a misread layout (channels taken for
    # rows, or uint8 not scaled to [0, 1]) shows in the values, not only in the shape.
    colours = np.array([[1.0, 0.5, 0.0], [0.0, 0.25, 0.75], [0.2, 0.2, 0.2], [0.6, 0.0, 1.0]])
    if layout == "nhwc_uint8":
        arr = np.round(255 * colours[:, None, None, :] * np.ones((1, 20, 20, 1))).astype(np.uint8)
    elif layout == "nchw_float":
        arr = (colours[:, :, None, None] * np.ones((1, 1, 20, 20))).astype(np.float32)
    else:
        colours = colours[:, :1].repeat(3, axis=1)  # grey: the first channel's level, shown in RGB
        arr = np.round(255 * colours[:, None, None, 0] * np.ones((1, 20, 20))).astype(np.uint8)
    np.save(tmp_path / "a.npy", arr)
    ds = build_dataset(str(tmp_path / "a.npy"), 16, train=False)
    assert isinstance(ds, ArrayDataset) and len(ds) == 4
    for i in range(4):
        x = ds[i]["image"]
        assert x.shape == (3, 16, 16)
        expected = torch.tensor(colours[i], dtype=torch.float32)[:, None, None].expand(3, 16, 16)
        torch.testing.assert_close(x, expected, atol=1 / 255, rtol=0)


def test_npz_with_labels_and_without_pickle(tmp_path):
    imgs = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.array([0, 2, 1]))
    ds = ArrayDataset(tmp_path / "d.npz", 8, train=False)
    assert [ds[i]["label"] for i in range(3)] == [0, 2, 1]
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="could not read"):
        ArrayDataset(tmp_path / "obj.npy", 8)
    np.savez(tmp_path / "wrong.npz", pictures=imgs)
    with pytest.raises(ValueError, match="'images'"):
        ArrayDataset(tmp_path / "wrong.npz", 8)


def test_photos_split_is_by_whole_photograph():
    assert not set(PHOTOS_TRAIN) & set(PHOTOS_EVAL)
    ev = PhotosDataset(32, train=False)
    tr = PhotosDataset(32, train=True)
    # Evaluation is a fixed tiling: same content every time, every tile distinct.
    tiles = torch.stack([ev[i]["image"] for i in range(len(ev))])
    assert len(ev) >= 32
    assert torch.equal(tiles[0], ev[0]["image"])
    assert tr[(0, 1)]["image"].shape == (3, 32, 32)
    # No evaluation tile appears in the training photographs' pixels (checked on the first tile).
    first = (tiles[0] * 255).round().byte().permute(1, 2, 0).numpy()
    for photo in tr.photos:
        h, w = photo.shape[:2]
        windows = np.lib.stride_tricks.sliding_window_view(photo, (32, 32, 3))[::4, ::4, 0]
        assert not (windows == first).all(axis=(2, 3, 4)).any(), (h, w)


def test_step_sampler_split_and_resume_match_single_process():
    n, batch = 10, 4
    one = StepSampler(n, batch, seed=1)
    it = iter(one)
    single = [next(it) for _ in range(batch * 6)]  # 6 steps, crossing epochs
    # Two processes: each takes its contiguous half of every global batch.
    halves = []
    for r in range(2):
        it_r = iter(StepSampler(n, batch, rank=r, world=2, seed=1))
        halves.append([next(it_r) for _ in range(2 * 6)])
    merged = []
    for s in range(6):
        merged += halves[0][2 * s : 2 * s + 2] + halves[1][2 * s : 2 * s + 2]
    assert merged == single
    # Resuming at step 3 continues the same stream.
    it3 = iter(StepSampler(n, batch, seed=1, start_step=3))
    assert [next(it3) for _ in range(batch * 3)] == single[batch * 3 :]
    # Each epoch visits every item once.
    assert sorted(i for i, _ in single[:n]) == list(range(n))
    with pytest.raises(ValueError, match="not divisible"):
        StepSampler(n, 5, world=2)


def test_loader_with_workers_reports_skips(tmp_path):
    _write_images(tmp_path, 3)
    (tmp_path / "bad.png").write_bytes(b"xx")
    ds = ImageFolderDataset(tmp_path, 8, train=True)
    loader = DataLoader(ds, batch_size=4, sampler=StepSampler(len(ds), 4), num_workers=1, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 8, 8)
    assert [Path(p).name for p in batch["skipped"]] == ["bad.png"]


def test_labels_from_csv(tmp_path):
    _write_images(tmp_path / "imgs", 3)
    (tmp_path / "labels.csv").write_text("path,label\nimg0.png,zebra\nimg1.png,ant\nimg2.png,zebra\n")
    ds = ImageFolderDataset(tmp_path / "imgs", 8, train=False, labels_csv=tmp_path / "labels.csv")
    assert ds.class_names == ["ant", "zebra"]
    assert [ds[i]["label"] for i in range(3)] == [1, 0, 1]
    (tmp_path / "short.csv").write_text("path,label\nimg0.png,zebra\n")
    with pytest.raises(ValueError, match="no label for 2 image"):
        ImageFolderDataset(tmp_path / "imgs", 8, labels_csv=tmp_path / "short.csv")


def test_digits_builtin_split_and_labels():
    tr, ev = build_dataset("digits", 32, train=True), build_dataset("digits", 32, train=False)
    assert len(tr) + len(ev) == 1797 and len(ev) == 360
    assert tr.class_names == [str(i) for i in range(10)]
    assert sorted({ev[i]["label"] for i in range(len(ev))}) == list(range(10))
    x = tr[0]["image"]
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1])  # grey ink shown in RGB
