"""The FP8 E4M3 fake quantization that an FP8 quantizer's export forward runs, in PyTorch and under
``torch.onnx.export``.

torch's exporters translate the fused integer fake-quant ops only (their range is at most 8 bits), so a
``TensorQuantizer(QuantDescriptor(num_bits=(4, 3)))`` in export mode (``use_fb_fake_quant``,
``qdq.transform.module_map.enable_onnx_export()``, ``set_export_mode(True)``) calls :func:`fp8_qdq` instead. In PyTorch it
computes :func:`qdq.math.formats.fake_quantize_fp8` (the numbers of training and of ONNX Runtime); while it is traced
(``torch.jit`` tracing, ``torch.export``) it hands the Q/DQ to the form the graph side registers,
:func:`qdq.onnx.export_fp8.export_form`, which writes standard FP8 QuantizeLinear/DequantizeLinear (TorchScript,
opset >= 19) or pytorch_quantization's ``trt::TRT_FP8QuantizeLinear`` pair (see :mod:`qdq.onnx.export_fp8`).

This module does not touch torch.onnx: the graph side owns the symbolic and the custom ops. A traced FP8 quantizer
whose export form nobody registered yet imports :mod:`qdq.onnx.export_fp8` (the export's own floor) at that
moment, so a script calling ``torch.onnx.export`` needs no import of its own.

The scale is ``amax / 448`` (ONNX's ``y_scale``: ``q = x / scale``), in float32; fp16/bf16 inputs are quantized in
float32 and the result cast back, as the integer export does.

Example:
    >>> import torch
    >>> fp8_qdq(torch.tensor([0.1, 3.0, 500.0]), torch.tensor(1.0)).tolist()
    [0.1015625, 3.0, 448.0]
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from qdq.math import formats

__all__ = ["fp8_qdq", "register_export_form", "broadcast_scale"]

#: The traced form of an FP8 Q/DQ, ``(x float32, scale float32, axis) -> tensor``, registered by the graph side.
_EXPORT_FORM: list[Callable[[torch.Tensor, torch.Tensor, int | None], torch.Tensor]] = []
_EXPORT_FORM_MODULE = "qdq.onnx.export_fp8"


def register_export_form(form: Callable[[torch.Tensor, torch.Tensor, int | None], torch.Tensor]) -> None:
    """Sets the function :func:`fp8_qdq` calls while traced (:func:`qdq.onnx.export_fp8.export_form`)."""
    _EXPORT_FORM[:] = [form]


def _export_form() -> Callable[[torch.Tensor, torch.Tensor, int | None], torch.Tensor]:
    if not _EXPORT_FORM:
        importlib.import_module(_EXPORT_FORM_MODULE)  # registers its form (export time only)
    return _EXPORT_FORM[0]


def broadcast_scale(scale: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``scale`` (a scalar, or one value per index of dimension ``axis``) shaped to broadcast against ``x``."""
    if axis is None:
        return scale.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def _traced() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def fp8_qdq(x: torch.Tensor, scale: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """FP8 E4M3 fake quantization of ``x`` with the float32 ``scale`` (``amax / 448``; a scalar, or one value per
    index of dimension ``axis``), written as FP8 Q/DQ by ``torch.onnx.export`` (see the module docstring).

    Returns ``x``'s dtype; no custom gradient (training uses :func:`qdq.math.formats.fake_fp8_quant`).
    """
    xf = x if x.dtype == torch.float32 else x.float()
    if scale.dtype != torch.float32 or scale.device != x.device:  # (a no-op .to() would be traced as a Cast)
        scale = scale.to(device=x.device, dtype=torch.float32)
    if _traced():
        out = _export_form()(xf, scale, axis)
    else:
        out = formats.fake_quantize_fp8(xf, broadcast_scale(scale, xf, axis))
    return out if out.dtype == x.dtype else out.to(x.dtype)
