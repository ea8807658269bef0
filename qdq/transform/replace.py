"""The in-place conversion of a float model to a quantized one, by the module map (:mod:`qdq.transform.module_map`).

:func:`replace_to_quantization_module` walks the whole model and turns every layer whose type is in the map into
its quantized twin **in place**: the module object stays the same (its class changes and quantizers are added), so
its parameters, buffers, hooks, optimizer state and every outside reference to it survive.

Subclasses of mapped layers are quantized too. A subclass that keeps its parent's ``forward`` gets the quantized
parent's ``forward``; a subclass with its own ``forward`` (EfficientNet's ``Conv2dStaticSamePadding``, which pads
and then calls ``F.conv2d`` itself) keeps that ``forward``, run on the quantized input with the quantized weight in
place of ``self.weight``. pytorch_quantization and ModelOpt skip such layers without a word.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from qdq import quant_modules
    >>> class SamePadConv(nn.Conv2d):           # a subclass with its own forward
    ...     def forward(self, x):
    ...         return nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1)), self.weight, self.bias)
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), SamePadConv(8, 8, 3), nn.Flatten(), nn.LazyLinear(2))
    >>> weight = model[0].weight
    >>> report = quant_modules.replace_to_quantization_module(model, ignore_policy="4")
    >>> report.replaced, report.ignored
    (['0', '2'], ['4'])
    >>> type(model[2]).__name__, model[0].weight is weight
    ('QuantSamePadConv', True)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
from torch import nn

from qdq import nn as quant_nn
from qdq.nn.modules._utils import QuantInputMixin, QuantMixin, pop_quant_desc_in_kwargs
from qdq.math.descriptor import QuantDescriptor
from qdq.transform.functional_weights import functional_user
from qdq.transform.ignore_policy import IgnorePolicy, compile_ignore_policy, unmatched_ignore_patterns
from qdq.transform.module_map import _build_map
from qdq.transform.subclasses import _quant_class_for

__all__ = [
    "replace_to_quantization_module",
    "quantizable_layers",
    "QuantizableLayer",
    "ReplacementReport",
    "name_quantizers",
    "is_quantized",
    "module_device",
]

logger = logging.getLogger(__name__)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized layer (has its own quantizers)."""
    return isinstance(module, (QuantMixin, QuantInputMixin))


def module_device(module: nn.Module) -> torch.device | None:
    """The device of a module's own parameters or buffers (``None`` for a module without tensors)."""
    for tensor in module.parameters(recurse=False):
        return tensor.device
    for tensor in module.buffers(recurse=False):
        return tensor.device
    for tensor in module.parameters():
        return tensor.device
    return None


def _convert(module: nn.Module, quant_cls: type, descs: Mapping[str, object] | None = None) -> None:
    module.__class__ = quant_cls
    given = {f"quant_desc_{role}": d for role, d in (descs or {}).items()}
    if issubclass(quant_cls, QuantInputMixin):
        module.init_quantizer(pop_quant_desc_in_kwargs(quant_cls, input_only=True, **given))
    elif issubclass(quant_cls, QuantMixin):
        module.init_quantizer(*pop_quant_desc_in_kwargs(quant_cls, **given))
    elif hasattr(module, "init_quantizer"):
        module.init_quantizer()
    device = module_device(module)
    if device is not None:  # the new quantizers live where the layer lives
        for child in module.modules():
            if isinstance(child, quant_nn.TensorQuantizer):
                child.to(device)


@dataclass
class ReplacementReport:
    """What :func:`replace_to_quantization_module` did, by dotted module path."""

    replaced: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    already_quantized: list[str] = field(default_factory=list)
    unsupported: list[tuple[str, str]] = field(default_factory=list)
    unmatched_ignore: list[str] = field(default_factory=list)  # ignore_policy patterns that matched no layer
    attention: list[str] = field(default_factory=list)  # attention blocks whose MatMuls got quantizers

    def __str__(self) -> str:
        lines = [f"quantized {len(self.replaced)} layers, ignored {len(self.ignored)}"]
        if self.attention:
            lines.append(f"  attention MatMuls quantized in {len(self.attention)} blocks")
        if self.unmatched_ignore:
            lines.append("  ignore_policy entries matching no layer: " + ", ".join(map(repr, self.unmatched_ignore)))
        if self.ignored:
            lines.append("  ignored: " + ", ".join(self.ignored))
        if self.already_quantized:
            lines.append("  already quantized: " + ", ".join(self.already_quantized))
        for path, why in self.unsupported:
            lines.append(f"  not quantized: {path}: {why}")
        return "\n".join(lines)


@dataclass
class QuantizableLayer:
    """A module the module map has an answer for (see :func:`quantizable_layers`)."""

    path: str  # the first dotted path of the module
    paths: list[str]  # every path it is reachable under
    module: nn.Module
    status: str  # "quantizable", "quantized" (already) or "unsupported"
    quant_cls: type | None = None  # the class it becomes (its own class when already quantized)
    reason: str = ""  # why it is unsupported


def _functional_use(model: nn.Module, paths: list[str], mapping: dict[type, type] | None) -> str:
    """Why the layer at ``paths`` must stay in float because a parent uses its weight functionally (``""`` if not).
    With ``mapping``, a parent about to be converted is judged by its quantized class's forward."""

    def class_of(parent):
        if mapping is None or is_quantized(parent):
            return None
        try:
            return _quant_class_for(type(parent), mapping)
        except NotImplementedError:
            return None

    for path in paths:
        user = functional_user(model, path, class_of)
        if user is not None:
            return (f"its parent {user[0] or '<root>'!r} ({user[1]}) passes its weight to a function instead of "
                    "calling it, so as a quantized layer it would never run; it stays in float")
    return ""


def quantizable_layers(model: nn.Module, quant_map: Mapping[type, type] | Iterable | None = None) -> list[QuantizableLayer]:
    """Every module of ``model`` the module map concerns, in module order, without changing anything.

    A module reachable under several paths is listed once (with all its paths). This is the list
    :func:`replace_to_quantization_module` works from. A mapped layer whose parent hands its weight to a function
    instead of calling it (:mod:`qdq.transform.functional_weights`) is ``"unsupported"``, with the reason.
    """
    mapping = _build_map(quant_map)
    paths: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
        modules[id(module)] = module
    layers = []
    for key, module in modules.items():
        where = paths[key]
        if is_quantized(module):
            layers.append(QuantizableLayer(where[0], where, module, "quantized", type(module)))
            continue
        try:
            quant_cls = _quant_class_for(type(module), mapping)
        except NotImplementedError as err:
            layers.append(QuantizableLayer(where[0], where, module, "unsupported", reason=str(err)))
            continue
        reason = _functional_use(model, where, mapping) if quant_cls is not None else ""
        if reason:
            layers.append(QuantizableLayer(where[0], where, module, "unsupported", reason=reason))
        elif quant_cls is not None:
            layers.append(QuantizableLayer(where[0], where, module, "quantizable", quant_cls))
    return layers


def replace_to_quantization_module(
    model: nn.Module,
    ignore_policy: IgnorePolicy = None,
    quant_map: Mapping[type, type] | Iterable | None = None,
    attention: bool = True,
    descriptors: Mapping[str, Mapping[str, object]] | None = None,
) -> ReplacementReport:
    """Quantizes every mapped layer of ``model`` in place (see the module docstring).

    Args:
        model: the float model (the root itself is converted too if it is a mapped layer).
        ignore_policy: layers to leave in float: a name, a regular expression, a callable on the dotted path, or a
            list of them (see :func:`compile_ignore_policy`). A layer reachable under several paths is ignored only
            when every path is.
        quant_map: extra or overriding ``{float class: quantized class}`` pairs (or ``_quant_entry`` items) for this
            call; the defaults are ``_DEFAULT_QUANT_MAP``.
        attention: also quantize the attention MatMuls of the transformer blocks of HuggingFace transformers, timm
            and torchvision (:func:`qdq.transform.attention.quantize_attention`; not-ignored blocks only).
        descriptors: per-layer descriptors, ``{layer path: {"input": QuantDescriptor, "weight": QuantDescriptor}}``
            (either role may be left out: the class default); each converted layer builds its quantizers from them
            once. A path that is no quantizable layer of the model is a ``ValueError``; an entry for a layer this
            call does not convert (ignored, already quantized) is not applied, with a warning. The per-layer config
            files (:mod:`qdq.config`) are applied through it.

    Layers whose parent uses their weight functionally (a Linear whose weight the parent hands to ``F.linear``) are
    left in float and listed in ``report.unsupported`` with the reason, unless the attention step quantizes them
    where they are used.

    Returns:
        A :class:`ReplacementReport`; its summary is also logged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_to_quantization_module takes an nn.Module, got {type(model).__name__}")
    ignore = compile_ignore_policy(ignore_policy)
    report = ReplacementReport()
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"replace_to_quantization_module: the model is a TorchScript module ({type(model).__name__}, from "
            "torch.jit.script or torch.jit.trace), whose layers cannot be replaced; quantize the Python nn.Module "
            "before scripting it"
        )
    if descriptors is not None:  # checked before anything changes
        _check_descriptors(descriptors, quantizable_layers(model, quant_map))
    if attention:
        from qdq.transform.attention import quantize_attention  # floor 4 beside this module; it imports this module

        report.attention = quantize_attention(model, ignore_policy)
    layers = quantizable_layers(model, quant_map)
    descriptors = _check_descriptors(descriptors, layers)
    report.unmatched_ignore = unmatched_ignore_patterns(ignore_policy, [p for layer in layers for p in layer.paths])
    if report.unmatched_ignore:
        logger.warning("ignore_policy: %s match no quantizable layer of the model (nothing ignored for them)",
                       ", ".join(map(repr, report.unmatched_ignore)))
    for path, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule) and not any(
                path.startswith(p + ".") for p, _ in report.unsupported):
            why = "a TorchScript module (torch.jit.script/trace): its layers cannot be replaced; quantize before scripting"
            report.unsupported.append((path, why))
            logger.warning("not quantized: %s: %s", path, why)
    for layer in layers:
        path, module = layer.path, layer.module
        descs = next((descriptors[p] for p in layer.paths if p in descriptors), None)
        if layer.status == "quantized":
            report.already_quantized.append(path)
            if descs is not None:
                logger.warning("%s is already quantized; the descriptors given for it are not applied", path)
            cls = type(module)
            if not cls.__module__.startswith("qdq.") and not vars(cls).get("_qdq_generated") and "forward" in vars(cls):
                logger.warning("%s (%s) subclasses a quantized layer with its own forward, which may bypass the "
                               "quantizers", path, cls.__qualname__)
            continue
        reason = layer.reason if layer.status == "unsupported" else _functional_use(model, layer.paths, None)
        if reason:  # (a parent converted or ignored by now has its final forward)
            report.unsupported.append((path, reason))
            logger.warning("not quantized: %s: %s", path, reason)
            continue
        flags = [ignore(p) for p in layer.paths]
        if all(flags):
            report.ignored.append(path)
            logger.info("Quantization: %s is ignored", path)
            if descs is not None:
                logger.warning("%s is ignored; the descriptors given for it are not applied", path)
            continue
        if any(flags):
            logger.warning("%s is reachable as %s; some of these paths are ignored, others not: it is quantized",
                           type(module).__name__, layer.paths)
        _convert(module, layer.quant_cls, descs)
        report.replaced.append(path)
    _report_unknown_weight_layers(model, layers, ignore, report)
    name_quantizers(model)
    logger.info("%s", report)
    return report


#: Modules with a weight matrix that TensorRT's INT8 layers do not take as one (a lookup table).
_NOT_WEIGHT_LAYERS = (nn.Embedding, nn.EmbeddingBag)


def _report_unknown_weight_layers(model: nn.Module, layers: list[QuantizableLayer], ignore, report) -> None:
    """Lists in ``report.unsupported`` the modules holding a ``weight`` matrix (2-D or more) that the module map
    has no quantized class for (transformers' ``Conv1D``, a custom layer): they stay in float, and that is said."""
    known = {id(layer.module) for layer in layers}
    listed = {p for p, _ in report.unsupported}
    found: dict[type, list[str]] = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):  # reported above, with its own reason
            continue
        weight = module._parameters.get("weight")
        if (weight is None or id(module) in known or isinstance(module, _NOT_WEIGHT_LAYERS)
                or isinstance(weight, nn.parameter.UninitializedParameter)  # a lazy module's: no shape yet
                or type(module).__module__.startswith("qdq.") or path in listed or ignore(path)
                or any(path.startswith(p + ".") for p in listed) or weight.dim() < 2):
            continue
        found.setdefault(type(module), []).append(path)
    for cls, paths in found.items():
        why = (f"{cls.__module__}.{cls.__qualname__} has a weight matrix but no quantized class in the module map: "
               "it stays in float (map one to it with quant_map, or ignore it)")
        report.unsupported.extend((path, why) for path in paths)
        logger.warning("not quantized: %d %s layers (%s%s): no quantized class in the module map, they stay in float",
                       len(paths), cls.__qualname__, ", ".join(paths[:3]), ", ..." if len(paths) > 3 else "")


def _check_descriptors(descriptors, layers: list[QuantizableLayer]) -> dict[str, Mapping[str, object]]:
    """``descriptors`` checked: a mapping of quantizable layer paths to ``{"input"/"weight": QuantDescriptor}``."""
    if descriptors is None:
        return {}
    if not isinstance(descriptors, Mapping):
        raise TypeError(f"descriptors must map layer paths to {{'input': ..., 'weight': ...}}, got "
                        f"{type(descriptors).__name__}")
    known = {p: layer for layer in layers for p in layer.paths}
    problems = []
    for path, descs in descriptors.items():
        layer = known.get(path)
        if layer is None or layer.status == "unsupported":
            problems.append(f"{path!r}: no quantizable layer of the model has this path")
            continue
        if not isinstance(descs, Mapping):
            problems.append(f"{path!r}: must be {{'input': QuantDescriptor, 'weight': QuantDescriptor}}, got "
                            f"{type(descs).__name__}")
            continue
        roles = ("input", "weight") if issubclass(layer.quant_cls, QuantMixin) else ("input",)
        for role, desc in descs.items():
            if role not in roles:
                problems.append(f"{path!r}: {layer.quant_cls.__name__} has no {role!r} quantizer (it has "
                                f"{', '.join(roles)})")
            elif not isinstance(desc, QuantDescriptor):
                problems.append(f"{path!r}[{role!r}]: must be a QuantDescriptor, got {type(desc).__name__}")
    if problems:
        raise ValueError("replace_to_quantization_module: descriptors: " + "; ".join(problems))
    return dict(descriptors)


def name_quantizers(model: nn.Module) -> None:
    """Gives every TensorQuantizer of ``model`` its dotted path as name (errors and reports use it)."""
    for path, module in model.named_modules():
        if isinstance(module, quant_nn.TensorQuantizer):
            module.name = path
