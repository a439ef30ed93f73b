"""One run per output folder: a second run is refused or replaces the first only once it has a checkpoint,
`--resume` continues the right run with its own settings, and leftovers of a killed run are cleaned."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from vqim.cli import main
from vqim.train import state as st

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--preset", "vit-vqgan-tiny", "--image-size", "32", "--batch-size", "4", "--num-workers", "0",
        "--no-progress", "--log-every", "1", "--lr", "1e-3", "--image-every", "100"]  # fmt: skip


@pytest.fixture()
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _train(folder: Path, out: Path, *extra: str) -> None:
    main(["train-tokenizer", "--data", str(folder), "--out", str(out), *TINY, *extra])


def _fail(argv_fn, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        argv_fn()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_second_run_in_the_same_folder_is_refused_and_the_first_stays_intact(tmp_path, folder, capsys):
    run = tmp_path / "run"
    _train(folder, run, "--steps", "4", "--ckpt-every", "2")
    before = {p: p.read_bytes() for p in [run / "model.safetensors", run / "train_config.json"]}
    ckpts = [p.name for p in st.list_checkpoints(run / "checkpoints")]

    # Without --resume or --overwrite: refused, nothing touched.
    err = _fail(lambda: _train(folder, run, "--steps", "2", "--ckpt-every", "1"), capsys)
    assert str(run) in err and "--resume" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in before} == before
    assert [p.name for p in st.list_checkpoints(run / "checkpoints")] == ckpts

    # --resume continues this run (step 4 → 6) with its optimizer state.
    _train(folder, run, "--steps", "6", "--ckpt-every", "2", "--resume")
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("step-0000004") and summary["steps"] == 6
    assert float(load_file(run / "checkpoints" / "step-0000006" / "training_state.safetensors")
                 ["opt.state.0.step"]) == 6.0  # fmt: skip


def test_settings_that_contradict_the_saved_run_are_refused_or_overridden_and_recorded(
    tmp_path, folder, capsys
):
    run = tmp_path / "run"
    _train(folder, run, "--steps", "2", "--ckpt-every", "2")
    # Another learning rate and other betas: refused with both differences listed.
    err = _fail(lambda: _train(folder, run, "--steps", "4", "--resume", "--lr", "5e-4", "--betas", "0.5", "0.9"),
                capsys)  # fmt: skip
    assert "--lr: saved 0.001, given 0.0005" in err and "--betas: saved [0.9, 0.99], given [0.5, 0.9]" in err
    assert "--override betas lr" in err
    # Another model size cannot be overridden: the checkpoint's weights have the saved architecture.
    err = _fail(lambda: _train(folder, run, "--steps", "4", "--resume", "--codebook-size", "256", "--override", "model"),
                capsys)  # fmt: skip
    assert "model" in err and "cannot be overridden" in err
    err = _fail(lambda: _train(folder, run, "--steps", "4", "--resume", "--preset", "vqgan-tiny"), capsys)
    assert "preset" in err
    # Longer runs, other logging and checkpoint intervals need no override.
    assert json.loads((run / "train_config.json").read_text())["overrides"] == []
    # An explicit override is applied and recorded with the step it took effect.
    _train(folder, run, "--steps", "4", "--ckpt-every", "1", "--log-every", "2", "--resume", "--lr", "5e-4",
           "--override", "lr")  # fmt: skip
    rec = json.loads((run / "train_config.json").read_text())
    assert rec["lr"] == 5e-4
    assert rec["overrides"] == [{"setting": "lr", "saved": 0.001, "given": 0.0005, "step": 2}]
    # Resuming beyond the run's end is refused; resuming a finished run at its own end is not an error.
    err = _fail(lambda: _train(folder, run, "--steps", "3", "--resume", "--lr", "5e-4"), capsys)
    assert "--steps 3" in err and "already at step 4" in err


def test_overwrite_replaces_the_old_run_only_at_the_new_runs_first_checkpoint(tmp_path, folder, capsys):
    run = tmp_path / "run"
    _train(folder, run, "--steps", "6", "--ckpt-every", "2", "--keep-checkpoints", "3")
    old_model = (run / "model.safetensors").read_bytes()

    # A new run that stops before its first checkpoint (non-finite losses at once is hard to provoke; a time
    # budget is not: it still checkpoints) - so interrupt the replacement by making the first checkpoint fail.
    import vqim.train.trainer as trainer_mod

    calls = []
    real = trainer_mod.save_checkpoint

    def failing(*a, **k):
        calls.append(1)
        raise KeyboardInterrupt  # killed while writing its first checkpoint

    trainer_mod.save_checkpoint = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            _train(folder, run, "--steps", "2", "--ckpt-every", "1", "--overwrite", "--lr", "5e-4")
    finally:
        trainer_mod.save_checkpoint = real
    assert calls
    # The old run is whole and resumable.
    assert (run / "model.safetensors").read_bytes() == old_model
    assert [p.name for p in st.list_checkpoints(run / "checkpoints")] == [
        "step-0000002", "step-0000004", "step-0000006"]  # fmt: skip
    assert json.loads((run / "train_config.json").read_text())["lr"] == 1e-3

    # A new, shorter run that completes: its checkpoints are the only ones kept (never pruned for the old
    # run's higher step numbers), its settings and model replace the old ones.
    _train(folder, run, "--steps", "2", "--ckpt-every", "1", "--overwrite", "--lr", "5e-4")
    assert [p.name for p in st.list_checkpoints(run / "checkpoints")] == ["step-0000001", "step-0000002"]
    assert st.latest_checkpoint(run / "checkpoints").name == "step-0000002"
    assert json.loads((run / "train_config.json").read_text())["lr"] == 5e-4
    assert (run / "model.safetensors").read_bytes() != old_model
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 2
    # --resume continues the new run, not the old one.
    _train(folder, run, "--steps", "3", "--ckpt-every", "1", "--resume", "--lr", "5e-4")
    assert json.loads((run / "train_summary.json").read_text())["resumed_from"].endswith("step-0000002")


def test_checkpoints_of_another_run_are_never_pruned(tmp_path):
    root = tmp_path / "checkpoints"

    def write(step: int, run_id: str) -> None:
        tmp = st.tmp_dir(root, step)
        tmp.mkdir(parents=True)
        for name in st.COMPLETE:
            (tmp / name).write_text(json.dumps({"step": step, "run_id": run_id}))
        st.commit(root, step, keep=1, run_id=run_id)

    write(500, "old")
    write(1000, "old")
    assert [p.name for p in st.list_checkpoints(root)] == ["step-0001000"]
    write(50, "new")  # a lower step number than the old run's, but the newest checkpoint of its run
    assert [p.name for p in st.list_checkpoints(root)] == ["step-0000050", "step-0001000"]
    assert st.latest_checkpoint(root).name == "step-0000050"  # latest.json names the last one committed


def test_steps_zero_and_bad_out_are_refused(tmp_path, folder, capsys):
    err = _fail(lambda: _train(folder, tmp_path / "r", "--steps", "0"), capsys)
    assert "--steps" in err
    assert not (tmp_path / "r" / "model.safetensors").exists()
    (tmp_path / "file").write_text("x")
    err = _fail(lambda: _train(folder, tmp_path / "file", "--steps", "1"), capsys)
    assert "--out" in err and "file" in err
    err = _fail(lambda: _train(folder, tmp_path / "r", "--steps", "1", "--resume", "--overwrite"), capsys)
    assert "--resume and --overwrite" in err
