"""Evaluation entry points: reconstructing image files, the processes of an evaluation, the prior's commands'
input checks, and the probe's data split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vqim import InputError, Prior, Tokenizer
from vqim.evaluate import (
    EvalPriorConfig,
    ProbeConfig,
    evaluate_prior,
    evaluation_processes,
    linear_probe,
    load_center_crop,
    reconstruct_files,
)
from vqim.metrics import psnr


def test_load_center_crop_resizes_the_shorter_side_then_crops_the_middle(tmp_path):
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, 20:60] = 255  # a white middle half: exactly what a centre crop of the 20×40 resize keeps
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x = load_center_crop(tmp_path / "wide.png", 20)
    assert x.shape == (3, 20, 20) and x.dtype == torch.float32
    assert x[:, :, 2:-2].min() > 0.95  # bicubic ringing aside, all white
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_center_crop(tmp_path / "missing.png", 20)


def test_reconstruct_files_writes_pairs_and_psnr(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, codebook_size=64).eval()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    # A named file that cannot be read is refused before anything is written.
    with pytest.raises(InputError, match="broken.png: not a readable image"):
        reconstruct_files(tok, [str(tmp_path / "a.png"), str(tmp_path / "broken.png")], tmp_path / "out")
    assert not (tmp_path / "out" / "a_reconstruction.png").exists()
    res = reconstruct_files(tok, [str(tmp_path / "a.png")], tmp_path / "out")
    assert list(res) == [str(tmp_path / "a.png")]
    pair = np.asarray(Image.open(res[str(tmp_path / "a.png")]["png"]))
    assert pair.shape == (32, 64, 3)  # input | reconstruction
    x = load_center_crop(tmp_path / "a.png", 32)[None]
    with torch.no_grad():
        expected = float(psnr(tok.decode(tok.encode(x)), x)[0])
    assert res[str(tmp_path / "a.png")]["psnr"] == pytest.approx(expected, abs=1e-3)
    assert np.abs(pair[:, :32].astype(np.float32) / 255 - x[0].permute(1, 2, 0).numpy()).max() <= 1 / 255
    with pytest.raises(FileNotFoundError):
        reconstruct_files(tok, [str(tmp_path / "missing.png")], tmp_path / "out")


def _not_launched(monkeypatch) -> None:
    from vqim.distributed import LAUNCHER_VARS

    for size_var, _ in LAUNCHER_VARS:
        monkeypatch.delenv(size_var, raising=False)


def test_one_process_evaluation(monkeypatch):
    _not_launched(monkeypatch)
    procs = evaluation_processes("cpu")
    assert (procs.device, procs.main, procs.distributed) == (torch.device("cpu"), True, False)
    assert evaluation_processes("auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("size_var", ["WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
def test_launched_evaluation_takes_its_share(monkeypatch, size_var):
    """Under torchrun's or MPI's variables (Accelerate sets WORLD_SIZE from MPI's only once it starts), every
    process joins the launch's group."""
    from types import SimpleNamespace

    from vqim import distributed

    _not_launched(monkeypatch)
    monkeypatch.setenv(size_var, "2")
    state = SimpleNamespace(device="cpu", is_main_process=False, num_processes=2)
    monkeypatch.setattr(distributed, "process_state", lambda: state)
    procs = evaluation_processes("cpu")
    assert (procs.device, procs.main, procs.distributed) == (torch.device("cpu"), False, True)
    # Launched, but the processes did not form one group (mpirun with GPUs): refused, not run N times over.
    monkeypatch.setattr(distributed, "process_state", lambda: SimpleNamespace(device="cpu", is_main_process=True,
                                                                              num_processes=1))  # fmt: skip
    with pytest.raises(InputError, match="did not join one group"):
        evaluation_processes("cpu")


def test_prior_commands_check_their_input(tmp_path):
    Prior.from_preset("vim-tiny", vocab_size=64, grid_size=(4, 4), num_classes=10, depth=2).save_pretrained(
        tmp_path / "p"
    )
    Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, codebook_size=64).save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match="both a tokenizer and --data digits"):
        evaluate_prior(
            EvalPriorConfig(prior=str(tmp_path / "p"), tokens=str(tmp_path), tokenizer=str(tmp_path))
        )
    probe = dict(
        prior=str(tmp_path / "p"), tokenizer=str(tmp_path / "t"), data="digits", out=str(tmp_path / "o")
    )
    with pytest.raises(ValueError, match=r"blocks must be in \[0, 2\)"):
        linear_probe(ProbeConfig(**probe, blocks="0,2", device="cpu"))
    with pytest.raises(ValueError, match="comma-separated integers"):
        linear_probe(ProbeConfig(**probe, blocks="first", device="cpu"))
    # A tokenizer whose codebook does not fit the prior's vocabulary is refused when the pair is loaded.
    Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, codebook_size=32).save_pretrained(tmp_path / "t32")
    with pytest.raises(ValueError, match="does not fit the prior"):
        linear_probe(ProbeConfig(**{**probe, "tokenizer": str(tmp_path / "t32")}, device="cpu"))
