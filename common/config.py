"""One configuration object per program: dataclasses filled from a YAML file and CLI flags.

A program declares a dataclass (which may compose other dataclasses, e.g. the Stage1 settings that
the shard builder, the trainer and the evaluator share). Every leaf field becomes one flag named
after the field (`lora_r` -> `--lora-r`), so leaf names must be unique across the composition.
Precedence: dataclass default < `--config file.yaml` < explicit CLI flag.

    @dataclass
    class MyConfig:
        lr: float = field(default=2e-5, metadata={"help": "peak learning rate"})

    cfg = parse_config(MyConfig, description="...")
    print_config(cfg); save_config(cfg, out_dir / "config.json")

Every value is checked and converted by its field's declared type, by one converter (`_convert`)
for the flags (as their argparse `type`) and for config files: int (whole numbers; 8.0 -> 8,
8.7 is an error), float (ints and numeric strings such as YAML 1.1's "2e-5"), bool (true/false and
the YAML words yes/no/on/off, quoted or not, any case; numbers and other strings are errors), str
(strings; numbers are taken as written, booleans are errors: quote them), Literal (membership; an
unquoted YAML on/off, which YAML reads as a boolean, maps to the one choice spelled on/yes/true
or off/no/false, e.g. "off"),
list[T]/tuple[T, ...] (each element), dict (a mapping, or JSON text on the command line),
Optional[T] (null too). A bad value is a `ConfigError` (a ValueError) naming the source and the
key, one line per bad value: `run.yaml: optim.weight_decay: expected a float, got 'lots'`.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union, get_args, get_origin

import yaml

from common.io import atomic_write_json

T = TypeVar("T")


def _leaf_fields(cls) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """(path, field, resolved type) for every non-dataclass field, depth first."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += [((f.name,) + p, lf, lt) for p, lf, lt in _leaf_fields(tp)]
        else:
            out.append(((f.name,), f, tp))
    return out


def _unwrap_optional(tp):
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class ConfigError(ValueError):
    """A config file or value that does not fit the config dataclass; the message names the source and the key."""


class _BadValue(Exception):
    """A value that does not fit its field's type: `message` without the source; `at` = the index inside it."""

    def __init__(self, message: str, at: str = ""):
        super().__init__(message)
        self.message, self.at = message, at


# The words YAML 1.1 (PyYAML) reads as booleans when unquoted; quoted ones (or JSON strings) mean the same.
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_SEQUENCE_ORIGINS = (list, tuple, collections.abc.Sequence)


def _show(value) -> str:
    return "null" if value is None else repr(value)


def _describe(tp) -> str:
    tp, optional = _unwrap_optional(tp)
    origin = get_origin(tp)
    if tp is bool:
        text = "a boolean (true/false)"
    elif tp is int:
        text = "an int"
    elif tp is float:
        text = "a float"
    elif tp is str:
        text = "a string"
    elif origin is Literal:
        text = "one of " + ", ".join(repr(c) for c in get_args(tp))
    elif tp in _SEQUENCE_ORIGINS or origin in _SEQUENCE_ORIGINS:
        text = "a list"
    elif tp is dict or origin is dict:
        text = "a mapping"
    else:
        text = str(tp)
    return text + (" or null" if optional else "")


def _convert(value, tp):
    """`value` (a flag's text or a value read from a file) as the declared type `tp`; raises _BadValue."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional or inner is Any:
            return None
        raise _BadValue(f"expected {_describe(inner)}, got null")
    tp, origin = inner, get_origin(inner)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise _BadValue(f"expected a boolean (true/false, yes/no, on/off), got {_show(value)}")
    if tp is int:
        return _to_int(value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                pass
        elif isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _BadValue(f"expected a float, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `run_name: 42` -> "42"
        hint = " (YAML reads unquoted yes/no/on/off/true/false as booleans: quote the value)" \
            if isinstance(value, bool) else ""
        raise _BadValue(f"expected a string, got {_show(value)}{hint}")
    if origin is Literal:
        return _to_choice(value, get_args(tp))
    if tp in _SEQUENCE_ORIGINS or origin in _SEQUENCE_ORIGINS:
        return _to_sequence(value, tp)
    if tp is dict or origin is dict:
        return _to_mapping(value, tp)
    raise TypeError(f"unsupported config type {tp}")


def _to_int(value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                number = float(value.strip())
            except ValueError:
                raise _BadValue(f"expected an int, got {value!r}") from None
    if isinstance(number, float) and not isinstance(value, bool):
        if number.is_integer():
            return int(number)
        raise _BadValue(f"expected an int, got {_show(value)} (not a whole number)")
    raise _BadValue(f"expected an int, got {_show(value)}")


def _to_choice(value, choices: tuple):
    for c in choices:
        if type(value) is type(c) and value == c:
            return c
    if isinstance(value, str):  # a flag's text, or a quoted number in a file
        for c in choices:
            if not isinstance(c, str) and str(c) == value.strip():
                return c
    if isinstance(value, bool):  # YAML 1.1 reads an unquoted on/off (yes/no, true/false) as a boolean
        words = [w for w, b in _BOOL_WORDS.items() if b is value]
        matches = [c for c in choices if isinstance(c, str) and c.lower() in words]
        if len(matches) == 1:
            return matches[0]
    raise _BadValue(f"expected one of {', '.join(repr(c) for c in choices)}; got {_show(value)}")


def _to_sequence(value, tp):
    if not isinstance(value, (list, tuple)):
        raise _BadValue(f"expected a list, got {_show(value)}")
    origin, args = get_origin(tp) or tp, get_args(tp)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise _BadValue(f"expected a list of {len(args)} values, got {len(value)}: {_show(value)}")
        types_ = list(args)
    else:
        types_ = [args[0] if args else Any] * len(value)
    out = []
    for i, (v, t) in enumerate(zip(value, types_)):
        try:
            out.append(_convert(v, t))
        except _BadValue as e:
            raise _BadValue(e.message, f"[{i}]{e.at}") from None
    return tuple(out) if origin is tuple else out


def _to_mapping(value, tp) -> dict:
    if isinstance(value, str):  # the command line: JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _BadValue(f"expected a JSON object, got {value!r} ({e.msg})") from None
    if not isinstance(value, dict):
        raise _BadValue(f"expected a mapping, got {_show(value)}")
    args = get_args(tp)
    if not args:
        return dict(value)
    out = {}
    for k, v in value.items():
        try:
            out[_convert(k, args[0])] = _convert(v, args[1])
        except _BadValue as e:
            raise _BadValue(e.message, f"[{k!r}]{e.at}") from None
    return out


def _arg_type(tp):
    """The argparse `type` of a flag: the same conversion as for file values, argparse's error format."""
    def convert(text: str):
        try:
            return _convert(text, tp)
        except _BadValue as e:
            raise argparse.ArgumentTypeError(e.message) from None

    convert.__name__ = _describe(tp)
    return convert


def build_parser(cls, description: str | None = None, parser: argparse.ArgumentParser | None = None):
    parser = parser or argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--config", default=None, help="YAML/JSON file with field values; CLI flags override it")
    seen: dict[str, tuple[str, ...]] = {}
    for path, f, tp in _leaf_fields(cls):
        name = path[-1]
        if name in seen:
            raise TypeError(f"config field name {name!r} appears twice ({seen[name]} and {path})")
        seen[name] = path
        tp, _ = _unwrap_optional(tp)
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        # argparse %-formats help strings: a literal '%' ("85% of") must be doubled, here, once
        kw: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS,
                                  help=f"{help_} (default: {default!r})".replace("%", "%%"))
        origin = get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin in _SEQUENCE_ORIGINS:
            args = get_args(tp)
            kw.update(nargs="+", type=_arg_type(args[0] if args else str))
        elif origin is Literal:
            kw.update(choices=list(get_args(tp)), type=_arg_type(tp))
        elif tp in (int, float, str) or tp is dict or origin is dict:
            kw["type"] = _arg_type(tp)
        else:
            raise TypeError(f"unsupported config type {tp} for field {name}")
        parser.add_argument(_flag(name), **kw)
    return parser


def _load_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: config file not found" + (" (a directory)" if p.is_dir() else ""))
    text = p.read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
            raise ConfigError(f"{path}{where}: not valid YAML: {problem or e}") from None
        data = {} if data is None else data
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}, line {e.lineno}, column {e.colno}: not valid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config file must hold a mapping of field names to values")
    return data


def _flatten(data: dict, cls, source: str = "config", prefix: str = "") -> dict:
    """Accept both flat files and files nested like the dataclasses (as saved by save_config)."""
    hints = typing.get_type_hints(cls)
    flat = {}
    for k, v in data.items():
        k = str(k).replace("-", "_")
        if k in hints and dataclasses.is_dataclass(hints[k]):
            if v is None:  # `optim:` with every field under it commented out
                continue
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: {prefix}{k}: expected a mapping of its fields "
                                  f"({', '.join(f.name for f in dataclasses.fields(hints[k]))}), got {_show(v)}")
            flat.update(_flatten(v, hints[k], source, f"{prefix}{k}."))
        else:
            flat[k] = v
    return flat


def convert_values(cls, values: dict, source: str = "config") -> dict:
    """A flat {leaf name: value} mapping checked against `cls`: unknown names and values that do not
    fit their field's type are a ConfigError naming `source` and each bad key; values come back
    converted (e.g. "2e-5" -> 2e-05 for a float field)."""
    leaves = {path[-1]: (path, tp) for path, _, tp in _leaf_fields(cls)}
    unknown = sorted(set(values) - set(leaves))
    if unknown:
        raise ConfigError(f"{source}: unknown config field(s) {unknown}; known: {sorted(leaves)}")
    out, errors = {}, []
    for name, value in values.items():
        path, tp = leaves[name]
        try:
            out[name] = _convert(value, tp)
        except _BadValue as e:
            errors.append(f"{source}: {'.'.join(path)}{e.at}: {e.message}")
    if errors:
        raise ConfigError("\n".join(errors))
    return out


def from_dict(cls: type[T], values: dict, source: str = "config") -> T:
    """Build `cls` from a flat {leaf name: value} mapping; unknown names and ill-typed values are an error."""
    values = convert_values(cls, values, source)

    def build(c):
        hints = typing.get_type_hints(c)
        kwargs = {}
        for f in dataclasses.fields(c):
            if dataclasses.is_dataclass(hints[f.name]):
                kwargs[f.name] = build(hints[f.name])
            elif f.name in values:
                kwargs[f.name] = values[f.name]
        return c(**kwargs)

    return build(cls)


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    parser = build_parser(cls, description or (cls.__doc__ or "").strip().splitlines()[0])
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:  # checked on its own: a bad file value is an error even where a flag overrides it
        values.update(convert_values(cls, _flatten(_load_file(args.config), cls, args.config), args.config))
    values.update({k: v for k, v in vars(args).items() if k != "config"})
    cfg = from_dict(cls, values, source=args.config or "command line")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def print_config(cfg, file=None) -> None:
    file = file or sys.stdout
    print(f"{type(cfg).__name__}:", file=file)
    for path, _, _ in _leaf_fields(type(cfg)):
        v = cfg
        for p in path:
            v = getattr(v, p)
        print(f"  {path[-1]:<32} {v!r}", file=file)
    file.flush()


def save_config(cfg, path: str | Path) -> None:
    atomic_write_json(path, config_to_dict(cfg))


def load_config(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, _flatten(_load_file(str(path)), cls, str(path)), source=str(path))
