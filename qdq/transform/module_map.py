"""The module map: the quantized class each float layer type becomes, and pytorch_quantization's monkey patching.

``_DEFAULT_QUANT_MAP`` is pytorch_quantization's list of ``(module, attribute, quantized class)`` entries;
:func:`register_quant_module` adds to it, and every conversion
(:func:`qdq.transform.replace.replace_to_quantization_module`) reads it, overridden per call by its ``quant_map``.
:func:`initialize` and :func:`deactivate` patch and restore ``torch.nn`` itself, for code that builds its model after
``quant_modules.initialize()``.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Iterable, Mapping

import torch
from torch import nn

from qdq import nn as quant_nn

# pytorch_quantization's private names (_DEFAULT_QUANT_MAP, _quant_entry) stay importable for code that uses
# them; they are not part of the public API.
__all__ = [
    "register_quant_module",
    "initialize",
    "deactivate",
    "enable_onnx_export",
    "QuantModuleReplacementHelper",
]

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
