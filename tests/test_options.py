"""Options generated from config dataclasses: types, defaults in --help, help from docstrings, nesting."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from vqim.options import add_options, build, docstring_args, option, values


@dataclass(frozen=True)
class Sampling:
    """Sampling settings.

    Args:
        temperature: softmax temperature.
        top_k: keep the k most likely ids
            (None: all of them).
    """

    temperature: float = 1.0
    top_k: int | None = None


@dataclass(kw_only=True)
class Base:
    """Shared settings.

    Args:
        out: output folder.
        steps, batch_size: optimizer steps and global batch.
    """

    out: str
    steps: int = 1000
    batch_size: int = 16


@dataclass(kw_only=True)
class Run(Base):
    """A run.

    Args:
        steps: steps of this run (replaces the base's entry).
        lr: peak learning rate; 5% of it at the end.
        betas: Adam betas.
        widths: one or more widths.
        mode: how to run.
        progress: show a progress bar.
        resume: continue from the last checkpoint.
        norm: l2-normalise (None: the preset's).
        compile: torch.compile mode.
        path: a file.
        sampling: how to sample.
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    widths: tuple[int, ...] = (1, 2)
    mode: Literal["fast", "slow"] = "fast"
    progress: bool = True
    resume: bool = option(False, negatable=False)
    norm: bool | None = None
    compile: str | None = option(None, nargs="?", const="default", metavar="MODE")
    path: Path | None = None
    sampling: Sampling = Sampling()
    internal: dict = option(None, cli=False)


def _parser(obj=Run, **kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t")
    add_options(p, obj, **kw)
    return p


def test_types_map_to_argparse_and_build_the_dataclass():
    ns = _parser().parse_args(
        [
            "--out",
            "o",
            "--steps",
            "5",
            "--lr",
            "0.5",
            "--betas",
            "0.5",
            "0.9",
            "--widths",
            "3",
            "4",
            "5",
            "--mode",
            "slow",
            "--no-progress",
            "--resume",
            "--no-norm",
            "--compile",
            "--path",
            "a.txt",
            "--temperature",
            "0.7",
            "--top-k",
            "3",
        ]  # fmt: skip
    )
    run = build(Run, ns)
    assert run == Run(out="o", steps=5, lr=0.5, betas=(0.5, 0.9), widths=(3, 4, 5), mode="slow", progress=False,
                      resume=True, norm=False, compile="default", path=Path("a.txt"),
                      sampling=Sampling(0.7, 3))  # fmt: skip
    assert isinstance(run.steps, int) and isinstance(run.betas, tuple)
    # Not given: the dataclass's defaults; a bare optional flag takes its const.
    d = build(Run, _parser().parse_args(["--out", "o"]))
    assert d == Run(out="o") and d.compile is None and d.norm is None
    assert (
        build(Run, _parser().parse_args(["--out", "o", "--compile", "max-autotune"])).compile
        == "max-autotune"
    )


def test_bad_values_and_missing_required_are_usage_errors(capsys):
    for argv in (["--steps", "5"], ["--out", "o", "--mode", "medium"], ["--out", "o", "--betas", "1"],
                 ["--out", "o", "--steps", "x"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            _parser().parse_args(argv)
        assert e.value.code == 2
    assert "invalid choice: 'medium'" in capsys.readouterr().err


def test_help_shows_docstring_text_and_defaults():
    text = _parser().format_help()
    flat = " ".join(text.split())
    assert "steps of this run (replaces the base's entry). (default: 1000)" in flat
    assert "optimizer steps and global batch. (default: 16)" in flat  # one entry for two fields
    assert "peak learning rate; 5% of it at the end. (default: 0.0001)" in flat  # % survives formatting
    assert "--betas B1 B2" in flat and "Adam betas. (default: 0.9 0.99)" in flat
    assert "{fast,slow}" in flat and "(default: fast)" in flat
    assert "--progress, --no-progress" in flat and "show a progress bar. (default: on)" in flat
    assert "keep the k most likely ids (None: all of them)." in flat  # continuation lines joined
    assert "--compile [MODE]" in flat
    assert "how to sample:" not in flat and "sampling settings:" in flat  # the nested class's group
    assert "--internal" not in flat
    assert "--out OUT" in flat and "(default: None)" not in flat


def test_command_level_defaults_text_and_overrides():
    p = _parser(defaults={"lr": None}, default_text={"lr": "the preset's recipe"},
                overrides={"mode": {"choices": ["fast"]}}, help={"batch_size": "sequences per step."})  # fmt: skip
    flat = " ".join(p.format_help().split())
    assert "peak learning rate; 5% of it at the end. (default: the preset's recipe)" in flat
    assert "sequences per step. (default: 16)" in flat
    assert p.parse_args(["--out", "o"]).lr is None
    assert values(Run, p.parse_args(["--out", "o"]), drop_none=True).get("lr", "absent") == "absent"
    with pytest.raises(SystemExit):
        p.parse_args(["--out", "o", "--mode", "slow"])


def test_missing_help_is_an_error():
    @dataclass
    class Undocumented:
        """One documented field.

        Args:
            a: documented.
        """

        a: int = 1
        b: int = 2

    with pytest.raises(TypeError, match=r"Undocumented\.b has no help text"):
        _parser(Undocumented)
    _parser(Undocumented, exclude=["b"])  # fine without it
    with pytest.raises(TypeError, match="no command-line form"):

        @dataclass
        class Odd:
            """A mapping.

            Args:
                d: a mapping.
            """

            d: dict = None

        _parser(Odd)


def test_positional_and_only():
    @dataclass
    class Files:
        """Files.

        Args:
            images: image files.
            out: output folder.
            size: crop side.
        """

        images: list[str] = option(positional=True)
        out: str = "o"
        size: int | None = None

    ns = _parser(Files).parse_args(["a.png", "b.png", "--size", "3"])
    assert build(Files, ns) == Files(images=["a.png", "b.png"], out="o", size=3)
    p = _parser(Files, only=["out"])
    assert "--size" not in p.format_help()


def test_function_parameters_are_options_too():
    def run(out: str = "runs/x", steps: int | None = None, progress: bool = True) -> None:
        """Do it.

        Args:
            out: where.
            steps: how many (default: the recipe's).
            progress: show a progress bar.
        """

    p = _parser(run)
    assert values(run, p.parse_args(["--steps", "3", "--no-progress"])) == {
        "out": "runs/x",
        "steps": 3,
        "progress": False,
    }
    assert "where. (default: runs/x)" in " ".join(p.format_help().split())


def test_docstring_args_reads_bases_and_multi_name_entries():
    d = docstring_args(Run)
    assert d["out"] == "output folder." and d["batch_size"] == "optimizer steps and global batch."
    assert d["steps"] == "steps of this run (replaces the base's entry)."


def test_tuples_of_choices_and_parsed_options():
    def pairs(items: list[str]) -> dict[str, int]:
        out = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"expected KEY=VALUE, got {item!r}")
            out[key] = int(value)
        return out

    @dataclass
    class Study:
        """A study.

        Args:
            baselines: baselines to fit.
            overrides: settings for every row.
        """

        baselines: tuple[Literal["encoder", "pixels"], ...] = option(("encoder",), nargs="*")
        overrides: dict = option(
            default_factory=dict, flag="--set", metavar="KEY=VALUE", nargs="+", parse=pairs
        )

    p = _parser(Study)
    assert build(Study, p.parse_args(["--baselines", "pixels", "encoder", "--set", "a=1", "b=2"])) == Study(
        ("pixels", "encoder"), {"a": 1, "b": 2}
    )
    assert build(Study, p.parse_args(["--baselines"])).baselines == ()
    assert build(Study, p.parse_args([])) == Study()
    for argv in (["--baselines", "colour"], ["--set", "a"]):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
    flat = " ".join(p.format_help().split())
    assert "--set KEY=VALUE [KEY=VALUE ...]" in flat and "(default: {})" not in flat
