"""The checker's rule for strongly typed builds: ``float32-remainder``.

TensorRT 11 builds every Q/DQ network strongly typed: a layer runs in the type the ONNX file gives its tensors, and
no ``--fp16`` flag lowers the float32 ones. A QDQ file exported in float32 therefore builds its unquantized layers in
FP32, slower than the FP16 engine users compare against. With ``check_tensorrt(model, strongly_typed=True)`` (``qdq
check --strongly-typed``) the checker reports, in one warning, the layers that compute in float32 (their output is a
float32 tensor: DequantizeLinear nodes with float32 scales, and the float layers after them), leaving out Casts (the
float32 graph inputs and outputs of :mod:`qdq.onnx.float16` files) and integer shape arithmetic. The fix is
``export_onnx(..., float_dtype=torch.float16)``.

Example:
    >>> import numpy as np
    >>> from onnx import TensorProto, helper
    >>> from qdq.onnx.check import check_tensorrt
    >>> nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    >>> io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("x", "y")]
    >>> model = helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:]),
    ...                           opset_imports=[helper.make_opsetid("", 19)])
    >>> [f.rule for f in check_tensorrt(model, strongly_typed=True)]
    ['float32-remainder', 'no-qdq']
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Iterator

import onnx
from onnx import TensorProto

from qdq.onnx.value_types import value_types

if TYPE_CHECKING:
    from qdq.onnx.check import Finding, _Index

__all__ = ["check_float32_remainder", "float32_nodes", "strongly_typed_scale_dtype"]

logger = logging.getLogger(__name__)

_EXEMPT = ("Cast", "CastLike", "QuantizeLinear", "Constant", "Shape", "Size")


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    types = value_types(model, "float32-remainder reads the types the file declares")
    return {name: t.elem_type for name, t in types.items()}


def float32_nodes(ix: "_Index") -> list:
    """The nodes of the main graph whose first output is a float32 tensor (Casts and Q nodes left out)."""
    types = _elem_types(ix.model)
    return [node for node in ix.nodes if node.op not in _EXEMPT and node.outputs and node.output(0) and
            node.output(0) not in ix.constants and types.get(node.output(0)) == TensorProto.FLOAT]


def check_float32_remainder(ix: "_Index") -> Iterator["Finding"]:
    from qdq.onnx.check import Finding

    nodes = float32_nodes(ix)
    if not nodes:
        return
    ops = ", ".join(f"{count} {op}" for op, count in Counter(n.op for n in nodes).most_common(6))
    examples = ", ".join(n.label for n in nodes[:3])
    yield Finding("warning", "float32-remainder",
                  f"{len(nodes)} nodes compute in float32 ({ops}; e.g. {examples}); TensorRT 11 builds a strongly "
                  "typed network in the file's types, so they run in FP32, not FP16: export with "
                  "export_onnx(..., float_dtype=torch.float16)", tuple(n.name for n in nodes))


def strongly_typed_scale_dtype(finding: "Finding") -> bool:
    """Whether a finding stands in a strongly typed build: a ``scale-dtype`` warning about float16/bfloat16 scales
    does not (such scales are what makes a DequantizeLinear output float16 there); every other finding does."""
    return not (finding.rule == "scale-dtype" and finding.severity == "warning")
