"""Strongly typed FP16 export: the unquantized remainder of a QDQ file in float16, for TensorRT 11.

TensorRT 11 builds every Q/DQ network strongly typed: each layer runs in the type the file gives its tensors, with no
``--fp16`` flag to lower float32 layers. ``export_onnx(..., float_dtype=torch.float16)`` therefore writes:

* **Q/DQ with float16 scales** (opset >= 19, where QuantizeLinear takes float16 input and DequantizeLinear's output
  has its scale's type; the export raises a lower opset to 19): every QuantizeLinear reads a float16 tensor and every
  DequantizeLinear writes one, with no Cast between a DQ and its layer (the form TensorRT fuses). Zero points stay
  int8 (or float8e4m3fn, int4).
* **Exact scales**: a scale is written in float16 only when the quantizer's float32 scale ``amax / 127`` *is* a
  float16 value (non-zero and at most 65504; below ``2**-14`` a subnormal one), so the file quantizes with exactly the
  scale PyTorch's fake quantization uses. Any other scale is an :class:`~qdq.onnx.export.ExportError` that names the
  quantizer. :func:`round_scales_to_float16` moves every amax to the nearest such value (a relative change below
  ``2**-11``, smaller than the float16 rounding of the activations themselves); run it after calibration (before
  QAT fine-tuning, or again after it).
* **float16 initializers** for the float layers (weights, biases, constants). A weight behind a QuantizeLinear
  (the fake-quant form) is stored as the float16 value of its *dequantized* integers, so the file's Q still yields
  exactly PyTorch's integers (the float16 rounding moves each value by at most ``|q| * 2**-11`` of a step).
* **float32 graph inputs and outputs**, with a Cast to float16 after each input and a Cast to float32 before each
  output: callers keep feeding and reading float32 (as for the float32 file), and the Casts are two cheap layers at
  the engine's edges.
* **Ops kept in float32**: a few ops with no float16 form in ONNX or ONNX Runtime (:data:`FLOAT32_OPS`) keep
  float32 with Casts around them, and inputs that ONNX types float32 only (Resize's ``scales``) stay float32. Both
  are reported by the checker's ``float32-remainder`` rule with ``strongly_typed=True``.

:func:`convert_to_float16` is the graph rewrite (it edits the ONNX model; it does not use ``torch.onnx``);
:func:`scale_problems` is the check the export runs on the quantizers first. ONNX Runtime runs the files on the CPU
(float16 kernels of Conv, Gemm, MatMul, pooling, the activations and the elementwise ops); ``qdq.verify`` compares
them with the float32 PyTorch model (see :mod:`qdq.onnx.parity`).

Example:
    >>> import tempfile, os, torch
    >>> import qdq
    >>> from qdq.onnx.float16 import round_scales_to_float16
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    >>> _ = qdq.replace_to_quantization_module(model)
    >>> _ = qdq.calibrate_model(model, [torch.randn(2, 3, 8, 8)], progress=False)
    >>> _ = round_scales_to_float16(model)
    >>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
    >>> info = qdq.export_onnx(model, torch.randn(1, 3, 8, 8), path, float_dtype=torch.float16)
    >>> info.opset, [n.op_type for n in info.model.graph.node]
    (19, ['Cast', 'QuantizeLinear', 'DequantizeLinear', 'QuantizeLinear', 'DequantizeLinear', 'Conv', 'Relu', 'Cast'])
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qdq.onnx.export import weight_integers
from qdq.onnx.value_types import value_types

__all__ = ["FLOAT16_MIN_OPSET", "FLOAT32_OPS", "Float16Report", "scale_problems", "round_scales_to_float16",
           "convert_to_float16"]

logger = logging.getLogger(__name__)

#: The lowest opset whose QuantizeLinear/DequantizeLinear take float16 scales (and so float16 data).
FLOAT16_MIN_OPSET = 19
#: Ops kept in float32 (Casts around them): ONNX types Celu and NonMaxSuppression float32 only. Measured with
#: onnxruntime 1.31: its CPU provider runs Conv, ConvTranspose, Gemm, MatMul, Einsum, the poolings, Resize, Upsample,
#: RoiAlign, BatchNormalization, LayerNormalization, InstanceNormalization, Softmax, Gelu, Erf and the elementwise
#: ops in float16.
FLOAT32_OPS = frozenset({"NonMaxSuppression", "Celu"})
#: Inputs that ONNX types float32 only, whatever the op's data type: ``{op: slots}``.
FLOAT32_SLOTS = {"Resize": (2,), "Upsample": (1,)}  # the scales

_FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)  # 2**-14
_FP16_MIN_SUBNORMAL = 2.0**-24
_FP16_MAX = float(np.finfo(np.float16).max)  # 65504
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class Float16Report:
    """What :func:`convert_to_float16` did."""

    scales: int = 0
    initializers: int = 0
    weights_requantized: int = 0
    casts_added: int = 0
    float32_nodes: list[str] = field(default_factory=list)  # nodes kept in float32 (FLOAT32_OPS)
    clamped: list[str] = field(default_factory=list)  # initializers with values beyond float16's range


def _fp16_problem(scale: np.ndarray) -> str | None:
    """Why the float32 ``scale`` values are not exact non-zero float16 values (``None`` when they are)."""
    s32 = np.asarray(scale, np.float32).reshape(-1)
    with np.errstate(over="ignore"):
        s16 = s32.astype(np.float16)
    if not np.isfinite(s32).all() or (s32 <= 0).any():
        return "has scales that are not finite and positive"
    if (s32 > _FP16_MAX).any():
        return f"has a scale {float(s32.max()):.6g} above float16's largest value {_FP16_MAX:g}"
    if (s16 == 0).any():
        return (f"has a scale {float(s32.min()):.6g} that underflows to zero in float16 (below "
                f"{_FP16_MIN_SUBNORMAL / 2:.3g})")
    changed = s16.astype(np.float32) != s32
    if changed.any():
        i = int(np.argmax(changed))
        rel = float(np.abs(s16.astype(np.float32) - s32).max() / s32[changed].min())
        return (f"has {int(changed.sum())} of {s32.size} scales that are not float16 values (e.g. {float(s32[i])!r} "
                f"-> {float(s16[i])!r}, relative change up to {rel:.2g})")
    return None


def _quantizers(model: nn.Module):
    from qdq.transform.replace import name_quantizers
    from qdq.transform.switches import quantizers

    name_quantizers(model)
    seen = set()
    for name, q in quantizers(model):
        if q.is_enabled and id(q) not in seen:
            seen.add(id(q))
            yield name, q


def scale_problems(model: nn.Module) -> list[str]:
    """One line per enabled quantizer whose scale is not an exact non-zero float16 value (see the module docstring).

    >>> from qdq.nn import TensorQuantizer
    >>> q = TensorQuantizer(); q.amax = 127.0 * 2 ** -3   # scale 0.125: a float16 value
    >>> m = torch.nn.Module(); m.q = q
    >>> scale_problems(m)
    []
    >>> q.amax = 1.0                                       # scale 1/127
    >>> print(scale_problems(m)[0])
    q: has 1 of 1 scales that are not float16 values (e.g. 0.007874015718698502 -> 0.00787353515625, relative change up to 6.1e-05)
    """
    problems = []
    for name, q in _quantizers(model):
        scale = q.scale
        if scale is None:
            continue  # check_exportable reports it
        if not q.symmetric:
            problems.append(f"{name}: asymmetric quantizers are not exported with float16 scales")
            continue
        problem = _fp16_problem(scale.detach().float().cpu().numpy())
        if problem:
            problems.append(f"{name}: {problem}")
    return problems


def round_scales_to_float16(model: nn.Module) -> dict[str, float]:
    """Moves each enabled quantizer's amax so that its scale ``amax / 127`` is the nearest float16 value.

    Run it after calibration and before a float16 export (and before QAT fine-tuning, so that training sees the
    final scales). The change of each scale is below ``2**-11`` relative (normal float16 values). Returns
    ``{quantizer: largest relative change of its amax}`` (channels of amax 0 left out).

    Scales below ``2**-14`` become float16 subnormals, exact but with fewer significant bits (an amax below about
    ``127 * 2**-14 = 0.0078``: small weight channels are common, 130 of the 22,008 channels of the pretrained
    EfficientNet-Lite0); a scale that would underflow to zero (an amax below ``127 * 2**-25``, a dead channel)
    becomes ``2**-24``, with a warning.

    Raises:
        ValueError: naming every quantizer with a scale above float16's largest value (an amax above about
            ``127 * 65504``), or that is asymmetric; nothing is changed then.

    >>> from qdq.nn import TensorQuantizer
    >>> m = torch.nn.Module(); m.q = TensorQuantizer(); m.q.amax = 1.0
    >>> change = round_scales_to_float16(m)
    >>> scale_problems(m), float(m.q.scale) == float(np.float16(1 / 127))
    ([], True)
    """
    plans, problems = [], []
    for name, q in _quantizers(model):
        scale = q.scale
        if scale is None:
            continue
        if not q.symmetric:
            problems.append(f"{name}: asymmetric")
            continue
        s32 = scale.detach().float().cpu()
        s16 = s32.half().float()
        if not bool(torch.isfinite(s16).all()):
            problems.append(f"{name}: scales up to {float(s32.max()):.3g} are above float16's largest value "
                            f"{_FP16_MAX:g}")
            continue
        if bool((s16 == 0).any()):  # an amax below 127 * 2**-25 (a dead channel): the smallest float16 step
            logger.warning("%s: %d scales underflow to zero in float16; set to 2**-24 (float16's smallest)", name,
                           int((s16 == 0).sum()))
            s16 = s16.clamp(min=_FP16_MIN_SUBNORMAL)
        plans.append((name, q, s16))
    if problems:
        raise ValueError("cannot give these quantizers float16 scales (disable them, or export without "
                         "float_dtype):\n  " + "\n  ".join(problems))
    changes = {}
    for name, q, s16 in plans:
        amax = q.amax.detach().float().cpu()
        factor = (q.effective_amax().detach().float().cpu() / amax.clamp(min=1e-30)) if q.scale_amax else 1.0
        target = (s16 * q.maxbound) / factor  # exact in float32: 11 + 8 significant bits
        q.amax = target.reshape(q.amax.shape).to(q.amax.device)
        if _fp16_problem(q.scale.detach().float().cpu().numpy()) is not None:
            raise ValueError(f"{name}: its scale is not a float16 value after rounding its amax (scale_amax "
                             f"{q.scale_amax!r}); set its amax to 127 times a float16 value by hand")
        live = amax > 0  # a dead channel (amax 0) gets the smallest step: no relative change to report
        changes[name] = float(((target - amax).abs()[live] / amax[live]).max()) if bool(live.any()) else 0.0
    logger.info("float16 scales: %d quantizers rounded, largest relative amax change %.3g", len(changes),
                max(changes.values(), default=0.0))
    return changes


# --------------------------------------------------------------------------------------------------------------------
# the graph rewrite
# --------------------------------------------------------------------------------------------------------------------


def _to_fp16(values: np.ndarray, name: str, report: Float16Report) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size and float(np.abs(finite).max()) > _FP16_MAX:
        report.clamped.append(name)
        values = np.where(np.isfinite(values), np.clip(values, -_FP16_MAX, _FP16_MAX), values)
    return values.astype(np.float16)


def _dequantized_fp16(weight: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """float16 values whose QuantizeLinear (float16 ``scale``) gives exactly qdq's integers of the float32 weight."""
    from qdq.math.formats import dequantize_fp8, quantize_fp8

    if zero_point.dtype.kind in "iu":
        q, s, z = weight_integers(weight, scale, zero_point, axis)
        deq = (q - z) * s
    else:  # float8e4m3fn
        w = torch.from_numpy(weight.astype(np.float32))
        s = torch.from_numpy(scale.astype(np.float32))
        shape = [n if d == axis % w.dim() else 1 for d, n in enumerate(w.shape)] if s.numel() > 1 else []
        s = s.reshape(shape)
        deq = dequantize_fp8(quantize_fp8(w, s), s)
    return deq.numpy().astype(np.float16)


def convert_to_float16(model: onnx.ModelProto) -> Float16Report:
    """Rewrites a float32 QDQ model in place as the float16 file described in the module docstring.

    The model must be at opset >= :data:`FLOAT16_MIN_OPSET` and its Q/DQ scales exact non-zero float16 values.

    Raises:
        ValueError: a lower opset, a Q/DQ scale that is not a constant or not an exact float16 value (naming the
            node), or a node with subgraphs (If, Loop, Scan: not converted).
    """
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < FLOAT16_MIN_OPSET:
        raise ValueError(f"float16 Q/DQ scales need opset >= {FLOAT16_MIN_OPSET}; the model has opset {opset}")
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"{node.op_type} {node.name!r} has subgraphs, which the float16 conversion does not "
                             "convert; export it in float32")
    report = Float16Report()
    types = {name: t.elem_type for name, t in value_types(model).items()}
    inits = {init.name: init for init in graph.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, slot))

    def float32_slot(node: onnx.NodeProto, slot: int) -> bool:
        return node.op_type in FLOAT32_OPS or slot in FLOAT32_SLOTS.get(node.op_type, ())

    # Q/DQ scales (checked exact) and the weights behind a QuantizeLinear
    scale_names: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        if node.op_type in _QDQ and len(node.input) > 1:
            if node.input[1] not in inits:
                raise ValueError(f"{node.op_type} {node.name!r}: scale {node.input[1]!r} is not an initializer")
            scale_names.setdefault(node.input[1], node)
    for name, node in scale_names.items():
        init = inits[name]
        values = numpy_helper.to_array(init)
        if init.data_type == TensorProto.FLOAT16:
            continue
        problem = _fp16_problem(values)
        if problem:
            raise ValueError(f"{node.op_type} {node.name!r} scale {name!r} {problem}")
        init.CopyFrom(numpy_helper.from_array(values.astype(np.float16), name))
        report.scales += 1
    requantized = set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        weight = inits[node.input[0]]
        if weight.data_type != TensorProto.FLOAT:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits \
            else np.zeros((), np.uint8)
        values = _dequantized_fp16(numpy_helper.to_array(weight), numpy_helper.to_array(inits[node.input[1]]), zp,
                                   axis)
        if len(readers.get(weight.name, [])) > 1:  # read elsewhere too: a copy for this Q
            copy = numpy_helper.from_array(values, f"{weight.name}_fp16_q{len(requantized)}")
            graph.initializer.append(copy)
            inits[copy.name] = copy
            node.input[0] = copy.name
        else:
            weight.CopyFrom(numpy_helper.from_array(values, weight.name))
        requantized.add(node.input[0])
        report.weights_requantized += 1

    # the other float32 initializers, unless only float32 slots read them (a copy when both kinds do)
    for init in list(graph.initializer):
        if init.data_type != TensorProto.FLOAT or init.name in scale_names or init.name in requantized:
            continue
        uses = readers.get(init.name, [])
        fp32_uses = [(n, s) for n, s in uses if float32_slot(n, s)]
        if uses and len(fp32_uses) == len(uses):
            continue
        values = numpy_helper.to_array(init)
        if fp32_uses:
            keep = numpy_helper.from_array(values, f"{init.name}_fp32")
            graph.initializer.append(keep)
            for n, s in fp32_uses:
                n.input[s] = keep.name
        init.CopyFrom(numpy_helper.from_array(_to_fp16(values, init.name, report), init.name))
        report.initializers += 1

    # typed attributes: Cast(to=float), ConstantOfShape(value), Constant(value*)
    for node in graph.node:
        outs = readers.get(node.output[0], []) if node.output else []
        only_fp32 = bool(outs) and all(float32_slot(n, s) for n, s in outs)
        if only_fp32:
            continue
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT and \
                    node.op_type in ("ConstantOfShape", "Constant"):
                attr.t.CopyFrom(numpy_helper.from_array(_to_fp16(numpy_helper.to_array(attr.t), node.name, report),
                                                        attr.t.name))
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name in ("value_float", "value_floats"):
            attr = node.attribute[0]
            values = np.array(attr.f if attr.name == "value_float" else list(attr.floats), np.float16)
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(values)))

    new_nodes: list[onnx.NodeProto] = []
    prefix: list[onnx.NodeProto] = []

    def cast(src: str, dst: str, to: int) -> onnx.NodeProto:
        report.casts_added += 1
        return helper.make_node("Cast", [src], [dst], to=to, name=f"{dst}_cast")

    # graph inputs stay float32: a Cast to float16 after each
    for inp in graph.input:
        if inp.name in inits or types.get(inp.name) != TensorProto.FLOAT:
            continue
        half = f"{inp.name}_fp16"
        prefix.append(cast(inp.name, half, TensorProto.FLOAT16))
        for n, s in readers.get(inp.name, []):
            if not float32_slot(n, s):
                n.input[s] = half
    # ops kept in float32: Casts around them
    for node in graph.node:
        if node.op_type in FLOAT32_OPS:
            report.float32_nodes.append(node.name or node.op_type)
            for slot, name in enumerate(node.input):
                if name and types.get(name) == TensorProto.FLOAT and name not in inits and \
                        not any(name == i.name for i in graph.input):
                    wide = f"{name}_fp32_for_{node.name or node.op_type}"
                    new_nodes.append(cast(name, wide, TensorProto.FLOAT))
                    node.input[slot] = wide
            new_nodes.append(node)
            for slot, name in enumerate(node.output):
                if name and types.get(name) == TensorProto.FLOAT:
                    wide = f"{name}_fp32"
                    node.output[slot] = wide
                    new_nodes.append(cast(wide, name, TensorProto.FLOAT16))
            continue
        new_nodes.append(node)
    # graph outputs stay float32: the producer writes a float16 tensor, a Cast gives the output its name
    outputs = {o.name for o in graph.output}
    for out in graph.output:
        if types.get(out.name) != TensorProto.FLOAT:
            continue
        producer = next((n for n in new_nodes if out.name in n.output), None)
        if producer is None or producer.op_type == "Cast" and producer.output[0] == out.name and \
                any(a.name == "to" and a.i == TensorProto.FLOAT for a in producer.attribute):
            continue
        half = f"{out.name}_fp16"
        producer.output[list(producer.output).index(out.name)] = half
        for n, s in readers.get(out.name, []):
            n.input[s] = half
        new_nodes.append(cast(half, out.name, TensorProto.FLOAT))
        out.type.tensor_type.elem_type = TensorProto.FLOAT
    del graph.node[:]
    graph.node.extend(prefix + new_nodes)
    del graph.value_info[:]  # the exporter's float32 types; ONNX infers the new ones
    used = {i for n in graph.node for i in n.input} | outputs
    alive = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(alive)
    # every Cast sits right after the producer of its input: the order stays topological (the checker holds it)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    logger.info("float16: %d scales, %d initializers, %d weights requantized, %d casts, %d nodes kept in float32",
                report.scales, report.initializers, report.weights_requantized, report.casts_added,
                len(report.float32_nodes))
    if report.clamped:
        logger.warning("float16: %d initializers had values beyond +-65504, clamped: %s", len(report.clamped),
                       ", ".join(report.clamped[:10]))
    return report
