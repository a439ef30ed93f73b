"""No pixel silently wrong: 16-bit and float inputs are scaled or refused, never clipped; large images are
decoded at reduced size and once per file; metrics that are not finite are written as valid JSON."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
from PIL import Image

from vqim import InputError, data
from vqim.checkpoint import write_json
from vqim.data import ArrayDataset, ImageFolderDataset, load_rgb


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(load_rgb(tmp_path / "g16.png"))
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.abs(rgb[..., 0].astype(float) - ramp / 257).max() <= 0.5 + 1e-9
    assert rgb.min() == 0 and rgb.max() == 255 and (rgb < 250).mean() > 0.9  # not almost all white


def test_float_images_outside_0_1_are_refused_with_the_range_found(tmp_path):
    rng = np.random.default_rng(0)
    ok = rng.random((4, 16, 16, 3), dtype=np.float32)
    np.save(tmp_path / "ok.npy", ok)
    ds = ArrayDataset(tmp_path / "ok.npy", 16, train=False)
    assert np.abs(ds.images.astype(float) - ok * 255).max() <= 0.5 + 1e-4
    np.save(tmp_path / "x255.npy", ok * 255)
    with pytest.raises(
        InputError, match=r"x255.npy: float images must lie in \[0, 1\], found values in .*255"
    ):
        ArrayDataset(tmp_path / "x255.npy", 16)
    bad = ok.copy()
    bad[0, 0, 0, 0], bad[1, 1, 1, 1] = np.nan, np.inf
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(InputError, match="nan.npy: the images hold 2 NaN or infinite values"):
        ArrayDataset(tmp_path / "nan.npy", 16)
    np.save(tmp_path / "u16.npy", (ok * 65535).astype(np.uint16))
    with pytest.raises(InputError, match="u16.npy: integer images must lie in .*divide by 257"):
        ArrayDataset(tmp_path / "u16.npy", 16)
    np.save(tmp_path / "i64.npy", (ok * 255).astype(np.int64))  # integers in range are fine
    assert ArrayDataset(tmp_path / "i64.npy", 16).images.dtype == np.uint8


@pytest.mark.parametrize("labels", [np.array([0.5, 1, 0, 1]), np.array([0, -1, 0, 1]), np.zeros((4, 2), int)])
def test_float_negative_or_2d_labels_are_refused(tmp_path, labels):
    images = np.zeros((4, 16, 16, 3), np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    with pytest.raises(InputError, match="d.npz: 'labels' must be one non-negative integer per image"):
        ArrayDataset(tmp_path / "d.npz", 16)


def test_a_large_image_is_decoded_at_reduced_size_once_per_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(data, "LARGE_PIXELS", 100 * 100)
    rng = np.random.default_rng(0)
    (tmp_path / "f").mkdir()
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(tmp_path / "f" / "big.jpg")
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(tmp_path / "f" / "big.png")
    for name in ("big.jpg", "big.png"):
        im = load_rgb(tmp_path / "f" / name, min_side=32)
        assert 32 <= min(im.size) < 2 * 32 * 2 and im.info["vqim_large"]  # JPEG draft / box reduction
    full = np.asarray(load_rgb(tmp_path / "f" / "big.png"))
    assert full.shape == (480, 640, 3)

    calls = []
    real = data.load_rgb
    monkeypatch.setattr(data, "load_rgb", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    ds = ImageFolderDataset(tmp_path / "f", 32, train=True)
    calls.clear()
    crops = [ds[(i % 2, i)]["image"] for i in range(10)]
    assert len(calls) == 2 and all(c.shape == (3, 32, 32) for c in crops)  # one decode per file
    # The reduced decode gives the picture a direct resize gives (the same image, up to resampling).
    direct = np.asarray(data.resize_shorter(Image.fromarray(full), 32)).astype(float)
    reduced = np.asarray(data.resize_shorter(real(tmp_path / "f" / "big.png", min_side=32), 32)).astype(float)
    assert np.abs(direct - reduced).mean() < 4


def test_pixel_limit_refuses_and_the_bomb_warning_is_not_repeated(tmp_path, monkeypatch, caplog):
    Image.fromarray(np.zeros((200, 300, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(
        InputError, match=r"a.png: 300×200 = 60000 pixels exceeds the limit of 1000.*VQIM_MAX_PIXELS"
    ):
        load_rgb(tmp_path / "a.png", max_pixels=1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)  # PIL would warn on every open of a.png
    monkeypatch.setattr(data, "LARGE_PIXELS", 10000)
    data._announced.discard(str(tmp_path / "a.png"))
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO, logger="vqim.data"):
        warnings.simplefilter("always")
        for _ in range(5):
            load_rgb(tmp_path / "a.png", max_pixels=10**6)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert sum("large image" in r.getMessage() for r in caplog.records) == 1
    # Above PIL's own bomb limit but within vqim's: read, since vqim's limit is what the user set.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10000)
    assert load_rgb(tmp_path / "a.png", max_pixels=10**6).size == (300, 200)
    # A folder with an oversized file skips and counts it instead of crashing.
    (tmp_path / "f").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "f" / "small.png")
    (tmp_path / "a.png").rename(tmp_path / "f" / "a.png")
    monkeypatch.setattr(data, "MAX_PIXELS", 5000)
    ds = ImageFolderDataset(tmp_path / "f", 32, train=False)
    items = [ds[i] for i in range(len(ds))]
    assert sum(it["image"] is None for it in items) == 1 and items[0]["skipped"][0].endswith("a.png")


def test_non_finite_metrics_are_valid_json_with_a_reason(tmp_path):
    write_json(
        tmp_path / "m.json", {"psnr": float("nan"), "fid": float("inf"), "ok": 1.5, "xs": [float("nan")]}
    )
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    m = json.loads(text)
    assert m == {"psnr": None, "psnr_not_finite": "nan", "fid": None, "fid_not_finite": "inf", "ok": 1.5,
                 "xs": [None]}  # fmt: skip


@pytest.mark.parametrize("mode", ["P", "1", "I;16"])
def test_large_palette_bilevel_and_16_bit_images_are_reduced_after_conversion(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(data, "LARGE_PIXELS", 100 * 100)
    arr = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    im = {
        "P": im.convert("P"),
        "1": im.convert("1"),
        "I;16": Image.fromarray(arr[..., 0].astype(np.uint16) * 257),
    }[mode]
    im.save(tmp_path / "big.png")
    out = load_rgb(tmp_path / "big.png", min_side=32)
    assert out.mode == "RGB" and 32 <= min(out.size) < 64
