"""TensorRT rule checker: what a QDQ ONNX model needs before TensorRT builds it into an INT8 engine.

TensorRT's explicit quantization (TensorRT 8.6 to 10, and 11, where every Q/DQ network is strongly typed) reads the
QuantizeLinear/DequantizeLinear (Q/DQ) pairs of an ONNX model and decides from them which layers run in INT8. Some
models it rejects, some it computes differently from the ONNX semantics, and many it builds with extra reformat or
requantize layers that cost speed without any message. :func:`check_tensorrt` reads the model once and returns one
:class:`Finding` per problem, naming the nodes, tensors and scales at fault:

* ``error``: TensorRT rejects the model, or computes numbers that differ from what the QDQ model says;
* ``warning``: it builds and computes the right numbers but runs slower (reformat/requantize layers), or differs
  from what the user most likely wants;
* ``info``: worth knowing (which layers run in float, what the checker did not look at).

From the command line (exit code 1 when there is an error finding, 2 when the file cannot be read)::

    python -m qdq.onnx.check model_qdq.onnx            # every finding and a summary line
    python -m qdq.onnx.check model_qdq.onnx --quiet    # errors and warnings only (info hidden)

Rules
-----

==========================  ========  ==================================================================================
rule                        severity  what it checks - why TensorRT cares
==========================  ========  ==================================================================================
``opset``                   error     The default-domain opset is >= 13 - per-channel Q/DQ (``axis``) needs opset 13.
``unsupported-quant-op``    error     No QLinear* (QLinearConv, QLinearMatMul, ...), *Integer (ConvInteger,
                                      MatMulInteger), DynamicQuantize*, QGemm/QAttention, and no Q/DQ outside the
                                      default ONNX domain - TensorRT parses only ONNX Q/DQ around float ops.
``q-without-dq``            error     Every QuantizeLinear output is read by DequantizeLinear nodes only and is not a
                                      graph output - TensorRT cannot run a layer on a quantized tensor without its DQ.
``unused-q``                info      A QuantizeLinear whose output nobody reads - it has no effect.
``qdq-mismatch``            error     Each DQ that reads a Q has the Q's scale values, zero point values and axis - the
                                      pair is fused into one scale; a different one would change the numbers.
``dq-input``                error     A DQ reads a Q output or a constant (int8 weights as an initializer or a Constant
                                      node: the deploy form) - anything else has no quantization TensorRT knows.
``qparam-not-constant``     error     Scales and zero points of every Q/DQ are constants (initializers or Constant
                                      nodes) - TensorRT needs them when it builds the engine.
``zero-point-missing``      error     A QuantizeLinear has a zero point - without one (and without the opset-21
                                      ``output_dtype``) it outputs uint8.
``zero-point-dtype``        error,    Zero points are int8, or float8e4m3fn (FP8, opset >= 19) - TensorRT's INT8 is
                            warning   signed. int4 zero points of a DQ on constant weights read by MatMul/Gemm are a
                                      warning (weight-only int4 needs TensorRT 10); read by anything else (a
                                      convolution) an error: TensorRT runs int4 weight-only on MatMul/Gemm only.
``zero-point-nonzero``      error     Zero points are all zero - TensorRT supports symmetric quantization only.
``scale-dtype``             warning,  Scales are float32; float16 or bfloat16 is a warning (TensorRT 10 takes them,
                            error     older versions need float32; not reported with ``strongly_typed=True``, where
                                      float16 scales make a DQ's output float16), any other type an error.
``scale-value``             error     Scales are finite and > 0 - TensorRT rejects zero, negative and non-finite scales -
                                      and at least 1 / FLT_MAX (about 2.9e-39), whose reciprocal is finite in float32.
``per-channel-activation``  error     A Q/DQ of an activation (not constant data) has one scale - TensorRT quantizes
                                      activations per tensor only.
``per-channel-shape``       error     A per-channel weight DQ has an ``axis`` inside the weight's rank and one scale per
                                      element of the weight along it - otherwise the model is invalid.
``per-channel-axis``        error,    The axis suits the layer reading the weight: Conv and ConvTranspose axis 0 (error;
                            warning   TensorRT's deconvolution kernels take C_in of the (C_in, C_out/group, k...) weight
                                      and reject axis 1); Gemm the output-feature axis of B (0 when transB=1, 1 when
                                      transB=0) and MatMul the last axis of its second input (warning).
``blocked-quantization``    info,     A Q/DQ with ``block_size`` (opset 21 blocked quantization) - TensorRT 10 takes it
                            error     for weight-only int4 DQ; a DQ of constant data whose scale does not have the
                                      data's shape with ``ceil(n / block_size)`` along ``axis`` is an error.
``half-quantized``          error     A Conv, ConvTranspose, Gemm or MatMul with one of its two data/weight inputs from
                                      a DQ and the other not - TensorRT runs it in high precision and cannot fuse the
                                      Q/DQ. An int4 weight DQ on a float activation is weight-only quantization
                                      instead (see ``zero-point-dtype``).
``format-mix``              error     Such a layer whose data and weight DQs have different types (int8 and
                                      float8e4m3fn) - TensorRT runs a layer in INT8 or in FP8, both inputs alike.
``fp8-layer``               warning   A Conv or ConvTranspose with FP8 (float8e4m3fn) Q/DQ that TensorRT has no FP8
                                      kernel for: depthwise (``group`` equal to its channels), at most 16 input
                                      channels per group or 16 output channels, or a kernel of more than 32 elements
                                      (ModelOpt's FP8 rule, ``qdq.fp8_exclusion``) - TensorRT runs it in higher
                                      precision with reformats around it; give it INT8 or float.
``float-layer``             info      Such a layer with neither input from a DQ in a quantized model - it runs in
                                      float/fp16 (perhaps a layer skipped on purpose).
``scale-mismatch``          warning   The Q/DQ around a scale group (tensors joined by Concat, MaxPool, zero Pad, Slice,
                                      Split (every output), Reshape, Transpose, Flatten, Squeeze, Unsqueeze, nearest
                                      Resize/Upsample) share one scale - otherwise TensorRT inserts
                                      requantize/reformat layers instead of fusing.
``fanout-scale``            warning   A tensor read by several Q nodes uses one scale - each extra scale is an extra
                                      quantization of the same data.
``add-scale-mismatch``      warning   A residual Add with both inputs from DQ nodes has equal scales on both - otherwise
                                      TensorRT rescales one input before it can add in INT8.
``add-one-side``            info      A residual Add with one input from a DQ whose other input does not come from a
                                      Conv (directly or through BatchNormalization) - TensorRT fuses the add into the
                                      Conv only in that form.
``add-float``               warning   A residual Add of two activations (both computed from the graph inputs'
                                      values, not from constants and shapes alone) with neither from a DQ in a
                                      quantized model - it runs in float, and TensorRT converts its inputs and
                                      output around it.
``float32-remainder``       warning   With ``strongly_typed=True`` only: nodes computing in float32 (DQ with float32
                                      scales, float layers) - TensorRT 11 builds them in FP32, not FP16
                                      (:mod:`qdq.onnx.check_precision`; fix: ``float_dtype=torch.float16``).
``attention-pair``          warning   BMM1 and BMM2 of an attention (MatMul -> Softmax -> MatMul) both quantized or
                                      both float - TensorRT's fused attention runs in INT8 only with both quantized.
``attention-mask``          warning   No Q/DQ on the attention scores or the mask before the Softmax - the fused
                                      attention takes them in float.
``attention-shape``         warning   A quantized attention has sequence length <= 512, head size and key length >= 16
                                      - TensorRT's INT8 fused attention limits (:mod:`qdq.onnx.check_attention`).
``no-qdq``                  info      The model has no quantization op at all - TensorRT builds it in float/fp16.
``subgraph``                info      A node carries subgraphs (If, Loop, Scan) - only the main graph is checked.
==========================  ========  ==================================================================================

How the rules read the graph:

* **Which node defines a quantization.** Every QuantizeLinear, and every DequantizeLinear that does not read a
  QuantizeLinear (deploy-form weights), is checked for its zero point and scale values (``zero-point-*``,
  ``scale-*``, ``per-channel-activation``). A DQ that reads a Q is held to its Q by ``qdq-mismatch`` instead, so a
  bad scale is reported once, on the Q. ``qparam-not-constant`` is checked on every Q and DQ.
* **Weights.** A Q/DQ quantizes a weight when its data is a constant (for a DQ: directly, or through its Q).
  Per-channel rules are checked on the DQ (the node TensorRT takes the weight's scales from) against the layers
  that read the DQ output directly.
* **"Comes from a DQ".** A tensor comes from a DQ when a DequantizeLinear produces it, directly or through a chain
  of single-input ops that commute with per-tensor quantization (MaxPool, zero Pad, Slice, Split, Reshape,
  Transpose, Flatten, Squeeze, Unsqueeze, nearest Resize/Upsample): TensorRT moves a DQ forward through those.
* **Scale groups.** Union-find over tensors: a Concat joins its inputs and its output; each op above joins its data
  input and its output; a DQ joins nothing (it is where a scale is read). A group's scales are those of the Q nodes
  reading any of its tensors and of the DQ nodes producing any of its tensors (per-tensor, valid scales only), and
  two scales are equal within a relative 1e-6. Nested Concats collapse into one group and one finding.
* **No duplicate fan-out.** ``fanout-scale`` covers tensors outside every scale group; a tensor inside a group is
  reported (once) by the group's ``scale-mismatch``, which lists every Q and DQ of the group, fan-out Qs included.

Findings come sorted: errors, then warnings, then info; within a severity in the order of the table, and within a
rule in graph order. For the scale rules, ``Finding.scales[i]`` belongs to the i-th Q/DQ of ``Finding.nodes``.

Example:
    >>> import numpy as np
    >>> from onnx import TensorProto, helper, numpy_helper
    >>> inits = [numpy_helper.from_array(np.array(0.02, np.float32), "s"),
    ...          numpy_helper.from_array(np.array(0, np.int8), "zp")]
    >>> nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
    ...          helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xdq"], name="dq"),
    ...          helper.make_node("Relu", ["xdq"], ["y"], name="relu")]
    >>> io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("x", "y")]
    >>> graph = helper.make_graph(nodes, "g", io[:1], io[1:], inits)
    >>> model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    >>> check_tensorrt(model)
    []
    >>> model.graph.node[2].input[0] = "xq"          # Relu now reads the int8 tensor
    >>> print(format_findings(check_tensorrt(model)))
    ERROR   q-without-dq: QuantizeLinear 'q' output 'xq' is read by Relu 'relu'; TensorRT needs every Q output to go ...
    1 error, 0 warnings, 0 info
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from qdq._union_find import UnionFind

__all__ = ["Finding", "ModelReadError", "RULES", "SEVERITIES", "check_tensorrt", "format_findings", "main", "quantize_groups"]

logger = logging.getLogger(__name__)

#: Finding severities, most severe first (the order findings come in).
SEVERITIES = ("error", "warning", "info")

#: Every rule id, in the order of the module's table (the order findings of one severity come in).
RULES = (
    "opset",
    "unsupported-quant-op",
    "q-without-dq",
    "unused-q",
    "qdq-mismatch",
    "dq-input",
    "qparam-not-constant",
    "zero-point-missing",
    "zero-point-dtype",
    "zero-point-nonzero",
    "scale-dtype",
    "scale-value",
    "per-channel-activation",
    "per-channel-shape",
    "per-channel-axis",
    "blocked-quantization",
    "half-quantized",
    "format-mix",
    "fp8-layer",
    "float-layer",
    "scale-mismatch",
    "fanout-scale",
    "add-scale-mismatch",
    "add-one-side",
    "add-float",
    "float32-remainder",  # strongly typed builds only: qdq/onnx/check_precision.py
    "attention-pair",  # the attention rules live in qdq/onnx/check_attention.py
    "attention-mask",
    "attention-shape",
    "no-qdq",
    "subgraph",
)

#: Relative tolerance under which two scales count as one.
SCALE_REL_TOL = 1e-6
#: Lowest default-domain opset accepted: QuantizeLinear/DequantizeLinear take ``axis`` (per channel) from 13 on.
MIN_OPSET = 13
#: Lowest default-domain opset whose Q/DQ take float8e4m3fn (FP8 E4M3) zero points.
FP8_MIN_OPSET = 19

#: TensorRT's FP8 convolution kernels need more than this many input channels per group and output channels, and
#: a kernel of at most FP8_MAX_KERNEL_AREA elements (ModelOpt's FP8 rule; the same numbers as
#: ``qdq.transform.layer_formats.FP8_MIN_CHANNELS`` and ``FP8_MAX_KERNEL_AREA``, which decide the model side).
FP8_MIN_CHANNELS = 16
FP8_MAX_KERNEL_AREA = 32

_DEFAULT_DOMAINS = ("", "ai.onnx")
_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_SHAPE_OPS = ("MaxPool", "Slice", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")
#: Ops each of whose outputs has the scale of their data input (the dynamo exporter writes chunk/split as Split).
_MULTI_OUTPUT_OPS = ("Split",)
_INTEGER_OPS = ("QGemm", "QAttention")
_SHOW_VALUES = 8

PathOrModel = Union[str, os.PathLike, onnx.ModelProto]


class ModelReadError(ValueError):
    """A file (or a constant inside it) that cannot be read as an ONNX model; the message names it."""


@dataclass(frozen=True)
class Finding:
    """One problem found in a model.

    Attributes:
        severity: ``"error"``, ``"warning"`` or ``"info"`` (see the module docstring).
        rule: the rule's id, one of :data:`RULES`.
        message: one line naming the nodes, tensors and scales at fault.
        nodes: names of the nodes involved (unnamed nodes show as ``<OpType #index>``).
        scales: the scales involved, in the order the message gives them (may be empty).

    Example:
        >>> f = Finding("warning", "fanout-scale", "tensor 'x' is read by 2 Q nodes", ("q1", "q2"), (0.1, 0.2))
        >>> print(f)
        WARNING fanout-scale: tensor 'x' is read by 2 Q nodes
        >>> Finding("fatal", "opset", "...")
        Traceback (most recent call last):
        ...
        ValueError: Finding: severity must be one of ('error', 'warning', 'info'), got 'fatal'
    """

    severity: str
    rule: str
    message: str
    nodes: tuple[str, ...] = ()
    scales: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding: severity must be one of {SEVERITIES}, got {self.severity!r}")
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    def __str__(self) -> str:
        return f"{self.severity.upper():<7} {self.rule}: {self.message}"


# --------------------------------------------------------------------------------------------------------------------
# Reading the graph
# --------------------------------------------------------------------------------------------------------------------


class _Const:
    """A dense constant tensor (initializer or Constant node output): dtype and shape at once, values on demand."""

    def __init__(self, name: str, proto: TensorProto, base_dir: str):
        self.name = name
        self.proto = proto
        self.base_dir = base_dir
        self.dtype = proto.data_type
        self.shape = tuple(proto.dims)
        self.size = math.prod(self.shape)
        self._values: np.ndarray | None = None
        self._floats: np.ndarray | None = None

    def values(self) -> np.ndarray:
        """The tensor as a NumPy array (external data is read from ``base_dir``)."""
        if self._values is None:
            try:
                self._values = numpy_helper.to_array(self.proto, self.base_dir)
            except Exception as exc:  # external data missing, corrupt raw data, unknown dtype
                raise ModelReadError(f"cannot read the constant tensor {self.name!r}: {exc}") from exc
        return self._values

    def floats(self) -> np.ndarray:
        """The values as a flat float64 array (computed once; do not modify it)."""
        if self._floats is None:
            self._floats = np.asarray(self.values()).astype(np.float64).ravel()
        return self._floats


class _TransposedConst(_Const):
    """A Transpose of a constant: constant data too (a weight that an exporter transposes before its Q/DQ)."""

    def __init__(self, name: str, source: _Const, perm: Sequence[int] | None):
        self.name = name
        self.proto = source.proto
        self.base_dir = source.base_dir
        self.dtype = source.dtype
        self.perm = tuple(perm) if perm else tuple(reversed(range(len(source.shape))))
        self.shape = tuple(source.shape[p] for p in self.perm)
        self.size = source.size
        self._source = source
        self._values = None
        self._floats = None

    def values(self) -> np.ndarray:
        if self._values is None:
            self._values = np.transpose(self._source.values(), self.perm)
        return self._values


def _constant_node_tensor(name: str, attrs: dict[str, Any], base_dir: str) -> _Const | None:
    """The dense tensor a Constant node outputs; ``None`` for sparse and string constants."""
    if "value" in attrs:
        return _Const(name, attrs["value"], base_dir)
    for key, dtype in (("value_float", TensorProto.FLOAT), ("value_int", TensorProto.INT64)):
        if key in attrs:
            return _Const(name, helper.make_tensor(name, dtype, [], [attrs[key]]), base_dir)
    for key, dtype in (("value_floats", TensorProto.FLOAT), ("value_ints", TensorProto.INT64)):
        if key in attrs:
            return _Const(name, helper.make_tensor(name, dtype, [len(attrs[key])], attrs[key]), base_dir)
    return None


def _attr_value(attr: AttributeProto) -> Any:
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8", "replace") for v in value]
    return value


@dataclass(eq=False)
class _Node:
    """A graph node with its display name and decoded attributes."""

    index: int
    name: str
    op: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    has_subgraph: bool = False

    @classmethod
    def from_proto(cls, index: int, proto: onnx.NodeProto) -> "_Node":
        subgraph_types = (AttributeProto.GRAPH, AttributeProto.GRAPHS)
        return cls(
            index=index,
            name=proto.name or f"<{proto.op_type} #{index}>",
            op=proto.op_type,
            domain=proto.domain,
            inputs=tuple(proto.input),
            outputs=tuple(proto.output),
            attrs={a.name: _attr_value(a) for a in proto.attribute if a.type not in subgraph_types},
            has_subgraph=any(a.type in subgraph_types for a in proto.attribute),
        )

    def input(self, i: int) -> str:
        """Name of input ``i``, ``""`` when absent."""
        return self.inputs[i] if i < len(self.inputs) else ""

    def output(self, i: int) -> str:
        """Name of output ``i``, ``""`` when absent."""
        return self.outputs[i] if i < len(self.outputs) else ""

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    @property
    def label(self) -> str:
        return f"{self.op} '{self.name}'"

    @property
    def in_default_domain(self) -> bool:
        return self.domain in _DEFAULT_DOMAINS

    @property
    def is_q(self) -> bool:
        return self.op == "QuantizeLinear" and self.in_default_domain

    @property
    def is_dq(self) -> bool:
        return self.op == "DequantizeLinear" and self.in_default_domain


def _is_unsupported_quant_op(node: _Node) -> bool:
    if node.op in ("QuantizeLinear", "DequantizeLinear"):
        return not node.in_default_domain
    return (node.op.startswith("QLinear") or "Integer" in node.op or node.op.startswith("DynamicQuantize")
            or node.op in _INTEGER_OPS)


class _Index:
    """Producer, consumer and constant maps of the main graph, built once."""

    def __init__(self, model: onnx.ModelProto, base_dir: str):
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), None)
        self.nodes = [_Node.from_proto(i, n) for i, n in enumerate(graph.node)]
        self.constants: dict[str, _Const] = {t.name: _Const(t.name, t, base_dir) for t in graph.initializer}
        self.graph_outputs = {o.name for o in graph.output}
        self.producer: dict[str, _Node] = {}
        self.consumers: dict[str, list[tuple[_Node, int]]] = defaultdict(list)
        for node in self.nodes:
            for out in node.outputs:
                if out:
                    self.producer[out] = node
            for slot, name in enumerate(node.inputs):
                if name:
                    self.consumers[name].append((node, slot))
            if node.op == "Constant" and node.in_default_domain and node.output(0):
                const = _constant_node_tensor(node.output(0), node.attrs, base_dir)
                if const is not None:
                    self.constants[node.output(0)] = const
            elif node.op == "Transpose" and node.in_default_domain and node.input(0) in self.constants:
                self.constants[node.output(0)] = _TransposedConst(node.output(0), self.constants[node.input(0)],
                                                                  node.attr("perm"))
        for node in self.nodes:  # the TorchScript exporter passes shared parameters through Identity nodes
            if node.op == "Identity" and node.in_default_domain and node.input(0) in self.constants and node.output(0):
                self.constants.setdefault(node.output(0), self.constants[node.input(0)])
        self.model = model
        self.qs = [n for n in self.nodes if n.is_q]
        self.dqs = [n for n in self.nodes if n.is_dq]
        self.quantized = bool(self.qs or self.dqs)
        self._dq_sources: dict[str, _Node | None] = {}
        logger.debug("indexed %d nodes, %d constants, %d Q, %d DQ", len(self.nodes), len(self.constants),
                     len(self.qs), len(self.dqs))

    # ---- Q/DQ parameters ---------------------------------------------------------------------------------------
    def const(self, name: str) -> _Const | None:
        return self.constants.get(name) if name else None

    def q_of(self, dq: _Node) -> _Node | None:
        """The QuantizeLinear a DequantizeLinear reads, if any."""
        prod = self.producer.get(dq.input(0))
        return prod if prod is not None and prod.is_q else None

    def defines_quantization(self, node: _Node) -> bool:
        return node.is_q or (node.is_dq and self.q_of(node) is None)

    def weight_of(self, node: _Node) -> str | None:
        """The constant tensor a Q/DQ quantizes (for a DQ: directly or through its Q), else ``None``."""
        data = node.input(0)
        if node.is_dq and data not in self.constants:
            q = self.q_of(node)
            data = q.input(0) if q is not None else ""
        return data if data in self.constants else None

    def scale_size(self, node: _Node) -> int | None:
        scale = self.const(node.input(1))
        return None if scale is None else scale.size

    def per_tensor_scale(self, node: _Node) -> float | None:
        """The single scale of a Q/DQ when it is a constant, finite and > 0; ``None`` otherwise."""
        scale = self.const(node.input(1))
        if scale is None or scale.size != 1:
            return None
        value = float(scale.floats()[0])
        return value if math.isfinite(value) and value > 0 else None

    def is_blocked(self, node: _Node) -> bool:
        return int(node.attr("block_size", 0) or 0) > 0

    # ---- data flow ---------------------------------------------------------------------------------------------
    def passes_scale(self, node: _Node, tensor: str) -> bool:
        """Whether ``tensor`` (an output of ``node``) has the scale of ``node``'s data input: per-tensor
        quantization commutes with the op."""
        if not node.in_default_domain or not tensor or not node.input(0):
            return False
        if node.op in _MULTI_OUTPUT_OPS:
            return tensor in node.outputs
        if tensor != node.output(0):
            return False
        if node.op in _SHAPE_OPS:
            return True
        if node.op in ("Resize", "Upsample"):
            return node.attr("mode", "nearest") == "nearest"
        if node.op == "Pad":
            return node.attr("mode", "constant") == "constant" and self._pads_with_zero(node)
        return False

    def _pads_with_zero(self, pad: _Node) -> bool:
        value_name = pad.input(2)
        if not value_name:
            return float(pad.attr("value", 0.0)) == 0.0
        value = self.const(value_name)
        return value is not None and not np.any(value.floats() != 0)

    def dq_source(self, tensor: str) -> _Node | None:
        """The DequantizeLinear ``tensor`` comes from, directly or through ops that pass its scale on (memoized,
        so a long chain is walked once)."""
        path: list[str] = []
        found: _Node | None = None
        while tensor not in self._dq_sources:
            path.append(tensor)
            node = self.producer.get(tensor)
            if node is None or node.is_dq or not self.passes_scale(node, tensor) or len(path) > len(self.nodes):
                found = node if node is not None and node.is_dq else None  # the length bound guards against cycles
                break
            tensor = node.input(0)
        else:
            found = self._dq_sources[tensor]
        for t in path:
            self._dq_sources[t] = found
        return found

    @functools.cached_property
    def activations(self) -> frozenset[str]:
        """The tensors whose values depend on the values of the graph inputs: computed from a graph input by ops
        other than ``Shape`` and ``Size``. The rest is computed from constants and shapes alone (a bias a forward
        edits, ``x.new_zeros(...)`` and the masks built on it, an index table): TensorRT folds it at build time, so it
        is not data for an add or an activation quantizer to act on."""
        found = {i.name for i in self.model.graph.input if i.name not in self.constants}
        for node in self.nodes:  # a graph's nodes are in topological order
            if node.op in ("Shape", "Size") and node.in_default_domain:
                continue
            if any(t in found for t in node.inputs if t):
                found.update(t for t in node.outputs if t)
        return frozenset(found)

    @functools.cached_property
    def attention_scores(self) -> frozenset[str]:
        """Names of the nodes between an attention's first MatMul and its Softmax (scale, mask or bias adds,
        reshapes): no residual adds, as TensorRT's fused attention takes them in float."""
        from qdq.onnx.check_attention import find_attentions  # imported where used, as _check_attention does

        return frozenset(n.name for att in find_attentions(self) for n in att.between)

    def origin(self, tensor: str) -> str:
        """Where a tensor comes from, for messages."""
        node = self.producer.get(tensor)
        if node is not None:
            return f"'{tensor}' from {node.label}"
        if tensor in self.constants:
            return f"constant '{tensor}'"
        return f"graph input '{tensor}'"


# --------------------------------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _fmt_values(values: np.ndarray) -> str:
    shown = ", ".join(_fmt(v) for v in values[:_SHOW_VALUES])
    more = f", ... ({values.size} values)" if values.size > _SHOW_VALUES else ""
    return f"[{shown}{more}]" if values.size != 1 else shown


def _dtype_name(dtype: int | None) -> str:
    if dtype is None:
        return "unknown"
    return helper.tensor_dtype_to_string(dtype).replace("TensorProto.", "").lower()


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _distinct(values: Iterable[float], rel_tol: float = SCALE_REL_TOL) -> list[float]:
    """The distinct values, sorted, values within ``rel_tol`` of the previous one counted as that one."""
    out: list[float] = []
    for v in sorted(values):
        if not out or not math.isclose(v, out[-1], rel_tol=rel_tol):
            out.append(v)
    return out


def _qdq_list(members: Sequence[tuple[_Node, float]]) -> str:
    return ", ".join(f"{node.label} {_fmt(scale)}" for node, scale in members)


# --------------------------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------------------------


def _check_opset(ix: _Index) -> Iterator[Finding]:
    if ix.opset is None:
        yield Finding("error", "opset", "the model imports no default-domain (ai.onnx) opset; TensorRT needs >= 13")
    elif ix.opset < MIN_OPSET:
        yield Finding("error", "opset", f"the model uses default-domain opset {ix.opset}; TensorRT's Q/DQ support "
                      f"(per-channel scales with axis) needs opset >= {MIN_OPSET}")


def _check_unsupported_ops(ix: _Index) -> Iterator[Finding]:
    for node in ix.nodes:
        if _is_unsupported_quant_op(node):
            where = f" in domain '{node.domain}'" if node.domain not in _DEFAULT_DOMAINS else ""
            yield Finding("error", "unsupported-quant-op",
                          f"{node.label}{where} is an integer-arithmetic quantized op; TensorRT parses only "
                          "ai.onnx QuantizeLinear/DequantizeLinear around float ops (export the QDQ format)",
                          (node.name,))


def _check_q_consumers(ix: _Index) -> Iterator[Finding]:
    for q in ix.qs:
        out = q.output(0)
        readers = ix.consumers.get(out, [])
        others = [node for node, _ in readers if not node.is_dq]
        if out in ix.graph_outputs:
            yield Finding("error", "q-without-dq", f"{q.label} output '{out}' is a graph output; TensorRT needs "
                          "every Q output to go into a DequantizeLinear", (q.name,))
        if others:
            names = ", ".join(n.label for n in others)
            yield Finding("error", "q-without-dq", f"{q.label} output '{out}' is read by {names}; TensorRT needs "
                          "every Q output to go into DequantizeLinear nodes only", (q.name, *(n.name for n in others)))
        if not readers and out not in ix.graph_outputs:
            yield Finding("info", "unused-q", f"{q.label} output '{out}' is never read; the Q has no effect",
                          (q.name,))


def _same_values(ix: _Index, a: str, b: str) -> bool:
    """Whether two Q/DQ parameter tensors hold the same values (same name, or equal constants)."""
    if a == b:
        return True
    ca, cb = ix.const(a), ix.const(b)
    if ca is None or cb is None:
        return False
    return ca.dtype == cb.dtype and np.array_equal(ca.floats(), cb.floats(), equal_nan=True)


def _same_zero_point(ix: _Index, a: str, b: str) -> bool:
    """Like :func:`_same_values`, a missing zero point standing for zeros of the pair's integer type."""
    if a and b:
        return _same_values(ix, a, b)
    present = ix.const(a or b)
    return not (a or b) or (present is not None and not np.any(present.floats() != 0))


def _describe_param(ix: _Index, name: str) -> str:
    if not name:
        return "none"
    const = ix.const(name)
    if const is None:
        return f"'{name}' (not constant)"
    try:
        return f"{_fmt_values(const.floats())} ({_dtype_name(const.dtype)})"
    except ModelReadError:
        return f"'{name}' (unreadable)"


def _axis(node: _Node, rank: int | None) -> int:
    axis = int(node.attr("axis", 1))
    return axis + rank if rank is not None and axis < 0 else axis


def _pair_differences(ix: _Index, q: _Node, dq: _Node) -> list[str]:
    diffs = []
    if not _same_values(ix, q.input(1), dq.input(1)):
        diffs.append(f"scale {_describe_param(ix, q.input(1))} vs {_describe_param(ix, dq.input(1))}")
    if not _same_zero_point(ix, q.input(2), dq.input(2)):
        diffs.append(f"zero point {_describe_param(ix, q.input(2))} vs {_describe_param(ix, dq.input(2))}")
    sizes = (ix.scale_size(q), ix.scale_size(dq))
    if any(s is None or s > 1 for s in sizes):
        weight = ix.weight_of(dq)
        rank = len(ix.constants[weight].shape) if weight is not None else None
        if _axis(q, rank) != _axis(dq, rank):
            diffs.append(f"axis {q.attr('axis', 1)} vs {dq.attr('axis', 1)}")
    return diffs


def _check_dq_inputs(ix: _Index) -> Iterator[Finding]:
    for dq in ix.dqs:
        data = dq.input(0)
        q = ix.q_of(dq)
        if q is not None:
            diffs = _pair_differences(ix, q, dq)
            if diffs:
                scales = [s for s in (ix.per_tensor_scale(q), ix.per_tensor_scale(dq)) if s is not None]
                yield Finding("error", "qdq-mismatch", f"{dq.label} does not match its {q.label}: "
                              f"{'; '.join(diffs)}; TensorRT fuses the pair into one scale",
                              (q.name, dq.name), scales if len(scales) == 2 else ())
        elif data not in ix.constants:
            yield Finding("error", "dq-input", f"{dq.label} reads {ix.origin(data)}, neither a QuantizeLinear output "
                          "nor a constant; TensorRT cannot tell how that tensor was quantized", (dq.name,))


def _check_qparams_constant(ix: _Index) -> Iterator[Finding]:
    for node in ix.nodes:
        if not (node.is_q or node.is_dq):
            continue
        scale, zero_point = node.input(1), node.input(2)
        if not scale:
            yield Finding("error", "qparam-not-constant", f"{node.label} has no scale input", (node.name,))
        elif scale not in ix.constants:
            yield Finding("error", "qparam-not-constant", f"{node.label} scale {ix.origin(scale)} is not a dense "
                          "constant; TensorRT needs constant scales", (node.name,))
        if zero_point and zero_point not in ix.constants:
            yield Finding("error", "qparam-not-constant", f"{node.label} zero point {ix.origin(zero_point)} is not a "
                          "dense constant; TensorRT needs constant zero points", (node.name,))


def _quantized_dtype(ix: _Index, node: _Node) -> int | None:
    """The integer type a Q/DQ uses: its zero point's, else a Q's ``output_dtype`` (uint8 when neither is given),
    else a DQ's constant data's; ``None`` when not known from constants."""
    zero_point = ix.const(node.input(2))
    if zero_point is not None:
        return zero_point.dtype
    if node.input(2):
        return None
    if node.is_q:
        return int(node.attr("output_dtype", 0) or TensorProto.UINT8)
    data = ix.const(node.input(0))
    return data.dtype if data is not None else None


def _check_zero_points(ix: _Index) -> Iterator[Finding]:
    for node in ix.nodes:
        if not ((node.is_q or node.is_dq) and ix.defines_quantization(node)):
            continue
        if node.is_q and not node.input(2) and not node.attr("output_dtype"):
            yield Finding("error", "zero-point-missing", f"{node.label} has no zero point (nor output_dtype), so it "
                          "outputs uint8; TensorRT needs an int8 zero point", (node.name,))
            continue
        dtype = _quantized_dtype(ix, node)
        if dtype == TensorProto.FLOAT8E4M3FN and ix.opset is not None and ix.opset < FP8_MIN_OPSET:
            yield Finding("error", "zero-point-dtype", f"{node.label} quantizes to float8e4m3fn, which Q/DQ take "
                          f"from opset {FP8_MIN_OPSET} on; the model uses opset {ix.opset}", (node.name,))
        elif dtype is not None and dtype not in (TensorProto.INT8, TensorProto.FLOAT8E4M3FN):
            yield _zero_point_dtype_finding(ix, node, dtype)
        zero_point = ix.const(node.input(2))
        if zero_point is not None:
            values = zero_point.floats()
            if np.any(values != 0):
                yield Finding("error", "zero-point-nonzero", f"{node.label} zero point '{node.input(2)}' is "
                              f"{_fmt_values(values)}; TensorRT supports symmetric quantization only (zero point 0)",
                              (node.name,))


def _zero_point_dtype_finding(ix: _Index, node: _Node, dtype: int) -> Finding:
    name = _dtype_name(dtype)
    if dtype == TensorProto.INT4 and node.is_dq and node.input(0) in ix.constants:
        others = sorted({reader.label for reader, _ in ix.consumers.get(node.output(0), [])
                         if reader.op not in ("MatMul", "Gemm")})
        if others:
            return Finding("error", "zero-point-dtype", f"{node.label} dequantizes int4 weights '{node.input(0)}' for "
                           f"{', '.join(others)}; TensorRT runs int4 weight-only quantization on MatMul/Gemm only "
                           "(convolutions take INT8 or FP8)", (node.name,))
        return Finding("warning", "zero-point-dtype", f"{node.label} dequantizes int4 weights "
                       f"'{node.input(0)}': weight-only int4 needs TensorRT 10 and MatMul/Gemm", (node.name,))
    return Finding("error", "zero-point-dtype", f"{node.label} quantizes to {name}; TensorRT's explicit INT8 "
                   "quantization needs int8 zero points", (node.name,))


def _check_scales(ix: _Index) -> Iterator[Finding]:
    for node in ix.nodes:
        if not ((node.is_q or node.is_dq) and ix.defines_quantization(node)):
            continue
        scale = ix.const(node.input(1))
        if scale is None:
            continue  # reported by qparam-not-constant
        yield from _scale_dtype_findings(node, scale)
        yield from _scale_value_findings(node, scale)
        if ix.is_blocked(node):
            problem = _blocked_shape_problem(ix, node, scale)
            if problem:
                yield Finding("error", "blocked-quantization", f"{node.label} blocked scale '{scale.name}' does not "
                              f"fit: {problem}", (node.name,))
            else:
                yield Finding("info", "blocked-quantization", f"{node.label} uses blocked quantization (block_size="
                              f"{node.attr('block_size')}); TensorRT 10 takes it for weight-only int4 DQ on "
                              "MatMul/Gemm", (node.name,))
        elif scale.size > 1 and ix.weight_of(node) is None:
            yield Finding("error", "per-channel-activation", f"{node.label} quantizes the activation "
                          f"{ix.origin(node.input(0))} with {scale.size} scales (axis {node.attr('axis', 1)}); "
                          "TensorRT quantizes activations per tensor only", (node.name,))


def _blocked_shape_problem(ix: _Index, node: _Node, scale: _Const) -> str:
    """What is wrong with a blocked scale's shape (empty when it fits the data, or when the data is not constant)."""
    data = ix.const(node.input(0)) if node.is_dq else None
    if data is None:
        return ""
    shape, block = tuple(data.shape), int(node.attr("block_size"))
    axis = _axis(node, len(shape))
    if not 0 <= axis < len(shape):
        return f"axis {axis} is outside the data's rank {len(shape)}"
    want = tuple(-(-n // block) if d == axis else n for d, n in enumerate(shape))
    if tuple(scale.shape) != want:
        return (f"data {list(shape)} in blocks of {block} along axis {axis} needs a scale of shape {list(want)}, "
                f"it is {list(scale.shape)}")
    return ""


def _scale_dtype_findings(node: _Node, scale: _Const) -> Iterator[Finding]:
    if scale.dtype == TensorProto.FLOAT:
        return
    shown = tuple(scale.floats()) if scale.size == 1 else ()
    if scale.dtype in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
        yield Finding("warning", "scale-dtype", f"{node.label} scale '{scale.name}' is {_dtype_name(scale.dtype)}; "
                      "TensorRT 10 takes it, older versions need float32 scales", (node.name,), shown)
    else:
        yield Finding("error", "scale-dtype", f"{node.label} scale '{scale.name}' is {_dtype_name(scale.dtype)}; "
                      "TensorRT needs float32 scales", (node.name,), shown)


def _scale_value_findings(node: _Node, scale: _Const) -> Iterator[Finding]:
    values = scale.floats()
    bad = values[~(np.isfinite(values) & (values > 0))]
    if bad.size:
        of = f" ({bad.size} of {values.size} values)" if values.size > 1 else ""
        yield Finding("error", "scale-value", f"{node.label} scale '{scale.name}' has {_fmt_values(bad)}{of}; "
                      "TensorRT needs finite scales > 0", (node.name,), tuple(bad[:_SHOW_VALUES]))
    # 1 / scale (what QuantizeLinear multiplies by) is Inf in float32 below 1 / FLT_MAX: every input saturates
    tiny = values[np.isfinite(values) & (values > 0) & (values < 1.0 / float(np.finfo(np.float32).max))]
    if tiny.size:
        of = f" ({tiny.size} of {values.size} values)" if values.size > 1 else ""
        yield Finding("error", "scale-value", f"{node.label} scale '{scale.name}' has {_fmt_values(tiny)}{of}, whose "
                      "reciprocal overflows float32 (Inf); raise the amax", (node.name,), tuple(tiny[:_SHOW_VALUES]))


def _expected_weight_axis(reader: _Node, slot: int, rank: int) -> tuple[int, str, str] | None:
    """``(axis, severity, why)`` TensorRT wants for a per-channel weight that ``reader`` reads at input ``slot``."""
    if reader.op == "Conv" and slot == 1:
        return 0, "error", "TensorRT takes per-channel Conv weight scales along output channels (axis 0)"
    if reader.op == "ConvTranspose" and slot == 1:
        return 0, "error", ("TensorRT's deconvolution kernels expect per-channel scales along axis 0 (C_in of the "
                            "(C_in, C_out/group, k...) weight) and reject axis 1")
    if reader.op == "Gemm" and slot == 1:
        axis = 0 if reader.attr("transB", 0) else 1
        return axis, "warning", f"the output features of Gemm's B are axis {axis} (transB={reader.attr('transB', 0)})"
    if reader.op == "MatMul" and slot == 1 and rank >= 1:
        return rank - 1, "warning", "the output features of MatMul's weight are its last axis"
    return None


def _check_per_channel_weights(ix: _Index) -> Iterator[Finding]:
    for dq in ix.dqs:
        weight = ix.weight_of(dq)
        scale = ix.const(dq.input(1))
        if weight is None or scale is None or scale.size <= 1 or ix.is_blocked(dq):
            continue
        shape = ix.constants[weight].shape
        axis = _axis(dq, len(shape))
        problem = _per_channel_shape_problem(shape, scale, axis)
        if problem:
            yield Finding("error", "per-channel-shape", f"{dq.label} per-channel scale '{scale.name}' does not fit "
                          f"weight '{weight}' {list(shape)}: {problem}", (dq.name,))
            continue
        for reader, slot in ix.consumers.get(dq.output(0), []):
            expected = _expected_weight_axis(reader, slot, len(shape))
            if expected is not None and expected[0] != axis:
                want, severity, why = expected
                yield Finding(severity, "per-channel-axis", f"{dq.label} quantizes weight '{weight}' of "
                              f"{reader.label} along axis {axis}, expected axis {want}: {why}", (dq.name, reader.name))


def _per_channel_shape_problem(shape: tuple[int, ...], scale: _Const, axis: int) -> str:
    if not 0 <= axis < len(shape):
        return f"axis {axis} is outside the weight's rank {len(shape)}"
    if len(scale.shape) != 1:
        return f"a per-channel scale must be 1-D, it is {list(scale.shape)}"
    if scale.shape[0] != shape[axis]:
        return f"{scale.shape[0]} scales for {shape[axis]} channels along axis {axis}"
    return ""


def _is_weight_only(ix: _Index, dq: _Node) -> bool:
    """An int4 DQ of constant weights: weight-only quantization, whose activations stay in float on purpose."""
    return ix.weight_of(dq) is not None and _quantized_dtype(ix, dq) == TensorProto.INT4


def _check_compute_layers(ix: _Index) -> Iterator[Finding]:
    for node in ix.nodes:
        if node.op not in _COMPUTE_OPS or not node.in_default_domain:
            continue
        data, weight = node.input(0), node.input(1)
        sources = (ix.dq_source(data), ix.dq_source(weight))
        if any(dq is not None and _is_weight_only(ix, dq) for dq in sources):
            continue  # int4 weight-only quantization: reported by zero-point-dtype
        types = [_quantized_dtype(ix, dq) for dq in sources if dq is not None]
        if len(types) == 2 and None not in types and types[0] != types[1]:
            yield Finding("error", "format-mix", f"{node.label} reads {_dtype_name(types[0])} data and "
                          f"{_dtype_name(types[1])} weights; TensorRT runs a layer in INT8 or in FP8 with both inputs "
                          "in that type", (node.name,))
        if (sources[0] is None) != (sources[1] is None):
            quantized, plain = (data, weight) if sources[0] is not None else (weight, data)
            yield Finding("error", "half-quantized", f"{node.label} reads '{quantized}' from a DequantizeLinear but "
                          f"{ix.origin(plain)} without one: half-quantized; TensorRT runs it in high precision and "
                          "cannot fuse its Q/DQ", (node.name,))
        elif sources[0] is None and ix.quantized:
            yield Finding("info", "float-layer", f"{node.label} has no DequantizeLinear on its inputs and runs in "
                          "float/fp16 (fine if the layer is skipped on purpose)", (node.name,))


def _fp8_conv_problem(ix: _Index, conv: _Node, weight_dq: _Node | None) -> str | None:
    """Why TensorRT has no FP8 kernel for ``conv`` (its weight's shape and ``group``), or ``None``."""
    weight = ix.weight_of(weight_dq) if weight_dq is not None else None
    if weight is None:
        weight = conv.input(1) if conv.input(1) in ix.constants else None
    if weight is None or len(ix.constants[weight].shape) < 3:
        return None
    shape = ix.constants[weight].shape
    group = int(conv.attr("group", 1) or 1)
    if conv.op == "Conv":  # (C_out, C_in / group, k...)
        out_channels, per_group = shape[0], shape[1]
    else:  # ConvTranspose: (C_in, C_out / group, k...)
        out_channels, per_group = shape[1] * group, shape[0] // group
    in_channels = per_group * group
    area = math.prod(shape[2:])
    if group > 1 and per_group == 1:
        return (f"depthwise (group {group} = {in_channels} channels); TensorRT's FP8 convolutions need more than "
                f"{FP8_MIN_CHANNELS} input channels per group")
    if per_group <= FP8_MIN_CHANNELS:
        return (f"{per_group} input channels per group; TensorRT's FP8 convolutions need more than "
                f"{FP8_MIN_CHANNELS}")
    if out_channels <= FP8_MIN_CHANNELS:
        return f"{out_channels} output channels; TensorRT's FP8 convolutions need more than {FP8_MIN_CHANNELS}"
    if area > FP8_MAX_KERNEL_AREA:
        return f"a {area}-element kernel; TensorRT's FP8 convolutions take at most {FP8_MAX_KERNEL_AREA}"
    return None


def _check_fp8_layers(ix: _Index) -> Iterator[Finding]:
    for node in ix.nodes:
        if node.op not in ("Conv", "ConvTranspose") or not node.in_default_domain:
            continue
        sources = (ix.dq_source(node.input(0)), ix.dq_source(node.input(1)))
        if not any(dq is not None and _quantized_dtype(ix, dq) == TensorProto.FLOAT8E4M3FN for dq in sources):
            continue
        why = _fp8_conv_problem(ix, node, sources[1])
        if why is not None:
            yield Finding("warning", "fp8-layer", f"{node.label} has FP8 (float8e4m3fn) Q/DQ but TensorRT has no FP8 "
                          f"kernel for it: {why}; it runs in higher precision with reformats around it; quantize "
                          "it in INT8 or leave it float (qdq.set_model_format(model, 'fp8') does)", (node.name,))


def _scale_groups(ix: _Index) -> tuple[UnionFind, dict[str, list[_Node]]]:
    """Tensors joined by scale-preserving ops, and the joining nodes of each group (keyed by the group's root)."""
    groups = UnionFind()
    joins: list[tuple[str, _Node]] = []
    for node in ix.nodes:
        if node.op == "Concat" and node.in_default_domain and node.output(0):
            members = [t for t in node.inputs if t] + [node.output(0)]
        elif ix.passes_scale(node, node.output(0)):
            members = [node.input(0)] + [t for t in node.outputs if t and ix.passes_scale(node, t)]
        else:
            continue
        for tensor in members[1:]:
            groups.union(members[0], tensor)
        joins.append((members[0], node))
    joined: dict[str, list[_Node]] = defaultdict(list)
    for tensor, node in joins:
        joined[groups.find(tensor)].append(node)
    return groups, joined


def quantize_groups(model: PathOrModel) -> list[list[str]]:
    """Names of the QuantizeLinear nodes that TensorRT needs to share one scale, group by group.

    Two Q nodes belong together when they read tensors of one scale group (tensors joined by Concat and by the ops
    that commute with per-tensor quantization, as in the ``scale-mismatch`` rule), when they read the same tensor
    (``fanout-scale``), when one reads a tensor of a group that a DQ fed by the other produces, or when their Q/DQ
    pairs feed the two inputs of one Add (``add-scale-mismatch``). Per-channel (weight) Q nodes never join. Groups
    of one are left out; each group lists its nodes in graph order. The scale-matching rules
    (:mod:`qdq.onnx.rules`) use these groups to make quantizers share.
    """
    onnx_model, base_dir = _load(model)
    ix = _Index(onnx_model, base_dir)
    tensor_groups, _ = _scale_groups(ix)
    qgroups = UnionFind()
    per_tensor = [q for q in ix.qs if (ix.scale_size(q) or 1) == 1]
    anchor: dict[str, str] = {}  # tensor group root -> first Q node of the group

    def join(root: str, q: _Node) -> None:
        if root in anchor:
            qgroups.union(anchor[root], q.name)
        else:
            anchor[root] = q.name
            qgroups.find(q.name)

    for q in per_tensor:
        join(tensor_groups.find(q.input(0)), q)
    for dq in ix.dqs:
        q = ix.q_of(dq)
        if q is not None and (ix.scale_size(q) or 1) == 1:
            join(tensor_groups.find(dq.output(0)), q)
    for node in ix.nodes:
        if node.op == "Add" and node.in_default_domain and len(node.inputs) == 2:
            sources = [ix.dq_source(t) for t in node.inputs]
            qs = [ix.q_of(dq) if dq is not None else None for dq in sources]
            if all(q is not None and (ix.scale_size(q) or 1) == 1 for q in qs):
                qgroups.union(qs[0].name, qs[1].name)
    order = {q.name: i for i, q in enumerate(ix.qs)}
    members: dict[str, list[str]] = defaultdict(list)
    for q in per_tensor:
        members[qgroups.find(q.name)].append(q.name)
    groups = [sorted(set(names), key=order.__getitem__) for names in members.values()]
    return sorted((g for g in groups if len(g) > 1), key=lambda g: order[g[0]])


def _check_scale_groups(ix: _Index) -> Iterator[Finding]:
    groups, joined = _scale_groups(ix)
    members: dict[str, list[tuple[_Node, float]]] = defaultdict(list)
    fanout: dict[str, list[tuple[_Node, float]]] = defaultdict(list)
    for node in ix.nodes:
        scale = ix.per_tensor_scale(node) if (node.is_q or node.is_dq) else None
        if scale is None:
            continue
        tensor = node.input(0) if node.is_q else node.output(0)
        root = groups.find(tensor)
        if root in joined:
            members[root].append((node, scale))
        elif node.is_q:
            fanout[tensor].append((node, scale))
    for root, ops in joined.items():
        found = members.get(root, [])
        count = len(_distinct(s for _, s in found))
        if count > 1:
            names = ", ".join(op.label for op in ops)
            yield Finding("warning", "scale-mismatch", f"the Q/DQ around {names} use {count} scales "
                          f"({_qdq_list(found)}); TensorRT fuses them only with one shared scale and adds "
                          "requantize/reformat layers otherwise", tuple(n.name for n, _ in found),
                          tuple(s for _, s in found))
    for tensor, readers in fanout.items():
        if len(_distinct(s for _, s in readers)) > 1:
            yield Finding("warning", "fanout-scale", f"tensor '{tensor}' is read by {len(readers)} QuantizeLinear "
                          f"nodes with different scales ({_qdq_list(readers)}); each extra scale quantizes the same "
                          "data again", tuple(n.name for n, _ in readers), tuple(s for _, s in readers))


def _comes_from_conv(ix: _Index, tensor: str) -> bool:
    node = ix.producer.get(tensor)
    if node is not None and node.op == "BatchNormalization":
        node = ix.producer.get(node.input(0))
    return node is not None and node.op == "Conv"


def _check_residual_adds(ix: _Index) -> Iterator[Finding]:
    for add in ix.nodes:
        if (add.op != "Add" or not add.in_default_domain or len(add.inputs) != 2
                or add.name in ix.attention_scores):
            continue
        a, b = add.inputs
        if a not in ix.activations or b not in ix.activations:  # a bias, a constant or a mask built from shapes
            continue
        dq_a, dq_b = ix.dq_source(a), ix.dq_source(b)
        if dq_a is not None and dq_b is not None:
            yield from _add_scale_findings(ix, add, dq_a, dq_b)
        elif dq_a is not None or dq_b is not None:
            other = b if dq_a is not None else a
            if not _comes_from_conv(ix, other):
                yield Finding("info", "add-one-side", f"{add.label} has one input from a DequantizeLinear and "
                              f"{ix.origin(other)}, not a Conv output; TensorRT fuses a residual add into a Conv "
                              "(optionally through BatchNormalization) only", (add.name,))
        elif ix.quantized:
            yield Finding("warning", "add-float", f"{add.label} adds '{a}' and '{b}', neither from a DequantizeLinear;"
                          " the add runs in float, with reformats around it (quantize one input: "
                          "qdq.onnx.placement)", (add.name,))


def _add_scale_findings(ix: _Index, add: _Node, dq_a: _Node, dq_b: _Node) -> Iterator[Finding]:
    sa, sb = ix.per_tensor_scale(dq_a), ix.per_tensor_scale(dq_b)
    if sa is not None and sb is not None and len(_distinct((sa, sb))) > 1:
        yield Finding("warning", "add-scale-mismatch", f"{add.label} adds inputs dequantized with different scales "
                      f"({dq_a.label} {_fmt(sa)}, {dq_b.label} {_fmt(sb)}); TensorRT rescales one before adding "
                      "in INT8", (add.name, dq_a.name, dq_b.name), (sa, sb))


def _check_attention(ix: _Index) -> Iterator[Finding]:
    from qdq.onnx.check_attention import check_attention

    return check_attention(ix)


def _check_coverage(ix: _Index) -> Iterator[Finding]:
    if not ix.quantized and not any(_is_unsupported_quant_op(n) for n in ix.nodes):
        yield Finding("info", "no-qdq", "the model has no QuantizeLinear/DequantizeLinear nodes; TensorRT builds it "
                      "in float/fp16")
    for node in ix.nodes:
        if node.has_subgraph:
            yield Finding("info", "subgraph", f"{node.label} has subgraphs; only the main graph is checked",
                          (node.name,))


_CHECKS: tuple[Callable[[_Index], Iterable[Finding]], ...] = (
    _check_opset,
    _check_unsupported_ops,
    _check_q_consumers,
    _check_dq_inputs,
    _check_qparams_constant,
    _check_zero_points,
    _check_scales,
    _check_per_channel_weights,
    _check_compute_layers,
    _check_fp8_layers,
    _check_scale_groups,
    _check_residual_adds,
    _check_attention,
    _check_coverage,
)


# --------------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------------


def read_onnx(path: str | os.PathLike, caller: str = "check_tensorrt",
              load_external_data: bool = False) -> onnx.ModelProto:
    """The ONNX file at ``path``; a clear error for a missing, unreadable, empty or non-ONNX file.

    ``caller`` names the function in the error for an argument that is no path.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{caller} takes a path or an onnx.ModelProto, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not an ONNX file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"ONNX model {str(path)!r} {what}")
    try:
        proto = onnx.load(str(path), load_external_data=load_external_data)
    except OSError as exc:
        raise OSError(f"cannot read ONNX model {str(path)!r}: {exc.strerror or exc}") from exc
    except Exception as exc:  # protobuf decode errors have no common base class
        raise ModelReadError(f"{str(path)!r} is not an ONNX model: {exc}") from exc
    if not proto.HasField("graph"):
        raise ModelReadError(f"{str(path)!r} is not an ONNX model: it has no graph")
    return proto


def _load(model: PathOrModel) -> tuple[onnx.ModelProto, str]:
    """The model and the folder its external data lives in."""
    if isinstance(model, onnx.ModelProto):
        return model, ""
    return read_onnx(model), str(Path(model).parent)


def check_tensorrt(model: PathOrModel, strongly_typed: bool = False) -> list[Finding]:
    """Checks a QDQ ONNX model against TensorRT's explicit-quantization rules (see the module's table).

    Args:
        model: a path (``str`` or ``os.PathLike``) or an ``onnx.ModelProto``. External data is read, when a rule
            needs a value, from the model file's folder.
        strongly_typed: the engine is built strongly typed (TensorRT 11): also report a float32 remainder
            (``float32-remainder``).

    Returns:
        The findings: errors, then warnings, then info; within a severity in the order of :data:`RULES`, and within
        a rule in graph order. An empty list means TensorRT should build the model as quantized as it is.

    Raises:
        FileNotFoundError: no file at the path (the message names it).
        OSError: the file cannot be read.
        ModelReadError: the file, or a scale or zero point inside it, is not readable ONNX.

    Example:
        >>> check_tensorrt("missing.onnx")
        Traceback (most recent call last):
        ...
        FileNotFoundError: ONNX model 'missing.onnx' does not exist
    """
    proto, base_dir = _load(model)
    ix = _Index(proto, base_dir)
    findings = [finding for check in _CHECKS for finding in check(ix)]
    if strongly_typed:
        from qdq.onnx.check_precision import check_float32_remainder, strongly_typed_scale_dtype

        findings = [f for f in findings if strongly_typed_scale_dtype(f)] + list(check_float32_remainder(ix))
    rule_order = {rule: i for i, rule in enumerate(RULES)}
    findings.sort(key=lambda f: (SEVERITIES.index(f.severity), rule_order[f.rule]))
    counts = Counter(f.severity for f in findings)
    logger.info("TensorRT check of %d nodes: %d errors, %d warnings, %d info", len(ix.nodes), counts["error"],
                counts["warning"], counts["info"])
    return findings


def format_findings(findings: Sequence[Finding], *, show_info: bool = True) -> str:
    """A report: one line per finding, then a summary line such as ``1 error, 2 warnings, 0 info``.

    Args:
        findings: what :func:`check_tensorrt` returned.
        show_info: list info findings too (they are always counted in the summary).

    Example:
        >>> print(format_findings([Finding("info", "no-qdq", "no Q/DQ")]))
        INFO    no-qdq: no Q/DQ
        0 errors, 0 warnings, 1 info
        >>> print(format_findings([Finding("info", "no-qdq", "no Q/DQ")], show_info=False))
        0 errors, 0 warnings, 1 info (hidden)
    """
    lines = [str(f) for f in findings if show_info or f.severity != "info"]
    counts = Counter(f.severity for f in findings)
    summary = f"{_plural(counts['error'], 'error')}, {_plural(counts['warning'], 'warning')}, {counts['info']} info"
    if counts["info"] and not show_info:
        summary += " (hidden)"
    return "\n".join(lines + [summary])


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m qdq.onnx.check model.onnx [--quiet]``.

    Prints the report and returns 1 when there is an error finding, 0 otherwise; 2, with a one-line message on
    stderr, when the file cannot be read (or the arguments are wrong).

    Example:
        >>> main(["missing.onnx"])
        2
    """
    parser = argparse.ArgumentParser(
        prog="python -m qdq.onnx.check",
        description="Check a QDQ ONNX model against TensorRT's explicit-quantization rules.",
    )
    parser.add_argument("model", help="path of the .onnx file")
    parser.add_argument("-q", "--quiet", action="store_true", help="list errors and warnings only (info hidden)")
    parser.add_argument("--strongly-typed", action="store_true",
                        help="the engine is built strongly typed (TensorRT 11): warn about a float32 remainder")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: argparse has printed what to say
        return exc.code if isinstance(exc.code, int) else 2
    try:
        findings = check_tensorrt(args.model, strongly_typed=args.strongly_typed)
    except (OSError, ModelReadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_findings(findings, show_info=not args.quiet))
    return 1 if any(f.severity == "error" for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
