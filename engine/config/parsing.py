"""JSON -> frozen dataclasses: every key and type checked, errors name the key path; `--set` overrides."""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or impossible; the message names the key."""


def _check_int(where: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where}: expected an integer >= {minimum}, got {value!r}")


def from_dict(cls, data, where: str):
    """Build dataclass `cls` from parsed JSON, checking every key and type; errors name the key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls) if f.init and f.name != "extra_hf"]
    def path(key): return f"{where}.{key}" if where else key
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f"{path(key)}: unknown key" + (f" (did you mean '{path(hint[0])}'?)" if hint else
                                                             f"; valid keys: {', '.join(known)}"))
    for f in fields(cls):
        if f.name in known and f.name not in data and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{path(f.name)}: required key is missing")
    return cls(**{k: _coerce(hints[k], v, path(k)) for k, v in data.items()})


def _coerce(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if len(options := [a for a in args if a is not type(None)]) == 1:  # Optional[X]: X's error, key path intact
            return _coerce(options[0], value, where)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e).split(": ", 1)[1])
        raise ConfigError(f"{where}: " + " or ".join(dict.fromkeys(errors)))
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is tuple:
        if isinstance(value, str):  # a single path where a list is allowed
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    expected = {float: (int, float), int: (int,), bool: (bool,), str: (str,), dict: (dict,)}.get(origin or tp)
    if expected is None:
        return value
    if not isinstance(value, expected) or (tp is not bool and isinstance(value, bool)):
        names = {float: "a number", int: "an integer", bool: "true or false", str: "a string", dict: "an object"}
        raise ConfigError(f"{where}: expected {names[origin or tp]}, got {json.dumps(value)}")
    return float(value) if tp is float else value


def _parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key.path=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {text}: '{key.strip()}' is not a key path (expected e.g. train.lr=1e-4)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # bare strings need no quotes: --set out_dir=runs/x
    return keys, value


def read_config_file(path) -> dict:
    """The top-level object of a JSON config file; a missing file, bad JSON or a YAML file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if path.suffix.lower() in (".yaml", ".yml"):
            raise ConfigError(f"{path}: run configs are JSON, and YAML is not supported (yet); write it as JSON, "
                              "as in configs/quickstart.json") from None
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return raw


def apply_overrides(raw: dict, overrides: typing.Sequence[str]) -> dict[str, str]:
    """Apply `--set key.path=value` texts to `raw` in place, in order; returns {key path: the --set text}."""
    origin = {}
    for override in overrides:
        keys, value = _parse_override(override)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {override}: '{k}' is not a section")
        node[keys[-1]] = value
        origin.pop(".".join(keys), None)  # re-inserted: the dict's order is the order the values took effect
        origin[".".join(keys)] = override
    return origin


def _blame(message: str, path: Path, origin: dict[str, str]) -> str:
    """Prefix an error with the --set that set its key (the key, a section above it or a key in it), else the file."""
    key = re.sub(r"\[\d+\]", "", message.split(": ", 1)[0])
    for set_key, text in reversed(origin.items()):  # the latest --set touching the key is the one in effect
        if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
            return f"--set {text}: {message}"
    return f"{path}: {message}"


def load_config(cls, path, overrides: typing.Sequence[str] = ()):
    """Build dataclass `cls` from a JSON file plus `--set` overrides; errors name the file or the --set at fault."""
    path = Path(path)
    raw = read_config_file(path)
    origin = apply_overrides(raw, overrides)
    try:
        return from_dict(cls, raw, where="")
    except ConfigError as e:
        raise ConfigError(_blame(str(e), path, origin)) from None
