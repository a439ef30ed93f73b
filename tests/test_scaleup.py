"""The trainers' scale-up tools, one implementation for both stages: gradient accumulation (the step of an N×
larger batch), a weight average (EMA) saved beside the weights and resumed exactly, activation checkpointing
(the same gradients with less memory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vqim import Prior
from vqim.train.prior import PriorTrainConfig, train_prior
from vqim.train.trainer import EMA

pytestmark = pytest.mark.usefixtures("one_thread")

GRID, CODES = (4, 4), 32


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, token_folder) -> Path:
    return token_folder(tmp_path_factory.mktemp("tokens"), GRID, CODES)


def _train(tokens: Path, out: Path, **kw) -> dict:
    base = {"tokens": str(tokens), "out": str(out), "preset": "vim-tiny", "steps": 4, "batch_size": 8,
            "val_every": 0, "lr": 3e-3, "progress": False, "log_every": 1, "ckpt_every": 2, "num_workers": 0,
            "model": {"depth": 2, "dim": 32, "heads": 2, "mlp_dim": 64}, "dropout": 0.0, "class_dropout": 0.0}  # fmt: skip
    return train_prior(PriorTrainConfig(**{**base, **kw}))


def _interrupted_copy(run: Path, dest: Path, step: int) -> None:
    """dest holds what `run` would have left if killed after its checkpoint at `step`."""
    import shutil

    shutil.copytree(run / "checkpoints" / f"step-{step:07d}", dest / "checkpoints" / f"step-{step:07d}")
    shutil.copy(run / "train_config.json", dest / "train_config.json")


def _max_diff(a: Path, b: Path, name: str = "model.safetensors") -> float:
    wa, wb = load_file(a / name), load_file(b / name)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def test_gradient_accumulation_equals_the_larger_batch(tokens, tmp_path):
    _train(tokens, tmp_path / "big", batch_size=16)
    summary = _train(tokens, tmp_path / "accum", batch_size=8, grad_accum=2)
    assert _max_diff(tmp_path / "big", tmp_path / "accum") < 2e-6
    _train(tokens, tmp_path / "small", batch_size=8)  # what accumulation is not: the plain small batch
    assert _max_diff(tmp_path / "big", tmp_path / "small") > 1e-4
    assert summary["tokens_per_s"] > 0 and summary["steps"] == 4


def test_accumulated_run_resumes_exactly(tokens, tmp_path):
    _train(tokens, tmp_path / "a", grad_accum=3)
    _interrupted_copy(tmp_path / "a", tmp_path / "b", 2)
    _train(tokens, tmp_path / "b", grad_accum=3, resume=True)
    assert _max_diff(tmp_path / "a", tmp_path / "b") < 1e-6


def test_the_weight_average_is_saved_loaded_and_resumed_exactly(tokens, tmp_path):
    _train(tokens, tmp_path / "a", ema_decay=0.6)
    ema = load_file(tmp_path / "a" / "ema.safetensors")
    raw = load_file(tmp_path / "a" / "model.safetensors")
    assert ema.keys() == raw.keys()
    assert max(float((ema[k] - raw[k]).abs().max()) for k in ema) > 1e-4  # an average, not the weights
    # from_pretrained uses the average when it is there; ema=False gives the trained weights.
    p_ema, p_raw = Prior.from_pretrained(tmp_path / "a"), Prior.from_pretrained(tmp_path / "a", ema=False)
    name = "head.weight"
    assert torch.equal(p_ema.state_dict()[name], ema[name]) and torch.equal(
        p_raw.state_dict()[name], raw[name]
    )
    # Interrupted at step 2 and resumed: the same average as the uninterrupted run.
    _interrupted_copy(tmp_path / "a", tmp_path / "b", 2)
    _train(tokens, tmp_path / "b", ema_decay=0.6, resume=True)
    assert _max_diff(tmp_path / "a", tmp_path / "b", "ema.safetensors") < 1e-6
    # A changed decay is a changed run: refused on resume unless overridden.
    with pytest.raises(ValueError, match="--ema-decay: saved 0.6, given 0.9"):
        _train(tokens, tmp_path / "b", ema_decay=0.9, steps=6, resume=True)
    # save_pretrained into the folder drops the stale average, so it cannot stand in for the new weights.
    p_raw.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / "ema.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        Prior.from_pretrained(tmp_path / "a", ema=True)


def test_ema_update_is_the_moving_average():
    lin = torch.nn.Linear(3, 2)
    w0 = lin.weight.detach().clone()
    ema = EMA(lin, 0.9)
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.tensors()["ema.weight"], 0.9 * w0 + 0.1 * (w0 + 1.0))


def test_activation_checkpointing_gives_the_same_gradients(tokens, tmp_path):
    torch.manual_seed(0)
    prior = Prior.from_preset("vim-tiny", vocab_size=CODES, grid_size=GRID, num_classes=2, depth=2, dim=32,
                              heads=2, mlp_dim=64, dropout=0.1).train()  # fmt: skip
    ids, labels = torch.randint(0, CODES, (4, 16)), torch.tensor([0, 1, 0, 1])
    grads = []
    for on in (False, True):
        prior.transformer.checkpoint_activations = on
        prior.zero_grad()
        torch.manual_seed(1)  # the same dropout masks
        logits = prior(ids, labels).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in prior.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert max(float((grads[0][k] - grads[1][k]).abs().max()) for k in grads[0]) < 1e-6
    # Through the trainer: the same run, and the setting may change on resume (it changes no result).
    _train(tokens, tmp_path / "plain")
    _train(tokens, tmp_path / "ckpt", checkpoint_activations=True)
    assert _max_diff(tmp_path / "plain", tmp_path / "ckpt") < 1e-6
    rec = json.loads((tmp_path / "ckpt" / "train_config.json").read_text())
    assert rec["checkpoint_activations"] is True and rec["grad_accum"] == 1


def test_the_tools_are_command_line_flags(capsys):
    from vqim.cli import main

    for command in ("train-prior", "train-tokenizer"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--grad-accum GRAD_ACCUM" in text and "--ema-decay EMA_DECAY" in text
        assert "--checkpoint-activations" in text


def test_the_documented_fsdp_config_loads_and_names_vqims_block():
    """The GPU configuration loads and names vqim's block (sharded training itself: tests/test_fsdp.py on CPU)."""
    from accelerate.commands.config.config_args import load_config_from_file

    import vqim.nn.transformer as tr

    path = Path(__file__).parents[1] / "docs" / "accelerate" / "fsdp_vim_large_8gpu.yaml"
    cfg = load_config_from_file(str(path))
    assert str(cfg.distributed_type).endswith("FSDP") and cfg.num_processes == 8
    fsdp = cfg.fsdp_config
    assert (
        fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    )
    layer = getattr(tr, fsdp["fsdp_transformer_layer_cls_to_wrap"])
    prior = Prior.from_preset("vim-tiny", vocab_size=CODES, grid_size=GRID)
    assert any(isinstance(m, layer) for m in prior.modules())  # the unit FSDP wraps is the prior's block


def test_compiled_prior_training_matches_eager(tokens, tmp_path):
    _train(tokens, tmp_path / "eager", steps=2)
    _train(tokens, tmp_path / "compiled", steps=2, compile="default")
    assert _max_diff(tmp_path / "eager", tmp_path / "compiled") < 1e-4


def test_a_weight_average_can_start_on_resume_and_grad_accum_cannot_change(tokens, tmp_path, caplog):
    _train(tokens, tmp_path / "a", steps=2)
    with caplog.at_level("WARNING"):
        _train(tokens, tmp_path / "a", steps=4, ema_decay=0.5, resume=True, override=["ema_decay"])
    assert "starts one from the current weights" in caplog.text
    assert (tmp_path / "a" / "ema.safetensors").is_file()
    with pytest.raises(ValueError, match="--override grad_accum"):
        _train(
            tokens, tmp_path / "a", steps=6, ema_decay=0.5, grad_accum=2, resume=True, override=["grad_accum"]
        )


def test_train_prior_takes_model_overrides_on_the_command_line(tokens, tmp_path, capsys):
    from vqim.cli import main

    main(["train-prior", "--tokens", str(tokens), "--out", str(tmp_path / "p"), "--steps", "1", "--batch-size", "8",
          "--val-every", "0", "--no-progress", "--dim", "32", "--depth", "1", "--heads", "2", "--mlp-dim", "48",
          "--pos-embed", "1d"])  # fmt: skip
    capsys.readouterr()
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert (cfg["dim"], cfg["depth"], cfg["heads"], cfg["mlp_dim"], cfg["pos_embed"]) == (32, 1, 2, 48, "1d")
    with pytest.raises(
        SystemExit
    ) as e:  # another width on resume: the checkpoint's weights have the saved one
        main(["train-prior", "--tokens", str(tokens), "--out", str(tmp_path / "p"), "--steps", "2", "--batch-size",
              "8", "--val-every", "0", "--no-progress", "--dim", "64", "--resume"])  # fmt: skip
    assert e.value.code == 2 and "cannot be overridden" in capsys.readouterr().err
