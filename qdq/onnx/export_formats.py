"""Q/DQ types of the quantization formats, and the graph rewrite that gives FP8 and INT4 quantizers theirs.

The one place that maps a quantizer's format to ONNX:

==================  ===============================  =====  ==================================================
format              Q/DQ zero point type             opset  form in the file
==================  ===============================  =====  ==================================================
INT8 (and uint8)    ``int8`` (``uint8``)             13     QuantizeLinear -> DequantizeLinear (per tensor, or
                                                            per channel with ``axis``)
FP8 E4M3            ``float8e4m3fn``                 19     QuantizeLinear -> DequantizeLinear, scale
                                                            ``amax / 448``, per tensor or per channel
INT4 weight-only    ``int4`` (packed initializer)    21     int4 weight initializer -> DequantizeLinear
                                                            (``axis`` and ``block_size`` when blocked) ->
                                                            Gemm / MatMul; no QuantizeLinear
==================  ===============================  =====  ==================================================

torch's exporters translate the fused fake-quant op into int8 Q/DQ only, so :func:`qdq.onnx.export_onnx` exports an
FP8 or INT4 quantizer with a per-tensor *tag* scale (a value no INT8 quantizer of the model has) and
:func:`rewrite_formats` then finds each tagged QuantizeLinear by its scale and writes the quantizer's real scale, zero
point type and axis (FP8), or replaces it by the packed int4 weights (INT4). The values come from the same functions
the PyTorch fake quantization uses (:mod:`qdq.math.formats`, :mod:`qdq.tensor_quant`), so ONNX Runtime dequantizes to
exactly the weights PyTorch used. This module does not use ``torch.onnx``; it edits the ONNX graph.

An int4 weight read through ``Transpose`` (the MatMul form of a Linear on 3-D inputs) is stored transposed, with the
block axis moved with it, so that the DequantizeLinear feeds the MatMul directly (the form TensorRT fuses).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qdq.math import formats
from qdq.math.quantize import quantize
from qdq.math.ranges import amax_to_scale, quant_range

__all__ = ["FormatSpec", "QDQ_TYPES", "MIN_OPSETS", "format_of", "format_spec", "rewrite_formats"]

logger = logging.getLogger(__name__)

#: ONNX element type of the zero point (and of the quantized tensor) per format.
QDQ_TYPES = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "fp8": TensorProto.FLOAT8E4M3FN,
             "int4": TensorProto.INT4}
#: The lowest default-domain opset that has each format's Q/DQ.
MIN_OPSETS = {"int8": 13, "uint8": 13, "fp8": 19, "int4": 21}


def format_of(quantizer) -> str:
    """``"int8"``, ``"uint8"``, ``"fp8"``, ``"int4"`` (4-bit weights, blocked or per channel) or ``"int<b>"``."""
    bits = quantizer.num_bits
    if formats.is_fp8(bits):
        return "fp8"
    if bits == 8:
        return "uint8" if quantizer.unsigned else "int8"
    return f"int{bits}"


@dataclass
class FormatSpec:
    """What the rewrite writes for one tagged quantizer: its format, real scale, axis and block size."""

    name: str
    format: str
    scale: np.ndarray  # float32: () per tensor, (C,) per channel, (rows, blocks) blocked
    axis: int | None
    block_size: int | None


def format_spec(name: str, quantizer) -> FormatSpec:
    """The :class:`FormatSpec` of an FP8 or INT4 quantizer (its amax already checked by the export)."""
    fmt = format_of(quantizer)
    amax = quantizer.effective_amax().detach().float().cpu()
    scale = amax_to_scale(amax, quantizer.num_bits, quantizer.unsigned)
    if quantizer.block_size:
        return FormatSpec(name, fmt, scale.reshape(scale.shape[0], scale.shape[1]).numpy(), 1, quantizer.block_size)
    varying = [d for d, n in enumerate(scale.shape) if n > 1]
    if len(varying) > 1:
        raise ValueError(f"{name}: amax varies along {len(varying)} dimensions; ONNX Q/DQ take one axis")
    axis = varying[0] if varying else None
    return FormatSpec(name, fmt, scale.reshape(-1).numpy() if axis is not None else scale.reshape(()).numpy(), axis,
                      None)


def _consts(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _set_axis(node: onnx.NodeProto, axis: int | None, block_size: int | None = None) -> None:
    keep = [a for a in node.attribute if a.name not in ("axis", "block_size")]
    del node.attribute[:]
    node.attribute.extend(keep)
    if axis is not None:
        node.attribute.append(helper.make_attribute("axis", axis))
    if block_size:
        node.attribute.append(helper.make_attribute("block_size", block_size))


def _int4_values(weight: np.ndarray, spec: FormatSpec) -> np.ndarray:
    """The int4 integers of ``weight`` with qdq's arithmetic (reciprocal, round half to even, saturate)."""
    qmin, qmax = quant_range(4, False, False)
    w = torch.from_numpy(weight.astype(np.float32))
    scale = torch.from_numpy(spec.scale)
    if spec.block_size:
        q = quantize(formats.block_view(w, spec.block_size), scale[:, :, None], 0, qmin, qmax).reshape(w.shape)
    elif spec.axis is not None:
        shape = [1] * w.dim()
        shape[spec.axis] = -1
        q = quantize(w, scale.reshape(shape), 0, qmin, qmax)
    else:
        q = quantize(w, scale, 0, qmin, qmax)
    return q.numpy().astype(ml_dtypes.int4)


def rewrite_formats(model: onnx.ModelProto, tags: dict[float, FormatSpec], deploy: bool = False) -> int:
    """Gives each QuantizeLinear whose per-tensor scale is a key of ``tags`` the Q/DQ of its :class:`FormatSpec`.

    FP8: scale, ``float8e4m3fn`` zero point and axis on the Q and its DQs (with ``deploy``, a constant weight is
    stored as float8 values feeding the DQ). INT4: the Q of a constant weight is replaced by an int4 initializer
    feeding its DQ (scale, int4 zero point, ``axis``, ``block_size``). Returns the number of quantizers rewritten;
    raises ``ValueError`` naming a quantizer whose Q is missing or whose INT4 weight is not a constant.
    """
    graph = model.graph
    consts = _consts(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    by_value = {float(np.float32(k)): spec for k, spec in tags.items()}
    found: set[str] = set()
    drop: list[onnx.NodeProto] = []
    retyped: list[str] = []
    inits: list[onnx.TensorProto] = []
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[1] not in consts or consts[node.input[1]].size != 1:
            continue
        spec = by_value.get(float(consts[node.input[1]].reshape(-1)[0]))
        if spec is None:
            continue
        found.add(spec.name)
        dqs = [c for c in consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
        base = node.output[0]
        weight = consts.get(node.input[0])
        if spec.format == "fp8":
            retyped.append(base)
            scale = numpy_helper.from_array(spec.scale.astype(np.float32), f"{base}_scale")
            zp = numpy_helper.from_array(np.zeros(spec.scale.shape, ml_dtypes.float8_e4m3fn), f"{base}_zero_point")
            inits += [scale, zp]
            if deploy and weight is not None:
                shape = [1] * weight.ndim
                if spec.axis is not None:
                    shape[spec.axis] = -1
                values = formats.quantize_fp8(torch.from_numpy(weight.astype(np.float32)),
                                              torch.from_numpy(spec.scale.reshape(shape)))
                stored = numpy_helper.from_array(values.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn),
                                                 f"{node.input[0]}_fp8")
                inits.append(stored)
                drop.append(node)
                targets = dqs
                for dq in dqs:
                    dq.input[0] = stored.name
            else:
                targets = [node] + dqs
            for n in targets:
                n.input[1], n.input[2] = scale.name, zp.name
                _set_axis(n, spec.axis)
            continue
        if spec.format != "int4":
            raise ValueError(f"{spec.name}: no ONNX form for format {spec.format!r}")
        if weight is None:
            raise ValueError(f"{spec.name}: INT4 is weight-only and needs a constant weight; its QuantizeLinear reads "
                             f"{node.input[0]!r}, which is computed in the graph")
        for dq in dqs:
            w, scale, axis = weight, spec.scale, spec.axis
            out = consumers.get(dq.output[0], [])
            transpose = out[0] if len(out) == 1 and out[0].op_type == "Transpose" and weight.ndim == 2 else None
            if transpose is not None:
                perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [1, 0])
                if perm != [1, 0]:
                    transpose = None
            q = _int4_values(w, spec)
            if transpose is not None:  # store W^T so that the DQ feeds the MatMul directly
                q = np.ascontiguousarray(q.T)
                scale = np.ascontiguousarray(scale.T) if spec.block_size else scale
                axis = 0 if spec.block_size else (None if axis is None else 1 - axis)
            suffix = "_T" if transpose is not None else ""
            stored = numpy_helper.from_array(q, f"{node.input[0]}_int4{suffix}")
            s = numpy_helper.from_array(scale.astype(np.float32), f"{base}_scale{suffix}")
            z = numpy_helper.from_array(np.zeros(scale.shape, ml_dtypes.int4), f"{base}_zero_point{suffix}")
            inits += [stored, s, z]
            del dq.input[:]
            dq.input.extend([stored.name, s.name, z.name])
            _set_axis(dq, axis, spec.block_size)
            if transpose is not None:
                retyped.append(dq.output[0])  # its shape changed: let ONNX infer it
                for reader in consumers.get(transpose.output[0], []):
                    for i, name in enumerate(reader.input):
                        if name == transpose.output[0]:
                            reader.input[i] = dq.output[0]
                for o in graph.output:
                    if o.name == transpose.output[0]:
                        raise ValueError(f"{spec.name}: the transposed weight is a graph output")
                drop.append(transpose)
        drop.append(node)
    missing = sorted({s.name for s in tags.values()} - found)
    if missing:
        logger.info("%d FP8/INT4 quantizers have no QuantizeLinear in the export (not on the traced path?): %s",
                    len(missing), ", ".join(missing[:10]))
    touched = {n.output[0] for n in drop} | {base for base in retyped}
    infos = [v for v in graph.value_info if v.name not in touched]  # the exporter typed them int8; ONNX infers them
    del graph.value_info[:]
    graph.value_info.extend(infos)
    if any(s.format == "int4" for s in tags.values() if s.name in found) and model.ir_version < 10:
        model.ir_version = 10  # int4 tensors (opset 21) need IR version 10
    dropped = {id(n) for n in drop}
    keep = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(inits)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    alive = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(alive)
    return len(found)


def format_problem(name: str, quantizer, layer) -> str | None:
    """Why an FP8/INT4 quantizer cannot be exported (``None`` when it can, or when it is not FP8/INT4).

    ``layer`` is the module that owns the quantizer (``None`` when not known).
    """
    fmt = format_of(quantizer)
    if fmt not in ("fp8", "int4"):
        return None
    if quantizer.narrow_range:
        return f"{name}: narrow_range is not exported for {fmt} (use the full range)"
    if fmt == "fp8":
        return None
    if not name.endswith("_weight_quantizer"):
        return (f"{name}: 4-bit activation; INT4 is weight-only in TensorRT: quantize this activation with INT8 or "
                "FP8, or disable it")
    if not isinstance(layer, torch.nn.Linear):
        kind = type(layer).__name__ if layer is not None else "an unknown layer"
        return (f"{name}: 4-bit weights of {kind}; INT4 weight-only runs on MatMul/Gemm (Linear layers) in TensorRT, "
                "not on convolutions: use INT8 or FP8 for it")
    iq = getattr(layer, "_input_quantizer", None)
    if iq is not None and iq.is_enabled:
        return (f"{name}: 4-bit weights with a quantized input; TensorRT runs INT4 weight-only, the activation in "
                "float: disable the layer's input quantizer (qdq.set_layer_format(model, layer, 'int4'))")
    if quantizer.block_size is None and quantizer.axis not in (None, 0):
        return f"{name}: per-channel INT4 weights are quantized along the output features (axis 0)"
    return None
