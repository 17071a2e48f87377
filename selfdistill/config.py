"""Typed, frozen config dataclasses loaded from YAML with dotted overrides.

Every stage declares one frozen dataclass whose fields carry a one-line help text
(`opt(default, "help")`). `from_dict` builds it from plain data and rejects unknown keys and
wrong types with a message naming the key, so a typo in a YAML file never runs silently.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from selfdistill.errors import UserError

T = TypeVar("T")


def opt(default: Any = dataclasses.MISSING, help: str = "", keyed: bool = True, **kwargs: Any) -> Any:
    """A dataclass field with a help text (shown by `--help`); list/dict defaults are copied per instance.

    `keyed=False`: never in a stage key (stages.key_config) — flags on how to treat an existing output
    (`overwrite`, `restart`) change no result.
    """
    meta = {"help": help, "keyed": keyed}
    if isinstance(default, (list, dict)):
        value = default.copy()
        return dataclasses.field(default_factory=lambda: value.copy(), metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow int->float, a number written as a string ->float
    and str->Path, nothing looser."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise UserError(f"config key '{key}': {value!r} is not one of {choices}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple):
        return _coerce_list(value, tp, key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}': expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    return _coerce_scalar(value, tp, key)


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    """The first member of `A | B | None` that accepts `value`."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except UserError:
            continue
    raise UserError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _coerce_list(value: Any, tp: Any, key: str) -> list[Any]:
    (item_tp, *_) = typing.get_args(tp) or (Any,)
    if item_tp is not str and isinstance(value, (str, list, tuple)):
        # "0.25,0.5" from YAML or `--t-grid 0.25,0.5` (which argparse hands over as ["0.25,0.5"])
        parts = [value] if isinstance(value, str) else value
        value = [yaml.safe_load(p) if isinstance(p, str) else p
                 for part in parts for p in (part.split(",") if isinstance(part, str) else [part])
                 if not isinstance(p, str) or p.strip()]
    if not isinstance(value, (list, tuple)):
        raise UserError(f"config key '{key}': expected a list, got {value!r}")
    return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 (PyYAML) reads `5e-5`, without a dot, as a string
    if tp is Path and isinstance(value, str):
        return Path(value)
    if tp is bool and not isinstance(value, bool):
        raise UserError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise UserError(f"config key '{key}': expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise UserError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build the dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(
            f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})"
        )
    values = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as e:  # a required field is missing
        raise UserError(f"config {prefix or cls.__name__}: {e}") from None
    except ValueError as e:  # __post_init__ cross-field checks
        raise UserError(f"config {prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form of a config (Paths as strings), for YAML and manifests."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def parse_override(item: str) -> tuple[list[str], Any]:
    """`prune.num_layers=4` -> (['prune', 'num_layers'], 4); the value is parsed as YAML."""
    if "=" not in item:
        raise UserError(f"override '{item}' must look like key=value (e.g. prune.num_layers=4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = dict(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}': '{part}' is not a section")
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of config keys")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """YAML file (optional) + dotted `key=value` overrides -> a validated `cls`."""
    data = read_yaml(path) if path else {}
    return from_dict(cls, apply_overrides(data, list(overrides)))


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
