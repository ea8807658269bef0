"""The ONNX form of an FP8 quantizer under ``torch.onnx.export``: the symbolic and the custom ops that the modules
floor's :func:`qdq.nn.modules.fp8_export.fp8_qdq` hands an FP8 Q/DQ to while it is traced.

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

Importing this module registers :func:`export_form` with the modules floor (which imports it on the first traced
FP8 quantizer when nothing did before), so torch.onnx stays on the graph side.
"""

from __future__ import annotations

import logging

import torch

from qdq.math import formats
from qdq.nn.modules import fp8_export

__all__ = ["FP8_QDQ_OPSET", "export_form"]

logger = logging.getLogger(__name__)

#: The opset whose QuantizeLinear/DequantizeLinear take a float8e4m3fn zero point.
FP8_QDQ_OPSET = 19
_TRT_DOMAIN = "trt"


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
        return formats.fake_quantize_fp8(x, fp8_export.broadcast_scale(scale, x, axis))

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


def export_form(xf: torch.Tensor, scale: torch.Tensor, axis: int | None) -> torch.Tensor:
    """The traced FP8 Q/DQ of float32 ``xf`` with the float32 ``scale``: the TorchScript symbolic under
    ``torch.jit`` tracing, the ``trt::`` custom ops in the dynamo exporter, the eager arithmetic anywhere else
    (``torch.export`` outside an ONNX export)."""
    if torch.jit.is_tracing():  # the TorchScript exporter: the symbolic above
        return _FP8QDQ.apply(xf, scale, axis)
    if not torch.onnx.is_in_onnx_export():
        return formats.fake_quantize_fp8(xf, fp8_export.broadcast_scale(scale, xf, axis))
    _trt_per_tensor(axis, "the dynamo exporter")
    global _said_trt
    if not _said_trt:
        _said_trt = True
        logger.info("FP8 quantizers exported by torch.onnx.export(dynamo=True) as trt::TRT_FP8QuantizeLinear/"
                    "TRT_FP8DequantizeLinear (pytorch_quantization's form, for TensorRT; ONNX Runtime cannot run "
                    "it); qdq.export_onnx writes standard opset-19 FP8 QuantizeLinear/DequantizeLinear")
    from torch.onnx import ops as onnx_ops

    scale = scale.reshape(())
    q = onnx_ops.symbolic(f"{_TRT_DOMAIN}::TRT_FP8QuantizeLinear", (xf, scale), dtype=torch.uint8, shape=xf.shape,
                          version=1)
    return onnx_ops.symbolic(f"{_TRT_DOMAIN}::TRT_FP8DequantizeLinear", (q, scale), dtype=torch.float32,
                             shape=xf.shape, version=1)


fp8_export.register_export_form(export_form)
