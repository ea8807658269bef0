"""The module map and the in-place conversion of a float model to a quantized one.

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

import functools
import inspect
import logging
import re
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import nn

from qdq import nn as quant_nn
from qdq.transform.functional_weights import functional_user
from qdq.nn.modules._utils import QuantInputMixin, QuantMixin, pop_quant_desc_in_kwargs
from qdq.tensor_quant import QuantDescriptor

# pytorch_quantization's private names (_DEFAULT_QUANT_MAP, _quant_entry) stay importable for code that uses
# them; they are not part of the public API.
__all__ = [
    "register_quant_module",
    "replace_to_quantization_module",
    "quantizable_layers",
    "QuantizableLayer",
    "ReplacementReport",
    "IgnorePolicy",
    "compile_ignore_policy",
    "initialize",
    "deactivate",
    "enable_onnx_export",
    "name_quantizers",
    "is_quantized",
    "module_device",
    "unmatched_ignore_patterns",
    "QuantModuleReplacementHelper",
]

logger = logging.getLogger(__name__)

_quant_entry = namedtuple("_quant_entry", ["orig_mod", "mod_name", "replace_mod"])

#: pytorch_quantization's map: module, attribute name, quantized class.
_DEFAULT_QUANT_MAP = [
    _quant_entry(torch.nn, "Conv1d", quant_nn.QuantConv1d),
    _quant_entry(torch.nn, "Conv2d", quant_nn.QuantConv2d),
    _quant_entry(torch.nn, "Conv3d", quant_nn.QuantConv3d),
    _quant_entry(torch.nn, "ConvTranspose1d", quant_nn.QuantConvTranspose1d),
    _quant_entry(torch.nn, "ConvTranspose2d", quant_nn.QuantConvTranspose2d),
    _quant_entry(torch.nn, "ConvTranspose3d", quant_nn.QuantConvTranspose3d),
    _quant_entry(torch.nn, "Linear", quant_nn.QuantLinear),
    _quant_entry(torch.nn, "LSTM", quant_nn.QuantLSTM),
    _quant_entry(torch.nn, "LSTMCell", quant_nn.QuantLSTMCell),
    _quant_entry(torch.nn, "AvgPool1d", quant_nn.QuantAvgPool1d),
    _quant_entry(torch.nn, "AvgPool2d", quant_nn.QuantAvgPool2d),
    _quant_entry(torch.nn, "AvgPool3d", quant_nn.QuantAvgPool3d),
    _quant_entry(torch.nn, "AdaptiveAvgPool1d", quant_nn.QuantAdaptiveAvgPool1d),
    _quant_entry(torch.nn, "AdaptiveAvgPool2d", quant_nn.QuantAdaptiveAvgPool2d),
    _quant_entry(torch.nn, "AdaptiveAvgPool3d", quant_nn.QuantAdaptiveAvgPool3d),
    _quant_entry(torch.nn, "MultiheadAttention", quant_nn.QuantMultiheadAttention),
]

# the float classes, captured at import so that initialize() patching torch.nn does not change the map
_FLOAT_CLASSES = {entry: getattr(entry.orig_mod, entry.mod_name) for entry in _DEFAULT_QUANT_MAP}


def _check_pair(float_cls, quant_cls) -> None:
    for what, cls in (("float", float_cls), ("quantized", quant_cls)):
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"quant_map: the {what} side of {float_cls!r} -> {quant_cls!r} is not an nn.Module subclass")


def register_quant_module(float_cls: type, quant_cls: type) -> None:
    """Adds ``float_cls -> quant_cls`` to the default map (for every later conversion in this process).

    ``quant_cls`` should subclass ``float_cls`` (it becomes the module's class) and create its quantizers in
    ``init_quantizer``, as the classes of :mod:`qdq.nn` do.
    """
    _check_pair(float_cls, quant_cls)
    module = __import__(float_cls.__module__, fromlist=[float_cls.__name__])
    entry = _quant_entry(module, float_cls.__name__, quant_cls)
    _DEFAULT_QUANT_MAP.append(entry)
    _FLOAT_CLASSES[entry] = float_cls


def _build_map(quant_map) -> dict[type, type]:
    mapping = {_FLOAT_CLASSES.get(e, getattr(e.orig_mod, e.mod_name)): e.replace_mod for e in _DEFAULT_QUANT_MAP}
    if quant_map is None:
        return mapping
    if not isinstance(quant_map, (Mapping, Iterable)) or isinstance(quant_map, (str, bytes)):
        raise TypeError(f"quant_map must be a mapping {{float class: quantized class}} or a list of pairs, got "
                        f"{quant_map!r}")
    pairs = quant_map.items() if isinstance(quant_map, Mapping) else quant_map
    for item in pairs:
        if isinstance(item, _quant_entry):
            float_cls, quant_cls = getattr(item.orig_mod, item.mod_name), item.replace_mod
        else:
            try:
                float_cls, quant_cls = item
            except (TypeError, ValueError):
                raise TypeError(f"quant_map entries must be (float class, quantized class) pairs, got {item!r}") from None
        _check_pair(float_cls, quant_cls)
        mapping[float_cls] = quant_cls
    return mapping


# ----------------------------------------------------------------------------------------------------------------
# ignore policies
# ----------------------------------------------------------------------------------------------------------------
IgnorePolicy = Union[None, str, re.Pattern, Callable[[str], bool], Sequence[Union[str, re.Pattern, Callable]]]


def compile_ignore_policy(policy: IgnorePolicy) -> Callable[[str], bool]:
    """A predicate on dotted module paths.

    A string matches a path that equals it, a path under it (``"head"`` matches ``"head.conv"``) or a path the
    string, read as a regular expression, matches in full (``"head.*"``, ``r"model\\.2[0-4]\\..*"``). Compiled
    patterns match in full; callables receive the path. A list matches when any item does. A mapping
    ``{pattern: bool}`` ignores the paths its ``True`` patterns match, except those a ``False`` pattern matches
    (``{"0": False}`` ignores nothing). Anything else (``ignore_policy=5``) is a ``TypeError``.

    >>> ignore = compile_ignore_policy(["head", r"backbone\\.layer[34]\\..*"])
    >>> [ignore(p) for p in ["head.fc", "backbone.layer3.0.conv1", "backbone.layer1.0.conv1", "header"]]
    [True, True, False, False]
    >>> ignore = compile_ignore_policy({"layer1": True, "layer1.0": False})
    >>> [ignore(p) for p in ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1"]]
    [False, True, False]
    """
    if policy is None:
        return lambda path: False
    return _compile_items(_policy_items(policy))


def _policy_items(policy: IgnorePolicy) -> list:
    """The items of a policy; a mapping ``{pattern: bool}`` gives ``("keep", pattern)`` items for False values."""
    if isinstance(policy, (str, re.Pattern)) or callable(policy):
        return [policy]
    if isinstance(policy, Mapping):
        items = []
        for key, value in policy.items():
            if not isinstance(value, bool):
                raise TypeError(f"ignore_policy[{key!r}] must be True (ignore) or False (quantize), got {value!r}")
            items.append(key if value else ("keep", key))
        return items
    if isinstance(policy, (bytes, bytearray)) or not isinstance(policy, Iterable):
        raise TypeError(
            "ignore_policy must be a layer name or regular expression, a compiled pattern, a callable on the dotted "
            f"path, a mapping {{pattern: bool}} or a list of these; got {policy!r} ({type(policy).__name__})"
        )
    return list(policy)


def _compile_items(items: list) -> Callable[[str], bool]:
    """A path is ignored when an item matches it and no ``("keep", pattern)`` item does."""
    keep = [_compile_items([item[1]]) for item in items if isinstance(item, tuple) and item[:1] == ("keep",)]
    items = [item for item in items if not (isinstance(item, tuple) and item[:1] == ("keep",))]
    tests = []
    for item in items:
        if isinstance(item, re.Pattern):
            tests.append(lambda p, rx=item: rx.fullmatch(p) is not None)
        elif isinstance(item, str):
            try:
                rx = re.compile(item)
            except re.error as err:
                raise ValueError(f"ignore_policy: {item!r} is not a valid regular expression ({err})") from None
            tests.append(lambda p, s=item, rx=rx: p == s or p.startswith(s + ".") or rx.fullmatch(p) is not None)
        elif callable(item):
            tests.append(lambda p, f=item: bool(f(p)))
        else:
            raise TypeError(f"ignore_policy items must be strings, compiled patterns or callables, got {item!r}")
    if keep:
        return lambda path: any(t(path) for t in tests) and not any(k(path) for k in keep)
    return lambda path: any(t(path) for t in tests)


# ----------------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------------
def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized layer (has its own quantizers)."""
    return isinstance(module, (QuantMixin, QuantInputMixin))


def _weight_quantizers(module) -> list[tuple[str, str]]:
    """(parameter name, quantizer attribute) pairs a converted subclass forward must quantize."""
    if isinstance(module, QuantMixin) and hasattr(module, "_weight_quantizer") and "weight" in module._parameters:
        return [("weight", "_weight_quantizer")]
    return []


#: Instance attribute of a generated subclass with its own forward: the stack of ``{name: fake-quantized weight}`` of
#: its forwards now running (nested calls push their own). Not the weight's own name: nothing shadows the Parameter.
_VIEWS = "_qdq_weight_views"


class _QuantizedWeight:
    """Class attribute ``weight`` of a generated subclass with its own forward: inside that forward ``self.weight``
    is the fake-quantized weight (computed once per call, through the quantizer's eval-mode weight cache),
    everywhere else the layer's Parameter. The views live on the instance under :data:`_VIEWS`, a stack pushed and
    popped by the forward (plain attribute state, which ``torch.compile(fullgraph=True)`` and torch.export trace);
    the Parameter is never replaced.
    """

    def __init__(self, name: str):
        self.name = name

    def __get__(self, module, owner=None):
        if module is None:
            return self
        stack = module.__dict__.get(_VIEWS)
        if stack and self.name in stack[-1]:
            return stack[-1][self.name]
        if self.name in module.__dict__:  # a plain attribute set after the Parameter was deleted
            return module.__dict__[self.name]
        return nn.Module.__getattr__(module, self.name)  # the Parameter (or AttributeError, as nn.Module says)

    def __set__(self, module, value) -> None:  # reached only for values nn.Module.__setattr__ does not register
        module.__dict__[self.name] = value

    def __delete__(self, module) -> None:  # reached only when the name is no parameter, buffer or child
        if self.name not in module.__dict__:
            raise AttributeError(self.name)
        del module.__dict__[self.name]


def _subclass_forward(float_sub: type):
    """The forward of a converted subclass with its own forward: its forward on quantized operands.

    The input is the forward's first argument, by position or by name; the weight the forward reads as
    ``self.weight`` is fake-quantized (:class:`_QuantizedWeight`).
    """
    original = float_sub.forward
    input_name = _input_parameter(float_sub)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if args:
            args = (self._input_quantizer(args[0]),) + args[1:]
        elif input_name in kwargs:
            kwargs = {**kwargs, input_name: self._input_quantizer(kwargs[input_name])}
        else:
            raise TypeError(f"{type(self).__name__}.forward() got no input: quantized subclasses quantize the first "
                            f"argument of {float_sub.__qualname__}.forward ({input_name!r}), by position or name")
        views = {name: getattr(self, attr)(self._parameters[name]) for name, attr in _weight_quantizers(self)}
        if not views:
            return original(self, *args, **kwargs)
        stack = self.__dict__.setdefault(_VIEWS, [])
        stack.append(views)
        try:
            return original(self, *args, **kwargs)
        finally:
            stack.pop()

    return forward


def _input_parameter(float_sub: type) -> str:
    """The name of the input argument of ``float_sub.forward`` (its first parameter after ``self``)."""
    params = list(inspect.signature(float_sub.forward).parameters.values())[1:]
    if not params or params[0].kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
        raise NotImplementedError(f"{float_sub.__qualname__}.forward{inspect.signature(float_sub.forward)} takes no "
                                  "positional input; qdq cannot tell which argument to quantize: ignore the layer "
                                  "(ignore_policy) or quantize it by hand")
    return params[0].name


def _new_generated(float_sub: type, quant_cls: type, float_base: type) -> nn.Module:
    """An empty instance of the generated class for these three classes (made again if needed): what unpickling a
    quantized subclass calls before it restores the instance's state."""
    cls = _quant_subclass(float_sub, quant_cls, float_base)
    return cls.__new__(cls)


def _reduce_generated(self, protocol):
    """Pickles an instance of a generated class by the classes it is made from: the generated class itself lives in
    no module, so pickle could not find it by name (``torch.save(model)``, multiprocessing). A class derived from a
    generated one is pickled the usual way, by its own name."""
    if not vars(type(self)).get("_qdq_generated"):
        return object.__reduce_ex__(self, protocol)
    return _new_generated, type(self)._qdq_origin, self.__getstate__()


@functools.lru_cache(maxsize=None)
def _quant_subclass(float_sub: type, quant_cls: type, float_base: type) -> type:
    """``Quant<Sub>``: a class deriving from the quantized twin of ``float_base`` and from ``float_sub``."""
    own_forward = any("forward" in vars(c) for c in float_sub.__mro__[: float_sub.__mro__.index(float_base)])
    attrs = {
        "__module__": float_sub.__module__,
        "__doc__": f"Quantized {float_sub.__qualname__} (made by qdq).",
        "_qdq_generated": True,
        "_qdq_origin": (float_sub, quant_cls, float_base),
        "__reduce_ex__": _reduce_generated,
    }
    if own_forward:
        if issubclass(quant_cls, nn.RNNBase) or issubclass(quant_cls, nn.RNNCellBase):
            raise NotImplementedError(f"{float_sub.__qualname__} overrides forward; recurrent layers with their own "
                                      "forward cannot be quantized automatically")
        attrs["forward"] = _subclass_forward(float_sub)
        own_weight = any("weight" in vars(c) for c in float_sub.__mro__)  # e.g. a property: the class keeps it
        if issubclass(quant_cls, QuantMixin) and not own_weight:
            attrs["weight"] = _QuantizedWeight("weight")
        elif issubclass(quant_cls, QuantMixin):
            logger.warning("%s defines its own 'weight' attribute; its forward reads that, so its weight is not "
                           "fake-quantized there (ignore the layer, or quantize it by hand)", float_sub.__qualname__)
    return type(f"Quant{float_sub.__name__}", (quant_cls, float_sub), attrs)


def _quant_class_for(cls: type, mapping: dict[type, type]) -> type | None:
    if cls in mapping:
        return mapping[cls]
    for base in cls.__mro__[1:]:
        if base in mapping:
            return _quant_subclass(cls, mapping[base], base)
    return None


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
    name_quantizers(model)
    logger.info("%s", report)
    return report


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


def unmatched_ignore_patterns(policy: IgnorePolicy, paths: Iterable[str]) -> list[str]:
    """The string and pattern entries of ``policy`` that match none of ``paths`` (callables cannot be judged).

    >>> unmatched_ignore_patterns(["fc", "head.*", "nothing"], ["conv1", "fc", "head.0"])
    ['nothing']
    """
    if policy is None:
        return []
    paths = list(paths)
    unmatched = []
    for item in _policy_items(policy):
        pattern = item[1] if isinstance(item, tuple) else item
        if isinstance(pattern, (str, re.Pattern)):
            test = _compile_items([pattern])
            if not any(test(p) for p in paths):
                unmatched.append(pattern if isinstance(pattern, str) else pattern.pattern)
    return unmatched


def name_quantizers(model: nn.Module) -> None:
    """Gives every TensorQuantizer of ``model`` its dotted path as name (errors and reports use it)."""
    for path, module in model.named_modules():
        if isinstance(module, quant_nn.TensorQuantizer):
            module.name = path


# ----------------------------------------------------------------------------------------------------------------
# pytorch_quantization's monkey patching, for code that builds the model after calling initialize()
# ----------------------------------------------------------------------------------------------------------------
_patched: list[tuple[object, str, object]] = []


def initialize(float_module_list: Iterable[str] | None = None, custom_quant_modules: Iterable | None = None) -> None:
    """Replaces ``torch.nn.Conv2d`` & co. by their quantized classes, so models built *afterwards* are quantized.

    Opt-in compatibility with pytorch_quantization. A model built before the call is not affected (use
    :func:`replace_to_quantization_module`); classes that subclass ``nn.Conv2d`` and are *defined* after the call
    inherit the quantized class. Undo with :func:`deactivate`. Calling it twice patches once.

    Args:
        float_module_list: names (``"Conv2d"``) of the default entries not to patch.
        custom_quant_modules: extra ``(module, name, quantized class)`` triples to patch.
    """
    skip = set(float_module_list or ())
    entries = [e for e in _DEFAULT_QUANT_MAP if e.mod_name not in skip]
    entries += [_quant_entry(*item) for item in (custom_quant_modules or ())]
    for entry in entries:
        current = getattr(entry.orig_mod, entry.mod_name)
        if current is entry.replace_mod:
            continue
        _patched.append((entry.orig_mod, entry.mod_name, current))
        setattr(entry.orig_mod, entry.mod_name, entry.replace_mod)


def deactivate() -> None:
    """Restores what :func:`initialize` replaced."""
    while _patched:
        module, name, original = _patched.pop()
        setattr(module, name, original)


class QuantModuleReplacementHelper:
    """pytorch_quantization's state holder of :func:`initialize`: which ``torch.nn`` attributes get which quantized
    class, and the originals to put back.

    ``prepare_state(float_module_list, custom_map)`` fills ``quant_map`` (default entries not named in
    ``float_module_list``, plus the ``(module, name, quantized class)`` triples of ``custom_map``) and
    ``orginal_func_map`` (the same entries with the current attribute, spelt as in pytorch_quantization);
    ``apply_quant_modules()`` patches, ``restore_float_modules()`` restores.

    >>> import torch
    >>> from qdq import nn as quant_nn
    >>> helper = QuantModuleReplacementHelper()
    >>> helper.prepare_state(float_module_list=["Linear"])
    >>> sorted(e.mod_name for e in helper.quant_map)[:3]
    ['AdaptiveAvgPool1d', 'AdaptiveAvgPool2d', 'AdaptiveAvgPool3d']
    >>> helper.apply_quant_modules(); patched = torch.nn.Conv2d; helper.restore_float_modules()
    >>> patched is quant_nn.QuantConv2d, torch.nn.Conv2d is quant_nn.QuantConv2d
    (True, False)
    """

    def __init__(self):
        self.orginal_func_map: set = set()
        self.default_quant_map = _DEFAULT_QUANT_MAP
        self.quant_map: set = set()

    def prepare_state(self, float_module_list: Iterable[str] | None = None, custom_map: Iterable | None = None) -> None:
        skip = set(float_module_list or ())
        entries = [e for e in self.default_quant_map if e.mod_name not in skip]
        entries += [_quant_entry(*item) for item in (custom_map or ())]
        for entry in entries:
            self.quant_map.add(entry)
            self.orginal_func_map.add(_quant_entry(entry.orig_mod, entry.mod_name, getattr(entry.orig_mod, entry.mod_name)))

    def apply_quant_modules(self) -> None:
        for entry in self.quant_map:
            setattr(entry.orig_mod, entry.mod_name, entry.replace_mod)

    def restore_float_modules(self) -> None:
        for entry in self.orginal_func_map:
            setattr(entry.orig_mod, entry.mod_name, entry.replace_mod)


class enable_onnx_export:
    """pytorch_quantization's export switch, for scripts that call ``torch.onnx.export`` themselves: inside it every
    TensorQuantizer runs its export forward (as with ``TensorQuantizer.use_fb_fake_quant = True``), so either of
    torch's exporters writes QuantizeLinear/DequantizeLinear. :func:`qdq.export_onnx` needs no switch."""

    def __enter__(self):
        self._saved = quant_nn.TensorQuantizer._enable_onnx_export
        quant_nn.TensorQuantizer._enable_onnx_export = True
        return self

    def __exit__(self, *exc):
        quant_nn.TensorQuantizer._enable_onnx_export = self._saved
        return False
