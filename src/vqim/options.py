"""Command-line options generated from config dataclasses: one declaration per option.

A field of a config dataclass *is* the option: its name gives the flag (`batch_size` → `--batch-size`), its
type the parser, its default the default shown in `--help`, and its entry in the class docstring's "Args:"
section the help text (or `option(..., help=...)` where a field needs more: choices, a flag name, a default
that means "from the preset's recipe"). The same dataclass is what the Python API takes, so a new setting is
added in one place and appears in the CLI with its help.

    @dataclass(kw_only=True)
    class RunConfig:
        '''Args:
            steps: optimizer steps.
        '''
        steps: int = 1000

    add_options(parser, RunConfig)          # --steps STEPS   optimizer steps. (default: 1000)
    cfg = build(RunConfig, namespace)       # RunConfig(steps=...)

Types: int, float, str and `pathlib.Path` take one value; `bool` gives `--name/--no-name` (or a plain switch
with `negatable=False`); `Literal[...]` gives choices; `tuple[T, T]` takes exactly two values, `tuple[T, ...]`
and `list[T]` one or more; `X | None` is X with None meaning "not given". A field whose type is itself a
config dataclass adds that class's options (in a group) and is built from them. A function's parameters work
the same way (`add_options(parser, fn)`, `values(fn, namespace)`), with its docstring's "Args:".
A field without help text is an error: every option says what it does.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import functools
import inspect
import os
import pathlib
import re
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal

_UNSET: Any = object()


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str | None = None,  # noqa: A002 - argparse's name
    default_factory: Any = dataclasses.MISSING,
    flag: str | None = None,
    choices: Iterable[Any] | None = None,
    metavar: str | tuple[str, ...] | None = None,
    cli: bool = True,
    cli_default: Any = _UNSET,
    default_text: str | None = None,
    negatable: bool = True,
    nargs: str | int | None = None,
    const: Any = _UNSET,
    positional: bool = False,
    parse: Callable[[Any], Any] | None = None,
) -> Any:
    """A dataclass field with command-line details (all optional; the docstring gives the help by default).

    Args:
        default, default_factory: as for `dataclasses.field`.
        help: help text, instead of the class docstring's entry.
        flag: the flag's name, instead of `--field-name`.
        choices: allowed values (`Literal[...]` types give them without this).
        metavar: argparse metavar.
        cli: False keeps the field out of the command line (set by code, or not a user's setting).
        cli_default: the default on the command line when it differs from the field's: `None` for settings
            whose value, when not given, comes from elsewhere (a preset's recipe, a fraction of the steps).
        default_text: what `--help` shows as the default (e.g. "the preset's recipe"), instead of the value.
        negatable: for booleans, also accept `--no-NAME` (False: a plain on-switch).
        nargs, const: as for argparse, e.g. nargs="?" with const="default" for `--compile [MODE]`.
        positional: a positional argument instead of a flag.
        parse: turns the string(s) given on the command line into the field's value (for types with no
            command-line form, e.g. `KEY=VALUE` items into a dict); a ValueError is a usage error.
    """
    meta = {
        "help": help,
        "flag": flag,
        "choices": tuple(choices) if choices is not None else None,
        "metavar": metavar,
        "cli": cli,
        "cli_default": cli_default,
        "default_text": default_text,
        "negatable": negatable,
        "nargs": nargs,
        "const": const,
        "positional": positional,
        "parse": parse,
    }
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_ENTRY = re.compile(r"^(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)\s*:\s*(.*)$")


def docstring_args(obj: Any) -> dict[str, str]:
    """Name → help text from the "Args:" section of a function's or class's docstring (and its bases').

    An entry may name several fields (`seed, num_workers: ...`); continuation lines are joined; a subclass's
    entry replaces its base's.
    """
    out: dict[str, str] = {}
    docs = (
        [k.__dict__.get("__doc__") for k in reversed(obj.__mro__)] if isinstance(obj, type) else [obj.__doc__]
    )
    for doc in docs:
        if not doc:
            continue
        lines = inspect.cleandoc(doc).splitlines()
        try:
            start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
        except StopIteration:
            continue
        names: list[str] = []
        indent = None
        for line in lines[start + 1 :]:
            if not line.strip():
                continue
            ind = len(line) - len(line.lstrip())
            if ind == 0:
                break  # a new section
            if indent is None:
                indent = ind
            m = _ENTRY.match(line.strip()) if ind == indent else None
            if m:
                names = [n.strip().lstrip("*") for n in m.group(1).split(",")]
                for n in names:
                    out[n] = m.group(2).strip()
            elif names:
                for n in names:
                    out[n] = f"{out[n]} {line.strip()}".strip()
    return out


@functools.cache
def _signature_class(fn: Callable) -> type:
    """A dataclass with one field per parameter of fn (its type hint, its default), carrying fn's docstring."""
    hints = typing.get_type_hints(fn)
    fields = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        spec = dataclasses.field() if p.default is p.empty else dataclasses.field(default=p.default)
        fields.append((p.name, hints.get(p.name, Any), spec))
    cls = dataclasses.make_dataclass(f"{fn.__name__}_options", fields, kw_only=True)
    cls.__doc__ = fn.__doc__
    return cls


def _as_class(obj: Any) -> type:
    if dataclasses.is_dataclass(obj) and isinstance(obj, type):
        return obj
    if callable(obj):
        return _signature_class(obj)
    raise TypeError(f"options come from a dataclass or a function, not {obj!r}")


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _nested(tp: Any) -> type | None:
    """The config dataclass a field holds, if it holds one."""
    tp = _unwrap_optional(tp)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _field_default(f: dataclasses.Field) -> Any:
    if f.metadata.get("cli_default", _UNSET) is not _UNSET:
        return f.metadata["cli_default"]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _UNSET


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple | list):
        return " ".join(map(str, value))
    return str(value)


def _tuple_metavar(name: str, n: int) -> tuple[str, ...]:
    """`betas`, 2 → ("B1", "B2"): short names that say how many values the flag takes."""
    return tuple(f"{name[0].upper()}{i + 1}" for i in range(n))


def _kwargs_for(
    f: dataclasses.Field, tp: Any, help_text: str, default: Any, default_text: str | None
) -> dict:
    """argparse keyword arguments for one field (the help text still to be finished by the caller)."""
    tp = _unwrap_optional(tp)
    meta = f.metadata
    kw: dict[str, Any] = {}
    if default is _UNSET:
        if not meta.get("positional"):
            kw["required"] = True
    else:
        kw["default"] = default
    origin = typing.get_origin(tp)
    if meta.get("parse") is not None:
        kw["type"], kw["action"] = str, _parsing_action(meta["parse"])
    elif tp is bool:
        kw["action"] = argparse.BooleanOptionalAction if meta.get("negatable", True) else "store_true"
    elif origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            kw["nargs"] = "+"
        else:
            if len(set(args)) != 1:
                raise TypeError(f"option {f.name}: a tuple option takes values of one type, got {tp!r}")
            kw["nargs"] = len(args)
        kw.update(_item(f, args[0]))
        if isinstance(kw["nargs"], int) and "choices" not in kw:
            kw["metavar"] = _tuple_metavar(f.name, len(args))
        kw["action"] = _TupleAction
    elif origin in (list, collections.abc.Sequence):
        (item,) = typing.get_args(tp)
        kw["nargs"] = "+"
        kw.update(_item(f, item))
    else:
        kw.update(_item(f, tp))
    for key in ("choices", "metavar", "nargs"):
        if meta.get(key) is not None:
            kw[key] = list(meta[key]) if key == "choices" else meta[key]
    if meta.get("const", _UNSET) is not _UNSET:
        kw["const"] = meta["const"]
    text = help_text.strip()
    shown = default_text or meta.get("default_text")
    if shown is None and default not in (_UNSET, None) and kw.get("action") != "store_true":
        shown = _show(default) if default not in ({}, (), []) else None
    if shown and "(default:" not in text:  # a help text may say its default itself
        text = f"{text} (default: {shown})"
    kw["help"] = text.replace("%", "%%")
    return kw


_PATHS = (str, pathlib.Path, os.PathLike)


def _item(f: dataclasses.Field, tp: Any) -> dict[str, Any]:
    """type (and choices) for one value of type tp."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and all(
        a in _PATHS or typing.get_origin(a) in _PATHS for a in typing.get_args(tp)
    ):
        return {"type": str}  # `str | os.PathLike`: a path, given as a string
    if typing.get_origin(tp) is Literal:
        values = typing.get_args(tp)
        return {"type": type(values[0]), "choices": list(values)}
    if tp in (int, float, str, pathlib.Path):
        return {"type": tp}
    raise TypeError(f"option {f.name}: type {tp!r} has no command-line form; declare it with cli=False")


class _TupleAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):  # noqa: D102
        setattr(namespace, self.dest, tuple(values))


def _parsing_action(parse: Callable[[Any], Any]) -> type[argparse.Action]:
    class _Parse(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):  # noqa: D102
            try:
                setattr(namespace, self.dest, parse(values))
            except ValueError as e:
                raise argparse.ArgumentError(self, str(e)) from None

    return _Parse


def add_options(
    parser: argparse._ActionsContainer,
    obj: Any,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
    default_text: dict[str, str] | None = None,
    help: dict[str, str] | None = None,  # noqa: A002
    overrides: dict[str, dict[str, Any]] | None = None,
) -> list[str]:
    """Add one option per field of dataclass `obj` (or per parameter of function `obj`); returns their names.

    A field holding a config dataclass adds that class's options in an argument group (titled by the first
    line of its docstring); `values` / `build` put them back together.

    Args:
        parser: an ArgumentParser or argument group.
        obj: the config dataclass, or a function.
        only: add just these fields (in this order).
        exclude: fields left out (set by the command itself).
        defaults: command-line defaults that differ from the dataclass's (e.g. None: "from the preset").
        default_text: what `--help` shows as the default of these fields (e.g. "the preset's recipe").
        help: help texts that replace the docstring's for this command.
        overrides: extra argparse keyword arguments per field (e.g. choices known only at run time).

    Raises:
        TypeError: a field has no help text, or a type with no command-line form.
    """
    cls = _as_class(obj)
    docs = docstring_args(cls)
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    names = list(only) if only is not None else list(by_name)
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {unknown}")
    added = []
    for name in names:
        f = by_name[name]
        if name in exclude or not f.metadata.get("cli", True):
            continue
        nested = _nested(hints[name])
        if nested is not None:
            title = (inspect.getdoc(nested) or nested.__name__).splitlines()[0].rstrip(".")
            group = parser.add_argument_group(title[:1].lower() + title[1:])
            added += add_options(group, nested, defaults=defaults, default_text=default_text, help=help,
                                 overrides=overrides)  # fmt: skip
            continue
        text = (help or {}).get(name) or f.metadata.get("help") or docs.get(name)
        if not text:
            raise TypeError(f"{cls.__name__}.{name} has no help text: document it under Args:")
        default = defaults[name] if defaults and name in defaults else _field_default(f)
        kw = _kwargs_for(f, hints[name], text, default, (default_text or {}).get(name))
        kw.update((overrides or {}).get(name, {}))
        if f.metadata.get("positional"):
            action = parser.add_argument(name, **kw)
        else:
            action = parser.add_argument(_flag(f), dest=name, **kw)
        action.help = kw["help"]  # BooleanOptionalAction appends its own default on some Pythons
        added.append(name)
    return added


def values(obj: Any, namespace: argparse.Namespace, *, drop_none: bool = False) -> dict[str, Any]:
    """The fields of dataclass (or parameters of function) `obj` found in a parsed namespace, as a dict.

    A field holding a config dataclass is built from its own options. With drop_none, options left at None
    ("not given") are omitted, so the dataclass's or function's own defaults apply.
    """
    cls = _as_class(obj)
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        nested = _nested(hints[f.name])
        if nested is not None and f.metadata.get("cli", True):
            out[f.name] = build(nested, namespace)
        elif hasattr(namespace, f.name):
            v = getattr(namespace, f.name)
            if not (drop_none and v is None):
                out[f.name] = v
    return out


def build(cls: type, namespace: argparse.Namespace, **given: Any) -> Any:
    """An instance of config dataclass cls from a parsed namespace; `given` sets (or replaces) fields."""
    return cls(**{**values(cls, namespace), **given})


__all__ = ["option", "add_options", "values", "build", "docstring_args"]
