"""Formats per layer: INT8, FP8, INT4 weight-only or float, set layer by layer or for the whole model.

The search that picks one format per layer under an accuracy budget is :mod:`qdq.calibrate.format_search`.

A layer's format sets both of its quantizers:

===========  ====================================  ===========================================================
format       input quantizer                       weight quantizer
===========  ====================================  ===========================================================
``int8``     8-bit per tensor                      8-bit per channel (the layer class's default axis)
``fp8``      FP8 E4M3 per tensor                   FP8 E4M3 per channel (the same axis)
``int4``     disabled (weight-only)                4-bit, blocks of ``block_size`` input features (Linear only)
``float``    disabled                              disabled
===========  ====================================  ===========================================================

The input quantizer keeps its calibrator kind (max or histogram), so a model converted with histogram inputs is
calibrated with the same method in every format. New quantizers have no amax: calibrate after changing formats.

FP8 for the whole model (:func:`set_model_format` with ``"fp8"``) leaves the layers TensorRT has no FP8 kernel for
in higher precision (``fp8_fallback``, float by default), as ModelOpt's FP8 mode does (its rule, in
:func:`fp8_exclusion`): convolutions with at most :data:`FP8_MIN_CHANNELS` input channels per group or output
channels (every depthwise convolution, a 3-channel stem) or a kernel of more than :data:`FP8_MAX_KERNEL_AREA`
elements, and Linear layers with fewer than 16 input or output features. On EfficientNet-Lite0 this is also what
accuracy asks for. E4M3's 3 mantissa bits give every tensor about 32 dB SQNR (INT8 per channel: 40-51 dB on its
weights), and a depthwise convolution, whose 9 or 25 weights per channel nearly cancel, turns that into 20-40 dB at
its output; with max calibration, on the 400 evaluation images of the ImageNet sample (fp32 88.25%, INT8 88.50%),
FP8 on every layer gives 83.00% and this default 89.25% (``benchmarks/bench_formats.py``).

Example:
    >>> import torch
    >>> import qdq
    >>> from qdq.transform.layer_formats import layer_formats, set_layer_format
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 64))
    >>> _ = qdq.replace_to_quantization_module(model)
    >>> set_layer_format(model, "0", "fp8")
    >>> set_layer_format(model, "2", "int4", block_size=32)
    >>> layer_formats(model)
    {'0': 'fp8', '2': 'int4'}
    >>> _ = qdq.calibrate_model(model, [torch.randn(2, 3, 8, 8)], progress=False)
"""

from __future__ import annotations

import logging
import math
from typing import Iterable

import torch
from torch import nn

from qdq.math.formats import BLOCK_SIZES, FORMAT_NAMES, is_fp8
from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.math.descriptor import QuantDescriptor
from qdq.transform.replace import name_quantizers

__all__ = [
    "FP8_MIN_CHANNELS",
    "FP8_MAX_KERNEL_AREA",
    "fp8_exclusion",
    "format_layers",
    "layer_formats",
    "set_layer_format",
    "set_model_format",
]

logger = logging.getLogger(__name__)

#: Convolutions with at most this many input channels per group or output channels stay out of FP8 (and Linear
#: layers with fewer input or output features): ModelOpt's FP8 rule for TensorRT's FP8 convolution kernels.
FP8_MIN_CHANNELS = 16


#: Convolutions whose kernel has more elements than this stay out of FP8 (ModelOpt's FP8 rule).
FP8_MAX_KERNEL_AREA = 32


def fp8_exclusion(layer: nn.Module) -> str | None:
    """Why TensorRT would not run ``layer`` in FP8, or ``None`` when it would (convolutions and Linear layers).

    >>> fp8_exclusion(torch.nn.Conv2d(32, 32, 3, groups=32))
    '1 input channels per group (FP8 convolutions need more than 16)'
    >>> fp8_exclusion(torch.nn.Conv2d(32, 64, 1)) is None
    True
    """
    if isinstance(layer, nn.modules.conv._ConvNd):
        per_group = layer.in_channels // layer.groups
        if per_group <= FP8_MIN_CHANNELS:
            return f"{per_group} input channels per group (FP8 convolutions need more than {FP8_MIN_CHANNELS})"
        if layer.out_channels <= FP8_MIN_CHANNELS:
            return f"{layer.out_channels} output channels (FP8 convolutions need more than {FP8_MIN_CHANNELS})"
        area = math.prod(layer.kernel_size)
        if area > FP8_MAX_KERNEL_AREA:
            return f"a {area}-element kernel (FP8 convolutions take at most {FP8_MAX_KERNEL_AREA})"
    elif isinstance(layer, nn.Linear) and min(layer.in_features, layer.out_features) < FP8_MIN_CHANNELS:
        return (f"{layer.in_features} input and {layer.out_features} output features (FP8 GEMMs need at least "
                f"{FP8_MIN_CHANNELS})")
    return None


def _quantizer_attrs(layer: nn.Module) -> tuple[str | None, str | None]:
    has = lambda attr: isinstance(getattr(layer, attr, None), TensorQuantizer)  # noqa: E731
    return ("_input_quantizer" if has("_input_quantizer") else None,
            "_weight_quantizer" if has("_weight_quantizer") else None)


def format_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: layer}`` of the layers whose format can be set: those with an input and a weight quantizer."""
    return {path: m for path, m in model.named_modules() if all(_quantizer_attrs(m))}


def _format_of(layer: nn.Module) -> str:
    iq, wq = (getattr(layer, a) for a in _quantizer_attrs(layer))
    if not wq.is_enabled:
        return "float"
    if is_fp8(wq.num_bits):
        return "fp8"
    if wq.num_bits == 4 and not iq.is_enabled:
        return "int4"
    return f"int{wq.num_bits}"


def layer_formats(model: nn.Module) -> dict[str, str]:
    """``{layer path: format}`` for every layer :func:`format_layers` lists."""
    return {path: _format_of(layer) for path, layer in format_layers(model).items()}


def _check_format(fmt: str, path: str, layer: nn.Module, block_size: int) -> None:
    if fmt not in FORMAT_NAMES:
        raise ValueError(f"layer {path!r}: unknown format {fmt!r}; choose one of {', '.join(FORMAT_NAMES)}")
    if fmt != "int4":
        return
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"layer {path!r} ({type(layer).__name__}): INT4 weight-only is for Linear layers "
                         "(TensorRT runs it on MatMul/Gemm, not on convolutions)")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"layer {path!r}: block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    if layer.in_features % block_size:
        raise ValueError(f"layer {path!r}: {layer.in_features} input features are not a multiple of block_size "
                         f"{block_size}")


def _descriptors(fmt: str, iq: TensorQuantizer, wq: TensorQuantizer, block_size: int):
    calib = {"calib_method": iq.quant_desc.calib_method, "calib_args": iq.quant_desc.calib_args}
    if fmt == "int8":
        return QuantDescriptor(8, **calib), QuantDescriptor(8, axis=wq.axis)
    if fmt == "fp8":
        return (QuantDescriptor((4, 3), **calib),
                QuantDescriptor((4, 3), axis=wq.axis))
    if fmt == "int4":
        return None, QuantDescriptor(4, axis=0, block_size=block_size)
    return None, None


def _replace_everywhere(model: nn.Module, old: TensorQuantizer, new: TensorQuantizer) -> None:
    """Puts ``new`` wherever ``old`` sits (a quantizer shared by several modules stays shared)."""
    for module in model.modules():
        # _modules, not named_children(): that lists a module once however many attributes name it
        for attr, child in list(module._modules.items()):
            if child is old:
                setattr(module, attr, new)


def set_layer_format(model: nn.Module, layer: str, fmt: str, block_size: int = 64) -> None:
    """Gives layer ``layer`` (its path in ``model``) new quantizers of format ``fmt`` (see the module docstring).

    A quantizer shared with other modules (a scale-sharing rule) is replaced in all of them. Raises ``ValueError``
    naming the layer for an unknown layer or format, INT4 on a layer that is not Linear, or a block size that does not
    divide its input features.
    """
    layers = format_layers(model)
    if layer not in layers:
        raise ValueError(f"no layer {layer!r} with input and weight quantizers in the model "
                         f"(quantize the model first); layers: {', '.join(list(layers)[:8])}"
                         + (" ..." if len(layers) > 8 else ""))
    module = layers[layer]
    _check_format(fmt, layer, module, block_size)
    iq, wq = module._input_quantizer, module._weight_quantizer
    idesc, wdesc = _descriptors(fmt, iq, wq, block_size)
    device = next(iter(module.parameters()), torch.empty(0)).device
    new_iq = TensorQuantizer(idesc if idesc is not None else iq.quant_desc).to(device)
    new_wq = TensorQuantizer(wdesc if wdesc is not None else wq.quant_desc).to(device)
    if idesc is None:
        new_iq.disable()
    if wdesc is None:
        new_wq.disable()
    _replace_everywhere(model, iq, new_iq)
    _replace_everywhere(model, wq, new_wq)
    name_quantizers(model)


def set_model_format(model: nn.Module, fmt: str, block_size: int = 64,
                     layers: Iterable[str] | None = None, fp8_fallback: str | None = "float") -> dict[str, str]:
    """Sets ``fmt`` on every layer (or on ``layers``); returns :func:`layer_formats`.

    ``fmt="int4"`` sets INT4 weight-only on the Linear layers whose input features ``block_size`` divides and leaves
    the other layers as they are (logged). With ``fmt`` ``"int8"`` or ``"fp8"`` and no ``layers``, quantizers of
    layers without weights (pooling, Add, Concat inputs) take the format too, so that TensorRT sees one type.

    ``fmt="fp8"`` with no ``layers`` gives the layers :func:`fp8_exclusion` names (depthwise and small
    convolutions) the format ``fp8_fallback`` instead (``"float"``, or ``"int8"`` for a mixed model; logged);
    ``fp8_fallback=None`` puts every layer in FP8. Layers listed in ``layers`` get ``fmt`` as asked.

    >>> import qdq
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.Conv2d(32, 32, 3, groups=32),
    ...                             torch.nn.Conv2d(32, 64, 1))
    >>> _ = qdq.replace_to_quantization_module(model)
    >>> set_model_format(model, "fp8")
    {'0': 'float', '1': 'float', '2': 'fp8'}
    >>> set_model_format(model, "fp8", fp8_fallback=None)
    {'0': 'fp8', '1': 'fp8', '2': 'fp8'}
    """
    if fp8_fallback not in (None, "float", "int8"):
        raise ValueError(f"set_model_format: fp8_fallback must be 'float', 'int8' or None, got {fp8_fallback!r}")
    chosen = list(format_layers(model)) if layers is None else list(layers)
    skipped = []
    kept: dict[str, str] = {}
    for path in chosen:
        module = format_layers(model)[path] if path in format_layers(model) else None
        if fmt == "int4" and module is not None and not (
                isinstance(module, nn.Linear) and module.in_features % block_size == 0):
            skipped.append(path)
            continue
        why = fp8_exclusion(module) if fmt == "fp8" and layers is None and fp8_fallback and module is not None \
            else None
        if why is not None:
            kept[path] = why
            set_layer_format(model, path, fp8_fallback, block_size)
            continue
        set_layer_format(model, path, fmt, block_size)
    if kept:
        logger.info("FP8: %d layers TensorRT has no FP8 kernel for stay in %s (fp8_fallback): %s", len(kept),
                    fp8_fallback, "; ".join(f"{p}: {w}" for p, w in list(kept.items())[:8])
                    + (" ..." if len(kept) > 8 else ""))
    if layers is None and fmt in ("int8", "fp8"):  # pooling, Add, Concat inputs: the same format, not mixed
        bits = 8 if fmt == "int8" else (4, 3)
        for path, module in model.named_modules():
            iq, wq = _quantizer_attrs(module)
            q = getattr(module, iq) if iq else None
            if q is not None and wq is None and q.num_bits != bits:
                new = TensorQuantizer(q.quant_desc.replace(num_bits=bits, unsigned=False, narrow_range=False,
                                                           learn_amax=False, amax=None))
                if not q.is_enabled:
                    new.disable()
                _replace_everywhere(model, q, new.to(q.amax.device if q.amax is not None else "cpu"))
        name_quantizers(model)
    if skipped:
        logger.info("INT4 weight-only applies to Linear layers with input features divisible by %d: %d layers keep "
                    "their format (%s)", block_size, len(skipped), ", ".join(skipped[:8]))
    return layer_formats(model)
