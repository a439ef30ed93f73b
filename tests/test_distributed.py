"""A two-process CPU run through `accelerate launch` (gloo) equals a one-process run of the same global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def _launch(args: list[str], env: dict) -> None:
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (
        f"{' '.join(args)}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"
    )


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate CLI not installed")  # fmt: skip
def test_two_process_gloo_run_matches_one_process(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "images.npy"
    np.save(data, rng.integers(0, 255, (32, 40, 40, 3), dtype=np.uint8))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    accelerate = str(Path(sys.executable).parent / "accelerate")
    two, one = tmp_path / "two", tmp_path / "one"
    _launch(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "29517", str(HERE / "dist_train.py"), str(two), str(data)],
        env,
    )  # fmt: skip
    _launch([sys.executable, str(HERE / "dist_train.py"), str(one), str(data)], env)

    r0, r1 = load_file(two / "rank0.safetensors"), load_file(two / "rank1.safetensors")
    single = load_file(one / "rank0.safetensors")
    assert r0.keys() == r1.keys() == single.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"processes disagree on {k}"
        torch.testing.assert_close(
            r0[k], single[k], rtol=1e-4, atol=1e-5, msg=f"2-process run differs on {k}"
        )
    # The runs did train (weights moved away from the initialisation of the same seed).
    from vqim import Tokenizer

    torch.manual_seed(0)
    init = Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, dead_code_window=2).state_dict()
    moved = [k for k in init if not torch.equal(init[k], single[k])]
    assert len(moved) > len(init) // 2


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate CLI not installed")  # fmt: skip
def test_two_process_evaluation_equals_one_process(tmp_path):
    import json

    from PIL import Image

    from vqim import Tokenizer

    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(11):  # odd: the processes get unequal shares
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    torch.manual_seed(0)
    Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, codebook_size=64).save_pretrained(tmp_path / "tok")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    accelerate = str(Path(sys.executable).parent / "accelerate")
    vqim = str(Path(sys.executable).parent / "vqim")
    args = ["eval-tokenizer", "--tokenizer", str(tmp_path / "tok"), "--data", str(folder), "--batch-size", "2",
            "--no-progress", "--lpips", "off", "--fid", "off"]  # fmt: skip
    _launch(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "29518", "-m", "vqim.cli", *args, "--out", str(tmp_path / "two")],
        env,
    )  # fmt: skip
    _launch([vqim, *args, "--out", str(tmp_path / "one")], env)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert one["images"] == two["images"] == 11 and one["skipped_files"] == two["skipped_files"] == 1
    assert one.pop("processes") == 1 and two.pop("processes") == 2
    assert set(one) == set(two)
    for k, v in one.items():
        if isinstance(v, float):
            assert two[k] == pytest.approx(v, rel=1e-5), k
        else:
            assert two[k] == v, k
