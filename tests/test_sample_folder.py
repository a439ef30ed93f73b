"""Sampling to a folder: each sample's randomness is its own (batch size and process count change nothing), an
interrupted run resumes without repeating or skipping a sample, classes are balanced, samples.npz matches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqim import InputError, Prior, Tokenizer
from vqim.checkpoint import write_json
from vqim.config import SamplingConfig, get_tokenizer_config
from vqim.samples import SampleConfig, sample_to_folder
from vqim.sampling import generate, row_seed
from vqim.tokens import tokenizer_identity

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    tok = Tokenizer(get_tokenizer_config("vit-vqgan-tiny", image_size=16, codebook_size=16, enc_depth=1,
                                         dec_depth=1))  # fmt: skip
    tok.save_pretrained(root / "tok")
    prior = Prior.from_preset("vim-tiny", vocab_size=16, grid_size=(2, 2), num_classes=3, depth=1, dim=32,
                              heads=2, mlp_dim=64)  # fmt: skip
    prior.save_pretrained(root / "prior")
    ident = tokenizer_identity(Tokenizer.from_pretrained(root / "tok"))
    write_json(
        root / "prior" / "tokens.json", {"tokens": "t", **ident, "grid_size": [2, 2], "codebook_size": 16}
    )
    return root / "prior", root / "tok"


def _cfg(pair, out, **kw) -> SampleConfig:
    base = {"prior": str(pair[0]), "tokenizer": str(pair[1]), "out": str(out), "device": "cpu",
            "progress": False, "sampling": SamplingConfig(seed=3, top_k=8)}  # fmt: skip
    return SampleConfig(**{**base, **kw})


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("class*.png"))}


def test_each_sample_draws_from_its_own_stream():
    torch.manual_seed(0)
    prior = Prior.from_preset("vim-tiny", vocab_size=16, grid_size=(3, 3), num_classes=2, depth=1, dim=32,
                              heads=2, mlp_dim=64).eval()  # fmt: skip
    seeds = [row_seed(7, i) for i in range(5)]
    labels = torch.tensor([0, 1, 0, 1, 0])
    for kw in ({}, {"cfg_scale": 2.0, "top_p": 0.9}):
        together = generate(prior, 5, labels, row_seeds=seeds, **kw)
        alone = torch.cat(
            [generate(prior, 1, labels[i : i + 1], row_seeds=seeds[i : i + 1], **kw) for i in range(5)]
        )
        assert torch.equal(together, alone)
    assert len(set(seeds)) == 5 and row_seed(7, 0) != row_seed(8, 0)
    # Inverse-CDF draws follow the distribution: one position, many rows, frequencies near the probabilities.
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(20000, 4)
    from vqim.sampling import row_uniforms, sample_logits

    ids = sample_logits(logits, uniform=row_uniforms(range(20000), 1, "cpu")[:, 0])
    freq = torch.bincount(ids, minlength=4).double() / 20000
    assert torch.allclose(freq, logits[0].softmax(-1).double(), atol=0.015)


def test_batch_size_does_not_change_the_samples_and_classes_are_balanced(pair, tmp_path):
    a = sample_to_folder(_cfg(pair, tmp_path / "a", per_class=3, batch_size=4, npz=True))
    sample_to_folder(_cfg(pair, tmp_path / "b", n=9, batch_size=9))
    assert a["images"] == 9 and a["classes"] == [0, 1, 2] and a["written"] == 9
    pa, pb = _pixels(tmp_path / "a"), _pixels(tmp_path / "b")
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert sorted(k.split("_")[0] for k in pa) == ["class0"] * 3 + ["class1"] * 3 + ["class2"] * 3
    assert Image.open(tmp_path / "a" / "grid.png").size == (3 * 18 + 2, 3 * 18 + 2)  # a row per class
    with np.load(tmp_path / "a" / "samples.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (9, 16, 16, 3) and images.dtype == np.uint8 and labels.tolist() == [0, 1, 2] * 3
    assert np.array_equal(images[4], pa["class1_0004.png"])
    rec = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert rec["complete"] and rec["n"] == 9 and rec["sampling"]["seed"] == 3


def test_an_interrupted_run_resumes_without_repeating_or_skipping(pair, tmp_path, monkeypatch):
    full = tmp_path / "full"
    sample_to_folder(_cfg(pair, full, n=7, batch_size=3))
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for name in ("class1_0001.png", "class0_0003.png", "class0_0006.png"):  # killed before these were written
        (part / name).unlink()
    import vqim.sampling

    drawn = []
    real = vqim.sampling.generate_images
    monkeypatch.setattr(vqim.sampling, "generate_images", lambda *a, **k: drawn.append(a[2]) or real(*a, **k))
    res = sample_to_folder(_cfg(pair, part, n=7, batch_size=2))
    assert res["written"] == 3 and res["resumed"] == 4 and sum(drawn) == 3
    pf, pp = _pixels(full), _pixels(part)
    assert pf.keys() == pp.keys() and all(np.array_equal(pf[k], pp[k]) for k in pf)
    # A larger --n adds samples; the first ones stay what they were.
    res = sample_to_folder(_cfg(pair, part, n=9, batch_size=4))
    assert res["written"] == 2 and len(_pixels(part)) == 9
    # Other settings are refused, as is a folder of images vqim did not write.
    with pytest.raises(InputError, match="holds samples of other settings.*sampling"):
        sample_to_folder(_cfg(pair, part, n=9, sampling=SamplingConfig(seed=4, top_k=8)))
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "photos" / "x.png")
    with pytest.raises(InputError, match="did not write"):
        sample_to_folder(_cfg(pair, tmp_path / "photos", n=2))
    with pytest.raises(InputError, match="not both"):
        _cfg(pair, tmp_path / "y", n=2, per_class=2)


@pytest.mark.skipif(
    not (Path(sys.executable).parent / "accelerate").exists(), reason="accelerate CLI not installed"
)
def test_two_processes_write_the_folder_one_process_writes(pair, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--prior", str(pair[0]), "--tokenizer", str(pair[1]), "--n", "10", "--batch-size", "3", "--seed",
              "3", "--top-k", "8", "--no-progress", "--npz"]  # fmt: skip
    sample_to_folder(_cfg(pair, one, n=10, batch_size=3, npz=True))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": "1"}
    accelerate = str(Path(sys.executable).parent / "accelerate")
    r = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
         "no", "--dynamo_backend", "no", "--main_process_port", "29523", "-m", "vqim.cli", "sample", *common,
         "--out", str(two)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    assert (
        json.loads(r.stdout)["processes"] == 2
    )  # the processes shared the work (one JSON, from the main one)
    p1, p2 = _pixels(one), _pixels(two)
    assert len(p1) == 10 and p1.keys() == p2.keys() and all(np.array_equal(p1[k], p2[k]) for k in p1)
    with np.load(one / "samples.npz") as z1, np.load(two / "samples.npz") as z2:
        assert np.array_equal(z1["arr_0"], z2["arr_0"]) and np.array_equal(z1["arr_1"], z2["arr_1"])
    assert json.loads((two / "samples.json").read_text())["complete"]


def test_inverse_cdf_draws_never_pick_a_filtered_token_and_negative_seeds_work():
    from vqim.sampling import sample_logits

    logits = torch.tensor([[5.0, 4.0, 0.0, -3.0, -8.0]]).expand(3, 5)
    u = torch.tensor([1 - 1e-12, 0.999999999, 0.0], dtype=torch.float64)
    ids = sample_logits(logits, top_p=0.9, uniform=u)
    assert ids.tolist()[0] in (0, 1) and ids.tolist()[1] in (0, 1) and ids.tolist()[2] == 0
    assert sample_logits(logits, uniform=torch.full((3,), 1 - 1e-12, dtype=torch.float64)).max() <= 4
    assert row_seed(-1, 0) != row_seed(0, 0) and row_seed(-1, 0) >= 0
