"""The file format of a per-layer quantization config (version 2): its keys, its checks, reading and writing.

A tensor section (``input``, ``weight``) *is* a :class:`~qdq.math.descriptor.QuantDescriptor`: its keys are the
descriptor's fields (all but ``name``, which qdq sets to the quantizer's path) and its values are checked by the
descriptor itself, one key at a time so that each problem names its key, then as a whole. ``enabled: false`` on a
section switches that quantizer off (INT4 weight-only layers). Nothing here needs a model; :mod:`qdq.config.apply`
adds the checks against one.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from qdq._files import write_atomically
from qdq._json_keys import DuplicateKeyError, loads_unique
from qdq.math.formats import BLOCK_SIZES
from qdq.transform.ignore_policy import compile_ignore_policy
from qdq.math.descriptor import QuantDescriptor

__all__ = ["CONFIG_FORMAT", "CONFIG_VERSION", "QuantConfigError", "load_quant_config", "save_quant_config",
           "section_of", "descriptor_of"]

logger = logging.getLogger(__name__)

#: The ``format`` value of a quantization config.
CONFIG_FORMAT = "qdq-quant-config"
#: The config version this module writes; version 1 files are read too (:mod:`qdq.config.v1`).
CONFIG_VERSION = 2

TOP_KEYS = ("format", "version", "qdq_version", "model", "global", "layers")
GLOBAL_KEYS = ("num_batches", "skip_layers", "input", "weight")
LAYER_KEYS = ("type", "enabled", "input", "weight")
DEFAULT_NUM_BATCHES = 8
#: The descriptor fields a tensor section may set (every field but ``name``), and the switch ``enabled``.
DESCRIPTOR_KEYS = tuple(k for k in QuantDescriptor().dict() if k != "name")
SECTION_KEYS = DESCRIPTOR_KEYS + ("enabled",)
#: Written in every section, in this order; the other fields only where they differ from the descriptor's default.
ALWAYS_WRITTEN = ("num_bits", "calib_method", "calib_args", "axis", "unsigned", "symmetric", "narrow_range")
#: The descriptors of a layer that the file does not describe otherwise: per-tensor inputs, per-channel weights.
DEFAULT_DESCRIPTORS = {"input": QuantDescriptor(), "weight": QuantDescriptor(axis=0)}
#: Version-1 keys and what version 2 calls them (a version-2 file using them is told so).
RENAMED = {
    "method": "calib_method",
    "per_channel": "axis (0 for one amax per channel, null for one per tensor)",
    "batch_num": "num_batches",
    "percentile": "calib_args.percentile",
    "start_bin": "calib_args.start_bin",
    "stride": "calib_args.stride",
    "num_bins": "calib_args.num_bins",
}
_LISTED = 20


class QuantConfigError(ValueError):
    """A quantization config that cannot be used; the message lists every problem with its JSON path.

    Attributes:
        source: where the config came from (a file path, or a description).
        problems: ``"<json path>: <what is wrong>"`` strings, in the order found.
    """

    def __init__(self, source: str, problems: list[str], note: str = ""):
        self.source = source
        self.problems = list(problems)
        count = f"{len(self.problems)} problem" + ("" if len(self.problems) == 1 else "s")
        super().__init__(f"quantization config {source} has {count}{note}:\n  " + "\n  ".join(self.problems))


class Problems:
    """Collects ``"<path>: <message>"`` strings."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")

    def __len__(self) -> int:
        return len(self.items)


def listing(names: list[str]) -> str:
    return ", ".join(names[:_LISTED]) + (f", ... ({len(names)} in all)" if len(names) > _LISTED else "")


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def layer_path(name: str) -> str:
    return f"layers[{json.dumps(name)}]"


def hint(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def as_json(value: Any) -> Any:
    """``value`` with tuples as lists, as JSON reads it back."""
    if isinstance(value, Mapping):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    return value


def _why(err: Exception) -> str:
    return str(err).replace("QuantDescriptor: ", "")


#: The version-1 keys of each level, reported with their version-2 names.
OLD_KEYS = {"global": ("batch_num",), "section": ("method", "per_channel", "percentile", "start_bin", "stride",
                                                  "num_bins")}


def check_keys(obj: Mapping, valid: tuple[str, ...], where: str, problems: Problems, old: tuple[str, ...] = ()) -> None:
    for key in obj:
        if key in valid:
            continue
        sep = "." if where else ""
        shown = key if isinstance(key, str) else repr(key)
        if key in old:
            problems.add(f"{where}{sep}{shown}", f"a version-1 key; version {CONFIG_VERSION} calls it {RENAMED[key]}")
        else:
            problems.add(f"{where}{sep}{shown}", f"unknown key; valid keys are {', '.join(valid)}{hint(str(key), valid)}")


# --------------------------------------------------------------------------------------------------------------------
# tensor sections <-> descriptors
# --------------------------------------------------------------------------------------------------------------------


def section_of(desc: QuantDescriptor, enabled: bool | None = None) -> dict[str, Any]:
    """The tensor section of ``desc`` as the file writes it (JSON values, default-valued extras left out).

    >>> section_of(QuantDescriptor(num_bits=4, axis=0, calib_method="mse"))
    {'num_bits': 4, 'calib_method': 'mse', 'calib_args': {'num_bins': 2048, 'start_bin': 128, 'stride': 1}, \
'axis': 0, 'unsigned': False, 'symmetric': True, 'narrow_range': False}
    """
    fields = desc.dict()
    defaults = QuantDescriptor().dict()
    out = {k: fields[k] for k in ALWAYS_WRITTEN}
    out.update({k: fields[k] for k in DESCRIPTOR_KEYS if k not in out and fields[k] != defaults[k]})
    if enabled is not None:
        out["enabled"] = enabled
    return as_json(out)


def descriptor_of(section: Mapping[str, Any]) -> QuantDescriptor:
    """The descriptor of a resolved tensor section (``enabled`` is the quantizer's switch, not a field)."""
    return QuantDescriptor.from_dict({k: v for k, v in section.items() if k != "enabled"})


def resolve_section(spec: Any, base: Mapping[str, Any], where: str, problems: Problems,
                    origin: str = "") -> dict[str, Any] | None:
    """Checks a tensor section and resolves it on ``base`` (a resolved section); ``None`` when it has problems.

    Keys the section sets replace those of ``base``; ``calib_args`` are inherited only while the ``calib_method``
    stays that of ``base`` (another search starts from its own defaults). Every key is checked by the descriptor
    alone first, so that each problem names its key; then the whole descriptor (the checks between keys).
    """
    if not isinstance(spec, Mapping):
        problems.add(where, f"must be an object, got {json_type(spec)}")
        return None
    before = len(problems)
    check_keys(spec, SECTION_KEYS, where, problems, OLD_KEYS["section"])
    if "enabled" in spec and not isinstance(spec["enabled"], bool):
        problems.add(f"{where}.enabled", f"must be true or false, got {_shown(spec['enabled'])}")
    for key in DESCRIPTOR_KEYS:
        if key in spec and key != "calib_args":
            try:
                QuantDescriptor(**{key: spec[key]})
            except (TypeError, ValueError) as err:
                problems.add(f"{where}.{key}", _why(err))
                continue
            if key == "block_size" and spec[key] is not None and spec[key] not in BLOCK_SIZES:
                problems.add(f"{where}.block_size", f"must be null or one of {list(BLOCK_SIZES)} (TensorRT's INT4 "
                                                    f"blocks), got {_shown(spec[key])}")
    if len(problems) > before:
        return None
    method = spec.get("calib_method", base["calib_method"])
    inherited = base["calib_args"] if method == base["calib_method"] else {}
    args = spec.get("calib_args", {})
    if not isinstance(args, Mapping):
        problems.add(f"{where}.calib_args", f"must be an object, got {json_type(args)}")
        return None
    came_from = "" if "calib_method" in spec else origin
    for key, value in args.items():
        try:
            QuantDescriptor(calib_method=method, calib_args={key: value})
        except (TypeError, ValueError) as err:
            problems.add(f"{where}.calib_args.{key}", _why(err) + came_from)
    if len(problems) > before:
        return None
    resolved = {k: v for k, v in base.items() if k in DESCRIPTOR_KEYS}
    resolved.update({k: v for k, v in spec.items() if k in DESCRIPTOR_KEYS})
    resolved["calib_args"] = {**inherited, **args}
    try:
        desc = QuantDescriptor.from_dict(resolved)
    except (TypeError, ValueError) as err:
        problems.add(where, _why(err) + came_from)
        return None
    enabled = spec.get("enabled", base.get("enabled"))
    return section_of(desc, enabled)


def _shown(value: Any) -> str:
    """``value`` as JSON when it is JSON, else its repr (a config dict built in Python can hold anything)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# --------------------------------------------------------------------------------------------------------------------
# the whole file, without a model
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Checked:
    """A config after the schema checks: the global section resolved, the layer entries as given."""

    config: dict[str, Any]
    global_: dict[str, Any]
    layers: dict[str, Any]
    bad_layers: set[str]
    problems: Problems
    upgraded: bool = False  # read from a version-1 file

    def error(self, source: str) -> QuantConfigError:
        note = (f" (a version-1 config, read as version {CONFIG_VERSION}: the paths use the version-{CONFIG_VERSION} "
                "keys, see qdq.config.v1)") if self.upgraded else ""
        return QuantConfigError(source, self.problems.items, note)


def default_global() -> dict[str, Any]:
    return {"num_batches": DEFAULT_NUM_BATCHES, "skip_layers": [],
            **{role: section_of(d) for role, d in DEFAULT_DESCRIPTORS.items()}}


def check_config(config: Any) -> Checked:
    """Checks a config (version 2, or version 1 read as version 2) without a model."""
    from qdq.config.v1 import upgrade  # the migration of old files, beside this module

    problems = Problems()
    glob = default_global()
    if not isinstance(config, Mapping):
        problems.add("<root>", f"must be an object, got {json_type(config)}")
        return Checked({}, glob, {}, set(), problems)
    upgraded = config.get("version") == 1
    if upgraded:
        config = upgrade(config, problems)
    check_keys(config, TOP_KEYS, "", problems)
    version = config.get("version")
    if "version" not in config:
        problems.add("version", f"missing; this qdq reads versions 1 and {CONFIG_VERSION}")
    elif isinstance(version, bool) or not isinstance(version, int) or version not in (1, CONFIG_VERSION):
        newer = isinstance(version, int) and not isinstance(version, bool) and version > CONFIG_VERSION
        problems.add("version", f"is {version!r}; this qdq reads versions 1 and {CONFIG_VERSION}"
                                + (" (the config was written by a newer qdq)" if newer else ""))
    if "format" in config and config["format"] != CONFIG_FORMAT:
        problems.add("format", f"is {config['format']!r}, not {CONFIG_FORMAT!r}")
    for key in ("qdq_version", "model"):
        if key in config and not isinstance(config[key], str):
            problems.add(key, f"must be a string, got {json_type(config[key])}")

    raw_global = config.get("global", {})
    if not isinstance(raw_global, Mapping):
        problems.add("global", f"must be an object, got {json_type(raw_global)}")
        raw_global = {}
    check_keys(raw_global, GLOBAL_KEYS, "global", problems, OLD_KEYS["global"])
    if "num_batches" in raw_global:
        n = raw_global["num_batches"]
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            problems.add("global.num_batches", f"must be an int >= 1 or null (all batches), got {_shown(n)}")
        else:
            glob["num_batches"] = n
    if "skip_layers" in raw_global:
        skip = raw_global["skip_layers"]
        if not isinstance(skip, list):
            problems.add("global.skip_layers", f"must be an array of strings, got {json_type(skip)}")
        else:
            for i, pattern in enumerate(skip):
                if not isinstance(pattern, str):
                    problems.add(f"global.skip_layers[{i}]", f"must be a string, got {json_type(pattern)}")
                    continue
                try:
                    compile_ignore_policy([pattern])
                except ValueError as err:
                    problems.add(f"global.skip_layers[{i}]", str(err).replace("ignore_policy: ", ""))
            glob["skip_layers"] = list(skip)
    for role in ("input", "weight"):
        if role in raw_global:
            resolved = resolve_section(raw_global[role], glob[role], f"global.{role}", problems, " (the default)")
            if resolved is not None:
                glob[role] = resolved

    layers = config.get("layers", {})
    bad: set[str] = set()
    if not isinstance(layers, Mapping):
        problems.add("layers", f"must be an object (layer path -> entry), got {json_type(layers)}")
        layers = {}
    for name, entry in layers.items():
        where = layer_path(name)
        before = len(problems)
        if not isinstance(entry, Mapping):
            problems.add(where, f"must be an object, got {json_type(entry)}")
            bad.add(name)
            continue
        check_keys(entry, LAYER_KEYS, where, problems)
        if "enabled" in entry and not isinstance(entry["enabled"], bool):
            problems.add(f"{where}.enabled", f"must be true or false, got {_shown(entry['enabled'])}")
        if "type" in entry and not isinstance(entry["type"], str):
            problems.add(f"{where}.type", f"must be a string, got {json_type(entry['type'])}")
        for role in ("input", "weight"):
            if role in entry:
                resolve_section(entry[role], glob[role], f"{where}.{role}", problems, " (the global one)")
        if len(problems) > before:
            bad.add(name)
    checked = {k: config[k] for k in TOP_KEYS if k in config and k not in ("global", "layers")}
    checked["version"] = CONFIG_VERSION if checked.get("version") == 1 else checked.get("version")
    checked["global"] = glob
    checked["layers"] = {name: copy.deepcopy(dict(entry)) for name, entry in layers.items()
                         if isinstance(entry, Mapping)}
    return Checked(checked, glob, checked["layers"], bad, problems, upgraded)


# --------------------------------------------------------------------------------------------------------------------
# reading and writing
# --------------------------------------------------------------------------------------------------------------------


def _read(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"quantization config {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise QuantConfigError(str(path), [f"<file>: cannot be read ({err})"]) from err
    try:
        return loads_unique(text)
    except json.JSONDecodeError as err:
        problem = f"<file>: not JSON: {err.msg} at line {err.lineno} column {err.colno}"
        raise QuantConfigError(str(path), [problem]) from None
    except DuplicateKeyError as err:
        raise QuantConfigError(str(path), [f"<file>: {err}; each key must appear once"]) from None


def source_of(config: Any) -> tuple[Any, str]:
    """``(config object, description)`` from a path, a dict or a :class:`~qdq.config.QuantizeReport`."""
    resolved = getattr(config, "config", None)
    if isinstance(resolved, Mapping) and hasattr(config, "replacement"):  # a QuantizeReport
        return resolved, "from a QuantizeReport"
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        return _read(path), str(path)
    if isinstance(config, Mapping):
        return config, "(a dict)"
    raise TypeError(f"a quantization config is a file path, a dict or a QuantizeReport, got {type(config).__name__}")


def checked_config(config: Any) -> tuple[Checked, str]:
    """``(checked config, source)``; a version-1 config is logged with the way to rewrite it."""
    raw, source = source_of(config)
    checked = check_config(raw)
    if checked.upgraded and not checked.problems:
        logger.warning("quantization config %s is version 1; read as version %d (method -> calib_method, "
                       "per_channel -> axis, batch_num -> num_batches, percentile/start_bin/stride/num_bins -> "
                       "calib_args). save_quant_config(load_quant_config(path), path) rewrites it as version %d",
                       source, CONFIG_VERSION, CONFIG_VERSION)
    return checked, source


def load_quant_config(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks a quantization config file (see :mod:`qdq.config` for the format).

    The checks here need no model: keys, types, the descriptors of every tensor section, ``skip_layers`` patterns.
    :func:`~qdq.config.apply_quant_config` adds the checks against the model. A version-1 file is read as
    version 2 (its keys renamed, :mod:`qdq.config.v1`; a warning says how to rewrite the file).

    Args:
        path: the JSON file.

    Returns:
        The config (version 2): the ``global`` section complete (defaults filled in), the layer entries as the file
        gives them.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        QuantConfigError: the file is not JSON, or has problems (all listed, each with its JSON path).

    Example:
        >>> import json, os, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "c.json")
        ...     with open(path, "w") as f:
        ...         json.dump({"version": 2, "layers": {"fc": {"weight": {"num_bits": 32, "calib_methd": "max"}}}}, f)
        ...     load_quant_config(path)
        Traceback (most recent call last):
        ...
        qdq.config.schema.QuantConfigError: quantization config ... has 2 problems:
          layers["fc"].weight.calib_methd: unknown key; valid keys are ... (did you mean 'calib_method'?)
          layers["fc"].weight.num_bits: num_bits must be in [2, 16], got 32
    """
    checked, source = checked_config(Path(path))
    if checked.problems:
        raise checked.error(source)
    return checked.config


def format_config(config: Mapping[str, Any]) -> str:
    """The config as JSON text: one line per tensor section, one entry per layer."""
    dump = lambda v: json.dumps(v, allow_nan=False)  # noqa: E731
    lines = ["{"]
    for key, value in config.items():
        if key not in ("global", "layers"):
            lines.append(f"  {dump(key)}: {dump(value)},")
    lines.append('  "global": {')
    lines.append(",\n".join(f"    {dump(k)}: {dump(v)}" for k, v in config.get("global", {}).items()))
    lines.append("  },")
    layers = config.get("layers", {})
    if not layers:
        lines.append('  "layers": {}')
    else:
        lines.append('  "layers": {')
        blocks = []
        for name, entry in layers.items():
            inner = ",\n".join(f"      {dump(k)}: {dump(v)}" for k, v in entry.items())
            blocks.append(f"    {dump(name)}: {{\n{inner}\n    }}" if entry else f"    {dump(name)}: {{}}")
        lines.append(",\n".join(blocks))
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def save_quant_config(config: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Checks ``config`` (as :func:`load_quant_config` does) and writes it as JSON (version 2), atomically.

    Use it to write a config edited in Python, the resolved config of a :class:`~qdq.config.QuantizeReport`, or
    a version-1 config read by :func:`load_quant_config` (which is then written as version 2).

    Args:
        config: a config dict, or a :class:`~qdq.config.QuantizeReport` (its resolved config is written).
        path: the file to write (folders are created).

    Returns:
        The checked config, as :func:`load_quant_config` will read it back.

    Raises:
        QuantConfigError: the config has problems (nothing is written).

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "c.json")
        ...     written = save_quant_config({"version": 2, "layers": {"fc": {"enabled": False}}}, path)
        ...     load_quant_config(path) == written
        True
    """
    checked, source = checked_config(config)
    if checked.problems:
        raise checked.error(source)
    out = dict(checked.config)
    out.setdefault("format", CONFIG_FORMAT)
    ordered = {k: out[k] for k in TOP_KEYS if k in out}
    write_atomically(Path(path), format_config(ordered))
    logger.info("wrote the quantization config of %d layers to %s", len(ordered.get("layers", {})), path)
    return ordered
