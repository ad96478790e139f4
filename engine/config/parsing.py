"""JSON or YAML -> frozen dataclasses: every key and type checked, errors name the key path; `--set` overrides."""
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


YAML_SUFFIXES = (".yaml", ".yml")


def read_config_file(path) -> dict:
    """The top-level object of a JSON or YAML (by suffix) config file; a missing file or bad syntax is one line."""
    return _read_config(Path(path))[0]


def _read_config(path: Path) -> tuple[dict, dict[str, int]]:
    """(top-level object, {key path: 1-based line}) of a config file; the lines are known for YAML only."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.suffix.lower() in YAML_SUFFIXES:
        return _read_yaml(path)
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return raw, {}


def _yaml_loader():
    """A SafeLoader that reads what a JSON user means: 1e-4 is a float (YAML 1.1 wants 1.0e-4), dates stay text."""
    try:
        import yaml
    except ImportError:
        raise ConfigError('YAML configs need PyYAML: pip install -e ".[yaml]"') from None

    class Loader(yaml.SafeLoader):
        pass
    # after YAML 1.1's int and float patterns, so only what they miss (an exponent without a dot) lands here
    float_re = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
    Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
                                      for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", float_re, list("-+0123456789."))
    return yaml, Loader


def _read_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    yaml, Loader = _yaml_loader()
    try:
        loader = Loader(path.read_text())
        try:
            node = loader.get_single_node()
            lines = _yaml_lines(path, node) if node is not None else {}
            raw = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({e.problem or e.context})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a YAML mapping (key: value lines) at the top level")
    return raw, lines


def _yaml_lines(path: Path, node, where: str = "", lines=None) -> dict[str, int]:
    """{key path ("train.lr", "data.train[0]"): 1-based line} from YAML's node marks; a duplicate key is an error."""
    lines = {} if lines is None else lines
    if node.tag.endswith(":map"):
        for key_node, value_node in node.value:
            key = f"{where}.{key_node.value}" if where else str(key_node.value)
            if key in lines:
                raise ConfigError(f"{path}:{key_node.start_mark.line + 1}: {key}: duplicate key (first on line "
                                  f"{lines[key]})")
            lines[key] = key_node.start_mark.line + 1
            _yaml_lines(path, value_node, key, lines)
    elif node.tag.endswith(":seq"):
        for i, item in enumerate(node.value):
            lines[f"{where}[{i}]"] = item.start_mark.line + 1
            _yaml_lines(path, item, f"{where}[{i}]", lines)
    return lines


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


def _blame(message: str, path: Path, origin: dict[str, str], lines: dict[str, int]) -> str:
    """Prefix an error with the --set that set its key (the key, a section above it or a key in it), else the file
    (and, for YAML, the line of the key or of the nearest section above it that is in the file)."""
    full_key = message.split(": ", 1)[0]
    key = re.sub(r"\[\d+\]", "", full_key)
    for set_key, text in reversed(origin.items()):  # the latest --set touching the key is the one in effect
        if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
            return f"--set {text}: {message}"
    while full_key and full_key not in lines:
        full_key = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", full_key) if re.search(r"[.\[]", full_key) else ""
    return f"{path}:{lines[full_key]}: {message}" if full_key else f"{path}: {message}"


def load_config(cls, path, overrides: typing.Sequence[str] = ()):
    """Build dataclass `cls` from a JSON or YAML file plus `--set` overrides; errors name the file (YAML: file:line)
    or the --set at fault."""
    path = Path(path)
    raw, lines = _read_config(path)
    origin = apply_overrides(raw, overrides)
    try:
        return from_dict(cls, raw, where="")
    except ConfigError as e:
        raise ConfigError(_blame(str(e), path, origin, lines)) from None
