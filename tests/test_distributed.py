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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": "1"}
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": "1"}
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


def _two_processes(port: int) -> list[str]:
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
            "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "vqim.cli"]  # fmt: skip


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate CLI not installed")  # fmt: skip
def test_two_process_encode_and_prior_training_equal_one_process(tmp_path):
    """`vqim encode` on 2 processes writes one token folder with the sequences of a 1-process run, in order; a
    prior trained on 2 processes ends with the weights of 1 process at the same global batch."""
    import json

    from PIL import Image

    from vqim import Tokenizer
    from vqim.tokens import TokenDataset

    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(7):  # 14 images: unequal shares of 2 shards each with --shard-size 4
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    (folder / "a" / "broken.png").write_bytes(b"not a png")
    torch.manual_seed(0)
    Tokenizer.from_preset("vit-vqgan-tiny", image_size=32, codebook_size=64).save_pretrained(tmp_path / "tok")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": "1"}
    vqim = str(Path(sys.executable).parent / "vqim")
    enc = ["encode", "--tokenizer", str(tmp_path / "tok"), "--data", str(folder), "--shard-size", "4",
           "--batch-size", "3", "--no-progress"]  # fmt: skip
    _launch([*_two_processes(29531), *enc, "--out", str(tmp_path / "tok2")], env)
    _launch([vqim, *enc, "--out", str(tmp_path / "tok1")], env)
    m1 = json.loads((tmp_path / "tok1" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "tok2" / "manifest.json").read_text())
    assert m1["count"] == m2["count"] == 14 and m1["skipped_files"] == m2["skipped_files"] == 1
    assert m1["tokenizer_id"] == m2["tokenizer_id"] and m2["class_names"] == ["a", "b"]
    names = [s["tokens"] for s in m2["shards"]]
    assert len(set(names)) == len(names) and all(
        n.startswith(("tokens-p000-", "tokens-p001-")) for n in names
    )
    d1, d2 = TokenDataset(tmp_path / "tok1"), TokenDataset(tmp_path / "tok2")
    for i in range(14):
        a, b = d1[i], d2[i]
        assert torch.equal(a["tokens"], b["tokens"]) and a["label"] == b["label"], i

    train = ["train-prior", "--tokens", str(tmp_path / "tok1"), "--preset", "vim-tiny", "--steps", "3",
             "--batch-size", "4", "--val-every", "0", "--dropout", "0", "--class-dropout", "0", "--lr", "3e-3",
             "--no-progress", "--log-every", "1"]  # fmt: skip
    _launch([*_two_processes(29532), *train, "--out", str(tmp_path / "p2")], env)
    _launch([vqim, *train, "--out", str(tmp_path / "p1")], env)
    w1, w2 = (
        load_file(tmp_path / "p1" / "model.safetensors"),
        load_file(tmp_path / "p2" / "model.safetensors"),
    )
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=f"2-process prior differs on {k}")
    assert json.loads((tmp_path / "p2" / "metrics.json").read_text())["processes"] == 2


def _launch_env(**env: str) -> dict:
    """This environment with a launcher's variables as given, and none left over from the one that runs the tests
    (a process told its rank and a rendezvous address would wait for peers that never start)."""
    from vqim.distributed import LAUNCHER_VARS

    names = {
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        *(v for pair in LAUNCHER_VARS for v in pair),
    }
    base = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("ACCELERATE_")}
    return {**base, "OMP_NUM_THREADS": "1", **env}


# Runs the `vqim` command in a process of its own, with a marker of Python's teardown; argv[1] names a command to
# replace by one that raises (to see how an unexpected error ends).
ENTRY = """
import atexit, sys
import vqim.cli as cli
atexit.register(lambda: print("teardown ran", file=sys.stderr))
if sys.argv[1] != "keep":
    help_, add, _ = cli.COMMANDS["presets"]
    error = {"raise": RuntimeError("boom"), "interrupt": KeyboardInterrupt(), "exit": SystemExit("bye")}[sys.argv[1]]
    def boom(args):
        raise error
    cli.COMMANDS["presets"] = (help_, add, boom)
sys.argv = ["vqim", *sys.argv[2:]]
cli.entry()
"""


def test_a_launched_process_ends_without_teardown_keeping_its_output_and_status():
    """In a process of a multi-process launch the `vqim` command ends without Python's teardown, where releasing
    the process group that DDP / FSDP keep alive can abort a finished run; its output (flushed first) and its exit
    status are those of an ordinary run."""

    def run(env: dict, *argv: str, mode: str = "keep") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", ENTRY, mode, *argv], env=_launch_env(**env),
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    one, launched = run({}, "presets"), run({"WORLD_SIZE": "2", "RANK": "0"}, "presets")
    assert one.returncode == 0 and "teardown ran" in one.stderr, one.stderr
    assert launched.returncode == 0 and "teardown ran" not in launched.stderr, launched.stderr
    assert launched.stdout == one.stdout and len(one.stdout) > 1000  # block-buffered in a pipe: flushed first
    mpi = run({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, "presets")  # an mpirun launch
    assert mpi.returncode == 0 and "teardown ran" not in mpi.stderr and mpi.stdout == one.stdout
    bad = run({"WORLD_SIZE": "2"}, "sample", "--prior", "p", "--tokenizer", "t", "--out", "o", "--top-p", "2")
    assert bad.returncode == 2 and "teardown ran" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["error: top_p (--top-p) must be None or in (0, 1], got 2.0"]
    crash = run({"WORLD_SIZE": "2"}, "presets", mode="raise")  # an unexpected error: its traceback, status 1
    assert crash.returncode == 1 and "teardown ran" not in crash.stderr
    assert "Traceback" in crash.stderr and crash.stderr.strip().endswith("RuntimeError: boom")
    interrupted = run({"WORLD_SIZE": "2"}, "presets", mode="interrupt")
    assert interrupted.returncode == 130 and "KeyboardInterrupt" in interrupted.stderr
    message = run({"WORLD_SIZE": "2"}, "presets", mode="exit")  # SystemExit("bye"): printed, status 1
    assert message.returncode == 1 and message.stderr.strip().splitlines()[-1] == "bye"
    # Only the first process prints results; a rank left over from another launcher (no count) is no launch,
    # and neither is a count that is not a number.
    assert run({"WORLD_SIZE": "2", "RANK": "1"}, "presets").stdout == ""
    assert run({"RANK": "1"}, "presets").stdout == one.stdout
    assert (
        run({"WORLD_SIZE": "2", "PMI_RANK": "1"}, "presets").stdout == one.stdout
    )  # RANK (unset) is torchrun's
    odd = run({"WORLD_SIZE": "abc"}, "presets")
    assert odd.returncode == 0 and "teardown ran" in odd.stderr and odd.stdout == one.stdout
    # The Python API's main() returns to its caller, launch or not.
    script = "from vqim.cli import main; main(['presets']); print('returned')"
    api = subprocess.run([sys.executable, "-c", script], env=_launch_env(WORLD_SIZE="2"), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert api.returncode == 0 and api.stdout.strip().endswith("returned")


def test_only_the_first_launched_process_logs_progress():
    """Under a launch the other processes log warnings and errors only, so each info line is printed once."""
    argv = [
        "-m",
        "vqim.cli",
        "train-tokenizer",
        "--data",
        "no-such-folder",
        "--out",
        "o",
        "--preset",
        "vit-vqgan-tiny",
    ]

    def run(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *argv], env=_launch_env(**env), capture_output=True, text=True,
                              timeout=300)  # fmt: skip

    # No rendezvous address: the run stops with an error once the trainer starts, after the recipe line.
    first, other, mpi_other = (
        run(WORLD_SIZE="2", RANK="0"),
        run(WORLD_SIZE="2", RANK="1"),
        run(PMI_SIZE="2", PMI_RANK="1"),
    )
    assert first.returncode == other.returncode == 2
    assert "INFO vqim: recipe:" in first.stderr and "INFO" not in other.stderr, other.stderr
    assert mpi_other.returncode == 2 and "INFO" not in mpi_other.stderr, mpi_other.stderr
    assert mpi_other.stderr.strip().splitlines()[-1].startswith("error: ")
    assert other.stderr.strip().splitlines()[-1].startswith("error: ")  # errors still reach the user
