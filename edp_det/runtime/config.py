"""YAML configuration files with ``_base_`` inheritance, ``key=value`` overrides and schema validation.

A config file holds only what differs from its base(s)::

    # configs/voc_r50_edp.yaml
    _base_: base/faster_rcnn.yaml        # or a list; paths relative to this file
    train:
      lr: 1e-3                           # scientific notation is a float here (plain PyYAML: a string)

Layers, lowest first: the defaults → the base chain (depth first, in list order) → the file itself →
command-line overrides ``a.b.c=value`` (values parsed as YAML) → extra layers given by the caller. Dicts merge
key by key; anything else replaces.

With a typed ``schema`` (:class:`edp_det.runtime.schema.ConfigSchema`) every layer is validated against the
schema of the method selected so far (a layer that sets ``method`` is validated against that method; the
command-line overrides form one layer): an unknown key, a key of another method, a renamed key, a wrong type,
a value outside its choices or bounds raise :class:`~edp_det.runtime.errors.ConfigError` naming the file (or
``command line``), the dotted key and the nearest valid key. ``compress`` keys that layers selecting another
method set, and that the final method does not declare, are dropped (logged), so that one config can run
several methods (a baseline config may inherit EDP's λ from its base). The defaults of the final method fill
in the rest.

With a plain mapping of ``defaults`` instead, the types are those of the default values: an ``int`` is accepted
(and converted) where a ``float`` is expected; a default of ``None`` accepts anything; ``{}`` is an open mapping;
``bool`` and ``int`` are not interchangeable. In both cases a command-line scalar for a ``str`` key is kept as
the literal text (``output_dir=2024`` gives ``"2024"``, not ``2024``).
"""

from __future__ import annotations

import copy
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
from edp_det.runtime.schema import ConfigSchema, Leaf, accepts_text, check_layer, lookup, tree_from_defaults

__all__ = [
    "load_config",
    "load_yaml",
    "parse_overrides",
    "apply_overrides",
    "dump_config",
    "config_hash",
    "config_differences",
    "check_device",
    "RESUME_FREE_KEYS",
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
def validate_config(layer: Mapping, defaults: Mapping, source: str = "config") -> dict:
    """Check ``layer`` (a partial config) against the schema ``defaults``; return it with ints→floats etc."""
    return check_layer(layer, tree_from_defaults(defaults), source)


# ----------------------------------------------------------------------------------------------- load
def _file_layers(path: Path, stack: list[Path]) -> list[tuple[str, dict]]:
    """``[(source, data)]`` of ``path`` and its ``_base_`` chain, lowest first (bases depth first, in list order)."""
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
    layers: list[tuple[str, dict]] = []
    for base in bases:
        base_path = Path(os.path.expanduser(base))
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        layers.extend(_file_layers(base_path, [*stack, real]))
    layers.append((str(path), data))
    return layers


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


def _apply_items(out: dict, items, tree: Mapping | None, explain=None) -> dict:
    """Apply parsed overrides ``[(item, key, value, text)]`` to ``out`` in place (validated against ``tree``)."""
    for item, key, value, text in items:
        source = f"{COMMAND_LINE} ({item!r})"
        if tree is not None:
            leaf = lookup(tree, key)
            if isinstance(leaf, Leaf) and accepts_text(leaf, value):
                value = text  # a str key keeps the literal text (``name=2024``, ``name=null`` ...)
            layer = check_layer(set_by_dotted({}, key, value), tree, source, explain=explain)
            value = get_by_dotted(layer, key)
        existing = get_by_dotted(out, key, default=None)
        if isinstance(value, Mapping) and isinstance(existing, Mapping):
            value = deep_merge(existing, value)
        try:
            set_by_dotted(out, key, copy.deepcopy(value))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return out


def apply_overrides(cfg: Mapping, overrides: Iterable[str], defaults: Mapping | None = None) -> dict:
    """Apply ``key=value`` overrides to a copy of ``cfg``; validated against ``defaults`` when given.

    A mapping value merges into an existing mapping (``model={depth: 50}``); anything else replaces.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    items = [(item, *_parse_override(item)) for item in overrides]
    tree = tree_from_defaults(_plain(defaults)) if defaults is not None else None
    return _apply_items(copy.deepcopy(dict(cfg)), items, tree)


def _drop_undeclared(cfg: dict, schema: ConfigSchema, method: str, origin: Mapping[str, tuple[str, str]]) -> dict:
    """Drop the ``compress`` keys that ``method`` does not declare (set by layers that selected another method)."""
    keep = schema.tree(method)["compress"]
    compress = cfg.get("compress")
    if isinstance(compress, dict):
        dropped = [k for k in compress if k not in keep]
        for k in dropped:
            del compress[k]
            where, other = origin.get(k, ("?", "?"))
            logger.info("method=%s: compress.%s (set in %s for method=%s) is not an option of %s; dropped",
                        method, k, where, other, method)
    return cfg


def _load_with_schema(layers: list[tuple[str, dict]], items, schema: ConfigSchema, extra_layers=()) -> dict:
    method = schema.default_method
    merged: dict = {}
    origin: dict[str, tuple[str, str]] = {}    # compress key -> (layer that set it, the method it selected)

    def add(data: Mapping, source: str) -> None:
        nonlocal merged, method
        if "method" in data:
            method = schema.check_method(data["method"], source)
        merged = deep_merge(merged, check_layer(data, schema.tree(method), source, explain=schema.explain(method)))
        for k in data.get("compress") or {}:
            origin[k] = (source, method)

    for source, data in layers:
        add(data, source)
    if items:
        chosen = [(item, value) for item, key, value, _ in items if key == "method"]
        if chosen:
            method = schema.check_method(chosen[-1][1], f"{COMMAND_LINE} ({chosen[-1][0]!r})")
        _apply_items(merged, items, schema.tree(method), schema.explain(method))
        for item, key, _, _ in items:
            if key.startswith("compress.") and key.count(".") >= 1:
                origin[key.split(".")[1]] = (COMMAND_LINE, method)
    for source, data in extra_layers:
        add(data, source)
    return _drop_undeclared(deep_merge(schema.defaults(method), merged), schema, method, origin)


def load_config(
    path: str | os.PathLike | None,
    overrides: Iterable[str] = (),
    defaults: Mapping | None = None,
    schema: ConfigSchema | None = None,
    extra_layers: Iterable[tuple[str, Mapping]] = (),
) -> dict:
    """Load a config: defaults ← ``_base_`` chain ← file ← ``overrides`` ← ``extra_layers`` (module docstring).

    ``path`` may be ``None`` (defaults + overrides only). ``schema``: validate against the typed schema of a task
    (the ``compress`` section follows the method each layer selects); ``defaults``: validate against a plain
    mapping of defaults instead. ``extra_layers``: ``[(source, partial config)]`` applied last (e.g. the method
    and FLOPs target a comparison harness sets). Returns a new plain dict.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    layers = _file_layers(Path(path), []) if path is not None else []
    items = [(item, *_parse_override(item)) for item in overrides]
    if schema is not None:
        return _load_with_schema(layers, items, schema, [(s, _plain(d)) for s, d in extra_layers])
    tree = None
    if defaults is not None:
        defaults = _plain(defaults)
        if not isinstance(defaults, dict):
            raise TypeError("defaults must be a mapping")
        tree = tree_from_defaults(defaults)
    cfg: dict = copy.deepcopy(defaults) if defaults is not None else {}
    for source, data in layers:
        cfg = deep_merge(cfg, check_layer(data, tree, source) if tree is not None else data)
    cfg = _apply_items(cfg, items, tree)
    for source, data in extra_layers:
        data = _plain(data)
        cfg = deep_merge(cfg, check_layer(data, tree, source) if tree is not None else data)
    return cfg


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


#: keys a resumed run may set differently from the run it continues: where the run writes, reads the data from or
#: runs, how it logs, evaluates (test split, test-time detector settings) and measures; nothing that changes what
#: is trained (a prefix ending in "." covers a section)
RESUME_FREE_KEYS = ("output_dir", "device", "data.root", "data.image_cache", "data.check_images", "data.test_split",
                    "data.val_split", "data.skip_bad_eval_images", "train.num_workers", "train.threads",
                    "train.log_interval", "train.tensorboard", "train.checkpoint_keep", "train.eval_interval",
                    "model.box_score_thresh", "model.box_detections_per_img", "model.rpn_pre_nms_top_n_test",
                    "model.rpn_post_nms_top_n_test", "eval.", "benchmark.")


def config_differences(saved: Mapping, new: Mapping, free: Iterable[str] = RESUME_FREE_KEYS) -> list[tuple]:
    """``(key, saved value, new value)`` of every key set differently in the two resolved configs, except the
    ``free`` keys (a prefix ending in ``"."`` stands for its section). Keys only one side has (a config written by
    another version of the package) are not compared."""
    free = tuple(free)
    a, b = flatten(_plain(saved)), flatten(_plain(new))
    out = []
    for key in sorted(set(a) & set(b)):
        if any(key == f or (f.endswith(".") and key.startswith(f)) for f in free):
            continue
        if a[key] != b[key]:
            out.append((key, a[key], b[key]))
    return out


def check_device(value, key: str, available: bool = False) -> None:
    """``value`` (a config's device string, or None) names a device torch knows (and, with ``available``, one this
    machine has); ConfigError naming ``key`` otherwise."""
    if value is None:
        return
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"{key}={value!r} is not a device (e.g. cpu, cuda, cuda:1): {str(e).splitlines()[0]}") \
            from None
    if not available:
        return
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={value!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"{key}={value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
