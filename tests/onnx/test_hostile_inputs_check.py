"""check_tensorrt on scales whose reciprocal overflows float32."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.onnx.check import check_tensorrt


def _qdq_graph(scale):
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("scale", [1e-42, 1e-39, 2.9e-39])
def test_scale_whose_reciprocal_overflows_is_an_error(scale):
    """Regression: check_tensorrt was quiet about a scale of 1e-42, whose reciprocal is Inf in float32."""
    with np.errstate(over="ignore"):
        assert np.isinf(np.float32(1) / np.float32(scale))
    findings = [f for f in check_tensorrt(_qdq_graph(scale)) if f.rule == "scale-value"]
    assert findings and all(f.severity == "error" for f in findings)
    assert "reciprocal overflows float32" in findings[0].message and "'s'" in findings[0].message


@pytest.mark.parametrize("scale", [3e-39, 1e-30, 0.01])
def test_small_but_invertible_scales_pass(scale):
    assert np.isfinite(np.float32(1) / np.float32(scale))
    assert not [f for f in check_tensorrt(_qdq_graph(scale)) if f.rule == "scale-value"]
