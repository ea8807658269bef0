"""Applying a per-layer config to a model: checked against it first, then one conversion that builds each
quantizer once, from its descriptor (:func:`~qdq.transform.replace.replace_to_quantization_module` with
``descriptors=``)."""

from __future__ import annotations

import difflib
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from qdq._version import __version__
from qdq.config.schema import (
    CONFIG_FORMAT,
    CONFIG_VERSION,
    DEFAULT_NUM_BATCHES,
    Checked,
    Problems,
    checked_config,
    descriptor_of,
    layer_path,
    listing,
    resolve_section,
)
from qdq.math.formats import FP8_E4M3, is_fp8
from qdq.nn.modules._utils import QuantInputMixin, QuantMixin
from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.transform.ignore_policy import compile_ignore_policy
from qdq.transform.replace import (
    ReplacementReport,
    module_device,
    name_quantizers,
    quantizable_layers,
    replace_to_quantization_module,
)

__all__ = ["QuantizeReport", "apply_quant_config", "quantize_model"]

logger = logging.getLogger(__name__)

_EXPORT_BITS = 8


@dataclass
class QuantizeReport:
    """What :func:`apply_quant_config` did, by dotted layer path.

    Attributes:
        quantized: layers that got quantizers from the config.
        float_layers: layers kept in float (``"enabled": false`` or matched by ``skip_layers``).
        defaulted: quantized layers the config does not list; they got the global settings.
        bits: ``{layer: (input bits, weight bits or None)}`` for every quantized layer.
        num_batches: the global ``num_batches``.
        config: the resolved config (version 2) - every quantizable layer of the model with its descriptors - as a
            dict that :func:`~qdq.config.save_quant_config` writes and :func:`apply_quant_config` and
            :func:`~qdq.config.calibrate_from_config` take.
        replacement: the :class:`~qdq.transform.replace.ReplacementReport` of the conversion.
    """

    quantized: list[str] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)
    bits: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    num_batches: int | None = DEFAULT_NUM_BATCHES
    config: dict[str, Any] = field(default_factory=dict)
    replacement: ReplacementReport = field(default_factory=ReplacementReport)

    @property
    def batch_num(self) -> int | None:
        """Deprecated name of :attr:`num_batches`."""
        warnings.warn("QuantizeReport.batch_num is now num_batches", DeprecationWarning, stacklevel=2)
        return self.num_batches

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
            lines.append("  float: " + listing(self.float_layers))
        if self.defaulted:
            lines.append("  not in the config (global settings): " + listing(self.defaulted))
        for path, (b_in, b_w) in self.bits.items():
            if path in self.not_exportable:
                lines.append(f"  {path}: input {b_in}-bit" + (f", weight {b_w}-bit" if b_w is not None else ""))
        return "\n".join(lines)


@dataclass
class Layer:
    """A quantizable layer of the model."""

    path: str
    type_name: str  # the class of the module now
    quant_type_name: str  # the class it has once quantized
    has_weight: bool
    already_quantized: bool
    aliases: list[str]
    in_features: int | None  # of a Linear (blocked INT4 weights need a multiple of block_size)


def model_layers(model: nn.Module, quant_map: Any) -> tuple[dict[str, Layer], dict[str, str]]:
    """``({path: layer}, {path: why not quantizable})`` as :func:`replace_to_quantization_module` sees them."""
    layers: dict[str, Layer] = {}
    unsupported: dict[str, str] = {}
    for entry in quantizable_layers(model, quant_map):
        if entry.status == "unsupported":
            unsupported[entry.path] = entry.reason
            continue
        cls = entry.quant_cls
        if not issubclass(cls, (QuantMixin, QuantInputMixin)):
            continue  # quantized by other means (no descriptors to set)
        layers[entry.path] = Layer(entry.path, type(entry.module).__name__, cls.__name__, issubclass(cls, QuantMixin),
                                   entry.status == "quantized", entry.paths, getattr(entry.module, "in_features", None))
    return layers, unsupported


def _not_a_layer(name: str, model: nn.Module, layers: Mapping[str, Layer], unsupported: Mapping[str, str]) -> str:
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
class Plan:
    config: dict[str, Any]  # resolved: every layer, every key
    layers: dict[str, Layer]
    enabled: dict[str, bool]
    defaulted: list[str]
    unsupported: dict[str, str]  # mapped layers the conversion cannot quantize, with the reason


def skip_rules(patterns: Any) -> list[tuple[int, str, Any]]:
    rules = []
    for i, pattern in enumerate(patterns if isinstance(patterns, list) else []):
        try:
            rules.append((i, pattern, compile_ignore_policy([pattern])))
        except (TypeError, ValueError):
            continue  # reported by the schema checks
    return rules


def skipped_by(rules: list[tuple[int, str, Any]], paths: list[str]) -> list[tuple[int, str]]:
    """``(index, pattern)`` of the ``skip_layers`` rules that keep a layer in float: those matching every path the
    layer is reachable under (a module shared by two parents is skipped only where both names match)."""
    return [(i, pattern) for i, pattern, rule in rules if all(rule(path) for path in paths)]


def plan(model: nn.Module, checked: Checked, strict: bool, quant_map: Any) -> tuple[Plan | None, list[str]]:
    """Checks the config against ``model`` and resolves every layer; ``(plan, problems)``."""
    problems = checked.problems
    layers, unsupported = model_layers(model, quant_map)
    glob = checked.global_
    rules = skip_rules(glob["skip_layers"])
    for i, pattern, rule in rules:
        if not any(rule(alias) for layer in layers.values() for alias in layer.aliases):
            close = difflib.get_close_matches(str(pattern), list(layers), n=1)
            problems.add(f"global.skip_layers[{i}]", f"{pattern!r} matches no quantizable layer of the model"
                                                     + (f" (did you mean {close[0]!r}?)" if close else ""))
    for name, entry in checked.layers.items():
        where = layer_path(name)
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
        skipped = skipped_by(rules, layer.aliases)
        entry = checked.layers.get(path)
        if entry is None:
            entry = {}
            if not skipped:  # a layer skip_layers matches is configured: float
                defaulted.append(path)
        on = entry.get("enabled", not skipped)
        if on and skipped:
            i, pattern = skipped[0]
            problems.add(f"{layer_path(path)}.enabled", f"is true but global.skip_layers[{i}] ({pattern!r}) keeps "
                                                        "this layer in float; remove one of the two")
        out: dict[str, Any] = {"type": entry.get("type", layer.type_name), "enabled": bool(on)}
        for role in ("input", "weight") if layer.has_weight else ("input",):
            where = f"{layer_path(path)}.{role}"
            out[role] = resolve_section(entry.get(role, {}), glob[role], where, Problems())
        block = (out.get("weight") or {}).get("block_size")
        if block is not None and on:
            if layer.in_features is not None and layer.in_features % block:
                problems.add(f"{layer_path(path)}.weight.block_size", f"{layer.in_features} input features are not "
                                                                      f"a multiple of {block}")
        resolved_layers[path] = out
        enabled[path] = bool(on)
    if strict and defaulted:
        problems.add("layers", f"strict: {len(defaulted)} quantizable layers of the model are missing: "
                               f"{listing(defaulted)}")
    if problems:
        return None, problems.items
    config = {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "qdq_version": __version__,
              "model": type(model).__name__, "global": glob, "layers": resolved_layers}
    return Plan(config, layers, enabled, defaulted, unsupported), []


def quantizer_roles(layer: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    """``("input" | "weight", quantizer)`` for the quantizers a layer owns directly (or in a ModuleList)."""
    roles = []
    for name, child in layer.named_children():
        for q in (list(child) if isinstance(child, nn.ModuleList) else [child]):
            if isinstance(q, TensorQuantizer):
                roles.append(("weight" if "weight" in name else "input", q))
    return roles


def _bits(section: Mapping[str, Any] | None) -> Any:
    if section is None:
        return None
    return tuple(section["num_bits"]) if is_fp8(section["num_bits"]) else section["num_bits"]


def apply_quant_config(
    model: nn.Module,
    config: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = False,
    quant_map: Any = None,
) -> QuantizeReport:
    """Quantizes ``model`` in place as ``config`` says: which layers, with which descriptors.

    The whole config is checked against the model first; any problem raises one :class:`QuantConfigError` listing
    them all, and the model is left untouched. Then one call of
    :func:`~qdq.transform.replace.replace_to_quantization_module` converts the model: disabled layers are its ignore
    policy, and each converted layer builds its quantizers once, from the descriptors of its entry
    (``descriptors=``), on the layer's device. A layer that was already quantized gets new quantizers from its
    entry (its amax is lost, logged), or, when its entry is disabled, has its quantizers disabled.

    Args:
        model: the float model.
        config: a config file path or dict (see :mod:`qdq.config`; version 1 is read too), or the
            :class:`QuantizeReport` of an earlier call (its resolved config).
        strict: layers of the model that the config does not list are an error (default: they get the global
            settings, logged).
        quant_map: extra ``{float class: quantized class}`` pairs (the same as given to
            :func:`~qdq.config.create_quant_config`).

    Returns:
        A :class:`QuantizeReport`; its ``config`` is the resolved config, which
        :func:`~qdq.config.calibrate_from_config` takes.

    Raises:
        FileNotFoundError: the file does not exist.
        QuantConfigError: the config has problems, alone or against this model.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> report = apply_quant_config(model, {"version": 2, "layers": {"2": {"weight": {"num_bits": 4}}}})
        >>> report.bits, report.defaulted
        ({'0': (8, 8), '2': (8, 4)}, ['0'])
        >>> apply_quant_config(torch.nn.Linear(2, 2), {"version": 2, "layers": {"fc": {}}})
        Traceback (most recent call last):
        ...
        qdq.config.schema.QuantConfigError: quantization config (a dict) has 1 problem:
          layers["fc"]: the model has no module of that name
    """
    checked, source = checked_config(config)
    the_plan, problems = plan(model, checked, strict, quant_map)
    if the_plan is None:
        raise checked.error(source)
    named_model = checked.config.get("model")
    if isinstance(named_model, str) and named_model != type(model).__name__:
        logger.warning("quantization config %s was written for a %s; this model is a %s", source, named_model,
                       type(model).__name__)
    if the_plan.defaulted:
        logger.info("%d layers are not in the config and get the global settings: %s", len(the_plan.defaulted),
                    listing(the_plan.defaulted))

    entries = the_plan.config["layers"]
    descriptors = {}
    for path, layer in the_plan.layers.items():
        entry = entries[path]
        if entry["enabled"]:
            descriptors[path] = {role: descriptor_of(entry[role]) for role in ("input", "weight") if role in entry}
    float_aliases = {a for path, on in the_plan.enabled.items() if not on for a in the_plan.layers[path].aliases}
    to_convert = {p: d for p, d in descriptors.items() if not the_plan.layers[p].already_quantized}
    replacement = replace_to_quantization_module(model, ignore_policy=lambda p: p in float_aliases,
                                                 quant_map=quant_map, descriptors=to_convert)

    report = QuantizeReport(num_batches=the_plan.config["global"]["num_batches"], config=the_plan.config,
                            replacement=replacement)
    for path, layer in the_plan.layers.items():
        module = model.get_submodule(path)
        entry = entries[path]
        if not entry["enabled"]:
            report.float_layers.append(path)
            if layer.already_quantized:
                for _, q in quantizer_roles(module):
                    q.disable()
                logger.warning("%s was already quantized; its entry is disabled, so its quantizers are disabled",
                               path)
            continue
        if layer.already_quantized:
            logger.warning("%s was already quantized; it gets new quantizers from the config (its amax is lost)",
                           path)
            descs = descriptors[path]
            module.init_quantizer(descs["input"], descs["weight"]) if layer.has_weight else module.init_quantizer(
                descs["input"])
            device = module_device(module)
            if device is not None:
                for _, q in quantizer_roles(module):
                    q.to(device)
        weight_only = entry["input"].get("enabled") is False
        if weight_only:  # INT4 weight-only: the input stays float
            for role, q in quantizer_roles(module):
                if role == "input":
                    q.disable()
        report.quantized.append(path)
        report.bits[path] = (None if weight_only else _bits(entry["input"]), _bits(entry.get("weight")))
        if path in the_plan.defaulted:
            report.defaulted.append(path)
    name_quantizers(model)
    logger.info("%s", report)
    if report.not_exportable:
        logger.warning("layers with bit widths other than 8 (fine for accuracy studies and QAT; export_onnx refuses "
                       "them, TensorRT's Q/DQ is 8-bit): %s", listing(report.not_exportable))
    return report


def quantize_model(model: nn.Module, config: Any, *, strict: bool = False, quant_map: Any = None) -> QuantizeReport:
    """Deprecated name of :func:`apply_quant_config` (it applies a per-layer config; it is not the main entry
    point - that is :func:`qdq.transform.replace.replace_to_quantization_module`)."""
    warnings.warn("qdq.config.quantize_model is now apply_quant_config (same arguments)", DeprecationWarning,
                  stacklevel=2)
    return apply_quant_config(model, config, strict=strict, quant_map=quant_map)
