"""An FP8 quantizer under torch.onnx.export with pytorch_quantization's switches (enable_onnx_export,
use_fb_fake_quant): FP8 Q/DQ in the file, the eager numbers of qdq's FP8 arithmetic."""

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from torch import nn

import qdq
from qdq import formats
from qdq.nn import QuantLinear, TensorQuantizer
from qdq.nn.modules.fp8_export import fp8_qdq
from qdq.tensor_quant import QuantDescriptor

FP8 = (4, 3)


def _model(axis=None, seed=0):
    torch.manual_seed(seed)
    kw = dict(quant_desc_input=QuantDescriptor(num_bits=FP8),
              quant_desc_weight=QuantDescriptor(num_bits=FP8, axis=axis))
    model = nn.Sequential(QuantLinear(16, 32, **kw), nn.ReLU(), QuantLinear(32, 8, **kw)).eval()
    x = torch.randn(16, 16)
    for q in (m for m in model.modules() if isinstance(m, TensorQuantizer)):
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        model(x)
    for q in (m for m in model.modules() if isinstance(m, TensorQuantizer)):
        q.load_calib_amax()
        q.disable_calib()
        q.enable_quant()
    return model, x


def _export(model, x, opset, dynamo=False):
    f = io.BytesIO()
    with qdq.enable_onnx_export():
        torch.onnx.export(model, (x,), f, opset_version=opset, dynamo=dynamo, input_names=["input"])
    return onnx.load_from_string(f.getvalue())


def _values(model, names):
    """The values of ``names`` (computed from initializers and constants only: the scales), run by ONNX Runtime."""
    producer = {out: node for node in model.graph.node for out in node.output}
    needed, todo = [], list(names)
    while todo:
        node = producer.get(todo.pop())
        if node is not None and node not in needed:
            needed.append(node)
            todo.extend(node.input)
    order = [n for n in model.graph.node if n in needed]
    outputs = [onnx.helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    graph = onnx.helper.make_graph(order, "scales", [], outputs, list(model.graph.initializer))
    sub = onnx.helper.make_model(graph, opset_imports=[o for o in model.opset_import if o.domain == ""],
                                 ir_version=model.ir_version)
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(None, {})))


def _quantizers(model):
    return [m for m in model.modules() if isinstance(m, TensorQuantizer)]


def test_eager_export_forward_is_fp8_not_integer_rounding():
    q = TensorQuantizer(QuantDescriptor(num_bits=FP8, amax=2.0))
    x = torch.linspace(-3, 3, 101)
    expected = formats.fake_fp8_quant(x, torch.tensor(2.0))
    q.set_export_mode(True)
    try:
        assert torch.equal(q(x), expected)
    finally:
        q.set_export_mode(False)
    with qdq.enable_onnx_export():
        assert torch.equal(q(x), expected)
        assert torch.equal(q(x.half()), formats.fake_fp8_quant(x.half().float(), torch.tensor(2.0)).half())
    assert torch.equal(q(x), expected)


def test_fp8_qdq_per_channel_scale_broadcasts_along_axis():
    x = torch.randn(3, 5)
    scale = torch.tensor([0.01, 0.02, 0.5])
    assert torch.equal(fp8_qdq(x, scale, axis=0), formats.fake_quantize_fp8(x, scale.reshape(3, 1)))


@pytest.mark.parametrize("axis", [None, 0])
def test_torchscript_opset19_writes_standard_fp8_qdq_that_onnxruntime_runs(axis):
    model, x = _model(axis)
    onnx_model = _export(model, x, 19)
    onnx.checker.check_model(onnx_model, full_check=True)
    qs = [n for n in onnx_model.graph.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in onnx_model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(qs) == len(dqs) == 4  # two inputs, two weights
    types = {t.name: t.data_type for t in onnx_model.graph.initializer}
    types.update({n.output[0]: n.attribute[0].t.data_type for n in onnx_model.graph.node if n.op_type == "Constant"})
    assert {types[n.input[2]] for n in qs + dqs} == {TensorProto.FLOAT8E4M3FN}
    # the scales are amax / 448 of the quantizers, in the order the graph uses them
    scales = _values(onnx_model, [n.input[1] for n in qs])
    expected = sorted(q.amax.flatten().tolist() for q in _quantizers(model))
    got = sorted((scales[n.input[1]].reshape(-1) * 448).tolist() for n in qs)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-6)
    per_channel = [n for n in qs if scales[n.input[1]].size > 1]
    assert len(per_channel) == (2 if axis == 0 else 0)
    assert all(a.name == "axis" and a.i == 0 for n in per_channel for a in n.attribute)
    options = ort.SessionOptions()  # (ONNX Runtime's CPU fusions take int8 Q/DQ only: QGemm refuses FP8)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_torchscript_below_opset19_writes_pytorch_quantizations_trt_ops():
    model, x = _model()
    onnx_model = _export(model, x, 17)
    onnx.checker.check_model(onnx_model)
    ops = [(n.domain, n.op_type) for n in onnx_model.graph.node if n.domain == "trt"]
    assert ops.count(("trt", "TRT_FP8QuantizeLinear")) == ops.count(("trt", "TRT_FP8DequantizeLinear")) == 4
    assert not [n for n in onnx_model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    names = [n.input[1] for n in onnx_model.graph.node if n.op_type == "TRT_FP8QuantizeLinear"]
    scales = sorted(float(v) * 448 for v in _values(onnx_model, names).values())
    np.testing.assert_allclose(scales, sorted(float(q.amax) for q in _quantizers(model)), rtol=1e-6)
    assert any(o.domain == "trt" for o in onnx_model.opset_import)


def test_per_channel_fp8_below_opset19_is_a_clear_error():
    model, x = _model(axis=0)
    with pytest.raises(Exception, match="FP8 per-channel Q/DQ .* need opset >= 19"):
        _export(model, x, 17)


@pytest.mark.slow
def test_dynamo_exporter_writes_trt_fp8_ops():
    model, x = _model()
    onnx_model = _export(model, x, 18, dynamo=True)
    onnx.checker.check_model(onnx_model)
    ops = [n.op_type for n in onnx_model.graph.node if n.domain == "trt"]
    assert ops.count("TRT_FP8QuantizeLinear") == ops.count("TRT_FP8DequantizeLinear") == 4


def test_modules_floor_leaves_torch_onnx_to_the_graph_side():
    """qdq/nn/modules/fp8_export.py imported torch.onnx (its ops API and is_in_onnx_export) from the modules floor;
    the export form now lives in qdq.onnx.export_fp8. Importing the floor and running an FP8 quantizer in export
    mode eagerly loads neither torch.onnx nor qdq.onnx."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, torch\n"
            "from qdq.nn import TensorQuantizer\n"
            "from qdq.tensor_quant import QuantDescriptor\n"
            "q = TensorQuantizer(QuantDescriptor(num_bits=(4, 3), amax=2.0))\n"
            "q.set_export_mode(True)\n"
            "q(torch.randn(8))\n"
            "print('torch.onnx' in sys.modules, any(m.startswith('qdq.onnx') for m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[-2:] == ["False", "False"], done.stderr
    def uses_torch_onnx(path):  # an import of torch.onnx or an attribute access torch.onnx in the code
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.onnx"):
                return True
            if isinstance(node, ast.Import) and any(a.name.startswith("torch.onnx") for a in node.names):
                return True
            if (isinstance(node, ast.Attribute) and node.attr == "onnx" and isinstance(node.value, ast.Name)
                    and node.value.id == "torch"):
                return True
        return False

    floor = Path(qdq.__file__).parent / "nn"
    assert [p.name for p in floor.rglob("*.py") if uses_torch_onnx(p)] == []
    assert uses_torch_onnx(Path(qdq.__file__).parent / "onnx" / "export_fp8.py")  # the check can fail


def test_traced_fp8_quantizer_uses_the_graph_sides_registered_form():
    from qdq.nn.modules import fp8_export
    from qdq.onnx import export_fp8

    assert fp8_export._export_form() is export_fp8.export_form
