import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.onnx.value_types import ValueType, value_types


def _model(dims=(2, 3)):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", dims[1]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)
    w = numpy_helper.from_array(np.ones((dims[1], 5), np.float16), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    return helper.make_model(helper.make_graph([node], "g", [x], [y], [w]))


def test_inferred_types_and_shapes_with_symbolic_dimensions():
    types = value_types(_model())
    assert types["x"] == ValueType(TensorProto.FLOAT16, [None, 3])
    assert types["w"] == ValueType(TensorProto.FLOAT16, [3, 5])
    assert types["y"] == ValueType(TensorProto.FLOAT16, [None, 5])  # inferred, the file declares no shape


def test_failed_inference_raises_or_logs_and_reads_the_declared_types(caplog, monkeypatch):
    def fail(model):
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] an invalid node")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", fail)
    with pytest.raises(onnx.shape_inference.InferenceError, match="an invalid node"):
        value_types(_model())
    with caplog.at_level(logging.INFO, logger="qdq.onnx.value_types"):
        types = value_types(_model(), "shapes are what the file declares", logging.INFO)
    assert "an invalid node" in caplog.text and "shapes are what the file declares" in caplog.text
    assert types["x"] == ValueType(TensorProto.FLOAT16, [None, 3]) and types["y"] == ValueType(TensorProto.FLOAT16, [])
    assert types["w"] == ValueType(TensorProto.FLOAT16, [3, 5])
