"""`vqim` command line: parsing, then one library call per command.

Each command's options are generated (`vqim.options`) from the config dataclass it fills, so a setting, its
type, default and help are declared once, beside the code that uses it:

    train-tokenizer   vqim.train.tokenizer.TokenizerTrainConfig, + vqim.config.TokenizerConfig overrides
    train-prior       vqim.train.prior.PriorTrainConfig
    reconstruct       vqim.evaluate.ReconstructConfig     eval-tokenizer   vqim.evaluate.EvalTokenizerConfig
    eval-prior        vqim.evaluate.EvalPriorConfig       probe            vqim.evaluate.ProbeConfig
    eval-samples      vqim.genmetrics.EvalSamplesConfig   reject           vqim.rejection.RejectConfig
    encode / decode   vqim.tokens.EncodeConfig / DecodeConfig
    sample / complete vqim.samples.SampleConfig / CompleteConfig (sampling settings: vqim.config.SamplingConfig)
    ablate            vqim.ablate.AblationConfig          demo             vqim.demo.run_demo's parameters
    convert           vqim.convert.ConvertConfig          serve            vqim.serve.ServeConfig

Bad input (`vqim.errors.InputError` or any ValueError; a missing or unusable path: FileNotFoundError,
PermissionError, IsADirectoryError, ...) ends the command with one line `error: ...` on stderr and exit status
2; a training run stopped early (`TrainingStopped`) likewise, with status 1. A process of a multi-process launch
(`accelerate launch`, torchrun, mpirun) ends with its command's status without Python's teardown
(`entry`, `vqim.distributed.leave`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vqim.distributed import first_process, launched, leave
from vqim.nn.memory import retain_freed_memory
from vqim.options import add_options, build, values

log = logging.getLogger("vqim")


def _print_json(obj: Any) -> None:
    """Print obj as JSON (on the main process only, under `accelerate launch`)."""
    from vqim.checkpoint import dumps

    if first_process():
        print(dumps(obj))


# Settings every trainer takes whose command-line form differs from the field: `--compile [MODE]`.
_TRAIN_OVERRIDES = {"compile": {"nargs": "?", "const": "default"}}


# ---------------------------------------------------------------------------------------------- stage 1
def opts_train_tokenizer(p: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from vqim.config import TRAIN_RECIPES, TokenizerConfig, tokenizer_presets
    from vqim.train.tokenizer import TokenizerTrainConfig

    recipe = {"lr" if k == "lr_per_image" else k for r in TRAIN_RECIPES.values() for k in r}
    add_options(
        p, TokenizerTrainConfig,
        defaults=dict.fromkeys(recipe), default_text=dict.fromkeys(recipe, "the preset's recipe, see `vqim presets`"),
        overrides={**_TRAIN_OVERRIDES, "preset": {"choices": tokenizer_presets()}},
    )  # fmt: skip
    g = p.add_argument_group("model overrides (TokenizerConfig fields; default: the preset's)")
    add_options(g, TokenizerConfig, defaults=dict.fromkeys(f.name for f in fields(TokenizerConfig)))


def cmd_train_tokenizer(a: argparse.Namespace) -> None:
    from vqim.config import TokenizerConfig
    from vqim.train.tokenizer import TokenizerTrainConfig, train_tokenizer

    settings = {k: v for k, v in values(TokenizerTrainConfig, a).items() if k != "preset"}
    cfg = TokenizerTrainConfig.for_preset(
        a.preset, model=values(TokenizerConfig, a, drop_none=True), **settings
    )
    log.info("recipe: disc=%s adv_weight=%s perceptual_weight=%s lr=%.3g betas=%s",
             cfg.disc, cfg.adv_weight, cfg.perceptual_weight, cfg.lr, cfg.betas)  # fmt: skip
    summary = train_tokenizer(cfg)
    if not first_process():
        return
    if summary.get("skipped_files"):
        log.warning("skipped %d unreadable files (listed in %s)", summary["skipped_files"],
                    Path(cfg.out) / "train_summary.json")  # fmt: skip
    log.info("tokenizer written to %s", cfg.out)


def cmd_reconstruct(a: argparse.Namespace) -> None:
    from vqim.evaluate import ReconstructConfig, reconstruct

    _print_json(reconstruct(build(ReconstructConfig, a)))


def cmd_encode(a: argparse.Namespace) -> None:
    from vqim.tokens import EncodeConfig, encode_to_folder

    m = encode_to_folder(build(EncodeConfig, a))
    keys = ("count", "grid_size", "codebook_size", "tokenizer_id", "tokenizer_config_hash", "skipped_files")
    _print_json({k: m[k] for k in keys})


def cmd_decode(a: argparse.Namespace) -> None:
    from vqim.tokens import DecodeConfig, decode_to_folder

    _print_json(decode_to_folder(build(DecodeConfig, a)))


def cmd_eval_tokenizer(a: argparse.Namespace) -> None:
    from vqim.evaluate import EvalTokenizerConfig, run_eval_tokenizer

    res = run_eval_tokenizer(build(EvalTokenizerConfig, a))
    if res is not None:  # the main process (the only one, unless launched on several)
        _print_json(res)


# ---------------------------------------------------------------------------------------------- stage 2
# PriorConfig fields a user sets on the command line (vocabulary, grid, classes and condition come from the tokens;
# dropout and class_dropout are PriorTrainConfig's own options).
PRIOR_MODEL_FIELDS = ("dim", "depth", "heads", "mlp_dim", "pos_embed")


def opts_train_prior(p: argparse.ArgumentParser) -> None:
    from vqim.config import PriorConfig, prior_presets
    from vqim.train.prior import PriorTrainConfig

    add_options(p, PriorTrainConfig, overrides={**_TRAIN_OVERRIDES, "preset": {"choices": prior_presets()}})
    g = p.add_argument_group("model overrides (PriorConfig fields; default: the preset's)")
    add_options(g, PriorConfig, only=PRIOR_MODEL_FIELDS, defaults=dict.fromkeys(PRIOR_MODEL_FIELDS))


def cmd_train_prior(a: argparse.Namespace) -> None:
    from vqim.train.prior import PriorTrainConfig, train_prior

    model = {k: getattr(a, k) for k in PRIOR_MODEL_FIELDS if getattr(a, k) is not None}
    _print_json(train_prior(build(PriorTrainConfig, a, model=model)))


def cmd_sample(a: argparse.Namespace) -> None:
    from vqim.samples import SampleConfig, sample_to_folder

    _print_json(sample_to_folder(build(SampleConfig, a)))


def cmd_complete(a: argparse.Namespace) -> None:
    from vqim.samples import CompleteConfig, complete_to_folder

    _print_json(complete_to_folder(build(CompleteConfig, a)))


def cmd_eval_prior(a: argparse.Namespace) -> None:
    from vqim.evaluate import EvalPriorConfig, evaluate_prior

    _print_json(evaluate_prior(build(EvalPriorConfig, a)))


def cmd_eval_samples(a: argparse.Namespace) -> None:
    from vqim.genmetrics import EvalSamplesConfig, evaluate_samples

    _print_json(evaluate_samples(build(EvalSamplesConfig, a)))


def cmd_reject(a: argparse.Namespace) -> None:
    from vqim.rejection import RejectConfig, reject

    _print_json(reject(build(RejectConfig, a)))


def cmd_convert(a: argparse.Namespace) -> None:
    from vqim.convert import ConvertConfig, convert

    _print_json(convert(build(ConvertConfig, a)))


def cmd_serve(a: argparse.Namespace) -> None:
    from vqim.serve import ServeConfig, serve

    serve(build(ServeConfig, a))


def cmd_probe(a: argparse.Namespace) -> None:
    from vqim.evaluate import ProbeConfig, linear_probe

    _print_json(linear_probe(build(ProbeConfig, a)))


# ---------------------------------------------------------------------------------------------- studies
def cmd_ablate(a: argparse.Namespace) -> None:
    from vqim.ablate import AblationConfig, run_ablation

    res = run_ablation(build(AblationConfig, a), command=shlex.join(["vqim", *a.argv]))
    print(res["markdown"])


def cmd_presets(a: argparse.Namespace) -> None:
    from vqim.config import preset_table

    _print_json(preset_table())


def cmd_demo(a: argparse.Namespace) -> None:
    from vqim.demo import run_demo

    m = run_demo(**values(run_demo, a))
    t, p, probe = m["tokenizer"], m["prior"], m["probe"]
    _print_json(
        {
            "tokenizer": {k: t[k] for k in ("psnr", "ssim", "usage", "codes_used", "perplexity", "train_seconds",
                                            "codebook_health")},
            "prior": {k: p[k] for k in ("test_bits_per_token", "sample_accuracy", "classifier_accuracy_real_test",
                                        "classifier_accuracy_reconstructions", "seconds")},
            "probe": {k: probe[k] for k in ("per_block_test_accuracy", "chosen_block", "chosen_block_test_accuracy",
                                            "baselines")},
            "conditional": m["conditional"],
        }
    )  # fmt: skip
    print(f"demo report: {Path(a.out) / 'index.html'}  (tokenizer: {t['path']}, prior: {p['path']})")


# ---------------------------------------------------------------------------------------------- main
def _options(module: str, name: str) -> Callable[[argparse.ArgumentParser], None]:
    """Add the options of the config dataclass (or function) module.name; imported only when needed."""

    def add(p: argparse.ArgumentParser) -> None:
        add_options(p, getattr(importlib.import_module(module), name))

    return add


# name: (help, how its options are added, what it runs)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {
    "train-tokenizer": ("train a tokenizer (CPU, GPU, or `accelerate launch`)", opts_train_tokenizer,
                        cmd_train_tokenizer),
    "reconstruct": ("side-by-side reconstructions of images, with PSNR",
                    _options("vqim.evaluate", "ReconstructConfig"), cmd_reconstruct),
    "encode": ("encode a dataset to token shards + manifest", _options("vqim.tokens", "EncodeConfig"), cmd_encode),
    "decode": ("decode a .npy of token ids (n, h, w) to PNGs", _options("vqim.tokens", "DecodeConfig"), cmd_decode),
    "eval-tokenizer": ("reconstruction metrics and codebook usage as JSON",
                       _options("vqim.evaluate", "EvalTokenizerConfig"), cmd_eval_tokenizer),
    "train-prior": ("train a VIM prior on token shards from `vqim encode`", opts_train_prior, cmd_train_prior),
    "sample": ("sample images: a PNG grid (a row per class or condition) and single PNGs",
               _options("vqim.samples", "SampleConfig"), cmd_sample),
    "complete": ("complete images from their top token rows (or a mask of kept tokens)",
                 _options("vqim.samples", "CompleteConfig"), cmd_complete),
    "eval-prior": ("bits per token on held-out tokens; sample accuracy on digits",
                   _options("vqim.evaluate", "EvalPriorConfig"), cmd_eval_prior),
    "eval-samples": ("FID, Inception Score, precision and recall of generated samples as JSON",
                     _options("vqim.genmetrics", "EvalSamplesConfig"), cmd_eval_samples),
    "reject": ("classifier rejection of class-conditional samples at an acceptance rate, metrics before and after",
               _options("vqim.rejection", "RejectConfig"), cmd_reject),
    "probe": ("linear probe on the frozen prior's block features", _options("vqim.evaluate", "ProbeConfig"),
              cmd_probe),
    "ablate": ("the ViT-VQGAN ablation study: train + evaluate every variant, table and plots",
               _options("vqim.ablate", "AblationConfig"), cmd_ablate),
    "convert": ("convert a public checkpoint (taming-transformers' VQGAN and GPT, LlamaGen's VQ, "
                "enhancing-transformers' ViT-VQGAN) to a vqim model folder",
                _options("vqim.convert", "ConvertConfig"), cmd_convert),
    "serve": ("a local web page to try the tokenizer (and prior) on your own images",
              _options("vqim.serve", "ServeConfig"), cmd_serve),
    "presets": ("list model presets with parameter counts and training recipes", lambda p: None, cmd_presets),
    "demo": ("the two-stage pipeline on built-in data (photos, digits)", _options("vqim.demo", "run_demo"),
             cmd_demo),
}  # fmt: skip


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with `only`, the options of that command alone are added (fewer imports)."""
    parser = argparse.ArgumentParser(prog="vqim", description="Vector-quantized image modeling.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add, func) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_[:1].upper() + help_[1:] + ".")
        p.set_defaults(func=func)
        if only is None or only == name:
            add(p)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(only=command or "").parse_args(argv)
    args.argv = argv
    # Under a multi-process launch the other processes log warnings and errors only: progress is the first's.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if first_process() else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # The command owns the process: keep freed CPU memory for reuse, so batch after batch of activations (training,
    # encoding, evaluation, sampling) is not page-faulted in again each time (vqim.nn.memory).
    retain_freed_memory()
    try:
        args.func(args)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError,
            ValueError) as e:  # fmt: skip
        _fail(e, 2)
    except RuntimeError as e:
        from vqim.train.trainer import TrainingStopped

        if not isinstance(e, TrainingStopped):
            raise
        _fail(e, 1)  # not bad input: a run that stopped early (the message names its last good checkpoint)


def _fail(e: BaseException, status: int) -> None:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    raise SystemExit(status) from None


def entry() -> None:
    """The `vqim` command and `python -m vqim.cli`: `main`, and in a process of a multi-process launch, the end
    of the process through `vqim.distributed.leave` with the status the command ended with (an unexpected error
    prints its traceback first, as Python would, and ends with 1; an interrupt with 130, as shells report it).
    `main` itself returns, for callers in a process of their own."""
    if not launched():
        main()
        return
    try:
        main()
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        leave(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
    except BaseException as e:  # noqa: BLE001 - reported, then the process ends as Python would end it
        traceback.print_exc()
        leave(130 if isinstance(e, KeyboardInterrupt) else 1)
    leave(0)


if __name__ == "__main__":
    entry()
