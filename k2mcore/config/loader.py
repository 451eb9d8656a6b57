"""Load a K2Config from a preset name or a YAML file, apply `dotted.key=value` overrides.

Everything is type-checked against the dataclasses of `schema.py`; a typo in a key or a value of the
wrong type is a one-line `ConfigError` naming the full dotted key, never a silent default.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import yaml

from k2mcore.config.schema import K2Config, RopeScalingConfig
from k2mcore.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent / "presets"

# World size each preset's `parallel:` section is laid out for (also noted in the YAML files).
INTENDED_WORLD_SIZE: dict[str, int] = {
    "k2-tiny": 1,
    "moonlight-16b-a3b": 64,
    "kimi-k2": 256,
    "deepseek-v3": 1024,
}

# Sections whose mapping must spell out every field: the schema's YaRN defaults are megatron's,
# which do not match K2, so a partially written rope_scaling is almost certainly a mistake.
_ALL_FIELDS_REQUIRED = (RopeScalingConfig,)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> K2Config:
    """Preset name (file in presets/) or YAML path -> K2Config, `key=value` overrides applied."""
    path = _resolve_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections, got {_short(raw)}")
    cfg = _build(K2Config, raw, "")
    for item in overrides:
        apply_override(cfg, item)
    cfg.parallel.resolve()
    return cfg


def apply_override(cfg: K2Config, item: str) -> None:
    """Apply one `dotted.key=value` in place; the value is YAML, checked against the field type."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. parallel.tp=2")
    parts = key.split(".")
    obj: Any = cfg
    for depth, name in enumerate(parts[:-1]):
        prefix = ".".join(parts[: depth + 1])
        obj = getattr(obj, _check_key(obj, name, prefix))
        if obj is None:
            raise ConfigError(
                f"{key}: cannot set a field of {prefix}, which is null "
                f"(set {prefix} to a full mapping instead)"
            )
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{key}: {prefix} is a {type(obj).__name__}, it has no fields")
    leaf = _check_key(obj, parts[-1], key)
    ftype = typing.get_type_hints(type(obj))[leaf]
    setattr(obj, leaf, _coerce(_parse_value(text, ftype), ftype, key))


def config_to_dict(cfg: K2Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: K2Config, path: Union[str, os.PathLike]) -> None:
    """Write the resolved config; `load_config(path)` reads it back equal."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False))


# --------------------------------------------------------------------------------------------
def _resolve_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path).expanduser()
    looks_like_path = candidate.suffix in (".yaml", ".yml") or os.sep in name_or_path
    if candidate.is_file():
        return candidate
    if not looks_like_path:
        preset = PRESET_DIR / f"{name_or_path}.yaml"
        if preset.is_file():
            return preset
    presets = ", ".join(list_presets())
    if looks_like_path:
        raise ConfigError(f"config file {candidate}: not found (presets: {presets})")
    raise ConfigError(
        f"config {name_or_path!r}: no such preset ({PRESET_DIR / (name_or_path + '.yaml')}) "
        f"or file (presets: {presets})"
    )


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# keys that were renamed or merged: the error says where they went
MOVED = {
    "data.eval_samples": "train.eval_iters (validation samples = eval_iters x global_batch_size)",
}


def _unknown(dotted: str, owner: str, names: list) -> ConfigError:
    if dotted in MOVED:
        return ConfigError(f"{dotted}: no longer a key; use {MOVED[dotted]}")
    return ConfigError(f"{dotted}: unknown key ({owner}: {', '.join(names)})")


def _check_key(obj: Any, name: str, dotted: str) -> str:
    names = _fields(type(obj))
    if name not in names:
        parent = dotted.rpartition(".")[0]
        owner = f"section {parent} has" if parent else "sections are"
        raise _unknown(dotted, owner, names)
    return name


def _build(cls: type, raw: Mapping, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = _fields(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            owner = f"section {prefix} has" if prefix else "sections are"
            raise _unknown(dotted, owner, names)
        kwargs[key] = _coerce(value, hints[key], dotted)
    if cls in _ALL_FIELDS_REQUIRED:
        missing = [n for n in names if n not in raw]
        if missing:
            raise ConfigError(
                f"{prefix}: missing {', '.join(missing)} (every field must be explicit here: "
                f"the schema defaults are megatron's, not K2's)"
            )
    return cls(**kwargs)


def _parse_value(text: str, ftype: Any) -> Any:
    """Override text -> Python value. String fields keep the text verbatim (`run.name=123`)."""
    base, optional = _unwrap_optional(ftype)
    if base is str:
        return None if optional and text.strip() in ("null", "~", "None") else text
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text  # let the type check report it


def _unwrap_optional(ftype: Any) -> tuple[Any, bool]:
    if typing.get_origin(ftype) in (Union, types.UnionType):
        args = [a for a in typing.get_args(ftype) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(ftype))
    return ftype, False


def _coerce(value: Any, ftype: Any, key: str) -> Any:
    base, optional = _unwrap_optional(ftype)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: expected {_type_name(base)}, got null")
    if dataclasses.is_dataclass(base):
        if isinstance(value, base):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {_short(value)}")
        return _build(base, value, key)
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-6" (no dot) as a string
            try:
                return float(value.strip())
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - schema uses only the types above
        raise ConfigError(f"{key}: unsupported field type {ftype!r}")
    raise ConfigError(f"{key}: expected {_type_name(base)}, got {_short(value)}")


def _type_name(tp: Any) -> str:
    return {bool: "bool (true/false)"}.get(tp, getattr(tp, "__name__", str(tp)))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
