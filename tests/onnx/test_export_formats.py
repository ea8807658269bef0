"""FP8 E4M3 and INT4 weight-only export (qdq.onnx.export_formats), run in ONNX Runtime against PyTorch."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

import qdq
from qdq.nn import TensorQuantizer
from qdq.onnx import check_tensorrt, export_onnx, verify
from qdq.onnx.export import ExportError
from qdq.onnx.parity import run_onnxruntime
from qdq.tensor_quant import QuantDescriptor

FP8 = QuantDescriptor(num_bits=(4, 3))
FP8_W = QuantDescriptor(num_bits=(4, 3), axis=0)


def _fp8_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    qdq.replace_to_quantization_module(model)
    for i in (0, 3, 5):
        model[i]._input_quantizer = TensorQuantizer(FP8)
        model[i]._weight_quantizer = TensorQuantizer(FP8_W)
    qdq.calibrate_model(model, [torch.randn(8, 3, 8, 8) for _ in range(2)], progress=False)
    return model


def _errors(path):
    return [f for f in check_tensorrt(path) if f.severity == "error"]


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("deploy", [False, True])
def test_fp8_export_matches_pytorch_in_onnxruntime(tmp_path, dynamo, deploy):
    model = _fp8_model()
    info = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", dynamic_batch=True, dynamo=dynamo,
                       deploy=deploy)
    assert info.opset >= 19
    qs = [n for n in info.model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == (3 if deploy else 6)
    inits = {i.name: i for i in info.model.graph.initializer}
    assert all(inits[q.input[2]].data_type == TensorProto.FLOAT8E4M3FN for q in qs)
    if deploy:  # weights stored as float8 values
        assert sum(i.data_type == TensorProto.FLOAT8E4M3FN and len(i.dims) >= 2 for i in inits.values()) == 3
    report = verify(model, info.path, torch.randn(6, 3, 8, 8))
    assert report.rounding.num_quantizers == 3 and report.rounding.max_step_difference == 0
    assert report.ok and report.outputs[0].max_error_steps <= 1
    assert _errors(info.path) == []


def test_fp8_scales_are_amax_over_448(tmp_path):
    model = _fp8_model()
    info = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    consts = {i.name: numpy_helper.to_array(i) for i in info.model.graph.initializer}
    q = next(n for n in info.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in consts)
    assert consts[q.input[1]] == np.float32(model[0]._input_quantizer.amax.item()) / np.float32(448.0)
    wq = next(n for n in info.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "0.weight")
    amax = model[0]._weight_quantizer.amax.flatten()
    np.testing.assert_array_equal(consts[wq.input[1]], (amax / 448.0).numpy())
    assert [a.i for a in wq.attribute if a.name == "axis"] == [0]


def _int4_model(block_size, in_features=256):
    torch.manual_seed(block_size or 1)
    model = torch.nn.Sequential(torch.nn.Linear(in_features, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    qdq.replace_to_quantization_module(model)
    model[0]._weight_quantizer = TensorQuantizer(QuantDescriptor(num_bits=4, axis=0, block_size=block_size))
    model[0]._input_quantizer.disable()
    qdq.calibrate_model(model, [torch.randn(8, in_features)], progress=False)
    return model


def _dq_outputs(path, x):
    """Every DequantizeLinear output of the file, run by ONNX Runtime."""
    m = onnx.load(str(path))
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    del m.graph.output[:]
    for n in dqs:
        m.graph.output.append(onnx.ValueInfoProto(name=n.output[0]))
    return dqs, run_onnxruntime(m, x)


@pytest.mark.parametrize("block_size", [32, 64, 128, None])
@pytest.mark.parametrize("dynamo", [False, True])
def test_int4_weights_dequantize_to_the_pytorch_weights(tmp_path, block_size, dynamo):
    model = _int4_model(block_size)
    info = export_onnx(model, torch.randn(1, 256), tmp_path / "m.onnx", dynamic_batch=True, dynamo=dynamo)
    assert info.opset >= 21 and info.model.ir_version <= 10
    inits = {i.name: i for i in info.model.graph.initializer}
    dqs, outs = _dq_outputs(info.path, [torch.randn(2, 256).numpy()])
    int4 = [(dq, out) for dq, out in zip(dqs, outs) if inits.get(dq.input[0]) is not None
            and inits[dq.input[0]].data_type == TensorProto.INT4]
    assert len(int4) == 1
    dq, out = int4[0]
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs.get("block_size", 0) == (block_size or 0)
    with torch.no_grad():
        expected = model[0]._weight_quantizer(model[0].weight).numpy()
    np.testing.assert_array_equal(out.T if out.shape != expected.shape else out, expected)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "0.weight" for n in info.model.graph.node)
    assert verify(model, info.path, torch.randn(4, 256)).ok
    assert _errors(info.path) == []


def test_int4_linear_on_3d_input_stores_the_weight_transposed_for_matmul(tmp_path):
    model = _int4_model(64)
    x = torch.randn(2, 3, 256)
    info = export_onnx(model, x, tmp_path / "m.onnx")
    nodes = info.model.graph.node
    readers = {i: n for n in nodes for i in n.input}
    dq = next(n for n in nodes if n.op_type == "DequantizeLinear" and "int4" in n.input[0])
    assert readers[dq.output[0]].op_type == "MatMul"  # no Transpose between the int4 DQ and the MatMul
    assert [tuple(i.dims) for i in info.model.graph.initializer if i.name == dq.input[0]] == [(256, 64)]
    assert verify(model, info.path, x).ok and _errors(info.path) == []


def test_int4_on_a_convolution_or_an_activation_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    qdq.replace_to_quantization_module(model)
    model[0]._weight_quantizer = TensorQuantizer(QuantDescriptor(num_bits=4, axis=0))
    model[2]._input_quantizer = TensorQuantizer(QuantDescriptor(num_bits=4))
    qdq.calibrate_model(model, [torch.randn(2, 3, 8, 8)], progress=False)
    with pytest.raises(ExportError) as err:
        export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert "0._weight_quantizer: 4-bit weights of QuantConv2d; INT4 weight-only runs on MatMul/Gemm" in str(err.value)
    assert "2._input_quantizer: 4-bit activation; INT4 is weight-only" in str(err.value)


def test_fp8_data_with_int8_weights_is_a_format_mix(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    qdq.replace_to_quantization_module(model)
    model[0]._input_quantizer = TensorQuantizer(FP8)
    qdq.calibrate_model(model, [torch.randn(4, 8)], progress=False)
    info = export_onnx(model, torch.randn(1, 8), tmp_path / "m.onnx", dynamic_batch=True)
    assert [f.rule for f in _errors(info.path)] == ["format-mix"]
    assert verify(model, info.path, torch.randn(3, 8)).ok


def _depthwise_model(fp8_fallback):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),              # 3 input channels
        torch.nn.Conv2d(32, 32, 3, padding=1, groups=32), torch.nn.ReLU(),  # depthwise
        torch.nn.Conv2d(32, 64, 1), torch.nn.ReLU(),                         # FP8 kernel exists
        torch.nn.Conv2d(64, 16, 1))                                          # 16 output channels
    qdq.replace_to_quantization_module(model)
    qdq.set_model_format(model, "fp8", fp8_fallback=fp8_fallback)
    qdq.calibrate_model(model, [torch.randn(4, 3, 8, 8)], progress=False)
    return model


@pytest.mark.parametrize("deploy", [False, True])
def test_fp8_on_a_layer_without_fp8_kernel_is_a_warning_naming_the_conv(tmp_path, deploy):
    model = _depthwise_model(fp8_fallback=None)  # every layer in FP8
    info = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", deploy=deploy)
    convs = [n.name for n in info.model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 4
    findings = [f for f in check_tensorrt(info.path) if f.rule == "fp8-layer"]
    assert [f.nodes for f in findings] == [(convs[0],), (convs[1],), (convs[3],)]
    assert all(f.severity == "warning" for f in findings)
    stem, depthwise, narrow = (f.message for f in findings)
    assert stem.startswith(f"Conv '{convs[0]}' has FP8 (float8e4m3fn) Q/DQ but TensorRT has no FP8 kernel for it: "
                           "3 input channels per group")
    assert f"Conv '{convs[1]}'" in depthwise and "depthwise (group 32 = 32 channels)" in depthwise
    assert "16 output channels" in narrow and "quantize it in INT8 or leave it float" in narrow
    assert _errors(info.path) == []


@pytest.mark.parametrize("fallback", ["float", "int8"])
def test_fp8_where_tensorrt_has_fp8_kernels_has_no_fp8_layer_finding(tmp_path, fallback):
    model = _depthwise_model(fp8_fallback=fallback)  # qdq's default keeps those layers out of FP8
    info = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    types = {i.name: i.data_type for i in info.model.graph.initializer}
    assert TensorProto.FLOAT8E4M3FN in {types.get(n.input[2]) for n in info.model.graph.node
                                        if n.op_type == "QuantizeLinear"}  # the 32->64 conv is FP8
    assert [f for f in check_tensorrt(info.path) if f.rule == "fp8-layer"] == []
    assert _errors(info.path) == []


def test_fp8_layer_rule_uses_the_model_sides_numbers():
    from qdq.transform.layer_formats import FP8_MAX_KERNEL_AREA, FP8_MIN_CHANNELS
    from qdq.onnx import check

    assert (check.FP8_MIN_CHANNELS, check.FP8_MAX_KERNEL_AREA) == (FP8_MIN_CHANNELS, FP8_MAX_KERNEL_AREA)
