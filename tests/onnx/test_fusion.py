"""The TensorRT fusion predictor: per-layer precision, INT8 FLOP share, float residual adds, transitions."""

import json

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

import qdq
from qdq.cli import main
from qdq.onnx.fusion import format_fusion, predict_fusion
from tests.onnx.test_check import Graph


def _conv(g, x, name, quantized=True):
    w = g.init(f"{name}.w", np.ones((4, 4, 1, 1), np.float32))
    if quantized:
        return g.op("Conv", [g.qdq(x, 0.05, f"{name}_in"), g.qdq(w, np.full(4, 0.01, np.float32), f"{name}_w",
                                                                  axis=0)], name)
    return g.op("Conv", [x, w], name)


def test_conv_flops_precisions_and_share():
    g = Graph()
    a = _conv(g, "x", "a")
    _conv(g, a, "b", quantized=False)
    report = predict_fusion(g.model({"x": [1, 4, 8, 8]}, ["b"]))
    assert [(l.name, l.precision, l.flops) for l in report.layers] == [("a", "INT8", 2 * 4 * 64 * 4),
                                                                      ("b", "FP32", 2 * 4 * 64 * 4)]
    assert report.int8_share == 0.5
    # 'a' writes float into a float conv: no Q/DQ around the boundary, hence no transition counted for it
    assert report.transitions == ["float -> INT8 at QuantizeLinear 'a_in_q' (input graph input 'x')"]


def test_residual_add_fused_int8_or_float():
    g = Graph()
    a = _conv(g, "x", "a")
    g.op("Add", [a, g.qdq("x", 0.05, "skip")], "fused")
    report = predict_fusion(g.model({"x": [1, 4, 8, 8]}, ["fused"]))
    assert report.fused_adds == 1 and report.float_residual_adds == []
    assert report.layers[-1].note == "fused into a"
    g = Graph()
    a = _conv(g, "x", "a")
    relu = g.op("Relu", [a], "relu")
    g.op("Add", [relu, "x"], "float_add")
    report = predict_fusion(g.model({"x": [1, 4, 8, 8]}, ["float_add"]))
    assert report.float_residual_adds == ["float_add"] and report.fused_adds == 0


def test_conv_read_twice_cannot_take_the_add():
    g = Graph()
    a = _conv(g, "x", "a")
    g.op("Add", [a, g.qdq("x", 0.05, "skip")], "add")
    g.op("Relu", [a], "other")
    report = predict_fusion(g.model({"x": [1, 4, 8, 8]}, ["add", "other"]))
    assert report.float_residual_adds == ["add"]


def test_fp16_file_reports_fp16_layers():
    g = Graph()
    w = g.init("w", np.ones((4, 4, 1, 1), np.float16))
    g.op("Conv", ["x", w], "c")
    model = g.model({"x": [1, 4, 8, 8]}, ["c"], dtypes={"x": TensorProto.FLOAT16, "c": TensorProto.FLOAT16})
    assert predict_fusion(model).layers[0].precision == "FP16"


def test_exported_model_and_the_command_line(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))
    qdq.replace_to_quantization_module(model)
    qdq.calibrate_model(model, [torch.randn(2, 3, 8, 8)], progress=False)
    path = tmp_path / "m.onnx"
    qdq.export_onnx(model, torch.randn(1, 3, 8, 8), path)
    report = predict_fusion(path)
    assert report.int8_share == 1.0 and {l.op for l in report.layers} == {"Conv", "GlobalAveragePool", "Gemm"}
    assert all(l.precision == "INT8" for l in report.layers)
    assert "INT8 share of conv/gemm FLOPs 100.00%" in format_fusion(report)
    assert main(["check", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fusion"]["summary"]["int8_share"] == 1.0 and data["findings"] == []
    assert main(["check", str(path), "--fusion"]) == 0
    out = capsys.readouterr().out
    assert "GlobalAveragePool" in out and "0 errors" in out
