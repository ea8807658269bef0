"""The element type and shape of every tensor of an ONNX graph, from ONNX shape inference.

One reader for the graph side's rules that need types or shapes (the fusion predictor's FLOPs, the attention and
precision rules of the checker, the float16 conversion).

>>> import onnx
>>> from onnx import TensorProto, helper
>>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
>>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
>>> model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
>>> value_types(model)["y"]
ValueType(elem_type=1, dims=[1, 4])
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import onnx

__all__ = ["ValueType", "value_types"]

logger = logging.getLogger(__name__)


class ValueType(NamedTuple):
    elem_type: int  # onnx.TensorProto.FLOAT, ...; 0 where unknown
    dims: list[int | None]  # None for a dimension of unknown or symbolic size


def value_types(model: onnx.ModelProto, on_failure: str | None = None,
                level: int = logging.WARNING) -> dict[str, ValueType]:
    """``{tensor name: ValueType}`` for the inputs, outputs, intermediate values and initializers of the main graph.

    Where shape inference fails, ``on_failure`` None raises its error; otherwise the message is logged at ``level``
    (with the error) and the types the file itself declares are used.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # onnx raises several kinds (InferenceError, ValidationError, ...)
        if on_failure is None:
            raise
        logger.log(level, "shape inference failed (%s); %s", exc, on_failure)
        inferred = model
    graph = inferred.graph
    out: dict[str, ValueType] = {}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        if not info.type.HasField("tensor_type"):
            continue
        t = info.type.tensor_type
        out[info.name] = ValueType(t.elem_type, [d.dim_value if d.HasField("dim_value") else None
                                                 for d in t.shape.dim])
    for init in model.graph.initializer:
        out[init.name] = ValueType(init.data_type, list(init.dims))
    return out
