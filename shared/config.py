"""The one config mechanism of every TRACE program (`trace-env`, `trace-engine`, `trace-train`, `trace-eval`).

A program's config is a tree of dataclasses whose fields carry a type, a default and a docstring under them.
`parse_args` builds it from, later wins:

    field defaults  <  --config FILE.toml  <  environment variables  <  --set section.field=value  <  flags

- TOML: keys are field names, one table per nested section (`[run]`, `[optim]`, ...); a program may also accept
  its fields under one table of its own (the env server's `[server]`). Unknown keys and wrong types are errors
  naming the file and the key; values merge onto the defaults, so a table sets only what it names. A top-level
  `extends = "base.toml"` (relative to the file) merges the base first, so a variant names only what it changes.
- Environment variables: each program names the few that make sense (a token, a URL), as `{VAR: "dotted.field"}`;
  the first one set wins, and a TOML value is overridden by it.
- `--set section.field=value`: the value in TOML syntax (numbers, booleans, lists, quoted strings; a bare word is a
  string), as in older releases' commands.
- Flags: every field, as `--section.field VALUE` (hyphens or underscores), booleans as `--x/--no-x`, lists and
  dicts repeatable; a few short aliases (`--steps`, `--model`) declared on the fields with `tyro.conf.arg`.
  `--help` lists every field with its docstring and the value it would take from the file given.
Then the config's `validate()` (its cross-field checks, in one place) runs; it raises ValueError saying what to
change, and `parse_args` turns that into a usage error (exit 2) before anything starts.

Why tyro: it builds the command line from the dataclasses we already document (their docstrings become the
help), it is light (import 88 ms vs 199 ms for pydantic-settings, measured in this venv with
`python -X importtime`), and the env server stays free of a second model system beside msgspec.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import tyro

T = TypeVar("T")
A = TypeVar("A")  # a program's argument dataclass (parse_args)


class ConfigError(ValueError):
    """A config that cannot be built: a bad file, key, value or combination. The message says what to change."""


# ---------------------------------------------------------------------------------------------- building a config
def load_config(
    cls: type[T],
    toml_path: str | Path | None = None,
    *,
    env_vars: Mapping[str, str] | None = None,
    sets: Sequence[str] = (),
    toml_table: str | None = None,
    base: T | None = None,
) -> T:
    """`cls` (or `base`) updated by a TOML file, then environment variables, then `section.field=value` items;
    types are checked field by field. No `validate()` here: `parse_args` runs it after the flags."""
    values = dataclasses.asdict(base if base is not None else cls())  # type: ignore[call-overload]
    for path, raw in _toml_chain(toml_path) if toml_path is not None else []:
        if toml_table is not None and isinstance(raw.get(toml_table), dict):
            raw = raw[toml_table]
        _merge(values, raw, cls, where=str(path))
    done: set[str] = set()
    for var, dotted in (env_vars or {}).items():
        text = os.environ.get(var)
        if text and dotted not in done:
            done.add(dotted)
            hint = _field_type(cls, dotted, where=f"${var}")
            _merge(values, _nested(dotted, _coerce(text, hint)), cls, where=f"${var}")
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        hint = _field_type(cls, key, where=f"--set {item!r}")
        _merge(values, _nested(key, _coerce(text, hint)), cls, where=f"--set {item!r}")
    return _convert(values, cls, where=str(toml_path or "config"))


def _toml_chain(path: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """The file and the files it extends, the farthest base first: a top-level `extends = "base.toml"` (a path
    relative to the file) loads the base's values before the file's own, which override them key by key."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    here: Path | None = Path(path)
    while here is not None:
        if any(here.resolve() == seen.resolve() for seen, _ in chain):
            names = " -> ".join(str(p) for p, _ in chain)
            raise ConfigError(f"{path}: `extends` goes round in a circle ({names} -> {here})")
        raw = _read_toml(here)
        base = raw.pop("extends", None)
        if base is not None and not isinstance(base, str):
            raise ConfigError(f"{here}: `extends` must be a path to a TOML file (a string), not {base!r}")
        chain.append((here, raw))
        here = None if base is None else here.parent / base
    return chain[::-1]


def _read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None


def _merge(into: dict[str, Any], new: Mapping[str, Any], cls: type, *, where: str, path: str = "") -> None:
    """Deep-merge `new` onto `into` (the current values of dataclass `cls`): a nested dataclass merges key by key,
    any other field (dicts included) is replaced whole; a key `cls` lacks is an unknown field."""
    hints = typing.get_type_hints(cls)
    for key, value in new.items():
        if key not in hints:
            raise ConfigError(f"{where}: unknown key {path + key!r}; known here: {', '.join(sorted(hints))}")
        sub = hints[key]  # get_type_hints drops Annotated[...] (tyro's flag metadata)
        if dataclasses.is_dataclass(sub) and isinstance(value, Mapping):
            _merge(into[key], value, sub, where=where, path=f"{path}{key}.")  # type: ignore[arg-type]
        else:
            into[key] = value


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    *head, last = dotted.split(".")
    for part in head:
        node = node.setdefault(part, {})
    node[last] = value
    return out


def _field_type(cls: type, dotted: str, *, where: str) -> Any:
    node: Any = cls
    seen: list[str] = []
    for part in dotted.split("."):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            here = ".".join(seen) or "top level"
            raise ConfigError(f"{where}: [{here}] has no field {part!r}; fields: {sorted(hints)}")
        node = hints[part]
        seen.append(part)
    return node


def _coerce(text: str, hint: Any) -> Any:
    """A command-line string as TOML syntax; a bare word stays a string, and so does a str field's text; for a list of
    strings, text that is not a TOML list is split at commas ($TRACE_ENV_URL=http://a:8000,http://b:8000)."""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    try:
        parsed = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = text
    if hint == list[str] and not isinstance(parsed, list):  # `A,B` (or one bare word) for a list of strings
        return [t.strip() for t in text.split(",") if t.strip()]
    if parsed is text:
        return text
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    admits_str = hint is str or (union and str in typing.get_args(hint))
    return text if admits_str and not isinstance(parsed, str) else parsed


def _convert(values: dict[str, Any], cls: type[T], *, where: str) -> T:
    try:
        return msgspec.convert(values, cls)  # strict: a TOML `port = "80"` is an error, not a guess
    except (msgspec.ValidationError, ValueError, AssertionError) as e:  # a section's own __post_init__ checks too
        raise ConfigError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------- the command line
def parse_args(
    args_cls: type[A],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    env_vars: Mapping[str, str] | None = None,
    toml_table: str | None = None,
) -> A:
    """Parse a program's command line. `args_cls` is a dataclass with a `config: str | None` field (the TOML
    file), optionally `set: list[str]`, a field `cfg` holding the program's config dataclass (annotated
    `tyro.conf.arg(name="")` so its flags have no prefix), and any flags that are not config (`--resume`).
    Exits 2 with the message on a bad config, as argparse does for a bad flag. A program with no flags of its own
    calls `parse_config` instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--set", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    cfg_cls = typing.get_type_hints(args_cls)["cfg"]
    try:
        cfg = load_config(cfg_cls, known.config, env_vars=env_vars, sets=known.set, toml_table=toml_table)
        default = args_cls(cfg=cfg, config=known.config)  # type: ignore[call-arg]
        before = copy.deepcopy(cfg)
    except ConfigError as e:
        _usage_error(prog, str(e))
    try:
        args = tyro.cli(
            args_cls,
            default=default,
            args=argv,
            prog=prog,
            description=description,
            config=(tyro.conf.UseAppendAction,),
        )
        _flags_replace_lists(args.cfg, before)  # type: ignore[attr-defined]
        validate = getattr(args.cfg, "validate", None)  # type: ignore[attr-defined]
        if validate is not None:
            validate()
    except (ValueError, AssertionError) as e:  # validate(), or a section's __post_init__ run by tyro
        _usage_error(prog, str(e))
    return args


def _flags_replace_lists(cfg: Any, before: Any) -> None:
    """A repeated flag (`--env-url A --env-url B`) gives a list field its values; the file's or the environment's
    list is replaced, not extended. (tyro's append action adds to the default, so what the flags gave is what
    follows the default.)"""
    for f in dataclasses.fields(cfg):
        new, old = getattr(cfg, f.name), getattr(before, f.name)
        if dataclasses.is_dataclass(new) and not isinstance(new, type):
            _flags_replace_lists(new, old)
        elif isinstance(new, list) and isinstance(old, list) and old and len(new) > len(old) and new[: len(old)] == old:
            setattr(cfg, f.name, new[len(old) :])


def parse_config(
    cls: type[T],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    env_vars: Mapping[str, str] | None = None,
    toml_table: str | None = None,
) -> T:
    """`parse_args` for a program whose command line is its config and `--config FILE.toml`, nothing else."""
    help_text = f"TOML file with {cls.__name__} fields; flags override it."
    wrapper = dataclasses.make_dataclass(
        f"_{cls.__name__}Args",
        [
            ("cfg", typing.Annotated[cls, tyro.conf.arg(name="")]),
            ("config", typing.Annotated[str | None, tyro.conf.arg(help=help_text)], dataclasses.field(default=None)),
        ],
    )
    args = parse_args(wrapper, argv, prog=prog, description=description, env_vars=env_vars, toml_table=toml_table)
    return args.cfg  # type: ignore[attr-defined,no-any-return]


def _usage_error(prog: str, message: str) -> typing.NoReturn:
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(2)
