"""The format search (qdq.calibrate.format_search): the cost table, FLOPs, and the search under a tolerance."""

import math

import pytest
import torch

import qdq
from qdq.calibrate.format_search import FORMAT_COSTS, layer_flops, search_formats
from qdq.onnx import export_onnx, verify
from qdq.transform.layer_formats import layer_formats

from format_models import quantized_cnn, quantized_mlp


def test_layer_flops_counts_multiply_adds():
    model = quantized_cnn()
    flops = layer_flops(model, torch.randn(1, 3, 8, 8))
    assert flops == {"0": 8 * 6 * 6 * 3 * 9, "4": 4 * 8}


def _metric_for(model, x):
    with torch.no_grad(), qdq.disable_quantization(model):
        ref = model(x)

    def metric(m):
        with torch.no_grad():
            return -float(((m(x) - ref) ** 2).mean())
    return metric


def test_search_meets_the_tolerance_at_lower_cost_than_float(tmp_path):
    model = quantized_mlp()
    x = torch.randn(256, 64)
    metric = _metric_for(model, x)
    data = [x[i:i + 64] for i in range(0, 256, 64)]
    loose = search_formats(model, data, metric, tolerance=math.inf, example_input=x[:1], progress=False)
    assert loose.met and set(loose.formats.values()) <= {"int8", "fp8"}  # cheapest (0.5/FLOP) everywhere
    assert loose.cost == pytest.approx(0.5)
    # a budget below what the cheapest assignment reaches forces moves, each logged with its reason
    tolerance = -loose.metric * 0.3
    report = search_formats(model, data, metric, tolerance=tolerance, example_input=x[:1], progress=False)
    assert report.met and report.float_metric - report.metric <= tolerance
    assert metric(model) == pytest.approx(report.metric)  # the model is left in the chosen formats
    assert len(report.steps) >= 2 and 0.5 < report.cost < 1.0
    assert layer_formats(model) == report.formats
    assert all(c.reason for c in report.choices) and "format search" in str(report)
    info = export_onnx(model, x[:1], tmp_path / "m.onnx", dynamic_batch=True)
    assert verify(model, info.path, x[:8]).ok


def test_search_with_no_budget_keeps_everything_float():
    model = quantized_mlp(1)
    x = torch.randn(64, 64)
    report = search_formats(model, [x], _metric_for(model, x), tolerance=0.0, example_input=x[:1], progress=False)
    assert report.met and set(report.formats.values()) == {"float"} and report.cost == pytest.approx(1.0)


def test_cost_table_is_documented_for_every_format():
    assert set(FORMAT_COSTS) == set(qdq.formats.FORMAT_NAMES)
    assert FORMAT_COSTS["float"] == 1.0 and FORMAT_COSTS["int8"] == FORMAT_COSTS["fp8"] < FORMAT_COSTS["int4"] < 1


def _depthwisequantized_cnn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),              # 3 input channels: no FP8 kernel
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1, groups=32),  # depthwise: no FP8 kernel
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 1),                        # FP8
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(64, 32))                           # FP8
    qdq.replace_to_quantization_module(model)
    return model


@pytest.mark.parametrize("fallback, expected", [("float", "float"), ("int8", "int8")])
def test_search_never_picks_fp8_where_tensorrt_has_no_fp8_kernel(fallback, expected):
    """search_formats used to offer FP8 to depthwise and <=16-channel convolutions (fp8_exclusion), which TensorRT
    has no FP8 kernel for: they get the fallback instead, and the report says why."""
    model = _depthwisequantized_cnn()
    x = torch.randn(8, 3, 8, 8)
    report = search_formats(model, [x], _metric_for(model, x), tolerance=math.inf, example_input=x[:1],
                            formats=("fp8",), fp8_fallback=fallback, progress=False)
    assert report.formats == {"0": expected, "2": expected, "4": "fp8", "7": "fp8"}
    assert layer_formats(model) == report.formats
    by_layer = {c.layer: c for c in report.choices}
    assert by_layer["0"].fp8_excluded == qdq.fp8_exclusion(model[0]) == \
        "3 input channels per group (FP8 convolutions need more than 16)"
    assert by_layer["2"].fp8_excluded.startswith("1 input channels per group")
    assert by_layer["4"].fp8_excluded is None and by_layer["7"].fp8_excluded is None
    for layer in ("0", "2"):
        assert f"FP8 not offered ({fallback} instead): TensorRT has no FP8 kernel for it" in by_layer[layer].reason
        assert "fp8" not in by_layer[layer].deltas  # never profiled in FP8
    assert "FP8 not offered" not in by_layer["4"].reason
    assert "FP8 not offered" in str(report)


def test_search_with_no_fp8_fallback_offers_fp8_everywhere():
    model = _depthwisequantized_cnn()
    x = torch.randn(8, 3, 8, 8)
    report = search_formats(model, [x], _metric_for(model, x), tolerance=math.inf, example_input=x[:1],
                            formats=("fp8",), fp8_fallback=None, progress=False)
    assert set(report.formats.values()) == {"fp8"} and not any(c.fp8_excluded for c in report.choices)
    with pytest.raises(ValueError, match="fp8_fallback must be 'float', 'int8' or None, got 'fp16'"):
        search_formats(model, [x], _metric_for(model, x), tolerance=1.0, example_input=x[:1], fp8_fallback="fp16")
