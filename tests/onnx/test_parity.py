"""qdq.onnx.parity: verify on files whose scales are Constant nodes (files from other tools)."""

import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

import qdq
from qdq.onnx import export_onnx, verify


def _with_constant_node_qparams(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every scale and zero point moved from an initializer into a Constant node."""
    graph = model.graph
    qparams = {name for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for name in n.input[1:]}
    moved = [init for init in graph.initializer if init.name in qparams]
    keep = [init for init in graph.initializer if init.name not in qparams]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    constants = [helper.make_node("Constant", [], [init.name], value=init) for init in moved]
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(constants + nodes)
    return model


def test_verify_reads_constant_node_scales(tmp_path):
    """Regression: verify raised KeyError on '.../Constant_1_output_0' for files whose scales are Constant nodes."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    qdq.replace_to_quantization_module(model)
    qdq.calibrate_model(model, [torch.randn(16, 8)], progress=False)
    info = export_onnx(model, torch.randn(1, 8), tmp_path / "m.onnx", dynamic_batch=True)
    converted = _with_constant_node_qparams(info.model)
    assert not any(i.name for i in converted.graph.initializer if "scale" in i.name.lower())
    report = verify(model, converted, torch.randn(5, 8))
    assert report.ok and report.rounding.num_quantizers == 2, str(report)


def test_verify_names_a_computed_scale():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    inits = [numpy_helper.from_array(torch.tensor(0.1).numpy(), "s0"),
             numpy_helper.from_array(torch.tensor(0, dtype=torch.int8).numpy(), "zp")]
    nodes = [helper.make_node("Identity", ["s0"], ["s"], name="computed"),
             helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s0", "zp"], ["y"], name="dq")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 10
    with pytest.raises(ValueError, match="QuantizeLinear 'q'.*not a constant"):
        verify(nn.Identity(), model, torch.randn(2))
