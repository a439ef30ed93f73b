"""A corpus of bad inputs, each through the real CLI in-process: every one must end with exit status 2 and one
line `error: ...` on stderr that names the offending file or flag, and never with a traceback.

The artifacts (a tiny tokenizer, a tiny class-conditional prior trained on nothing, a hand-written token folder,
a few images) are built once per module; each case copies and breaks one of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import shutil
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqim import Prior, Tokenizer
from vqim.checkpoint import write_json
from vqim.cli import main
from vqim.config import get_tokenizer_config
from vqim.tokens import tokenizer_identity

CODES = 64  # the tiny tokenizer's codebook: 32 px images, 8 px patches → 4×4 tokens
GRID = (4, 4)
SEQUENCES = 24
CLASSES = ["a", "b"]


# ---------------------------------------------------------------------------------------------- artifacts
@dataclass
class Art:
    """Paths of the module's artifacts (good ones, and broken copies by kind)."""

    root: Path
    tok: Path
    prior: Path
    images: Path  # a folder with class sub-folders a/, b/
    png: Path  # one good 32×32 RGB PNG
    png16: Path  # a 16-bit greyscale PNG (not an error)
    ids: Path  # a (2, 4, 4) int64 .npy of valid ids, outside any token folder
    tokens: Path  # a good token folder
    a_file: Path  # an existing regular file (given as --out)
    bad_tok: dict[str, Path] = field(default_factory=dict)
    bad_prior: dict[str, Path] = field(default_factory=dict)
    bad_tokens: dict[str, Path] = field(default_factory=dict)
    bad_images: dict[str, Path] = field(default_factory=dict)
    outside_shard: Path | None = None
    nan_npy: Path | None = None
    pickled: dict[str, Path] = field(default_factory=dict)


MODEL_KINDS = (
    "weights_corrupt", "weights_truncated", "weights_empty", "config_json_list", "config_wrong_type",
    "config_size_mismatch", "config_absurd_size", "config_invalid_json",
)  # fmt: skip
# The file each broken model folder gets wrong (the size mismatch is in both: either may be named).
MODEL_FILES = {k: ("model.safetensors",) for k in MODEL_KINDS if k.startswith("weights")} | {
    k: ("config.json",) for k in MODEL_KINDS if k.startswith("config")
}
MODEL_FILES["config_size_mismatch"] = ("config.json", "model.safetensors")

TOKEN_KINDS = (
    "manifest_json_list", "manifest_missing_keys", "labels_shorter_than_tokens", "shard_outside_relative",
    "shard_outside_absolute", "tokens_float", "ids_outside_vocab", "labels_negative", "labels_float",
    "labels_2d",
)  # fmt: skip
IMAGE_KINDS = ("not_an_image", "truncated_png", "empty_file")


def _break_model(good: Path, dest: Path, kind: str, wrong_type: dict, mismatch: dict, absurd: dict) -> Path:
    shutil.copytree(good, dest)
    weights, config = dest / "model.safetensors", dest / "config.json"
    cfg = json.loads(config.read_text())
    if kind == "weights_corrupt":
        weights.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "weights_truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "weights_empty":
        weights.write_bytes(b"")
    elif kind == "config_json_list":
        config.write_text(json.dumps([[k, v] for k, v in cfg.items()]))
    elif kind == "config_wrong_type":
        config.write_text(json.dumps({**cfg, **wrong_type}))
    elif kind == "config_size_mismatch":
        config.write_text(json.dumps({**cfg, **mismatch}))
    elif kind == "config_absurd_size":
        config.write_text(json.dumps({**cfg, **absurd}))
    elif kind == "config_invalid_json":
        config.write_text(json.dumps(cfg)[:-20])
    return dest


def _write_tokens(folder: Path, ids: np.ndarray, labels: np.ndarray, manifest_extra: dict) -> dict:
    folder.mkdir(parents=True)
    np.save(folder / "tokens-00000.npy", ids)
    np.save(folder / "labels-00000.npy", labels)
    manifest = {
        "format": "vqim-tokens/1", "grid_size": list(GRID), "codebook_size": CODES, "count": len(ids),
        "dtype": "uint16", "shards": [{"tokens": "tokens-00000.npy", "labels": "labels-00000.npy", "count": len(ids)}],
        "has_labels": True, "class_names": CLASSES, "skipped_files": 0, **manifest_extra,
    }  # fmt: skip
    write_json(folder / "manifest.json", manifest)
    return manifest


def _break_tokens(art: Art, kind: str, ids: np.ndarray, labels: np.ndarray) -> Path:
    dest = art.root / f"tokens_{kind}"
    shutil.copytree(art.tokens, dest)
    mpath = dest / "manifest.json"
    manifest = json.loads(mpath.read_text())
    if kind == "manifest_json_list":
        mpath.write_text(json.dumps([manifest]))
    elif kind == "manifest_missing_keys":
        mpath.write_text(json.dumps({k: v for k, v in manifest.items() if k not in ("grid_size", "shards")}))
    elif kind == "labels_shorter_than_tokens":
        np.save(dest / "labels-00000.npy", labels[:-5])
    elif kind in ("shard_outside_relative", "shard_outside_absolute"):
        where = "../outside-tokens.npy" if kind.endswith("relative") else str(art.outside_shard)
        manifest["shards"][0]["tokens"] = where
        mpath.write_text(json.dumps(manifest))
        (dest / "tokens-00000.npy").unlink()
    elif kind == "tokens_float":
        np.save(dest / "tokens-00000.npy", ids.astype(np.float32) + 0.25)
    elif kind == "ids_outside_vocab":
        bad = ids.copy()
        bad[3, 2, 1] = CODES + 5
        np.save(dest / "tokens-00000.npy", bad)
    elif kind == "labels_negative":
        bad = labels.copy()
        bad[2] = -3
        np.save(dest / "labels-00000.npy", bad)
    elif kind == "labels_float":
        np.save(dest / "labels-00000.npy", labels.astype(np.float64) + 0.5)
    elif kind == "labels_2d":
        np.save(dest / "labels-00000.npy", np.stack([labels, labels], axis=1))
    return dest


@pytest.fixture(scope="module")
def art(tmp_path_factory, one_thread) -> Art:
    root = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    tcfg = get_tokenizer_config(
        "vit-vqgan-tiny", image_size=32, codebook_size=CODES, enc_depth=1, dec_depth=1
    )
    Tokenizer(tcfg).save_pretrained(root / "tok")
    tok = Tokenizer.from_pretrained(root / "tok")
    prior = Prior.from_preset("vim-tiny", vocab_size=CODES, grid_size=GRID, num_classes=len(CLASSES), depth=1,
                              dim=32, heads=2, mlp_dim=64)  # fmt: skip
    prior.save_pretrained(root / "prior")

    images = root / "images"
    for c in CLASSES:
        (images / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / c / f"{i}.png")
    png = root / "good.png"
    Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(png)
    png16 = root / "sixteen_bit.png"
    Image.fromarray((np.arange(36 * 36).reshape(36, 36) * 50).astype(np.uint16)).save(png16)
    assert Image.open(png16).mode.startswith("I;16")
    (root / "ids").mkdir()
    ids_path = root / "ids" / "ids.npy"
    np.save(ids_path, rng.integers(0, CODES, (2, *GRID)).astype(np.int64))
    a_file = root / "a_regular_file.txt"
    a_file.write_text("not a folder\n")

    ids = rng.integers(0, CODES, (SEQUENCES, *GRID)).astype(np.uint16)
    labels = (np.arange(SEQUENCES) % len(CLASSES)).astype(np.int64)
    ident = tokenizer_identity(tok)
    manifest = _write_tokens(root / "tokens", ids, labels, {**ident, "tokenizer_dir": str(root / "tok"),
                                                            "tokenizer_config": tok.config.to_dict(), "image_size": 32})  # fmt: skip
    # What train-prior records beside the prior: the tokens it was trained on.
    write_json(root / "prior" / "tokens.json", {
        "tokens": str(root / "tokens"), **tokenizer_identity(manifest), "grid_size": list(GRID),
        "codebook_size": CODES, "class_names": CLASSES, "condition": None,
    })  # fmt: skip

    a = Art(root=root, tok=root / "tok", prior=root / "prior", images=images, png=png, png16=png16, ids=ids_path,
            tokens=root / "tokens", a_file=a_file)  # fmt: skip
    for kind in MODEL_KINDS:
        a.bad_tok[kind] = _break_model(
            a.tok, root / f"tok_{kind}", kind, wrong_type={"enc_dim": "big"}, mismatch={"enc_dim": 64},
            absurd={"codebook_size": 10**12},
        )  # fmt: skip
        a.bad_prior[kind] = _break_model(
            a.prior, root / f"prior_{kind}", kind, wrong_type={"dim": "big"}, mismatch={"dim": 64},
            absurd={"vocab_size": 10**12},
        )  # fmt: skip
    a.outside_shard = root / "outside-tokens.npy"
    np.save(a.outside_shard, ids)
    for kind in TOKEN_KINDS:
        a.bad_tokens[kind] = _break_tokens(a, kind, ids, labels)

    a.bad_images["not_an_image"] = root / "not_an_image.png"
    a.bad_images["not_an_image"].write_text("this is plain text, not a PNG\n")
    full = root / "full.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full)
    a.bad_images["truncated_png"] = root / "truncated.png"
    a.bad_images["truncated_png"].write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    a.bad_images["empty_file"] = root / "empty.png"
    a.bad_images["empty_file"].write_bytes(b"")
    nan = rng.random((4, 32, 32, 3)).astype(np.float32)
    nan[1, 5, 7, 0] = np.nan
    a.nan_npy = root / "images_with_nan.npy"
    np.save(a.nan_npy, nan)

    # .pth files that torch.load(weights_only=True) refuses: they pickle an object besides tensors.
    for name, key in (("vgg", "features.0.weight"), ("inception", "fc.weight")):
        path = root / f"{name}_pickled.pth"
        torch.save({key: torch.zeros(2, 2), "payload": argparse.Namespace(run="anything")}, path)
        a.pickled[name] = path
    return a


# ---------------------------------------------------------------------------------------------- running
@dataclass
class Outcome:
    code: object  # SystemExit's code; None when main() returned
    exc: BaseException | None  # an exception other than SystemExit that escaped main()
    out: str
    err: str


def _run(argv: list[str], capsys) -> Outcome:
    capsys.readouterr()
    code, exc = None, None
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    except Exception as e:  # noqa: BLE001 - what a user would see as a traceback
        exc = e
    cap = capsys.readouterr()
    return Outcome(code, exc, cap.out, cap.err)


def _describe(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1]
    ours = [f for f in frames if "/vqim/" in f.filename.replace("\\", "/")]
    where = f"last frame {Path(last.filename).name}:{last.lineno} in {last.name}"
    if ours and ours[-1] is not last:
        where += f"; last vqim frame {Path(ours[-1].filename).name}:{ours[-1].lineno} in {ours[-1].name}"
    msg = " ".join(str(exc).split())[:300]
    return f"raised {type(exc).__name__}: {msg} ({where})"


_ARGPARSE_ERROR = re.compile(r"^vqim(?: [\w-]+)?: error: ")


def _check(o: Outcome, names: list[str], *, flag: bool = False, forbidden: tuple[str, ...] = ()) -> None:
    """Exit status 2, one `error: ` line naming one of `names`, no traceback (argparse's form for flags)."""
    assert o.exc is None, f"{_describe(o.exc)} instead of exit status 2"
    problems = []
    if o.code != 2:
        problems.append(f"exit status {o.code!r} (expected 2)")
    lines = o.err.splitlines()
    argparse_form = (
        flag and len(lines) >= 2 and lines[0].startswith("usage:") and _ARGPARSE_ERROR.match(lines[-1])
    )
    if not argparse_form and (len(lines) != 1 or not lines[0].startswith("error: ")):
        problems.append(f"stderr is not exactly one `error: ` line: {o.err[-500:]!r}")
    if "Traceback" in o.err or "Traceback" in o.out:
        problems.append("a Traceback was printed")
    message = lines[-1] if lines else ""
    if not any(n in message for n in names):
        problems.append(f"the message names none of {names}: {message!r}")
    problems += [f"the message contains {f!r}: {message!r}" for f in forbidden if f in message]
    assert not problems, "; ".join(problems) + (f"; stdout: {o.out[:200]!r}" if o.out.strip() else "")


@contextlib.contextmanager
def _address_space_limit(extra_gib: int = 16) -> Iterator[None]:
    """Cap the address space a little above the current one, so an attempt to allocate an absurd model fails
    at once instead of paging the machine to death (restored afterwards)."""
    try:
        status = Path("/proc/self/status").read_text()
        vm = int(re.search(r"^VmSize:\s+(\d+) kB", status, re.M).group(1)) * 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = vm + extra_gib * 2**30
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, AttributeError, ValueError):
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---------------------------------------------------------------------------------------------- the corpus
@dataclass(frozen=True)
class Case:
    """argv and the names (file path, file name or flag) of which the message must contain one."""

    make: Callable[[Art, Path], tuple[list[str], list[str]]]
    flag: bool = False  # a flag's value: argparse's own usage error is acceptable too
    forbidden: tuple[str, ...] = ()
    absurd: bool = False


CPU = ["--device", "cpu"]
PRIOR_RUN = ["--steps", "1", "--batch-size", str(SEQUENCES), "--val-every", "0", "--no-progress", "--log-every",
             "1", "--num-workers", "0"]  # fmt: skip


def _tok_run(a: Art) -> list[str]:
    return ["--data", str(a.images), "--preset", "vit-vqgan-tiny", "--image-size", "32", "--codebook-size",
            str(CODES), "--enc-depth", "1", "--dec-depth", "1", "--steps", "1", "--batch-size", "2", "--num-workers",
            "0", "--no-progress", "--log-every", "1", "--image-every", "100", "--ckpt-every", "100"]  # fmt: skip


# Commands that read a tokenizer folder / a prior folder / a token folder, given the folder.
TOK_COMMANDS: dict[str, Callable[[Art, Path, Path], list[str]]] = {
    "reconstruct": lambda a, t, tok: ["reconstruct", "--tokenizer", str(tok), str(a.png), "--out", str(t / "o"), *CPU],
    "encode": lambda a, t, tok: ["encode", "--tokenizer", str(tok), "--data", str(a.images), "--out", str(t / "o"),
                                 "--no-progress", *CPU],
    "eval-tokenizer": lambda a, t, tok: ["eval-tokenizer", "--tokenizer", str(tok), "--data", str(a.images),
                                         "--no-progress", "--lpips", "off", "--fid", "off", *CPU],
    "decode": lambda a, t, tok: ["decode", "--tokenizer", str(tok), str(a.ids), "--out", str(t / "o"), *CPU],
    "sample": lambda a, t, tok: ["sample", "--prior", str(a.prior), "--tokenizer", str(tok), "--out", str(t / "o"),
                                 "--n", "1", *CPU],
}  # fmt: skip
PRIOR_COMMANDS: dict[str, Callable[[Art, Path, Path], list[str]]] = {
    "sample": lambda a, t, p: ["sample", "--prior", str(p), "--tokenizer", str(a.tok), "--out", str(t / "o"), "--n",
                               "1", *CPU],
    "eval-prior": lambda a, t, p: ["eval-prior", "--prior", str(p), "--tokens", str(a.tokens), *CPU],
    "probe": lambda a, t, p: ["probe", "--prior", str(p), "--tokenizer", str(a.tok), "--data", str(a.images),
                              "--out", str(t / "o"), *CPU],
}  # fmt: skip
TOKEN_COMMANDS: dict[str, Callable[[Art, Path, Path], list[str]]] = {
    "train-prior": lambda a, t, d: ["train-prior", "--tokens", str(d), "--out", str(t / "o"), *PRIOR_RUN],
    "eval-prior": lambda a, t, d: ["eval-prior", "--prior", str(a.prior), "--tokens", str(d), *CPU],
}
# The file of a broken token folder that the message must name.
TOKEN_FILES = {
    "manifest_json_list": "manifest.json", "manifest_missing_keys": "manifest.json",
    "labels_shorter_than_tokens": "labels-00000.npy", "shard_outside_relative": "outside-tokens.npy",
    "shard_outside_absolute": "outside-tokens.npy", "tokens_float": "tokens-00000.npy",
    "ids_outside_vocab": "tokens-00000.npy", "labels_negative": "labels-00000.npy",
    "labels_float": "labels-00000.npy", "labels_2d": "labels-00000.npy",
}  # fmt: skip

CASES: dict[str, Case] = {}


def _model_case(cmd: Callable, folders: str, kind: str) -> Case:
    def make(a: Art, t: Path) -> tuple[list[str], list[str]]:
        folder = getattr(a, folders)[kind]
        return cmd(a, t, folder), [n for f in MODEL_FILES[kind] for n in (str(folder / f), f)]

    return Case(make, absurd=kind == "config_absurd_size")


for _kind in MODEL_KINDS:
    for _name, _cmd in TOK_COMMANDS.items():
        CASES[f"tokenizer-{_kind}-{_name}"] = _model_case(_cmd, "bad_tok", _kind)
    for _name, _cmd in PRIOR_COMMANDS.items():
        CASES[f"prior-{_kind}-{_name}"] = _model_case(_cmd, "bad_prior", _kind)


def _tokens_case(cmd: Callable, kind: str) -> Case:
    def make(a: Art, t: Path) -> tuple[list[str], list[str]]:
        return cmd(a, t, a.bad_tokens[kind]), [TOKEN_FILES[kind]]

    return Case(make)


for _kind in TOKEN_KINDS:
    for _name, _cmd in TOKEN_COMMANDS.items():
        CASES[f"tokens-{_kind}-{_name}"] = _tokens_case(_cmd, _kind)


def _image_case(kind: str) -> Case:
    def make(a: Art, t: Path) -> tuple[list[str], list[str]]:
        p = a.bad_images[kind]
        return ["reconstruct", "--tokenizer", str(a.tok), str(p), "--out", str(t / "o"), *CPU], [
            str(p),
            p.name,
        ]

    return Case(make)


for _kind in IMAGE_KINDS:
    CASES[f"image-{_kind}-reconstruct"] = _image_case(_kind)

# reconstruct reads image files only (PIL): a .npy is "not an image" there. --data takes arrays: a NaN pixel.
CASES["data-nan_npy-encode"] = Case(
    lambda a, t: (
        [
            "encode",
            "--tokenizer",
            str(a.tok),
            "--data",
            str(a.nan_npy),
            "--out",
            str(t / "o"),
            "--no-progress",
            *CPU,
        ],
        [str(a.nan_npy), a.nan_npy.name],
    )  # fmt: skip
)
CASES["data-nan_npy-eval-tokenizer"] = Case(
    lambda a, t: (
        [
            "eval-tokenizer",
            "--tokenizer",
            str(a.tok),
            "--data",
            str(a.nan_npy),
            "--no-progress",
            "--lpips",
            "off",
            "--fid",
            "off",
            *CPU,
        ],
        [str(a.nan_npy), a.nan_npy.name],
    )  # fmt: skip
)


def _flag_case(build: Callable[[Art, Path], list[str]], flag: str) -> Case:
    return Case(lambda a, t: (build(a, t), [flag]), flag=True)


_TRAIN_PRIOR = lambda a, t: ["train-prior", "--tokens", str(a.tokens), "--out", str(t / "o"), *PRIOR_RUN]
_TRAIN_TOK = lambda a, t: ["train-tokenizer", "--out", str(t / "o"), *_tok_run(a)]
_SAMPLE = lambda a, t: ["sample", "--prior", str(a.prior), "--tokenizer", str(a.tok), "--out", str(t / "o"), "--n",
                        "1", *CPU]  # fmt: skip
_EVAL_PRIOR = lambda a, t: ["eval-prior", "--prior", str(a.prior), "--tokens", str(a.tokens), *CPU]
_ENCODE = TOK_COMMANDS["encode"]
_EVAL_TOK = TOK_COMMANDS["eval-tokenizer"]
_DECODE = TOK_COMMANDS["decode"]

FLAG_VALUES = {
    "ckpt_every_0": ("--ckpt-every", "0", {"train-prior": _TRAIN_PRIOR, "train-tokenizer": _TRAIN_TOK}),
    "compile_bogus": ("--compile", "bogusmode", {"train-prior": _TRAIN_PRIOR}),
    "max_minutes_negative": ("--max-minutes", "-1", {"train-prior": _TRAIN_PRIOR, "train-tokenizer": _TRAIN_TOK}),
    "min_lr_ratio_negative": ("--min-lr-ratio", "-3", {"train-tokenizer": _TRAIN_TOK}),
    "steps_negative": ("--steps", "-1", {"train-prior": _TRAIN_PRIOR, "train-tokenizer": _TRAIN_TOK}),
    "batch_size_0": ("--batch-size", "0", {
        "train-prior": _TRAIN_PRIOR, "train-tokenizer": _TRAIN_TOK, "eval-prior": _EVAL_PRIOR,
        "encode": lambda a, t: _ENCODE(a, t, a.tok), "eval-tokenizer": lambda a, t: _EVAL_TOK(a, t, a.tok),
        "decode": lambda a, t: _DECODE(a, t, a.tok),
    }),
    "cfg_scale_nan": ("--cfg-scale", "nan", {"sample": _SAMPLE, "eval-prior": _EVAL_PRIOR}),
    "temperature_negative": ("--temperature", "-1", {"sample": _SAMPLE, "eval-prior": _EVAL_PRIOR}),
    "top_k_0": ("--top-k", "0", {"sample": _SAMPLE, "eval-prior": _EVAL_PRIOR}),
}  # fmt: skip
for _id, (_flag, _value, _commands) in FLAG_VALUES.items():
    for _name, _build in _commands.items():
        CASES[f"flag-{_id}-{_name}"] = _flag_case(
            lambda a, t, b=_build, f=_flag, v=_value: [*b(a, t), f, v], _flag
        )


# --out naming an existing regular file: the message names --out or the file.
OUT_COMMANDS: dict[str, Callable[[Art, Path], list[str]]] = {
    "train-prior": _TRAIN_PRIOR,
    "train-tokenizer": _TRAIN_TOK,
    "encode": lambda a, t: _ENCODE(a, t, a.tok),
    "decode": lambda a, t: _DECODE(a, t, a.tok),
    "reconstruct": lambda a, t: TOK_COMMANDS["reconstruct"](a, t, a.tok),
    "sample": _SAMPLE,
    "probe": lambda a, t: PRIOR_COMMANDS["probe"](a, t, a.prior),
    "eval-tokenizer": lambda a, t: _EVAL_TOK(a, t, a.tok),
}
for _name, _build in OUT_COMMANDS.items():
    CASES[f"flag-out_is_a_file-{_name}"] = Case(
        lambda a, t, b=_build: ([*b(a, t), "--out", str(a.a_file)], ["--out", str(a.a_file), a.a_file.name]),
        flag=True,
    )

# Weight files that pickle more than tensors: refused by torch.load(weights_only=True); the message is vqim's.
CASES["weights-vgg_pickled-eval-tokenizer"] = Case(
    lambda a, t: (
        [*_EVAL_TOK(a, t, a.tok), "--lpips", "on", "--vgg-weights", str(a.pickled["vgg"])],
        [str(a.pickled["vgg"]), a.pickled["vgg"].name],
    ),  # fmt: skip
    forbidden=("weights_only",),
)
CASES["weights-vgg_pickled-train-tokenizer"] = Case(
    lambda a, t: (
        [*_TRAIN_TOK(a, t), "--perceptual-weight", "0.1", "--vgg-weights", str(a.pickled["vgg"])],
        [str(a.pickled["vgg"]), a.pickled["vgg"].name],
    ),  # fmt: skip
    forbidden=("weights_only",),
)
CASES["weights-inception_pickled-eval-tokenizer"] = Case(
    lambda a, t: (
        [*_EVAL_TOK(a, t, a.tok), "--fid", "on", "--inception-weights", str(a.pickled["inception"])],
        [str(a.pickled["inception"]), a.pickled["inception"].name],
    ),  # fmt: skip
    forbidden=("weights_only",),
)


# ---------------------------------------------------------------------------------------------- tests
def test_the_corpus_is_large_enough():
    assert len(CASES) >= 45


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input_exits_2_with_one_error_line_naming_it(case_id, art, tmp_path, capsys):
    case = CASES[case_id]
    argv, names = case.make(art, tmp_path)
    with _address_space_limit() if case.absurd else contextlib.nullcontext():
        outcome = _run(argv, capsys)
    _check(outcome, names, flag=case.flag, forbidden=case.forbidden)


def test_the_good_artifacts_work(art, tmp_path, capsys):
    """The corpus breaks one thing at a time: the unbroken artifacts go through the same commands."""
    for argv in (
        TOK_COMMANDS["reconstruct"](art, tmp_path / "r", art.tok),
        TOK_COMMANDS["decode"](art, tmp_path / "d", art.tok),
        _SAMPLE(art, tmp_path / "s"),
        _EVAL_PRIOR(art, tmp_path),
        _TRAIN_PRIOR(art, tmp_path / "p"),
    ):
        o = _run(argv, capsys)
        assert o.exc is None and o.code is None, (argv[0], o.exc and _describe(o.exc), o.code, o.err[-300:])
        json.loads(o.out)


def test_a_16_bit_png_is_not_an_error(art, tmp_path, capsys):
    o = _run(
        ["reconstruct", "--tokenizer", str(art.tok), str(art.png16), "--out", str(tmp_path / "o"), *CPU],
        capsys,
    )
    assert o.exc is None and o.code is None, (o.exc and _describe(o.exc), o.code, o.err[-300:])
    res = json.loads(o.out)
    assert str(art.png16) in res and Path(res[str(art.png16)]["png"]).is_file()


def test_the_python_api_raises_input_error_with_the_cli_message(art, tmp_path, capsys):
    """The same checks serve the library: an `InputError` (a ValueError) whose message the CLI prints."""
    from vqim import InputError
    from vqim.tokens import TokenDataset

    loads = [(Tokenizer.from_pretrained, art.bad_tok[k]) for k in MODEL_KINDS if k != "config_invalid_json"]
    loads += [(Prior.from_pretrained, art.bad_prior[k]) for k in MODEL_KINDS if k != "config_invalid_json"]
    loads += [
        (TokenDataset, art.bad_tokens[k]) for k in ("manifest_json_list", "tokens_float", "labels_negative")
    ]
    for load, path in loads:
        with pytest.raises(InputError) as e:
            load(path)
        message = " ".join(str(e.value).split())
        command = ["eval-prior", "--prior", str(art.prior), "--tokens", str(path), *CPU]
        if load == Tokenizer.from_pretrained:
            command = TOK_COMMANDS["decode"](art, tmp_path / "d", path)
        elif load == Prior.from_pretrained:
            command = ["eval-prior", "--prior", str(path), "--tokens", str(art.tokens), *CPU]
        o = _run(command, capsys)
        assert o.err.strip() == f"error: {message}", (path, o.err)
