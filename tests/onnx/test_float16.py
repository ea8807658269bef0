"""Strongly typed FP16 export (export_onnx(..., float_dtype=torch.float16)), its checker rule and verify."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

import qdq
from qdq.onnx import export_onnx
from qdq.onnx.check import check_tensorrt
from qdq.onnx.export import ExportError
from qdq.onnx.float16 import round_scales_to_float16, scale_problems
from qdq.onnx.fusion import predict_fusion
from qdq.onnx.parity import run_onnxruntime


def _small(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.SiLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    qdq.replace_to_quantization_module(model)
    qdq.calibrate_model(model, [torch.randn(4, 3, 12, 12) for _ in range(2)], progress=False)
    return model


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    return {vi.name for vi in inferred.graph.value_info if vi.type.tensor_type.elem_type == TensorProto.FLOAT}


def test_inexact_scales_are_an_error_naming_the_quantizer(tmp_path):
    model = _small()
    with pytest.raises(ExportError, match=r"0\._input_quantizer: has 1 of 1 scales that are not float16 values"):
        export_onnx(model, torch.randn(1, 3, 12, 12), tmp_path / "m.onnx", float_dtype=torch.float16)
    changes = round_scales_to_float16(model)
    assert scale_problems(model) == [] and 0 < max(changes.values()) < 2.0**-11 * 1.01


def test_small_scales_are_float16_subnormals_and_zero_is_an_error(tmp_path):
    model = _small()
    model[3].input_quantizer.amax = 1e-4  # scale 7.9e-7: a float16 subnormal after rounding
    model[7].input_quantizer.amax = 1e-6  # scale 7.9e-9: zero in float16
    with pytest.raises(ExportError, match=r"7\._input_quantizer: has a scale 7.87402e-09 that underflows to zero"):
        export_onnx(model, torch.randn(1, 3, 12, 12), tmp_path / "m.onnx", float_dtype=torch.float16)
    round_scales_to_float16(model)
    assert float(model[7].input_quantizer.scale) == 2.0**-24
    assert float(model[3].input_quantizer.scale) == 13 * 2.0**-24  # the nearest subnormal of 7.874e-7
    info = export_onnx(model, torch.randn(1, 3, 12, 12), tmp_path / "m.onnx", float_dtype=torch.float16)
    assert check_tensorrt(info.model, strongly_typed=True) == []


def test_a_scale_above_float16s_range_is_an_error():
    model = _small()
    model[3].input_quantizer.amax = 1e7  # scale 78740
    with pytest.raises(ValueError, match=r"3\._input_quantizer: scales up to 7.87e\+04 are above float16's largest"):
        round_scales_to_float16(model)


def test_float_dtype_other_than_float16_is_refused(tmp_path):
    with pytest.raises(ValueError, match="float_dtype must be torch.float16"):
        export_onnx(_small(), torch.randn(1, 3, 12, 12), tmp_path / "m.onnx", float_dtype=torch.bfloat16)


@pytest.mark.parametrize("deploy", [False, True])
def test_the_file_is_float16_inside_float32_at_the_edges(tmp_path, deploy):
    model = _small()
    round_scales_to_float16(model)
    x = torch.randn(3, 3, 12, 12)
    info = export_onnx(model, x[:1], tmp_path / "m.onnx", float_dtype=torch.float16, dynamic_batch=True,
                       deploy=deploy)
    proto = info.model
    assert info.opset == 19
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [TensorProto.FLOAT]
    scales = {n.input[1] for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    inits = {i.name: i for i in proto.graph.initializer}
    assert scales and all(inits[s].data_type == TensorProto.FLOAT16 for s in scales)
    assert not [i.name for i in proto.graph.initializer if i.data_type == TensorProto.FLOAT]
    assert _float_tensors(proto) == set()  # float32 only at the graph input and output
    findings = check_tensorrt(proto, strongly_typed=True)
    assert [f for f in findings if f.severity != "info"] == []
    assert {f.rule for f in check_tensorrt(proto)} == {"scale-dtype"}  # float16 scales: older TensorRT needs float32
    report = qdq.verify(model, proto, x)
    assert report.ok and report.float16 and report.rounding.max_step_difference <= 1, str(report)


def _weight_values(proto, x):
    """The weight each Conv/Gemm reads (the output of its weight DequantizeLinear), run by ONNX Runtime."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    names = [n.input[1] for n in probe.graph.node if n.op_type in ("Conv", "Gemm")]
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return run_onnxruntime(probe, x)


def test_dynamo_exporter(tmp_path):
    model = _small()
    round_scales_to_float16(model)
    x = torch.randn(1, 3, 12, 12)
    info = export_onnx(model, x, tmp_path / "m.onnx", float_dtype=torch.float16, dynamo=True)
    assert info.opset == 19 and _float_tensors(info.model) == set()
    assert check_tensorrt(info.model, strongly_typed=True) == []
    report = qdq.verify(model, info.path, x)
    assert report.ok and report.rounding.max_step_difference <= 1, str(report)


def test_weights_quantize_to_the_model_integers_in_both_forms(tmp_path):
    """The fake-quant file stores float16 weights behind its Q; the Q/DQ must give exactly PyTorch's fake-quantized
    weights (in float16), as the deploy form's int8 weights do."""
    model = _small()
    round_scales_to_float16(model)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = [layer.weight_quantizer(layer.weight).half().numpy() for layer in (model[0], model[3], model[7])]
    for deploy in (False, True):
        info = export_onnx(model, x[:1], tmp_path / f"m{deploy}.onnx", float_dtype=torch.float16,
                           dynamic_batch=True, deploy=deploy)
        got = _weight_values(info.model, x)
        assert len(got) == 3
        for g, e in zip(got, expected):
            assert g.dtype == np.float16
            np.testing.assert_array_equal(g.reshape(e.shape), e)


def test_float32_file_has_a_float32_remainder_for_strongly_typed_builds(tmp_path):
    model = _small()
    info = export_onnx(model, torch.randn(1, 3, 12, 12), tmp_path / "m.onnx")
    assert "float32-remainder" not in {f.rule for f in check_tensorrt(info.model)}
    found = [f for f in check_tensorrt(info.model, strongly_typed=True) if f.rule == "float32-remainder"]
    assert len(found) == 1 and found[0].severity == "warning"
    assert "Conv" in found[0].message and "float_dtype=torch.float16" in found[0].message


def test_cli_strongly_typed(tmp_path, capsys):
    from qdq.cli import main

    model = _small()
    export_onnx(model, torch.randn(1, 3, 12, 12), tmp_path / "m32.onnx")
    round_scales_to_float16(model)
    export_onnx(model, torch.randn(1, 3, 12, 12), tmp_path / "m16.onnx", float_dtype=torch.float16)
    assert main(["check", str(tmp_path / "m32.onnx"), "--strongly-typed", "--quiet"]) == 0
    assert "WARNING float32-remainder" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "m16.onnx"), "--strongly-typed", "--quiet"]) == 0
    assert "float32-remainder" not in capsys.readouterr().out


def test_float_export_in_float16(tmp_path):
    model = _small()
    x = torch.randn(2, 3, 12, 12)
    info = export_onnx(model, x[:1], tmp_path / "m.onnx", quantize=False, float_dtype=torch.float16,
                       dynamic_batch=True)
    assert not [n for n in info.model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    qdq.disable_quantization(model)
    with torch.no_grad():
        ref = model(x).numpy()
    (out,) = run_onnxruntime(info.model, x)
    np.testing.assert_allclose(out, ref, rtol=1e-2, atol=1e-2)


def _bn_statistics(model, shape):
    """Random weights with BatchNorm statistics measured on random data, so that activations do not vanish."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *shape[1:]))
    return model.eval()


def _torchvision_case(name, tmp_path, shape=(1, 3, 96, 96), keep_float=("fc", "classifier.1")):
    import torchvision

    torch.manual_seed(0)
    model = _bn_statistics(torchvision.models.get_model(name, weights=None, num_classes=10), shape)
    qdq.replace_to_quantization_module(model, ignore_policy=list(keep_float))  # the head stays float
    x = torch.randn(shape)
    qdq.apply_custom_rules_to_quantizer(model, x)
    qdq.calibrate_model(model, [torch.randn(4, *shape[1:]) for _ in range(2)], progress=False)
    round_scales_to_float16(model)
    f32 = export_onnx(model, x, tmp_path / "m32.onnx", dynamic_batch=True)
    f16 = export_onnx(model, x, tmp_path / "m16.onnx", dynamic_batch=True, float_dtype=torch.float16)
    return model, f32, f16


def _check_case(model, f32, f16, shape, tolerance_steps=8.0):
    xs = torch.randn(4, *shape[1:])
    report = qdq.verify(model, f16.path, xs, output_tolerance_steps=tolerance_steps)
    assert report.ok and report.float16, str(report)
    assert report.rounding.max_step_difference <= 1
    assert report.rounding.num_differing <= 1e-5 * report.rounding.num_elements
    assert not [f for f in check_tensorrt(f16.path, strongly_typed=True) if f.severity == "error" or
                f.rule == "float32-remainder"]
    precisions16 = {layer.name: layer.precision for layer in predict_fusion(f16.path).layers}
    precisions32 = {layer.name: layer.precision for layer in predict_fusion(f32.path).layers}
    assert "FP32" not in precisions16.values() and "FP16" in precisions16.values()
    assert {n for n, p in precisions16.items() if p == "FP16"} == {n for n, p in precisions32.items() if p == "FP32"}
    return report


@pytest.mark.slow
def test_resnet18_float16_in_onnxruntime(tmp_path):
    model, f32, f16 = _torchvision_case("resnet18", tmp_path)
    _check_case(model, f32, f16, (1, 3, 96, 96))


@pytest.mark.slow
def test_silu_and_squeeze_excitation_float16_in_onnxruntime(tmp_path):
    """torchvision efficientnet_b0: SiLU's Mul and the SE gating stay in float, in float16 here.

    With random weights this network amplifies one-step rounding flips far more than a trained one: measured on
    these inputs, 16.7 output steps for the float32 file and 46.3 for the float16 file (both with every
    QuantizeLinear within one step, 2 and 16 of 6.8 million values one step apart), hence 64 steps here."""
    model, f32, f16 = _torchvision_case("efficientnet_b0", tmp_path)
    ops = {n.op_type for n in f16.model.graph.node}
    assert {"Sigmoid", "Mul", "GlobalAveragePool"} <= ops or {"Sigmoid", "Mul", "ReduceMean"} <= ops
    _check_case(model, f32, f16, (1, 3, 96, 96), tolerance_steps=64.0)


def test_fusion_predictor_rates_the_float_remainder_fp16(tmp_path):
    model = _small()
    model[7].input_quantizer.disable()  # the classifier stays float
    model[7].weight_quantizer.disable()
    round_scales_to_float16(model)
    x = torch.randn(1, 3, 12, 12)
    f32 = export_onnx(model, x, tmp_path / "m32.onnx")
    f16 = export_onnx(model, x, tmp_path / "m16.onnx", float_dtype=torch.float16)
    p32 = {layer.op: layer.precision for layer in predict_fusion(f32.model).layers}
    p16 = {layer.op: layer.precision for layer in predict_fusion(f16.model).layers}
    assert p32["Gemm"] == "FP32" and p32["Conv"] == "INT8"
    assert p16["Gemm"] == "FP16" and p16["Conv"] == "INT8"


def test_check_module_command_line(tmp_path, capsys):
    from qdq.onnx.check import main

    export_onnx(_small(), torch.randn(1, 3, 12, 12), tmp_path / "m.onnx")
    assert main([str(tmp_path / "m.onnx"), "--strongly-typed", "-q"]) == 0
    assert "float32-remainder" in capsys.readouterr().out


def test_an_op_without_float16_form_stays_float32_between_casts(tmp_path):
    """ONNX types Celu float32 only: it keeps float32 with Casts around it, and the checker says so."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.CELU(), torch.nn.Conv2d(4, 4, 1)).eval()
    qdq.replace_to_quantization_module(model)
    qdq.calibrate_model(model, [torch.randn(2, 3, 8, 8)], progress=False)
    round_scales_to_float16(model)
    x = torch.randn(2, 3, 8, 8)
    info = export_onnx(model, x[:1], tmp_path / "m.onnx", float_dtype=torch.float16, dynamic_batch=True)
    ops = [n.op_type for n in info.model.graph.node]
    i = ops.index("Celu")
    assert ops[i - 1] == "Cast" and ops[i + 1] == "Cast"
    found = [f for f in check_tensorrt(info.model, strongly_typed=True) if f.rule == "float32-remainder"]
    assert len(found) == 1 and "1 Celu" in found[0].message
    report = qdq.verify(model, info.path, x)
    assert report.ok, str(report)
