"""YAML configuration files with ``_base_`` inheritance, ``key=value`` overrides and schema validation.

A config file holds only what differs from its base(s)::

    # configs/voc_r50_edp.yaml
    _base_: base/faster_rcnn.yaml        # or a list; paths relative to this file
    train:
      lr: 1e-3                           # scientific notation is a float here (plain PyYAML: a string)

Layers, lowest first: ``defaults`` (the full schema with default values, given by the caller) →
the base chain (depth first, in list order) → the file itself → command-line overrides
``a.b.c=value`` (values parsed as YAML). Dicts merge key by key; anything else replaces.

When ``defaults`` is given every layer is validated against it: an unknown key raises
:class:`~edp_det.runtime.errors.ConfigError` naming the file (or ``command line``), the dotted key and the
closest known key; a value whose type differs from the default's raises ConfigError naming key, value
and expected type. Rules: an ``int`` is accepted (and converted) where a ``float`` is expected;
a default of ``None`` accepts anything; a default of ``{}`` (empty dict) is an open mapping that
accepts any keys; ``bool`` and ``int`` are not interchangeable. For a ``str`` default, a command-line
scalar is kept as the literal text (``output_dir=2024`` gives ``"2024"``, not ``2024``).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from edp_det.runtime.errors import ConfigError

__all__ = [
    "load_config",
    "load_yaml",
    "parse_overrides",
    "apply_overrides",
    "dump_config",
    "config_hash",
    "deep_merge",
    "flatten",
    "get_by_dotted",
    "set_by_dotted",
    "validate_config",
]

logger = logging.getLogger(__name__)

BASE_KEY = "_base_"
COMMAND_LINE = "command line"

# YAML 1.1 float regex that also accepts exponents without a dot (``1e-3``, ``5E4``).
_FLOAT_RE = re.compile(
    r"""^(?:
        [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
      | [-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
      | \.[0-9_]+(?:[eE][-+]?[0-9]+)?
      | [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
      | [-+]?\.(?:inf|Inf|INF)
      | \.(?:nan|NaN|NAN)
    )$""",
    re.X,
)
_FLOAT_TAG = "tag:yaml.org,2002:float"


def _with_float_resolver(cls: type) -> type:
    """Replace the class's implicit float resolver by :data:`_FLOAT_RE` (without touching the parent)."""
    resolvers = {k: [r for r in v if r[0] != _FLOAT_TAG] for k, v in cls.yaml_implicit_resolvers.items()}
    cls.yaml_implicit_resolvers = resolvers
    cls.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))
    return cls


@_with_float_resolver
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float."""


@_with_float_resolver
class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings :class:`_Loader` would read as floats (round trip safety)."""


def _yaml_load(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"malformed YAML in {where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed YAML in {source}: {exc}") from None


def load_yaml(path: str | os.PathLike) -> dict:
    """Read one YAML file as a mapping (no ``_base_`` processing). Empty file → ``{}``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    data = _yaml_load(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------- helpers
def deep_merge(base: Mapping, override: Mapping) -> dict:
    """Return a new dict: ``override`` merged into ``base``; dicts merge recursively, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": {}}`` → ``{"a.b": 1, "c": {}}`` (empty dicts are kept as leaves)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _split(key: str) -> list[str]:
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"invalid dotted config key {key!r}")
    return parts


def get_by_dotted(cfg: Mapping, key: str, default: Any = KeyError) -> Any:
    """``get_by_dotted(cfg, "a.b")`` → ``cfg["a"]["b"]``; missing → ``default`` (KeyError if not given)."""
    node: Any = cfg
    for part in _split(key):
        if not isinstance(node, Mapping) or part not in node:
            if default is KeyError:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def set_by_dotted(cfg: dict, key: str, value: Any) -> dict:
    """Set ``cfg["a"]["b"]["c"] = value`` for ``key="a.b.c"``, creating missing dicts. Returns ``cfg``."""
    parts = _split(key)
    node = cfg
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"cannot set {key!r}: {where!r} is a {type(nxt).__name__}, not a mapping")
        node = nxt
    node[parts[-1]] = value
    return cfg


def _plain(obj: Any) -> Any:
    """Convert to YAML/JSON-friendly plain types (tuples → lists, Paths → str, numpy scalars → Python)."""
    if isinstance(obj, Mapping):
        return {(_plain(k) if not isinstance(k, str) else k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:
        return obj.item()  # numpy / torch scalars
    return obj


# ------------------------------------------------------------------------------------------ validation
def _type_name(t: Any) -> str:
    if t is None:
        return "null"
    if isinstance(t, bool):
        return "bool"
    if isinstance(t, (list, tuple)):
        return "list"
    if isinstance(t, Mapping):
        return "mapping"
    return type(t).__name__


def _suggest(dotted: str, known: list[str], siblings: list[str], prefix: str) -> str | None:
    leaf = dotted.rsplit(".", 1)[-1]
    moved = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    if moved:
        return moved[0]
    close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)
    if close:
        return prefix + close[0]
    return None


def _all_keys(schema: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for key, value in schema.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, Mapping):
            keys.extend(_all_keys(value, dotted + "."))
    return keys


def _check_value(value: Any, default: Any, dotted: str, source: str, root: Mapping) -> Any:
    """Validate ``value`` against ``default``; return the (possibly converted) value."""
    if default is None:
        return value
    ok = True
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        if ok:
            value = list(value)
    elif isinstance(default, Mapping):
        ok = isinstance(value, Mapping)
        if ok:
            return _validate(value, default, source, dotted + ".", root)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(
            f"{source}: config key {dotted!r} has value {value!r} of type {_type_name(value)}, "
            f"expected {_type_name(default)} (default {default!r})"
        )
    return value


def _validate(layer: Mapping, schema: Mapping, source: str, prefix: str, root: Mapping) -> dict:
    if not schema:  # open mapping: anything goes
        return dict(layer)
    out = {}
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            hint = _suggest(dotted, _all_keys(root), [str(k) for k in schema], prefix)
            msg = f"{source}: unknown config key {dotted!r}"
            raise ConfigError(msg + (f" (did you mean {hint!r}?)" if hint else ""))
        out[key] = _check_value(value, schema[key], dotted, source, root)
    return out


def validate_config(layer: Mapping, defaults: Mapping, source: str = "config") -> dict:
    """Check ``layer`` (a partial config) against the schema ``defaults``; return it with ints→floats etc."""
    return _validate(layer, defaults, source, "", defaults)


# ----------------------------------------------------------------------------------------------- load
def _load_layers(path: Path, stack: list[Path], defaults: Mapping | None) -> dict:
    real = path.resolve()
    if real in stack:
        chain = " -> ".join(str(p) for p in [*stack, real])
        raise ConfigError(f"cycle in {BASE_KEY} includes: {chain}")
    data = load_yaml(path)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        bases = []
    elif isinstance(bases, (str, os.PathLike)):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{path}: {BASE_KEY} must be a path or a list of paths, got {bases!r}")
    merged: dict = {}
    for base in bases:
        base_path = Path(os.path.expanduser(base))
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        merged = deep_merge(merged, _load_layers(base_path, [*stack, real], defaults))
    if defaults is not None:
        data = validate_config(data, defaults, str(path))
    return deep_merge(merged, data)


def _parse_override(item: Any) -> tuple[str, Any, str]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"{COMMAND_LINE}: override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{COMMAND_LINE}: override {item!r} has an empty key")
    try:
        _split(key)
    except ConfigError as exc:
        raise ConfigError(f"{COMMAND_LINE}: override {item!r}: {exc}") from None
    text = text.strip()
    value = _yaml_load(text, f"{COMMAND_LINE} override {item!r}") if text else ""
    return key, value, text


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """``["a.b=1e-3", "c=[1,2]"]`` → ``[("a.b", 0.001), ("c", [1, 2])]``.

    Values are parsed as YAML (``true``, ``null``, ``[1,2]``, ``{k: v}``, ``1e-3``); an empty value is ``""``.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    return [_parse_override(item)[:2] for item in overrides]


def apply_overrides(cfg: Mapping, overrides: Iterable[str], defaults: Mapping | None = None) -> dict:
    """Apply ``key=value`` overrides to a copy of ``cfg``; validated against ``defaults`` when given.

    A mapping value merges into an existing mapping (``model={depth: 50}``); anything else replaces.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    out = copy.deepcopy(dict(cfg))
    for item in overrides:
        key, value, text = _parse_override(item)
        source = f"{COMMAND_LINE} ({item!r})"
        if defaults is not None:
            default = get_by_dotted(defaults, key, default=None)
            if isinstance(default, str) and not isinstance(value, (str, list, dict)):
                value = text  # a str key keeps the literal text (``name=2024``, ``name=null`` ...)
            layer = validate_config(set_by_dotted({}, key, value), defaults, source)
            value = get_by_dotted(layer, key)
        existing = get_by_dotted(out, key, default=None)
        if isinstance(value, Mapping) and isinstance(existing, Mapping):
            value = deep_merge(existing, value)
        try:
            set_by_dotted(out, key, copy.deepcopy(value))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return out


def load_config(
    path: str | os.PathLike | None,
    overrides: Iterable[str] = (),
    defaults: Mapping | None = None,
) -> dict:
    """Load a config: ``defaults`` ← ``_base_`` chain ← file ← ``overrides`` (see module docstring).

    ``path`` may be ``None`` (defaults + overrides only). Returns a new plain dict.
    """
    if defaults is not None:
        defaults = _plain(defaults)
        if not isinstance(defaults, dict):
            raise TypeError("defaults must be a mapping")
    cfg: dict = copy.deepcopy(defaults) if defaults is not None else {}
    if path is not None:
        cfg = deep_merge(cfg, _load_layers(Path(path), [], defaults))
    return apply_overrides(cfg, overrides, defaults)


# ----------------------------------------------------------------------------------------------- dump
def dump_config(cfg: Mapping, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as YAML atomically (temp file in the same directory + fsync + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(_plain(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def config_hash(cfg: Mapping, length: int = 10) -> str:
    """Short hash of the config content, stable across runs, processes and key order."""
    blob = json.dumps(_plain(cfg), sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]
