"""The config tree's machinery: a field with its help text (and choices),
the field's type, the checks every config shares, and building a config
from defaults < a TOML file < command-line overrides.

Unset is one convention across the tree: ``""`` for a str field and
``None`` for a number that has no default. The entry points (`generate`,
`evaluate`, `merge`) take their config, so nothing translates one into the
other; their keyword forms build the config with ``config_of``, where a
keyword given as ``None`` is unset (the field's default)."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from dataclasses import field, fields
from pathlib import Path, PurePath
from typing import Any, get_args, get_origin, get_type_hints

from ..core.errors import UserError
from ..core.fileio import load_toml
from .checks import finite, is_whole


def _help(text: str, default: Any = None, *, positional: bool = False,
          choices: tuple[str, ...] = (), **kw: Any) -> Any:
    """A field with its help text; ``positional`` fields are command-line
    arguments without a dash (a list-typed one takes one or more).
    ``choices`` is the field's whole set of values, declared here once: the
    config checks it (``check_numbers``), the CLI shows it, the web page
    makes it a dropdown and ``tune`` draws from it."""
    meta = {"help": text, "positional": positional}
    if choices:
        meta["choices"] = tuple(choices)
    if "flag_value" in kw:  # a str option that may also be given bare (or as true/false)
        meta["flag_value"] = kw["flag_value"]
    if "default_factory" in kw:
        return field(metadata=meta, default_factory=kw["default_factory"])
    return field(default=default, metadata=meta)


def choices(cls: type, key: str) -> tuple[str, ...]:
    """The values a field may take (empty: any of its type)."""
    return cls.__dataclass_fields__[key].metadata.get("choices", ())


def field_kind(cls: type, key: str) -> tuple[type, bool, bool]:
    """(element type, is a list, may be None) of a field: the types the tree
    uses are str, int, float, bool, list[str], list[float] and ``X | None``."""
    hint = get_type_hints(cls)[key]
    args = [a for a in get_args(hint) if a is not type(None)]
    optional = type(None) in get_args(hint)
    if optional:
        hint = args[0]
    if get_origin(hint) is list:
        return get_args(hint)[0], True, optional
    return hint, False, optional


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def option_name(key: str) -> str:
    """``prior_loss_weight`` -> ``--prior-loss-weight``."""
    return "--" + key.replace("_", "-")

def check_numbers(config: Any) -> None:
    """NaN and inf compare false with everything, so they slip past every
    range check; refuse them first, for every float field (lists too). An
    int field given a float (1e23 from the Python API) or a bool is refused
    too: a count must be a whole number before its range is checked. A
    field with choices must hold one of them."""
    for f in fields(config):
        kind, many, _ = field_kind(type(config), f.name)
        value = getattr(config, f.name)
        if kind is float:
            for v in (value if many else [value]):
                if v is not None:
                    finite(v, option_name(f.name))
        elif kind is int and not many and value is not None and not is_whole(value):
            raise UserError(f"{option_name(f.name)}: must be a whole number (got {value!r})")
        if "choices" in f.metadata:
            one_of(config, f.name, f.metadata["choices"])


def config_keys(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _check_scalar(expected: type, key: str, value: Any, where: str) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool):
        raise UserError(f"{where}: `{key}` must be true or false (got {value!r})")
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{where}: `{key}` must be an integer (got {value!r})")
    if expected is float and not isinstance(value, float):
        raise UserError(f"{where}: `{key}` must be a number (got {value!r})")
    if expected is str and not isinstance(value, str):
        raise UserError(f"{where}: `{key}` must be a string (got {value!r})")
    return value


def _check_type(cls: type, key: str, value: Any, where: str) -> Any:
    kind, many, _ = field_kind(cls, key)
    if "flag_value" in cls.__dataclass_fields__[key].metadata:  # a str that may be a bool
        if not isinstance(value, (bool, str)):
            raise UserError(f"{where}: `{key}` must be a string or true/false (got {value!r})")
        return value  # the config checks the string and normalises the bool
    if not many:
        return _check_scalar(kind, key, value, where)
    if not isinstance(value, list):
        raise UserError(f"{where}: `{key}` must be a list (got {value!r})")
    return [_check_scalar(kind, key, v, where) for v in value]


def unknown_key(key: str, known: Iterable[str], where: str) -> UserError:
    """`unknown key `lerning_rate`; did you mean `learning_rate`?`"""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return UserError(f"{where}: unknown key `{key}`{hint}")


def check_keys(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Reject unknown keys (suggesting the closest) and wrong types."""
    known = config_keys(cls)
    checked = {}
    for key, value in values.items():
        if key not in known:
            raise unknown_key(key, known, where)
        checked[key] = _check_type(cls, key, value, where)
    return checked


def build_section(cls: type, values: dict[str, Any], where: str):
    """A config from one table of a file: every error names the table."""
    try:
        return cls(**check_keys(cls, values, where))
    except UserError as e:
        raise e if str(e).startswith(where) else UserError(f"{where}: {e}") from None


def build_config(cls: type, file: str | Path | None, overrides: dict[str, Any]):
    """Defaults < TOML file < command-line overrides (``None`` means unset)."""
    values: dict[str, Any] = {}
    if file:
        values.update(check_keys(cls, load_toml(file, "--config"), str(file)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def to_toml_dict(config: Any) -> dict[str, Any]:
    """The config as TOML can hold it (TOML has no null: unset fields are left out)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if v is not None}


def bad(config: Any, key: str, why: str) -> UserError:
    return UserError(f"{option_name(key)}: {why} (got {getattr(config, key)!r})")


def require(config: Any, *keys: str) -> None:
    for key in keys:
        if not getattr(config, key):
            raise UserError(f"{option_name(key)}: is required")


def one_of(config: Any, key: str, choices: tuple[str, ...]) -> None:
    if getattr(config, key) not in choices:
        raise bad(config, key, f"must be one of {', '.join(choices)}")


def _plain(value: Any) -> Any:
    """A Path as the str a field holds, a tuple as its list."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [str(v) if isinstance(v, PurePath) else v for v in value]
    return value


def config_of(cls: type, name: str, values: dict[str, Any], renames: dict[str, str] = {}):
    """The config of a Python call ``name(...)``: its first value already a
    ``cls`` (then nothing else may be given), or the call's keywords, named
    as the function has always named them (``renames``: keyword -> field),
    ``None`` for unset. The config checks them, once."""
    first, *rest = values.items()
    if isinstance(first[1], cls):
        given = [k for k, v in rest if v is not None]
        if given:
            raise TypeError(f"{name}(config) takes no other options (got {', '.join(given)})")
        return first[1]
    known = config_keys(cls)
    kwargs = {}
    for key, value in values.items():
        if renames.get(key, key) not in known:
            raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")
        if value is not None:
            kwargs[renames.get(key, key)] = _plain(value)
    return cls(**kwargs)


def _word(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def to_argv(config: Any) -> list[str]:
    """The command-line words the CLI's parser turns back into ``config``:
    its positional fields first, then each option that differs from its
    default (a value starting with "-" as ``--opt=VALUE``, which argparse
    would otherwise take for an option). The web page queues its jobs so."""
    words, options = [], []
    for f in fields(config):
        value = getattr(config, f.name)
        kind, many, _ = field_kind(type(config), f.name)
        if f.metadata.get("positional"):
            words += [str(v) for v in value] if many else [str(value)]
            continue
        if value == field_default(f):
            continue
        name = option_name(f.name)
        if isinstance(value, bool):
            options.append(name if value else "--no-" + name[2:])
            continue
        texts = [str(v) for v in value] if many and kind is str else \
            [",".join(_word(v) for v in value)] if many else [_word(value)]
        for text in texts:
            options += [f"{name}={text}"] if text.startswith("-") else [name, text]
    return words + options
