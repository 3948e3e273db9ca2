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
"""

from __future__ import annotations

import argparse
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
        elif origin in (list, tuple, Sequence):
            (inner,) = get_args(tp)[:1]
            kw.update(nargs="+", type=_unwrap_optional(inner)[0])
        elif origin is Literal:
            kw.update(choices=list(get_args(tp)), type=type(get_args(tp)[0]))
        elif tp in (int, float, str):
            kw["type"] = tp
        elif tp is dict or origin is dict:
            kw["type"] = json.loads
        else:
            raise TypeError(f"unsupported config type {tp} for field {name}")
        parser.add_argument(_flag(name), **kw)
    return parser


def _load_file(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config file must hold a mapping of field names to values")
    return data


def _flatten(data: dict, cls) -> dict:
    """Accept both flat files and files nested like the dataclasses (as saved by save_config)."""
    hints = typing.get_type_hints(cls)
    flat = {}
    for k, v in data.items():
        k = k.replace("-", "_")
        if k in hints and dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            flat.update(_flatten(v, hints[k]))
        else:
            flat[k] = v
    return flat


def from_dict(cls: type[T], values: dict, source: str = "config") -> T:
    """Build `cls` from a flat {leaf name: value} mapping; unknown names are an error."""
    leaves = {path[-1]: path for path, _, _ in _leaf_fields(cls)}
    unknown = sorted(set(values) - set(leaves))
    if unknown:
        raise ValueError(f"{source}: unknown config field(s) {unknown}; known: {sorted(leaves)}")

    def build(c, prefix: tuple[str, ...]):
        hints = typing.get_type_hints(c)
        kwargs = {}
        for f in dataclasses.fields(c):
            if dataclasses.is_dataclass(hints[f.name]):
                kwargs[f.name] = build(hints[f.name], prefix + (f.name,))
            elif f.name in values:
                v = values[f.name]
                tp, _ = _unwrap_optional(hints[f.name])
                if get_origin(tp) is tuple and isinstance(v, list):
                    v = tuple(v)
                kwargs[f.name] = v
        return c(**kwargs)

    return build(cls, ())


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    parser = build_parser(cls, description or (cls.__doc__ or "").strip().splitlines()[0])
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        values.update(_flatten(_load_file(args.config), cls))
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
    return from_dict(cls, _flatten(_load_file(str(path)), cls), source=str(path))
