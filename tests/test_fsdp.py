"""Sharded training (`--fsdp`, PyTorch FSDP2) on two gloo CPU processes: the same weights, weight average and
optimizer state as one unsharded process, across a resume, with checkpoints any run can resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vqim.cli import main
from vqim.train.prior import PriorTrainConfig, train_prior

pytestmark = pytest.mark.usefixtures("one_thread")

BIN = Path(sys.executable).parent
GRID, CODES = (4, 4), 32
ARGS = {"preset": "vim-tiny", "dim": 32, "depth": 2, "heads": 2, "mlp_dim": 64, "batch_size": 8, "grad_accum": 2,
        "val_every": 6, "eval_every": 2, "dropout": 0.0, "class_dropout": 0.0, "lr": 3e-3, "log_every": 1, "ckpt_every": 2,
        "ema_decay": 0.6, "num_workers": 0}  # fmt: skip


def _flags(**kw) -> list[str]:
    out = []
    for k, v in {**ARGS, **kw}.items():
        if v is True:
            out.append(f"--{k.replace('_', '-')}")
        elif v is not False:
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def _train_in_process(tokens: Path, out: Path, **kw) -> dict:
    model = {k: ARGS[k] for k in ("dim", "depth", "heads", "mlp_dim")}
    settings = {k: v for k, v in ARGS.items() if k not in model}
    cfg = PriorTrainConfig(
        tokens=str(tokens), out=str(out), model=model, progress=False, **{**settings, **kw}
    )
    return train_prior(cfg)


def _launch_two(tokens: Path, out: Path, port: int, **kw) -> None:
    args = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "vqim.cli",
            "train-prior", "--tokens", str(tokens), "--out", str(out), "--no-progress", *_flags(**kw)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": "1"}
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (
        f"{' '.join(args)}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"
    )


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{what}: {k}")


def _interrupted_copy(run: Path, dest: Path, step: int) -> None:
    """dest holds what `run` would have left if killed after its checkpoint at `step`."""
    name = f"step-{step:07d}"
    shutil.copytree(run / "checkpoints" / name, dest / "checkpoints" / name)
    shutil.copy(run / "train_config.json", dest / "train_config.json")


@pytest.mark.skipif(not (BIN / "accelerate").exists(), reason="accelerate CLI not installed")
def test_sharded_training_equals_one_process_and_resumes_either_way(tmp_path, token_folder):
    tokens = token_folder(tmp_path / "tokens", GRID, CODES)
    one = tmp_path / "one"
    _train_in_process(tokens, one, steps=4)

    fsdp = tmp_path / "fsdp"
    _launch_two(tokens, fsdp, 29541, steps=4, fsdp=True)
    summary = json.loads((fsdp / "metrics.json").read_text())
    assert summary["processes"] == 2 and summary["sharded"] is True
    whole = json.loads((one / "metrics.json").read_text())["weight_bytes_per_process"]
    assert whole / 2 <= summary["weight_bytes_per_process"] <= whole / 2 + 4096  # half each, up to padding
    for name in ("model.safetensors", "ema.safetensors"):
        _assert_same(load_file(fsdp / name), load_file(one / name), f"sharded {name}")
    # Validation (every 2 steps, before each checkpoint) runs on the sharded model and measures what one process does.
    val = [json.loads((run / "metrics.json").read_text())["val_bits_per_token"] for run in (fsdp, one)]
    assert val[0] == pytest.approx(val[1], abs=1e-5), val
    # The checkpoint holds the whole optimizer state, numbered like an unsharded run's.
    state = "checkpoints/step-0000004/training_state.safetensors"
    _assert_same(load_file(fsdp / state), load_file(one / state), "optimizer state")
    assert json.loads((fsdp / "checkpoints/step-0000004/training_state.json").read_text())["world_size"] == 2

    # Stopped after its step-2 checkpoint, the sharded run resumes sharded, or unsharded on one process; and the
    # one-process run's step-2 checkpoint resumes sharded on two.
    again = tmp_path / "again"
    _interrupted_copy(fsdp, again, 2)
    _launch_two(tokens, again, 29542, steps=4, fsdp=True, resume=True)
    back = tmp_path / "back"
    _interrupted_copy(fsdp, back, 2)
    _train_in_process(tokens, back, steps=4, resume=True)
    forth = tmp_path / "forth"
    _interrupted_copy(one, forth, 2)
    _launch_two(tokens, forth, 29543, steps=4, fsdp=True, resume=True)
    assert json.loads((forth / "metrics.json").read_text())["sharded"] is True
    for run in (again, back, forth):
        assert json.loads((run / "metrics.json").read_text())["steps_this_run"] == 2
        for name in ("model.safetensors", "ema.safetensors"):
            _assert_same(load_file(run / name), load_file(one / name), f"{run.name} {name}")


def test_the_tokenizer_trainer_refuses_fsdp(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-tokenizer", "--data", "photos", "--out", str(tmp_path / "t"), "--steps", "1", "--fsdp"])
    assert e.value.code == 2
    assert "--fsdp" in capsys.readouterr().err
