"""Per-layer quantization configs: one JSON file that says, layer by layer, what is quantized and how.

This is how mixed precision is written down: some layers 8-bit, some with 4-bit weights, some left in float, each
with its own calibration method. Three steps take a float model to a calibrated, mixed-precision model, and
:func:`qdq.export_onnx` turns that into a QDQ ONNX file::

    create_quant_config("quant_config.json", model, skip_layers=["fc"], batch_num=8, activation_calib="entropy")
    # ... the user edits quant_config.json ...
    report = quantize_model(model, "quant_config.json")        # replace layers, per-layer descriptors
    calibrate_from_config(model, loader, "quant_config.json")   # per-layer calibration methods
    qdq.export_onnx(model, example_input, "model_qdq.onnx")

:func:`create_quant_config` lists every layer the module map would quantize (:mod:`qdq.quant_modules`), with the
settings given as arguments. :func:`quantize_model` checks the whole file against the model first and reports every
problem at once, then converts the model in place (layers set to float are left alone) and gives each converted
layer the quantizers its entry describes. :func:`calibrate_from_config` feeds ``batch_num`` batches and computes each
quantizer's amax with the method of its own entry. :func:`load_quant_config` and :func:`save_quant_config` read and
write a config (checked) for editing in Python; a dict works wherever a file path does.

The file
========

::

    {
      "format": "qdq-quant-config",
      "version": 1,
      "qdq_version": "0.1.0",
      "model": "Net",
      "global": {
        "batch_num": 8,
        "skip_layers": ["fc"],
        "input": {"num_bits": 8, "method": "entropy", "start_bin": 128, "stride": 1, "num_bins": 2048,
                  "unsigned": false, "symmetric": true, "narrow_range": false},
        "weight": {"num_bits": 8, "method": "max", "per_channel": true, "symmetric": true, "narrow_range": false}
      },
      "layers": {
        "features.0": {
          "type": "Conv2d",
          "enabled": true,
          "input": {"num_bits": 8, "method": "percentile", "percentile": 99.9, "num_bins": 2048, ...},
          "weight": {"num_bits": 4, "method": "max", "per_channel": true, "symmetric": true, "narrow_range": false}
        },
        "pool": {"type": "AdaptiveAvgPool2d", "enabled": false, "input": {...}},
        "fc": {"type": "Linear", "enabled": false, "input": {...}, "weight": {...}}
      }
    }

Top level
    ``version`` (required, ``1``); ``format`` (``"qdq-quant-config"`` when given); ``qdq_version`` and ``model``
    (the model's class name) are written for the reader; a ``model`` that differs from the model's class is logged as
    a warning.

``global``
    ``batch_num``: batches :func:`calibrate_from_config` feeds (an int >= 1, or ``null`` for all of the data).
    ``skip_layers``: layers left in float - names or regular expressions, matched as by
    :func:`qdq.quant_modules.compile_ignore_policy` (``"layer4"`` covers ``"layer4.0.conv1"``); each must match at
    least one layer. ``input`` and ``weight``: the settings of every layer that does not say otherwise.

``layers``
    One entry per layer, by its dotted path in ``model.named_modules()`` (the empty string is the model itself).
    ``type``: the layer's class name, checked against the model so that a config written for another model fails
    loudly. ``enabled``: ``false`` keeps the layer in float (no quantizers, no Q/DQ in the export). ``input``, and
    ``weight`` for layers that have weights (convolutions, transposed convolutions, linear layers, LSTMs; pools have
    only ``input``).

Tensor sections (``input``, ``weight``)
    ``num_bits``: 2..16 (TensorRT's Q/DQ is 8-bit; see below). ``method``: how amax is computed - ``"max"``
    (running max), or a histogram search: ``"entropy"``, ``"mse"``, ``"percentile"``, ``"kld"`` (and any search
    registered with :func:`qdq.calib.register_search`). The method's parameters, and only those: ``percentile``
    (percentile, in (0, 100]), ``start_bin`` and ``stride`` (entropy, mse), ``num_bins`` (histogram size of every
    histogram method; kld needs at least 16). ``symmetric``: ``false`` quantizes with a zero point (needs method
    ``"max"``; ONNX Runtime runs it, TensorRT does not). ``narrow_range``: signed range -127..127 instead of
    -128..127. ``input`` only: ``unsigned`` (0..255, for non-negative activations). ``weight`` only:
    ``per_channel`` (one amax per output channel - per input channel for transposed convolutions, the axis of the
    layer class's default weight descriptor).

Formats (:mod:`qdq.formats`)
    ``"num_bits": [4, 3]`` is FP8 E4M3 (input and/or weight). INT4 weight-only on a Linear layer:
    ``"weight": {"num_bits": 4, "block_size": 64}`` (``block_size`` 32, 64 or 128 along the input features; without
    it, per channel) and ``"input": {"enabled": false}`` (the activation stays float). These two keys are written
    only where set.

Keys a layer's tensor section leaves out come from ``global``; a section that sets another ``method`` than the global
one starts from that method's default parameters (``percentile`` 99.99, ``start_bin`` 128, ``stride`` 1,
``num_bins`` 2048) instead of inheriting the global method's. Every other descriptor field keeps its default
(``fake_quant`` true, no ``learn_amax``, no ``scale_amax``): the file says everything that differs between layers.

Checks
    Unknown keys at any level, wrong types, ``num_bits`` outside 2..16, unknown methods, parameters of another method,
    layer names the model has no quantizable layer for, ``weight`` on a layer without weights, a ``type`` that differs
    from the model's, ``"enabled": true`` on a layer ``skip_layers`` matches, and ``skip_layers`` patterns that match
    nothing are all errors: one :class:`QuantConfigError` lists every problem with its JSON path, e.g.
    ``layers["features.3"].weight.num_bits: must be an int in 2..16, got 32``. Nothing is changed in the model when
    the config has a problem.

    Layers the model has and ``layers`` omits get the global settings (logged at INFO, and listed in
    :attr:`QuantizeReport.defaulted`); with ``quantize_model(..., strict=True)`` they are an error. A file written by
    :func:`create_quant_config` lists every layer.

Mixed precision and export
    :func:`qdq.export_onnx` writes Q/DQ for the 8-bit and FP8 layers and int4 DequantizeLinear for INT4 weight-only
    Linear layers; layers whose entry is disabled have no quantizers and stay float in the ONNX graph. Layers with
    other bit widths (4-bit activations, 16-bit inputs) are for accuracy studies and QAT: the export refuses them with an
    :class:`~qdq.onnx.export.ExportError` naming their quantizers. :attr:`QuantizeReport.not_exportable` lists them
    (and :func:`quantize_model` logs a warning).

What the config does not cover
    Quantizers that are not part of a mapped layer - :class:`~qdq.nn.QuantAdd` / :class:`~qdq.nn.QuantConcat` from
    forward patches, for example - keep their own descriptors; :func:`calibrate_from_config` calibrates them with
    their own calibrator and the global ``input`` method. Run :func:`quantize_model` on the float model, before
    patches and scale-sharing rules: it gives every configured layer new quantizers. A layer that is already quantized
    when :func:`quantize_model` runs gets new quantizers as well (its amax is lost, logged), or, when its entry is
    disabled, has its quantizers disabled.

Example:
    >>> import json, os, tempfile
    >>> import torch
    >>> import qdq
    >>> from qdq.config import calibrate_from_config, create_quant_config, quantize_model
    >>> torch.manual_seed(0) is not None
    True
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
    ...                             torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    ...                             torch.nn.Linear(8, 10))
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "quant_config.json")
    >>> config = create_quant_config(path, model, skip_layers=["6"], batch_num=2, activation_calib="entropy")
    >>> {name: entry["enabled"] for name, entry in config["layers"].items()}
    {'0': True, '2': True, '4': True, '6': False}
    >>> with open(path) as f:                       # the user edits the file
    ...     edited = json.load(f)
    >>> edited["layers"]["4"]["enabled"] = False    # the pool stays float
    >>> edited["layers"]["0"]["input"] = {"method": "percentile", "percentile": 99.9}
    >>> with open(path, "w") as f:
    ...     json.dump(edited, f, indent=2)
    >>> report = quantize_model(model, path)
    >>> report.quantized, report.float_layers
    (['0', '2'], ['4', '6'])
    >>> data = [torch.randn(4, 3, 16, 16) for _ in range(5)]
    >>> calibration = calibrate_from_config(model, data, path, progress=False)
    >>> calibration.batches, calibration.calibrated
    (2, 4)
    >>> info = qdq.export_onnx(model, torch.randn(1, 3, 16, 16), os.path.join(tmp.name, "model.onnx"))
    >>> info.num_qdq_pairs                          # two convs, input and weight each; pool and fc are float
    4
    >>> tmp.cleanup()
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from qdq._files import write_atomically
from qdq._json_keys import DuplicateKeyError, loads_unique
from qdq._version import __version__
from qdq.calib import HistogramCalibrator, MaxCalibrator, search_names
from qdq.calibrate import CalibrationReport, collect_stats, handle_no_data
from qdq.nn.modules._utils import QuantInputMixin, QuantMixin
from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.quant_modules import (
    ReplacementReport,
    compile_ignore_policy,
    name_quantizers,
    quantizable_layers,
    replace_to_quantization_module,
)
from qdq.switches import quantizers
from qdq.formats import BLOCK_SIZES, FP8_E4M3, is_fp8
from qdq.tensor_quant import MAX_BITS, MIN_BITS, QuantDescriptor

__all__ = [
    "CONFIG_FORMAT",
    "CONFIG_VERSION",
    "QuantConfigError",
    "QuantizeReport",
    "create_quant_config",
    "load_quant_config",
    "save_quant_config",
    "quantize_model",
    "calibrate_from_config",
]

logger = logging.getLogger(__name__)

#: The ``format`` value of a quantization config.
CONFIG_FORMAT = "qdq-quant-config"
#: The config version this module writes and reads.
CONFIG_VERSION = 1

_TOP_KEYS = ("format", "version", "qdq_version", "model", "global", "layers")
_GLOBAL_KEYS = ("batch_num", "skip_layers", "input", "weight")
_LAYER_KEYS = ("type", "enabled", "input", "weight")
_PARAM_KEYS = ("percentile", "start_bin", "stride", "num_bins")
_PARAM_DEFAULTS: dict[str, Any] = {"percentile": 99.99, "start_bin": 128, "stride": 1, "num_bins": 2048}
_PARAM_USERS = {
    "percentile": "method 'percentile'",
    "start_bin": "methods 'entropy' and 'mse'",
    "stride": "methods 'entropy' and 'mse'",
    "num_bins": "the histogram methods (all but 'max')",
}
_TAIL_KEYS = {
    "input": ("unsigned", "symmetric", "narrow_range"),
    "weight": ("per_channel", "symmetric", "narrow_range"),
}
#: Keys a tensor section may set that a resolved section holds only when set (qdq.formats): ``enabled: false`` on
#: an input section makes the layer weight-only (INT4), ``block_size`` on a weight section quantizes in blocks.
_OPTIONAL_KEYS = {"input": ("enabled",), "weight": ("block_size",)}
_TENSOR_KEYS = {role: ("num_bits", "method") + _PARAM_KEYS + tail + _OPTIONAL_KEYS[role]
                for role, tail in _TAIL_KEYS.items()}
_DEFAULT_TENSOR = {
    "input": {"num_bits": 8, "method": "max", "unsigned": False, "symmetric": True, "narrow_range": False},
    "weight": {"num_bits": 8, "method": "max", "per_channel": True, "symmetric": True, "narrow_range": False},
}
_DEFAULT_BATCH_NUM = 8
_EXPORT_BITS = 8
_KLD_MIN_BINS = 16
_LISTED = 20


# --------------------------------------------------------------------------------------------------------------------
# errors and reports
# --------------------------------------------------------------------------------------------------------------------


class QuantConfigError(ValueError):
    """A quantization config that cannot be used; the message lists every problem with its JSON path.

    Attributes:
        source: where the config came from (a file path, or a description).
        problems: ``"<json path>: <what is wrong>"`` strings, in the order found.
    """

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        count = f"{len(self.problems)} problem" + ("" if len(self.problems) == 1 else "s")
        super().__init__(f"quantization config {source} has {count}:\n  " + "\n  ".join(self.problems))


@dataclass
class QuantizeReport:
    """What :func:`quantize_model` did, by dotted layer path.

    Attributes:
        quantized: layers that got quantizers from the config.
        float_layers: layers kept in float (``"enabled": false`` or matched by ``skip_layers``).
        defaulted: quantized layers the config does not list; they got the global settings.
        bits: ``{layer: (input bits, weight bits or None)}`` for every quantized layer.
        batch_num: the global ``batch_num``.
        config: the resolved config - every quantizable layer of the model with every key - as a dict that
            :func:`save_quant_config` writes and :func:`quantize_model` and :func:`calibrate_from_config` take.
        replacement: the :class:`~qdq.quant_modules.ReplacementReport` of the conversion.
    """

    quantized: list[str] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)
    bits: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    batch_num: int | None = _DEFAULT_BATCH_NUM
    config: dict[str, Any] = field(default_factory=dict)
    replacement: ReplacementReport = field(default_factory=ReplacementReport)

    @property
    def not_exportable(self) -> list[str]:
        """Quantized layers with a bit width other than 8, which :func:`qdq.export_onnx` refuses."""
        ok = (None, _EXPORT_BITS, FP8_E4M3)  # and 4-bit weights of a weight-only layer (INT4)
        return [
            path for path, (b_in, b_w) in self.bits.items()
            if b_in not in ok or (b_w not in ok and not (b_w == 4 and b_in is None))
        ]

    def __str__(self) -> str:
        lines = [f"quantized {len(self.quantized)} layers, {len(self.float_layers)} kept in float"]
        if self.float_layers:
            lines.append("  float: " + _listing(self.float_layers))
        if self.defaulted:
            lines.append("  not in the config (global settings): " + _listing(self.defaulted))
        mixed = {p: b for p, b in self.bits.items() if p in self.not_exportable}
        for path, (b_in, b_w) in mixed.items():
            lines.append(f"  {path}: input {b_in}-bit" + (f", weight {b_w}-bit" if b_w is not None else ""))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------------


def _listing(names: list[str]) -> str:
    return ", ".join(names[:_LISTED]) + (f", ... ({len(names)} in all)" if len(names) > _LISTED else "")


def _json_type(value: Any) -> str:
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


def _layer_path(name: str) -> str:
    return f"layers[{json.dumps(name)}]"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _hint(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _params_for(method: str) -> tuple[str, ...]:
    """The parameter keys of ``method``, in file order."""
    if method == "max":
        return ()
    if method == "percentile":
        return ("percentile", "num_bins")
    if method in ("entropy", "mse"):
        return ("start_bin", "stride", "num_bins")
    return ("num_bins",)


def _key_order(role: str, method: str) -> tuple[str, ...]:
    return ("num_bits", "method") + _params_for(method) + _TAIL_KEYS[role]


def _calib_method(method: str) -> str:
    """The descriptor's ``calib_method`` (the collector) for an amax method."""
    return "max" if method == "max" else "histogram"


class _Problems:
    """Collects ``"<path>: <message>"`` strings."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")

    def __len__(self) -> int:
        return len(self.items)


# --------------------------------------------------------------------------------------------------------------------
# schema checks (no model needed)
# --------------------------------------------------------------------------------------------------------------------


def _check_keys(obj: Mapping, valid: tuple[str, ...], where: str, problems: _Problems) -> bool:
    ok = True
    for key in obj:
        if key not in valid:
            sep = "." if where else ""
            shown = key if isinstance(key, str) else repr(key)
            problems.add(f"{where}{sep}{shown}",
                         f"unknown key; valid keys are {', '.join(valid)}{_hint(str(key), valid)}")
            ok = False
    return ok


def _check_tensor(spec: Any, role: str, base: dict[str, Any], where: str, problems: _Problems) -> dict | None:
    """Checks one tensor section and resolves it on ``base`` (a full section); ``None`` when it has problems."""
    if not isinstance(spec, Mapping):
        problems.add(where, f"must be an object, got {_json_type(spec)}")
        return None
    before = len(problems)
    _check_keys(spec, _TENSOR_KEYS[role], where, problems)
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "num_bits": (lambda v: (_is_int(v) and MIN_BITS <= v <= MAX_BITS) or is_fp8(v),
                     f"an int in {MIN_BITS}..{MAX_BITS}" + (" or [4, 3] (FP8 E4M3)" if isinstance(
                         spec.get("num_bits"), (list, tuple)) else "")),
        "block_size": (lambda v: v is None or v in BLOCK_SIZES, f"null or one of {list(BLOCK_SIZES)}"),
        "enabled": (lambda v: isinstance(v, bool), "true or false"),
        "method": (lambda v: isinstance(v, str), "a string"),
        "percentile": (lambda v: _is_number(v) and 0 < v <= 100, "a number in (0, 100]"),
        "start_bin": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
        "stride": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
        "num_bins": (lambda v: _is_int(v) and v >= 2, "an int >= 2"),
    }
    for key in _TAIL_KEYS[role]:
        checks[key] = (lambda v: isinstance(v, bool), "true or false")
    for key, (test, wanted) in checks.items():
        if key in spec and not test(spec[key]):
            problems.add(f"{where}.{key}", f"must be {wanted}, got {_shown(spec[key])}")
    method = spec.get("method", base["method"])
    if "method" in spec and isinstance(method, str) and method not in search_names():
        problems.add(f"{where}.method", f"unknown method {method!r}; choose one of {', '.join(search_names())}"
                     f"{_hint(method, search_names())}")
    if len(problems) > before:
        return None
    origin = ""
    if "method" not in spec:
        origin = " (the default method)" if where.startswith("global") else " (the global one)"
    for key in _PARAM_KEYS:
        if key in spec and key not in _params_for(method):
            problems.add(f"{where}.{key}",
                         f"applies to {_PARAM_USERS[key]} only, but the method is {method!r}{origin}; remove it")
    if len(problems) > before:
        return None
    resolved = {}
    for key in _key_order(role, method):
        if key in spec:
            resolved[key] = spec[key]
        elif key in _PARAM_KEYS and (method != base["method"] or key not in base):
            resolved[key] = _PARAM_DEFAULTS[key]
        else:
            resolved[key] = base[key]
    for key in _OPTIONAL_KEYS[role]:
        if key in spec or key in base:
            resolved[key] = spec[key] if key in spec else base[key]
    if is_fp8(resolved["num_bits"]):
        resolved["num_bits"] = list(FP8_E4M3)  # as JSON writes it
    if method == "kld" and resolved["num_bins"] < _KLD_MIN_BINS:
        problems.add(f"{where}.num_bins",
                     f"method 'kld' needs at least {_KLD_MIN_BINS} bins, got {resolved['num_bins']}")
    if not resolved["symmetric"] and method != "max":
        problems.add(f"{where}.symmetric", f"false (a zero point) is calibrated from the min/max range and needs "
                                           f"method 'max', but the method is {method!r}")
    if len(problems) > before:
        return None
    try:
        _descriptor(resolved, role, axis=0 if resolved.get("per_channel") else None)
    except (TypeError, ValueError) as err:
        problems.add(where, str(err).replace("QuantDescriptor: ", ""))
        return None
    return resolved


def _shown(value: Any) -> str:
    """``value`` as JSON when it is JSON, else its repr (a config dict built in Python can hold anything)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _bits(num_bits: Any) -> int | tuple[int, int]:
    return tuple(num_bits) if is_fp8(num_bits) else num_bits


def _descriptor(spec: Mapping[str, Any], role: str, axis: int | tuple[int, ...] | None) -> QuantDescriptor:
    return QuantDescriptor(
        num_bits=tuple(spec["num_bits"]) if is_fp8(spec["num_bits"]) else spec["num_bits"],
        block_size=spec.get("block_size") if role == "weight" else None,
        axis=axis,
        calib_method=_calib_method(spec["method"]),
        unsigned=spec.get("unsigned", False) if role == "input" else False,
        symmetric=spec["symmetric"],
        narrow_range=spec["narrow_range"],
    )


@dataclass
class _Checked:
    """A config after the schema checks: the global section resolved, the layer entries as given."""

    config: dict[str, Any]
    global_: dict[str, Any]
    layers: dict[str, Any]
    bad_layers: set[str]
    problems: _Problems


def _check_config(config: Any) -> _Checked:
    problems = _Problems()
    glob = {"batch_num": _DEFAULT_BATCH_NUM, "skip_layers": [], **copy.deepcopy(_DEFAULT_TENSOR)}
    if not isinstance(config, Mapping):
        problems.add("<root>", f"must be an object, got {_json_type(config)}")
        return _Checked({}, glob, {}, set(), problems)
    _check_keys(config, _TOP_KEYS, "", problems)
    if "version" not in config:
        problems.add("version", f"missing; this qdq reads version {CONFIG_VERSION}")
    elif not _is_int(config["version"]) or config["version"] != CONFIG_VERSION:
        newer = _is_int(config["version"]) and config["version"] > CONFIG_VERSION
        problems.add("version", f"is {config['version']!r}; this qdq reads version {CONFIG_VERSION}"
                                + (" (the config was written by a newer qdq)" if newer else ""))
    if "format" in config and config["format"] != CONFIG_FORMAT:
        problems.add("format", f"is {config['format']!r}, not {CONFIG_FORMAT!r}")
    for key in ("qdq_version", "model"):
        if key in config and not isinstance(config[key], str):
            problems.add(key, f"must be a string, got {_json_type(config[key])}")

    raw_global = config.get("global", {})
    if not isinstance(raw_global, Mapping):
        problems.add("global", f"must be an object, got {_json_type(raw_global)}")
        raw_global = {}
    _check_keys(raw_global, _GLOBAL_KEYS, "global", problems)
    if "batch_num" in raw_global:
        batch_num = raw_global["batch_num"]
        if batch_num is not None and not (_is_int(batch_num) and batch_num >= 1):
            problems.add("global.batch_num", f"must be an int >= 1 or null (all batches), got {batch_num!r}")
        else:
            glob["batch_num"] = batch_num
    if "skip_layers" in raw_global:
        skip = raw_global["skip_layers"]
        if not isinstance(skip, list):
            problems.add("global.skip_layers", f"must be an array of strings, got {_json_type(skip)}")
        else:
            for i, pattern in enumerate(skip):
                if not isinstance(pattern, str):
                    problems.add(f"global.skip_layers[{i}]", f"must be a string, got {_json_type(pattern)}")
                    continue
                try:
                    compile_ignore_policy([pattern])
                except ValueError as err:
                    problems.add(f"global.skip_layers[{i}]", str(err).replace("ignore_policy: ", ""))
            glob["skip_layers"] = list(skip)
    for role in ("input", "weight"):
        if role in raw_global:
            resolved = _check_tensor(raw_global[role], role, _DEFAULT_TENSOR[role], f"global.{role}", problems)
            if resolved is not None:
                glob[role] = resolved
        else:
            glob[role] = _check_tensor({}, role, _DEFAULT_TENSOR[role], f"global.{role}", problems)

    layers = config.get("layers", {})
    bad: set[str] = set()
    if not isinstance(layers, Mapping):
        problems.add("layers", f"must be an object (layer path -> entry), got {_json_type(layers)}")
        layers = {}
    for name, entry in layers.items():
        where = _layer_path(name)
        before = len(problems)
        if not isinstance(entry, Mapping):
            problems.add(where, f"must be an object, got {_json_type(entry)}")
            bad.add(name)
            continue
        _check_keys(entry, _LAYER_KEYS, where, problems)
        if "enabled" in entry and not isinstance(entry["enabled"], bool):
            problems.add(f"{where}.enabled", f"must be true or false, got {entry['enabled']!r}")
        if "type" in entry and not isinstance(entry["type"], str):
            problems.add(f"{where}.type", f"must be a string, got {_json_type(entry['type'])}")
        for role in ("input", "weight"):
            if role in entry:
                _check_tensor(entry[role], role, glob[role], f"{where}.{role}", problems)
        if len(problems) > before:
            bad.add(name)
    checked = {k: config[k] for k in _TOP_KEYS if k in config and k not in ("global", "layers")}
    checked["global"] = glob
    checked["layers"] = {
        name: copy.deepcopy(dict(entry)) for name, entry in layers.items() if isinstance(entry, Mapping)
    }
    return _Checked(checked, glob, checked["layers"], bad, problems)


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


def _source_of(config: Any) -> tuple[Any, str]:
    """``(config object, description)`` from a path, a dict or a :class:`QuantizeReport`."""
    if isinstance(config, QuantizeReport):
        return config.config, "from a QuantizeReport"
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        return _read(path), str(path)
    if isinstance(config, Mapping):
        return config, "(a dict)"
    raise TypeError(f"a quantization config is a file path, a dict or a QuantizeReport, got {type(config).__name__}")


def load_quant_config(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks a quantization config file (see the module docstring for the format).

    The checks here need no model: keys, types, ranges, methods and their parameters, ``skip_layers`` patterns.
    :func:`quantize_model` adds the checks against the model.

    Args:
        path: the JSON file.

    Returns:
        The config: the ``global`` section complete (defaults filled in), the layer entries as the file gives them.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        QuantConfigError: the file is not JSON, or has problems (all listed, each with its JSON path).

    Example:
        >>> import json, os, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "c.json")
        ...     with open(path, "w") as f:
        ...         json.dump({"version": 1, "layers": {"fc": {"weight": {"num_bits": 32, "methd": "max"}}}}, f)
        ...     load_quant_config(path)
        Traceback (most recent call last):
        ...
        qdq.config.QuantConfigError: quantization config ... has 2 problems:
          layers["fc"].weight.methd: unknown key; valid keys are ... (did you mean 'method'?)
          layers["fc"].weight.num_bits: must be an int in 2..16, got 32
    """
    raw, source = _source_of(Path(path))
    checked = _check_config(raw)
    if checked.problems:
        raise QuantConfigError(source, checked.problems.items)
    return checked.config


def _format(config: Mapping[str, Any]) -> str:
    """The config as JSON text: one line per tensor section, one entry per layer."""
    dump = lambda v: json.dumps(v, allow_nan=False)  # noqa: E731
    lines = ["{"]
    head = [(k, v) for k, v in config.items() if k not in ("global", "layers")]
    for key, value in head:
        lines.append(f"  {dump(key)}: {dump(value)},")
    glob = config.get("global", {})
    lines.append('  "global": {')
    items = [f"    {dump(k)}: {dump(v)}" for k, v in glob.items()]
    lines.append(",\n".join(items))
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


def save_quant_config(config: Mapping[str, Any] | QuantizeReport, path: str | os.PathLike) -> dict[str, Any]:
    """Checks ``config`` (as :func:`load_quant_config` does) and writes it as JSON, atomically.

    Use it to write a config edited in Python, or the resolved config of a :class:`QuantizeReport`.

    Args:
        config: a config dict, or a :class:`QuantizeReport` (its resolved config is written).
        path: the file to write (folders are created).

    Returns:
        The checked config, as :func:`load_quant_config` will read it back.

    Raises:
        QuantConfigError: the config has problems (nothing is written).

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "c.json")
        ...     written = save_quant_config({"version": 1, "layers": {"fc": {"enabled": False}}}, path)
        ...     load_quant_config(path) == written
        True
    """
    raw, source = _source_of(config)
    checked = _check_config(raw)
    if checked.problems:
        raise QuantConfigError(source, checked.problems.items)
    out = dict(checked.config)
    out.setdefault("format", CONFIG_FORMAT)
    ordered = {k: out[k] for k in _TOP_KEYS if k in out}
    write_atomically(Path(path), _format(ordered))
    logger.info("wrote the quantization config of %d layers to %s", len(ordered.get("layers", {})), path)
    return ordered


# --------------------------------------------------------------------------------------------------------------------
# the model side
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    """A quantizable layer of the model."""

    path: str
    type_name: str  # the class of the module now
    quant_type_name: str  # the class it has once quantized
    has_weight: bool
    already_quantized: bool
    weight_axis: int | tuple[int, ...] | None  # axis of the quantized class's default weight descriptor
    aliases: list[str]


def _quantizable_layers(model: nn.Module, quant_map: Any) -> tuple[dict[str, _Layer], dict[str, str]]:
    """``({path: layer}, {path: why not quantizable})`` as :func:`replace_to_quantization_module` sees them."""
    layers: dict[str, _Layer] = {}
    unsupported: dict[str, str] = {}
    for entry in quantizable_layers(model, quant_map):
        if entry.status == "unsupported":
            unsupported[entry.path] = entry.reason
            continue
        cls = entry.quant_cls
        if not issubclass(cls, (QuantMixin, QuantInputMixin)):
            continue  # quantized by other means (no descriptors to set)
        has_weight = issubclass(cls, QuantMixin)
        axis = cls.default_quant_desc_weight.axis if has_weight else None
        layers[entry.path] = _Layer(entry.path, type(entry.module).__name__, cls.__name__, has_weight,
                                    entry.status == "quantized", axis, entry.paths)
    return layers, unsupported


def _not_a_layer(name: str, model: nn.Module, layers: Mapping[str, _Layer], unsupported: Mapping[str, str]) -> str:
    if name in unsupported:
        return f"cannot be quantized: {unsupported[name]}"
    for layer in layers.values():
        if name in layer.aliases:
            return f"is the same module as {layer.path!r}; use that name"
    try:
        module = model.get_submodule(name)
    except AttributeError:
        close = difflib.get_close_matches(name, list(layers), n=1)
        return "the model has no module of that name" + (f" (did you mean {close[0]!r}?)" if close else "")
    return f"is a {type(module).__name__}, which the module map does not quantize"


@dataclass
class _Plan:
    config: dict[str, Any]  # resolved: every layer, every key
    layers: dict[str, _Layer]
    enabled: dict[str, bool]
    defaulted: list[str]
    unsupported: dict[str, str]  # mapped layers the conversion cannot quantize, with the reason


def _plan(model: nn.Module, checked: _Checked, strict: bool, quant_map: Any) -> tuple[_Plan | None, list[str]]:
    """Checks the config against ``model`` and resolves every layer; ``(plan, problems)``."""
    problems = checked.problems
    layers, unsupported = _quantizable_layers(model, quant_map)
    glob = checked.global_
    skip_rules = []
    for i, pattern in enumerate(glob["skip_layers"] if isinstance(glob["skip_layers"], list) else []):
        try:
            rule = compile_ignore_policy([pattern])
        except (TypeError, ValueError):
            continue  # reported by the schema checks
        if not any(rule(alias) for layer in layers.values() for alias in layer.aliases):
            close = difflib.get_close_matches(str(pattern), list(layers), n=1)
            problems.add(f"global.skip_layers[{i}]", f"{pattern!r} matches no quantizable layer of the model"
                                                     + (f" (did you mean {close[0]!r}?)" if close else ""))
        skip_rules.append((i, pattern, rule))

    for name, entry in checked.layers.items():
        where = _layer_path(name)
        layer = layers.get(name)
        if layer is None:
            problems.add(where, _not_a_layer(name, model, layers, unsupported))
            continue
        if "weight" in entry and not layer.has_weight:
            problems.add(f"{where}.weight", f"{layer.type_name} layers have no weight quantizer; remove this section")
        if isinstance(entry.get("type"), str) and entry["type"] not in (layer.type_name, layer.quant_type_name):
            problems.add(f"{where}.type", f"is {entry['type']!r} but the model's layer is a {layer.type_name} "
                                          "(a config written for another model?)")

    resolved_layers: dict[str, dict[str, Any]] = {}
    enabled: dict[str, bool] = {}
    defaulted: list[str] = []
    for path, layer in layers.items():
        if path in checked.bad_layers:
            continue  # its problems are listed already
        skipped_by = [(i, p) for i, p, rule in skip_rules if all(rule(alias) for alias in layer.aliases)]
        entry = checked.layers.get(path)
        if entry is None:
            entry = {}
            if not skipped_by:  # a layer skip_layers matches is configured: float
                defaulted.append(path)
        on = entry.get("enabled", not skipped_by)
        if on and skipped_by:
            i, pattern = skipped_by[0]
            problems.add(f"{_layer_path(path)}.enabled", f"is true but global.skip_layers[{i}] ({pattern!r}) keeps "
                                                         "this layer in float; remove one of the two")
        out: dict[str, Any] = {"type": entry.get("type", layer.type_name), "enabled": bool(on)}
        ok = True
        for role in ("input", "weight") if layer.has_weight else ("input",):
            spec = _check_tensor(entry.get(role, {}), role, glob[role], f"{_layer_path(path)}.{role}", _Problems())
            if spec is None:
                ok = False
            out[role] = spec
        if ok:
            resolved_layers[path] = out
            enabled[path] = bool(on)
    if strict and defaulted:
        problems.add("layers", f"strict: {len(defaulted)} quantizable layers of the model are missing: "
                               f"{_listing(defaulted)}")
    if problems:
        return None, problems.items
    config = {
        "format": CONFIG_FORMAT,
        "version": CONFIG_VERSION,
        "qdq_version": __version__,
        "model": type(model).__name__,
        "global": glob,
        "layers": resolved_layers,
    }
    return _Plan(config, layers, enabled, defaulted, unsupported), []


# --------------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------------


def create_quant_config(
    path: str | os.PathLike | None,
    model: nn.Module,
    skip_layers: Iterable[str] = (),
    batch_num: int | None = _DEFAULT_BATCH_NUM,
    *,
    activation_calib: str = "max",
    weight_calib: str = "max",
    num_bits: int = 8,
    weight_num_bits: int | None = None,
    per_channel: bool = True,
    symmetric: bool = True,
    narrow_range: bool = False,
    percentile: float = 99.99,
    num_bins: int = 2048,
    quant_map: Any = None,
) -> dict[str, Any]:
    """Writes a quantization config listing every layer of ``model`` the module map would quantize.

    Every entry is complete (``type``, ``enabled`` and every key of ``input`` and ``weight``), so the file shows
    what each layer gets and any key can be edited in place. The model is not changed.

    Args:
        path: the JSON file to write (folders are created); ``None`` only returns the config.
        model: the float model (layers that are already quantized are listed too).
        skip_layers: layers to keep in float: names or regular expressions (see
            :func:`qdq.quant_modules.compile_ignore_policy`); written to ``global.skip_layers`` and as
            ``"enabled": false`` on the layers they match. Each must match a layer.
        batch_num: calibration batches (``global.batch_num``); ``None`` for all of the data.
        activation_calib: amax method of the inputs: ``"max"``, ``"entropy"``, ``"mse"``, ``"percentile"``,
            ``"kld"`` (``global.input.method``).
        weight_calib: amax method of the weights (``global.weight.method``).
        num_bits: bits of the inputs, and of the weights unless ``weight_num_bits`` is given.
        weight_num_bits: bits of the weights.
        per_channel: per-channel weight amax.
        symmetric: ``False`` for asymmetric (zero point) quantization of inputs and weights (needs method max).
        narrow_range: signed range -127..127.
        percentile: the percentile of a ``"percentile"`` method.
        num_bins: histogram bins of the histogram methods.
        quant_map: extra ``{float class: quantized class}`` pairs, as for
            :func:`~qdq.quant_modules.replace_to_quantization_module` (pass the same to :func:`quantize_model`).

    Returns:
        The config, as written.

    Raises:
        QuantConfigError: an argument gives an invalid setting, or a ``skip_layers`` item matches no layer (each
            named with the JSON path it would have in the file).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.AvgPool2d(2))
        >>> config = create_quant_config(None, model, activation_calib="percentile", percentile=99.9)
        >>> config["layers"]["0"]["input"]
        {'num_bits': 8, 'method': 'percentile', 'percentile': 99.9, 'num_bins': 2048, 'unsigned': False, \
'symmetric': True, 'narrow_range': False}
        >>> sorted(config["layers"]["1"])               # a pool has no weight
        ['enabled', 'input', 'type']
    """
    if isinstance(skip_layers, str):
        skip_layers = [skip_layers]
    if not isinstance(skip_layers, Iterable):
        raise TypeError(f"create_quant_config: skip_layers must be a list of layer names or patterns, got "
                        f"{skip_layers!r}")
    weight_bits = num_bits if weight_num_bits is None else weight_num_bits

    def section(role: str, method: Any, bits: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {"num_bits": bits, "method": method}
        if isinstance(method, str):
            for key in _params_for(method):
                spec[key] = {"percentile": percentile, "num_bins": num_bins}.get(key, _PARAM_DEFAULTS[key])
        if role == "input":
            spec["unsigned"] = False
        else:
            spec["per_channel"] = per_channel
        spec.update(symmetric=symmetric, narrow_range=narrow_range)
        return spec

    config = {
        "format": CONFIG_FORMAT,
        "version": CONFIG_VERSION,
        "qdq_version": __version__,
        "model": type(model).__name__,
        "global": {
            "batch_num": batch_num,
            "skip_layers": list(skip_layers),
            "input": section("input", activation_calib, num_bits),
            "weight": section("weight", weight_calib, weight_bits),
        },
        "layers": {},
    }
    source = "built by create_quant_config"
    checked = _check_config(config)
    if checked.problems:
        raise QuantConfigError(source, checked.problems.items)
    plan, problems = _plan(model, checked, strict=False, quant_map=quant_map)
    if plan is None:
        raise QuantConfigError(source, problems)
    config["layers"] = plan.config["layers"]
    for where, why in plan.unsupported.items():
        logger.warning("not listed in the config (cannot be quantized): %s: %s", where, why)
    quantized = sum(plan.enabled.values())
    logger.info("quantization config of %s: %d layers, %d to quantize, %d kept in float", type(model).__name__,
                len(plan.layers), quantized, len(plan.layers) - quantized)
    if path is not None:
        save_quant_config(config, path)
    return config


def _quantizer_roles(layer: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    """``("input" | "weight", quantizer)`` for the quantizers a layer owns directly (or in a ModuleList)."""
    roles = []
    for name, child in layer.named_children():
        group = list(child) if isinstance(child, nn.ModuleList) else [child]
        for q in group:
            if isinstance(q, TensorQuantizer):
                roles.append(("weight" if "weight" in name else "input", q))
    return roles


def _layer_device(layer: nn.Module) -> torch.device | None:
    for tensor in list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False)):
        return tensor.device
    return None


def quantize_model(
    model: nn.Module,
    config: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = False,
    quant_map: Any = None,
) -> QuantizeReport:
    """Quantizes ``model`` in place as ``config`` says: which layers, with which descriptors.

    The whole config is checked against the model first; any problem raises one :class:`QuantConfigError` listing
    them all, and the model is left untouched. Then the layers are converted with
    :func:`~qdq.quant_modules.replace_to_quantization_module` (disabled layers are its ignore policy), and each
    converted layer gets new quantizers built from its entry (``init_quantizer(input descriptor, weight
    descriptor)``), on the layer's device. Histogram methods get a histogram calibrator of ``num_bins`` bins.

    Args:
        model: the float model.
        config: a config file path or dict (see the module docstring), or the :class:`QuantizeReport` of an earlier
            call (its resolved config).
        strict: layers of the model that the config does not list are an error (default: they get the global
            settings, logged).
        quant_map: extra ``{float class: quantized class}`` pairs (the same as given to :func:`create_quant_config`).

    Returns:
        A :class:`QuantizeReport`; its ``config`` is the resolved config, which :func:`calibrate_from_config` takes.

    Raises:
        FileNotFoundError: the file does not exist.
        QuantConfigError: the config has problems, alone or against this model.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> report = quantize_model(model, {"version": 1, "layers": {"2": {"weight": {"num_bits": 4}}}})
        >>> report.bits, report.defaulted
        ({'0': (8, 8), '2': (8, 4)}, ['0'])
        >>> quantize_model(torch.nn.Linear(2, 2), {"version": 1, "layers": {"fc": {}}})
        Traceback (most recent call last):
        ...
        qdq.config.QuantConfigError: quantization config (a dict) has 1 problem:
          layers["fc"]: the model has no module of that name
    """
    raw, source = _source_of(config)
    checked = _check_config(raw)
    plan, problems = _plan(model, checked, strict, quant_map)
    if plan is None:
        raise QuantConfigError(source, problems)
    named_model = raw.get("model") if isinstance(raw, Mapping) else None
    if isinstance(named_model, str) and named_model != type(model).__name__:
        logger.warning("quantization config %s was written for a %s; this model is a %s", source, named_model,
                       type(model).__name__)
    if plan.defaulted:
        logger.info("%d layers are not in the config and get the global settings: %s", len(plan.defaulted),
                    _listing(plan.defaulted))

    float_aliases = {alias for path, on in plan.enabled.items() if not on for alias in plan.layers[path].aliases}
    replacement = replace_to_quantization_module(model, ignore_policy=lambda p: p in float_aliases, quant_map=quant_map)

    report = QuantizeReport(batch_num=plan.config["global"]["batch_num"], config=plan.config, replacement=replacement)
    for path, layer in plan.layers.items():
        module = model.get_submodule(path)
        entry = plan.config["layers"][path]
        if not entry["enabled"]:
            report.float_layers.append(path)
            if layer.already_quantized:
                for _, q in _quantizer_roles(module):
                    q.disable()
                logger.warning("%s was already quantized; its entry is disabled, so its quantizers are disabled",
                               path)
            continue
        if layer.already_quantized:
            logger.warning("%s was already quantized; it gets new quantizers from the config (its amax is lost)",
                           path)
        spec_in = entry["input"]
        desc_in = _descriptor(spec_in, "input", None)
        if layer.has_weight:
            spec_w = entry["weight"]
            axis = (layer.weight_axis if layer.weight_axis is not None else 0) if spec_w["per_channel"] else None
            module.init_quantizer(desc_in, _descriptor(spec_w, "weight", axis))
        else:
            spec_w = None
            module.init_quantizer(desc_in)
        if spec_in.get("enabled") is False:  # weight-only (INT4)
            module._input_quantizer.disable()
        device = _layer_device(module)
        for role, q in _quantizer_roles(module):
            spec = spec_in if role == "input" else spec_w
            if spec["method"] != "max":
                q.set_calibrator(HistogramCalibrator(q.num_bits, q.axis, q.unsigned, num_bins=spec["num_bins"]))
            if device is not None and device.type != "cpu":
                q.to(device)
        report.quantized.append(path)
        bits_in = None if spec_in.get("enabled") is False else _bits(spec_in["num_bits"])
        report.bits[path] = (bits_in, None if spec_w is None else _bits(spec_w["num_bits"]))
        if path in plan.defaulted:
            report.defaulted.append(path)
    name_quantizers(model)
    logger.info("%s", report)
    if report.not_exportable:
        logger.warning("layers with bit widths other than 8 (fine for accuracy studies and QAT; export_onnx refuses "
                       "them, TensorRT's Q/DQ is 8-bit): %s", _listing(report.not_exportable))
    return report


def _amax_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The ``load_calib_amax`` arguments of a tensor section."""
    if spec["method"] == "max":
        return {}
    kwargs: dict[str, Any] = {"method": spec["method"]}
    kwargs.update({k: spec[k] for k in _params_for(spec["method"]) if k != "num_bins"})
    return kwargs


def calibrate_from_config(
    model: nn.Module,
    data: Iterable | Callable[[nn.Module], Any],
    config: str | os.PathLike | Mapping[str, Any] | QuantizeReport,
    *,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    preprocess: Callable[[Any], Any] | None = None,
    strict: bool = True,
    progress: bool = True,
) -> CalibrationReport:
    """Calibrates a model prepared by :func:`quantize_model`, each quantizer with the method of its layer's entry.

    Statistics are collected once for the whole model (:func:`qdq.calibrate.collect_stats`; each quantizer collects
    with the calibrator :func:`quantize_model` gave it: a running max, or a histogram); then each quantizer's amax is
    computed with its entry's method and parameters. Quantizers outside the configured layers (e.g. a QuantAdd of a
    forward patch) use their own calibrator with the global ``input`` method.

    Args:
        model: the model :func:`quantize_model` converted with this config.
        data: batches or a forward loop, as for :func:`qdq.calibrate_model`.
        config: the same config (path or dict), or the :class:`QuantizeReport` of :func:`quantize_model`.
        num_batches: batches to feed (default: the config's ``global.batch_num``).
        device: where batches go (default: the model's device).
        preprocess: ``batch -> model input``.
        strict: quantizers that see no data are an error (``False``: they are disabled, with a warning).
        progress: show a progress bar.

    Returns:
        A :class:`~qdq.calibrate.CalibrationReport` (``method`` is ``"per-layer"``).

    Raises:
        QuantConfigError: the config has problems, or the model's quantizers do not match it (the model was not
            quantized with this config); each mismatch named.
        RuntimeError: quantizers saw no data (with ``strict``), naming them.
    """
    raw, source = _source_of(config)
    checked = _check_config(raw)
    if checked.problems:
        raise QuantConfigError(source, checked.problems.items)
    glob = checked.global_
    skip_rules = [compile_ignore_policy([p]) for p in glob["skip_layers"]]

    def is_enabled(path: str, entry: Mapping[str, Any]) -> bool:
        return entry.get("enabled", not any(rule(path) for rule in skip_rules))

    specs: dict[TensorQuantizer, tuple[str, dict[str, Any]]] = {}
    mismatches: list[str] = []
    layer_paths: set[str] = set()
    for path, layer in model.named_modules():
        if not isinstance(layer, (QuantMixin, QuantInputMixin)):
            continue
        layer_paths.add(path)
        entry = checked.layers.get(path, {})
        where = _layer_path(path)
        enabled = is_enabled(path, entry)
        for role, q in _quantizer_roles(layer):
            if not enabled:
                if q.is_enabled:
                    mismatches.append(f"{where}: disabled in the config, but {q.name} is enabled")
                continue
            label = f"{where}.{role}"
            spec = _check_tensor(entry.get(role, {}), role, glob[role], label, _Problems())
            if spec is None:
                continue
            want = MaxCalibrator if spec["method"] == "max" else HistogramCalibrator
            if q.num_bits != _bits(spec["num_bits"]):
                mismatches.append(f"{label}.num_bits: {spec['num_bits']} in the config, {q.num_bits} in {q.name}")
            if not isinstance(q.calibrator, want):
                mismatches.append(f"{label}.method: {spec['method']!r} needs a {want.__name__}, {q.name} has "
                                  f"{'no calibrator' if q.calibrator is None else 'a ' + type(q.calibrator).__name__}")
            if q in specs:
                if specs[q][1] != spec:
                    logger.warning("%s is shared by %s and %s with different settings; those of %s are used",
                                   q.name, specs[q][0], path, specs[q][0])
                continue
            specs[q] = (path, spec)
    for path, entry in checked.layers.items():
        if path not in layer_paths and is_enabled(path, entry):
            mismatches.append(f"{_layer_path(path)}: enabled in the config, but the model has no quantized layer of "
                              "that name (run quantize_model with this config first)")
    if mismatches:
        raise QuantConfigError(source, [m + " - the model does not match the config" for m in mismatches])

    batches = glob["batch_num"] if num_batches is None else num_batches
    start = time.perf_counter()
    fed = collect_stats(model, data, device, batches, method="max", preprocess=preprocess, progress=progress)
    report = CalibrationReport(method="per-layer", batches=fed, collect_seconds=time.perf_counter() - start)
    start = time.perf_counter()
    outside = 0
    for name, q in quantizers(model):
        if not q.is_enabled or q.calibrator is None:
            continue
        if q.calibrator.num_batches == 0:
            report.no_data.append(name)
            continue
        if q in specs:
            kwargs = _amax_kwargs(specs[q][1])
        else:
            outside += 1
            kwargs = {} if isinstance(q.calibrator, MaxCalibrator) else _amax_kwargs(glob["input"])
        q.load_calib_amax(**kwargs)
        report.calibrated += 1
    if outside:
        logger.info("%d quantizers outside the configured layers were calibrated with the global input method", outside)
    handle_no_data(model, report.no_data, strict)
    report.compute_seconds = time.perf_counter() - start
    logger.info("calibrated %d quantizers per layer on %d batches", report.calibrated, fed)
    return report
