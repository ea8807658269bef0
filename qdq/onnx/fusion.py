"""TensorRT fusion predictor: per layer, the precision TensorRT will run a QDQ ONNX model in, and where it leaves INT8.

TensorRT's explicit quantization runs a layer in INT8 when its inputs come from DequantizeLinear nodes, fuses a
residual Add into the convolution producing one of its inputs when the other is dequantized, moves DQ nodes forward
through ops that commute with quantization (MaxPool, Slice, Split, Reshape, ...) and Q nodes backward into the layer
that produces their input. :func:`predict_fusion` applies those rules to the file alone (no TensorRT needed) and
reports:

* per layer (Conv, ConvTranspose, Gemm, MatMul, residual Add, average pooling): ``INT8``, ``FP16`` or ``FP32``, and
  the FLOPs of the compute layers; a float layer is ``FP16`` when the file computes it in float16 (a strongly typed
  build keeps it there), ``FP32`` when in float32 (TensorRT 11 builds it in FP32; TensorRT 10 with ``--fp16``
  would lower it);
* the **INT8 share** of the Conv/ConvTranspose/Gemm/MatMul FLOPs;
* the **float residual Adds**: adds of two activations that run in float (neither fused into a conv nor with both
  inputs dequantized);
* the **precision transitions**: activation Q nodes that TensorRT cannot fuse into an INT8 producer (a float layer
  hands over to INT8) and activation DQ nodes read by a float layer (INT8 hands over to float); each is a
  quantize/dequantize kernel or a fused epilogue at a precision boundary, the reformat layers of an engine;
* the **mismatched scale groups** (requantize layers): the checker's ``scale-mismatch``, ``fanout-scale`` and
  ``add-scale-mismatch`` findings.

The predictor is a model of TensorRT's rules, not TensorRT: confirm on the target with ``trtexec
--exportLayerInfo`` (the README says how).

From the command line: ``qdq check model.onnx --fusion`` (a table) or ``--json``.

Example:
    >>> import numpy as np
    >>> from onnx import TensorProto, helper, numpy_helper
    >>> inits = [numpy_helper.from_array(np.array(0.02, np.float32), "s"),
    ...          numpy_helper.from_array(np.array(0, np.int8), "zp"),
    ...          numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w"),
    ...          numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
    ...          numpy_helper.from_array(np.zeros(4, np.int8), "wzp")]
    >>> nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
    ...          helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
    ...          helper.make_node("QuantizeLinear", ["w", "ws", "wzp"], ["wq"], axis=0),
    ...          helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wd"], axis=0),
    ...          helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv"),
    ...          helper.make_node("Conv", ["c", "w"], ["y"], name="float_conv")]
    >>> io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8, 8]) for n in ("x", "y")]
    >>> model = helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], inits),
    ...                           opset_imports=[helper.make_opsetid("", 13)])
    >>> report = predict_fusion(model)
    >>> [(layer.name, layer.precision, layer.flops) for layer in report.layers]
    [('conv', 'INT8', 2048), ('float_conv', 'FP32', 2048)]
    >>> report.int8_share
    0.5
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import math

import onnx
from onnx import TensorProto

from qdq.onnx.check import PathOrModel, _Index, _load, check_tensorrt
from qdq.onnx.value_types import ValueType, value_types

__all__ = ["LayerPrecision", "FusionReport", "predict_fusion", "format_fusion"]

logger = logging.getLogger(__name__)

_COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_POOLS = ("AveragePool", "GlobalAveragePool", "ReduceMean")
# single-input ops TensorRT fuses into the kernel of the layer before them (so a Q after them fuses too)
_EPILOGUE = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "BatchNormalization",
             "Identity", "Elu", "Selu", "Softplus", "Gelu")
_PASS_ON = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity")
_SCALE_RULES = ("scale-mismatch", "fanout-scale", "add-scale-mismatch")


@dataclass(frozen=True)
class LayerPrecision:
    """One layer: its node name, op, predicted precision (``INT8``/``FP16``/``FP32``), FLOPs (compute layers) and
    a note (what an Add fused into, say)."""

    name: str
    op: str
    precision: str
    flops: int = 0
    note: str = ""


@dataclass
class FusionReport:
    """What :func:`predict_fusion` predicts (see the module docstring)."""

    layers: list[LayerPrecision] = field(default_factory=list)
    float_residual_adds: list[str] = field(default_factory=list)
    transitions: list[str] = field(default_factory=list)
    mismatched_groups: int = 0
    fused_adds: int = 0
    int8_adds: int = 0

    @property
    def compute_flops(self) -> int:
        return sum(layer.flops for layer in self.layers if layer.op in _COMPUTE)

    @property
    def int8_flops(self) -> int:
        return sum(layer.flops for layer in self.layers if layer.op in _COMPUTE and layer.precision == "INT8")

    @property
    def int8_share(self) -> float:
        """INT8 share of the Conv/ConvTranspose/Gemm/MatMul FLOPs (1.0 when there are none)."""
        total = self.compute_flops
        return self.int8_flops / total if total else 1.0

    def summary(self) -> dict[str, Any]:
        return {
            "int8_share": round(self.int8_share, 6),
            "int8_gflops": self.int8_flops / 1e9,
            "compute_gflops": self.compute_flops / 1e9,
            "float_residual_adds": len(self.float_residual_adds),
            "fused_adds": self.fused_adds,
            "int8_adds": self.int8_adds,
            "precision_transitions": len(self.transitions),
            "mismatched_scale_groups": self.mismatched_groups,
        }

    def to_json(self) -> str:
        return json.dumps({"summary": self.summary(), "layers": [asdict(layer) for layer in self.layers],
                           "float_residual_adds": self.float_residual_adds, "transitions": self.transitions},
                          indent=1)


def _quantized_compute(ix: _Index, node) -> bool:
    return node.op in _COMPUTE and all(ix.dq_source(t) is not None for t in node.inputs[:2])


def _fusible(ix: _Index, tensor: str) -> str:
    """The quantized conv/gemm an Add input comes straight from (TensorRT fuses the add into it), else ``""``."""
    node = ix.producer.get(tensor)
    chain = [tensor]
    if node is not None and node.op == "BatchNormalization":
        chain.append(node.input(0))
        node = ix.producer.get(node.input(0))
    if node is not None and node.op == "Add" and any(t in ix.constants for t in node.inputs):
        other = next(t for t in node.inputs if t not in ix.constants)  # a MatMul's bias
        chain.append(other)
        node = ix.producer.get(other)
    if node is None or not _quantized_compute(ix, node):
        return ""
    if any(len(ix.consumers.get(t, [])) != 1 or t in ix.graph_outputs for t in chain):
        return ""  # the conv output is read elsewhere too: the add cannot be fused into it
    return node.name


def _feeds_q(ix: _Index, tensor: str, limit: int = 16) -> bool:
    """Whether ``tensor`` reaches a per-tensor QuantizeLinear through ops that pass its scale on."""
    todo, seen = [tensor], set()
    while todo and len(seen) < limit:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        for node, _ in ix.consumers.get(t, []):
            if node.is_q and (ix.scale_size(node) or 1) == 1:
                return True
            if ix.passes_scale(node, node.output(0)) or node.op in _PASS_ON:
                todo.append(node.output(0))
    return False


def _shapes(proto: onnx.ModelProto) -> dict[str, ValueType]:
    return value_types(proto, "FLOPs of layers without shapes count as 0")


def _prod(dims) -> int | None:
    if dims is None or any(d is None for d in dims):
        return None
    return math.prod(dims)


def _flops(node, shapes) -> int:
    def dims(t):
        return shapes.get(t, (0, None))[1]

    out = _prod(dims(node.output(0)))
    w = dims(node.input(1))
    if node.op == "Conv" and out is not None and w:
        return 2 * out * (_prod(w[1:]) or 0)
    if node.op == "ConvTranspose" and w:
        x = _prod(dims(node.input(0)))
        return 2 * (x or 0) * (_prod(w[1:]) or 0)
    a = dims(node.input(0))
    if node.op == "Gemm" and out is not None and a:
        k = a[0] if node.attr("transA", 0) else a[-1]
        return 2 * out * (k or 0)
    if node.op == "MatMul" and out is not None and a:
        return 2 * out * (a[-1] or 0)
    return 0


def predict_fusion(model: PathOrModel) -> FusionReport:
    """Predicts how TensorRT builds a QDQ ONNX model (see the module docstring)."""
    proto, base_dir = _load(model)
    ix = _Index(proto, base_dir)
    shapes = _shapes(proto)
    report = FusionReport()
    int8_nodes: set[str] = set()

    def float_precision(tensor: str) -> str:
        return "FP16" if shapes.get(tensor, (TensorProto.FLOAT,))[0] == TensorProto.FLOAT16 else "FP32"

    for node in ix.nodes:
        if not node.in_default_domain:
            continue
        if node.op in _COMPUTE:
            int8 = all(ix.dq_source(t) is not None for t in node.inputs[:2])
            precision = "INT8" if int8 else float_precision(node.output(0))
            report.layers.append(LayerPrecision(node.name, node.op, precision, _flops(node, shapes)))
        elif node.op == "Add" and len(node.inputs) == 2 and not any(t in ix.constants for t in node.inputs):
            sources = [ix.dq_source(t) is not None for t in node.inputs]
            fused = [_fusible(ix, t) for t in node.inputs]
            if all(sources):
                report.int8_adds += 1
                layer = LayerPrecision(node.name, "Add", "INT8", note="both inputs dequantized")
            elif any(sources) and fused[sources.index(False)]:
                report.fused_adds += 1
                layer = LayerPrecision(node.name, "Add", "INT8", note=f"fused into {fused[sources.index(False)]}")
            else:
                report.float_residual_adds.append(node.name)
                layer = LayerPrecision(node.name, "Add", float_precision(node.output(0)), note="residual add in float")
            report.layers.append(layer)
        elif node.op in _POOLS:
            int8 = ix.dq_source(node.input(0)) is not None and _feeds_q(ix, node.output(0))
            report.layers.append(LayerPrecision(node.name, node.op, "INT8" if int8 else float_precision(node.output(0))))
        else:
            continue
        if report.layers[-1].precision == "INT8":
            int8_nodes.add(node.name)

    def int8_producer(tensor: str) -> bool:
        for _ in range(len(ix.nodes)):
            node = ix.producer.get(tensor)
            if node is None:
                return False
            if node.name in int8_nodes or node.is_dq:
                return True
            if node.op in _EPILOGUE or ix.passes_scale(node, tensor) or node.op == "Concat":
                if node.op == "Concat":
                    return all(int8_producer(t) for t in node.inputs if t and t not in ix.constants)
                tensor = node.input(0)
                continue
            if node.op == "Mul" and len(node.inputs) == 2:  # SiLU: x * Sigmoid(x), fused into the layer of x
                a, b = node.inputs
                sig = next((t for t in (a, b) if getattr(ix.producer.get(t), "op", "") == "Sigmoid"), None)
                if sig is not None and ix.producer[sig].input(0) in (a, b):
                    tensor = ix.producer[sig].input(0)
                    continue
            return False
        return False

    def int8_reader(node, slot) -> bool:
        if node.name in int8_nodes or node.is_q:
            return True
        if ix.passes_scale(node, node.output(0)) or node.op in ("Concat", "Split"):
            return all(int8_reader(n, s) for out in node.outputs if out for n, s in ix.consumers.get(out, []))
        return False

    for q in ix.qs:
        if ix.weight_of(q) is None and not int8_producer(q.input(0)):
            report.transitions.append(f"float -> INT8 at {q.label} (input {ix.origin(q.input(0))})")
    for dq in ix.dqs:
        if ix.weight_of(dq) is not None:
            continue
        floats = [n for n, s in ix.consumers.get(dq.output(0), []) if not int8_reader(n, s)]
        if floats:
            report.transitions.append(f"INT8 -> float at {dq.label} (read by {', '.join(n.label for n in floats[:3])})")
    report.mismatched_groups = sum(1 for f in check_tensorrt(proto) if f.rule in _SCALE_RULES)
    return report


def format_fusion(report: FusionReport, *, layers: bool = True) -> str:
    """The report as a table (one row per layer) and a summary line.

    >>> print(format_fusion(FusionReport()))
    INT8 share of conv/gemm FLOPs 100.00% (0.000 of 0.000 GFLOPs), 0 float residual adds, 0 precision transitions, 0 mismatched scale groups
    """
    lines = []
    if layers and report.layers:
        width = max(len(layer.name) for layer in report.layers)
        lines.append(f"{'layer':<{width}}  {'op':<17}  {'precision':<9}  {'MFLOPs':>10}  note")
        for layer in report.layers:
            mflops = f"{layer.flops / 1e6:.2f}" if layer.flops else ""
            lines.append(f"{layer.name:<{width}}  {layer.op:<17}  {layer.precision:<9}  {mflops:>10}  {layer.note}")
        lines += report.transitions
    s = report.summary()
    lines.append(f"INT8 share of conv/gemm FLOPs {100 * report.int8_share:.2f}% ({s['int8_gflops']:.3f} of "
                 f"{s['compute_gflops']:.3f} GFLOPs), {s['float_residual_adds']} float residual adds, "
                 f"{s['precision_transitions']} precision transitions, {s['mismatched_scale_groups']} mismatched "
                 "scale groups")
    return "\n".join(lines)
