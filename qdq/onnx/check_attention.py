"""TensorRT rules for attention blocks, part of :func:`qdq.onnx.check_tensorrt`.

TensorRT fuses ``MatMul(Q, K^T) -> [Mul/Div scale] -> [Add mask] -> Softmax -> MatMul(., V)`` into one attention
kernel. It runs that kernel in INT8 only when both MatMuls (BMM1 and BMM2) read every input from a
DequantizeLinear, the mask Add and the softmax stay in float (the softmax output is quantized as BMM2's input), the
sequence length is at most 512 and the MatMuls' K and N (head size, key length) are at least 16.

==================  ========  =======================================================================================
rule                severity  what it checks - why TensorRT cares
==================  ========  =======================================================================================
``attention-pair``  warning   BMM1 and BMM2 of one attention are both quantized or both float - with one of each,
                              TensorRT cannot run the fused attention in INT8 and runs the float one unfused with
                              reformats around it. (A MatMul with one of its two inputs quantized is reported as
                              ``half-quantized``.)
``attention-mask``  warning   No Q/DQ between BMM1 and the Softmax, and the mask added to the scores does not come
                              from a DequantizeLinear - the fused kernel takes the scores and the mask in float.
``attention-shape`` warning   A quantized attention has sequence length <= 512 and head size and key length >= 16
                              (where the shapes are known) - otherwise TensorRT's INT8 fused attention does not apply.
==================  ========  =======================================================================================

The attention is found from each Softmax: BMM1 is the MatMul reached backwards through Mul, Div, Add, Sub, Where,
Cast, Reshape, Unsqueeze, Squeeze and Q/DQ nodes (Swin reshapes the scores around its shifted-window mask), BMM2 the MatMul reading the Softmax output (through Dropout, Cast and Q/DQ) as its first input.
A quantized MatMul is one whose two inputs come from DequantizeLinear nodes, directly or through the ops TensorRT
moves a DQ across (Transpose of K included). Shapes come from ONNX shape inference; unknown (dynamic) dimensions
are not judged.

Example:
    >>> ATTENTION_RULES
    ('attention-pair', 'attention-mask', 'attention-shape')
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator


from qdq.onnx.value_types import value_types

__all__ = ["ATTENTION_RULES", "check_attention", "find_attentions", "Attention"]

logger = logging.getLogger(__name__)

#: The attention rule ids, in the order of the table.
ATTENTION_RULES = ("attention-pair", "attention-mask", "attention-shape")

_SCORE_OPS = ("Mul", "Div", "Add", "Sub", "Where", "Cast", "Reshape", "Unsqueeze", "Squeeze", "QuantizeLinear",
              "DequantizeLinear")
_DATA_ONLY = ("QuantizeLinear", "DequantizeLinear", "Cast", "Reshape", "Unsqueeze", "Squeeze")
_PROB_OPS = ("Dropout", "Cast", "QuantizeLinear", "DequantizeLinear", "Identity")
_MAX_HOPS = 8
MAX_LENGTH = 512
MIN_DIM = 16


@dataclass
class Attention:
    """One attention found in the graph: its two MatMuls, its Softmax and the nodes between BMM1 and Softmax."""

    bmm1: object
    softmax: object
    bmm2: object
    between: tuple = ()


def _bmm1_of(ix, softmax) -> tuple[object, tuple] | None:
    """BMM1 and the nodes between it and the Softmax (depth-first through score ops)."""
    stack = [(softmax.input(0), ())]
    while stack:
        tensor, path = stack.pop()
        node = ix.producer.get(tensor)
        if node is None or len(path) > _MAX_HOPS:
            continue
        if node.op == "MatMul":
            return node, path
        if node.op in _SCORE_OPS:
            inputs = node.inputs[:1] if node.op in _DATA_ONLY else node.inputs
            stack.extend((t, path + (node,)) for t in inputs if t and t not in ix.constants)
    return None


def _bmm2_of(ix, softmax):
    frontier = [softmax.output(0)]
    for _ in range(_MAX_HOPS):
        following = []
        for tensor in frontier:
            for node, slot in ix.consumers.get(tensor, []):
                if node.op == "MatMul" and slot == 0:
                    return node
                if node.op in _PROB_OPS and slot == 0:
                    following.append(node.output(0))
        frontier = following
    return None


def find_attentions(ix) -> list[Attention]:
    """Every Softmax with a BMM1 before it and a BMM2 after it."""
    found = []
    for node in ix.nodes:
        if node.op != "Softmax" or not node.in_default_domain:
            continue
        before = _bmm1_of(ix, node)
        bmm2 = _bmm2_of(ix, node)
        if before is not None and bmm2 is not None:
            found.append(Attention(before[0], node, bmm2, before[1]))
    return found


def _state(ix, matmul) -> str:
    count = sum(ix.dq_source(t) is not None for t in matmul.inputs[:2])
    return ("float", "half-quantized", "quantized")[count]


def _shapes(ix) -> dict[str, list]:
    model = getattr(ix, "model", None)
    if model is None:
        return {}
    types = value_types(model, "the attention rules judge the shapes the file declares", logging.INFO)
    return {name: t.dims for name, t in types.items()}


def _shape_problem(shapes, att: Attention) -> str:
    q, kt = shapes.get(att.bmm1.input(0)), shapes.get(att.bmm1.input(1))
    v = shapes.get(att.bmm2.input(1))
    if not q or not kt or len(q) < 2 or len(kt) < 2:
        return ""
    q_len, head, kv_len = q[-2], q[-1], kt[-1]
    v_dim = v[-1] if v else None
    lengths = [n for n in (q_len, kv_len) if n is not None]
    if lengths and max(lengths) > MAX_LENGTH:
        return f"sequence length {max(lengths)} > {MAX_LENGTH}"
    small = [f"{what} {n}" for what, n in (("head size", head), ("key length", kv_len), ("value size", v_dim))
             if n is not None and n < MIN_DIM]
    return f"{', '.join(small)} < {MIN_DIM}" if small else ""


def check_attention(ix) -> Iterator:
    """The attention findings of the indexed graph (called by :func:`qdq.onnx.check_tensorrt`)."""
    from qdq.onnx.check import Finding

    attentions = find_attentions(ix)
    shapes = _shapes(ix) if any(_state(ix, a.bmm1) == "quantized" for a in attentions) else {}
    for att in attentions:
        s1, s2 = _state(ix, att.bmm1), _state(ix, att.bmm2)
        names = (att.bmm1.name, att.softmax.name, att.bmm2.name)
        if s1 != s2:
            yield Finding("warning", "attention-pair", f"attention at {att.softmax.label}: BMM1 {att.bmm1.label} is "
                          f"{s1}, BMM2 {att.bmm2.label} is {s2}; TensorRT runs fused attention in INT8 only with "
                          "both MatMuls quantized (or leave both in float)", names)
        qdq = [n for n in att.between if n.op in ("QuantizeLinear", "DequantizeLinear")]
        masks = [n for n in att.between if n.op == "Add" and any(ix.dq_source(t) is not None for t in n.inputs)]
        if qdq or masks:
            what = ", ".join(n.label for n in qdq + masks)
            yield Finding("warning", "attention-mask", f"attention at {att.softmax.label}: {what} between BMM1 "
                          f"{att.bmm1.label} and the Softmax quantize the scores or the mask; TensorRT's fused "
                          "attention takes them in float (quantize the Softmax output instead)", names)
        if s1 == s2 == "quantized":
            problem = _shape_problem(shapes, att)
            if problem:
                yield Finding("warning", "attention-shape", f"attention at {att.softmax.label} is quantized but "
                              f"{problem}; TensorRT runs INT8 fused attention only for sequence length <= "
                              f"{MAX_LENGTH} and head size, key length >= {MIN_DIM}", names)
