"""Training crops from one very large image: seconds and peak memory of the data path, printed as JSON.

A 12000×12000 photograph-like image (a smooth pattern with noise, written once as JPEG and as PNG) sits in an
image folder; a training run draws random 32×32 crops from it. Measured for each format:

- `full_decode`: what the data path did before: every crop decodes the whole file, then resizes it (the
  reference, at the same crops);
- `dataset`: `vqim.data.ImageFolderDataset` as it is: the file is decoded at reduced size (JPEG draft / box
  reduction to no less than the crop side) and only once per process, then every crop comes from the kept
  resized pixels.

Each row gives seconds per crop over `--crops` crops and the process's peak resident memory growth while it ran
(VmHWM, each row in its own child process). The ratio full/dataset is the speed-up in one run.
Usage:
    python benchmarks/large_images.py [--side 12000] [--crops 32]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _make(side: int, folder: Path) -> dict[str, Path]:
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    rng = np.random.default_rng(0)
    base = np.stack([np.sin(9 * x + 3 * y), np.cos(7 * y - 2 * x), np.sin(5 * (x + y))], -1) * 100 + 128
    img = np.clip(base + rng.normal(0, 8, (side, side, 1)).astype(np.float32), 0, 255).astype(np.uint8)
    paths = {}
    for fmt in ("jpg", "png"):
        d = folder / fmt
        d.mkdir()
        Image.MAX_IMAGE_PIXELS = None
        Image.fromarray(img).save(
            d / f"big.{fmt}", **({"quality": 90} if fmt == "jpg" else {"compress_level": 1})
        )
        paths[fmt] = d
    return paths


def _hwm_mb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _run(mode: str, folder: str, crops: int, queue) -> None:
    import vqim.data as data

    base = _hwm_mb()
    ds = data.ImageFolderDataset(folder, 32, train=True)
    t = time.perf_counter()
    for i in range(crops):
        if mode == "full_decode":
            file = ds.files[0]
            Image.MAX_IMAGE_PIXELS = None
            with Image.open(file) as im:
                arr = np.asarray(data.resize_shorter(im.convert("RGB"), 32))
            data._crop(arr, 32, np.random.default_rng(i), flip=True)
        else:
            ds[(0, i)]
    seconds = time.perf_counter() - t
    queue.put(
        {"seconds_per_crop": round(seconds / crops, 4), "peak_rss_growth_mb": round(_hwm_mb() - base, 1)}
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", type=int, default=12000)
    ap.add_argument("--crops", type=int, default=32)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    out: dict = {"side": args.side, "crops": args.crops, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = _make(args.side, Path(tmp))
        for fmt, folder in paths.items():
            row = {}
            for mode in ("full_decode", "dataset"):
                crops = args.crops if mode == "dataset" else max(2, args.crops // 8)  # the reference is slow
                q = ctx.Queue()
                p = ctx.Process(target=_run, args=(mode, str(folder), crops, q))
                p.start()
                row[mode] = q.get()
                p.join()
            row["speedup"] = round(
                row["full_decode"]["seconds_per_crop"] / row["dataset"]["seconds_per_crop"], 1
            )
            out["rows"][fmt] = row
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
