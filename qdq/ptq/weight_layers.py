"""The quantized layers the PTQ algorithms work on, and the facts about them they share.

A *weight layer* is a module with a ``weight`` parameter and an enabled ``weight_quantizer`` (qdq's quantized
convolutions and linear layers, and classes generated from their subclasses). This module finds them, says which
dim of their output holds the channels, and gives the integer grid their weight quantizer uses.

Example:
    >>> import torch
    >>> from qdq import nn as quant_nn
    >>> model = torch.nn.Sequential(quant_nn.QuantConv2d(3, 4, 1), quant_nn.QuantLinear(4, 2))
    >>> list(quantized_layers(model))
    ['0', '1']
    >>> output_channel_dim(model[0]), output_channel_dim(model[1])
    (1, -1)
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.math.ranges import amax_to_scale

__all__ = ["quantized_layers", "layers_left_out", "output_channel_dim", "check_reiterable", "weight_grid"]

logger = logging.getLogger(__name__)


def _has_enabled_weight_quantizer(module: nn.Module) -> bool:
    q = getattr(module, "_weight_quantizer", None)
    return isinstance(q, TensorQuantizer) and q.is_enabled


def _is_weight_layer(module: nn.Module) -> bool:
    return _has_enabled_weight_quantizer(module) and isinstance(getattr(module, "weight", None), nn.Parameter)


def quantized_layers(model: nn.Module, names: Sequence[str] | None = None, who: str = "qdq") -> dict[str, nn.Module]:
    """``{dotted name: layer}`` of the weight layers of ``model`` (only ``names`` when given, each checked)."""
    found = {n: m for n, m in model.named_modules() if _is_weight_layer(m)}
    if names is not None:
        unknown = [n for n in names if n not in found]
        if unknown:
            raise ValueError(f"{who}: {', '.join(map(repr, unknown))} not weight layers with an enabled weight "
                             f"quantizer (there are {len(found)}, e.g. {', '.join(list(found)[:4])})")
        found = {n: found[n] for n in names}
    if not found:
        raise RuntimeError(f"{who}: the model has no quantized layer with an enabled weight quantizer "
                           "(did you call replace_to_quantization_module?)")
    return found


def layers_left_out(model: nn.Module, who: str) -> list[str]:
    """Modules with an enabled weight quantizer that are no weight layer (their weight is not a ``weight``
    Parameter, e.g. ``nn.MultiheadAttention``'s ``in_proj_weight``): the PTQ algorithms cannot work on them, so they
    are logged as a warning naming them, and returned."""
    left = [n for n, m in model.named_modules() if _has_enabled_weight_quantizer(m) and not _is_weight_layer(m)]
    if left:
        logger.warning("%s: %d module(s) with quantized weights are left as they are (their weight is no `weight` "
                       "Parameter, e.g. nn.MultiheadAttention's in_proj_weight): %s", who, len(left), ", ".join(left))
    return left


def output_channel_dim(module: nn.Module) -> int:
    """The dim of the layer's output that holds its channels: 1 for convolutions, -1 (last) for linear layers."""
    return 1 if isinstance(module, _ConvNd) else -1


def check_reiterable(data: Iterable, who: str) -> None:
    """The PTQ algorithms pass over the data several times: a one-shot iterator is an error."""
    if callable(data) and not hasattr(data, "__iter__"):
        raise TypeError(f"{who}: needs batches it can capture layer by layer (a DataLoader or a list), not a "
                        "forward loop")
    if iter(data) is data:
        raise TypeError(f"{who}: the data is a one-shot iterator ({type(data).__name__}) but it is fed several times;"
                        " pass a DataLoader or a list of batches")


def weight_grid(name: str, layer: nn.Module) -> tuple[torch.Tensor, int, int]:
    """``(scale broadcastable to the weight, qmin, qmax)`` of the layer's (symmetric, calibrated) weight quantizer.

    A channel whose amax is 0 gets scale 1 (its weights are 0 and stay 0 on any grid).
    """
    q = layer.weight_quantizer
    if q.effective_amax() is None:
        raise RuntimeError(f"{name}: its weight quantizer has no amax; calibrate the model (calibrate_model) first")
    if not q.symmetric:
        raise ValueError(f"{name}: its weight quantizer is asymmetric; TensorRT takes symmetric weights")
    amax = q.effective_amax().detach()
    scale = amax_to_scale(amax, q.num_bits, q.unsigned)
    weight = layer.weight
    if scale.numel() > 1 and scale.dim() != weight.dim():
        raise ValueError(f"{name}: weight amax of shape {tuple(scale.shape)} does not broadcast to the weight "
                         f"{tuple(weight.shape)}")
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a dead channel (amax 0): its zeros stay zeros
    qmin, qmax = q.quant_range
    return scale.to(weight.device, torch.float32), qmin, qmax
