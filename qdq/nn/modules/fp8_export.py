"""The FP8 E4M3 Q/DQ pair that an FP8 quantizer's export forward hands to ``torch.onnx.export``.

torch's exporters translate the fused integer fake-quant ops only (their range is at most 8 bits), so a
``TensorQuantizer(QuantDescriptor(num_bits=(4, 3)))`` in export mode (``use_fb_fake_quant``,
``qdq.transform.module_map.enable_onnx_export()``, ``set_export_mode(True)``) calls :func:`fp8_qdq` instead. In PyTorch it
computes :func:`qdq.formats.fake_quantize_fp8` (the numbers of training and of ONNX Runtime); in an ONNX export it
writes:

=======================================  ===========================================================================
exporter and opset                       nodes written
=======================================  ===========================================================================
TorchScript (``dynamo=False``), >= 19    ``QuantizeLinear -> DequantizeLinear`` with a ``float8e4m3fn`` zero point
                                         (per tensor, or per channel with ``axis``): standard ONNX, which TensorRT
                                         and ONNX Runtime run
TorchScript below opset 19, and the      ``trt::TRT_FP8QuantizeLinear -> trt::TRT_FP8DequantizeLinear``, per tensor
dynamo exporter (any opset)              only: pytorch_quantization's FP8 form, valid ONNX in any opset (a custom
                                         domain) written for TensorRT's ONNX parser; ONNX Runtime cannot run it
=======================================  ===========================================================================

The dynamo exporter decides the opset after the model is traced, so the trace cannot choose the standard ops there.
:func:`qdq.export_onnx` always writes the standard opset-19 form, with either exporter, and checks it against
ONNX Runtime: prefer it when the model is not exported by a script of its own.

The scale is ``amax / 448`` (ONNX's ``y_scale``: ``q = x / scale``), in float32; fp16/bf16 inputs are quantized in
float32 and the result cast back, as the integer export does.

This module uses torch.onnx's op-definition API only (``torch.onnx.ops.symbolic``, an autograd ``symbolic``), not the
exporter, which stays in :mod:`qdq.onnx.export`.

Example:
    >>> import torch
    >>> fp8_qdq(torch.tensor([0.1, 3.0, 500.0]), torch.tensor(1.0)).tolist()
    [0.1015625, 3.0, 448.0]
"""

from __future__ import annotations

import logging

import torch

from qdq import formats

__all__ = ["fp8_qdq"]

logger = logging.getLogger(__name__)

#: The opset whose QuantizeLinear/DequantizeLinear take a float8e4m3fn zero point.
FP8_QDQ_OPSET = 19
_TRT_DOMAIN = "trt"


def _broadcast(scale: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return scale.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def _trt_per_tensor(axis: int | None, what: str) -> None:
    if axis is not None:
        raise RuntimeError(
            f"FP8 per-channel Q/DQ ({what}) need opset >= {FP8_QDQ_OPSET} and the TorchScript exporter "
            f"(torch.onnx.export(..., opset_version={FP8_QDQ_OPSET}, dynamo=False)), or qdq.export_onnx; "
            "pytorch_quantization's trt::TRT_FP8QuantizeLinear is per tensor only"
        )


class _FP8QDQ(torch.autograd.Function):
    """FP8 fake quantization whose TorchScript ``symbolic`` writes the FP8 Q/DQ pair (no gradient: export only)."""

    @staticmethod
    def forward(ctx, x, scale, axis):
        return formats.fake_quantize_fp8(x, _broadcast(scale, x, axis))

    @staticmethod
    def symbolic(g, x, scale, axis):
        if g.opset >= FP8_QDQ_OPSET:
            zero = torch.zeros(() if axis is None else (int(scale.type().sizes()[0]),), dtype=torch.float8_e4m3fn)
            zero_point = g.op("Constant", value_t=zero)
            kw = {} if axis is None else {"axis_i": int(axis)}
            q = g.op("QuantizeLinear", x, scale, zero_point, **kw)
            return g.op("DequantizeLinear", q, scale, zero_point, **kw)
        _trt_per_tensor(axis, f"opset {g.opset}")
        q = g.op(f"{_TRT_DOMAIN}::TRT_FP8QuantizeLinear", x, scale)
        q.setType(x.type().with_dtype(torch.uint8))
        out = g.op(f"{_TRT_DOMAIN}::TRT_FP8DequantizeLinear", q, scale)
        out.setType(x.type().with_dtype(torch.float32))
        return out


_said_trt = False


def fp8_qdq(x: torch.Tensor, scale: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """FP8 E4M3 fake quantization of ``x`` with the float32 ``scale`` (``amax / 448``; a scalar, or one value per
    index of dimension ``axis``), written as FP8 Q/DQ by ``torch.onnx.export`` (see the module docstring).

    Returns ``x``'s dtype; no custom gradient (training uses :func:`qdq.formats.fake_fp8_quant`).
    """
    xf = x if x.dtype == torch.float32 else x.float()
    if scale.dtype != torch.float32 or scale.device != x.device:  # (a no-op .to() would be traced as a Cast)
        scale = scale.to(device=x.device, dtype=torch.float32)
    if torch.jit.is_tracing():  # the TorchScript exporter: the symbolic above
        out = _FP8QDQ.apply(xf, scale, axis)
    elif torch.onnx.is_in_onnx_export():  # the dynamo exporter
        _trt_per_tensor(axis, "the dynamo exporter")
        global _said_trt
        if not _said_trt:
            _said_trt = True
            logger.info("FP8 quantizers exported by torch.onnx.export(dynamo=True) as trt::TRT_FP8QuantizeLinear/"
                        "TRT_FP8DequantizeLinear (pytorch_quantization's form, for TensorRT; ONNX Runtime cannot run "
                        "it); qdq.export_onnx writes standard opset-19 FP8 QuantizeLinear/DequantizeLinear")
        from torch.onnx import ops as onnx_ops

        scale = scale.reshape(())
        q = onnx_ops.symbolic(f"{_TRT_DOMAIN}::TRT_FP8QuantizeLinear", (xf, scale), dtype=torch.uint8,
                                    shape=xf.shape, version=1)
        out = onnx_ops.symbolic(f"{_TRT_DOMAIN}::TRT_FP8DequantizeLinear", (q, scale), dtype=torch.float32,
                                      shape=xf.shape, version=1)
    else:
        out = formats.fake_quantize_fp8(xf, _broadcast(scale, xf, axis))
    return out if out.dtype == x.dtype else out.to(x.dtype)
