"""Per-layer formats and the format search (qdq.layer_formats)."""

import math

import pytest
import torch

import qdq
from qdq.layer_formats import (FORMAT_COSTS, layer_flops, layer_formats, search_formats, set_layer_format,
                               set_model_format)
from qdq.onnx import check_tensorrt, export_onnx, verify


def _mlp(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    qdq.replace_to_quantization_module(model)
    return model


def _cnn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4))
    qdq.replace_to_quantization_module(model)
    return model


def test_set_layer_format_and_read_it_back():
    model = _mlp()
    set_layer_format(model, "0", "fp8")
    set_layer_format(model, "2", "int4", block_size=128)
    set_layer_format(model, "4", "float")
    assert layer_formats(model) == {"0": "fp8", "2": "int4", "4": "float"}
    assert model[2]._weight_quantizer.block_size == 128 and not model[2]._input_quantizer.is_enabled
    assert model[0]._weight_quantizer.axis == 0 and model[0]._weight_quantizer.num_bits == (4, 3)
    assert model[0]._input_quantizer.name == "0._input_quantizer"


def test_bad_formats_name_the_layer():
    model = _cnn()
    with pytest.raises(ValueError, match="layer '0' \\(QuantConv2d\\): INT4 weight-only is for Linear"):
        set_layer_format(model, "0", "int4")
    with pytest.raises(ValueError, match="layer '4': 8 input features are not a multiple of block_size 64"):
        set_layer_format(model, "4", "int4")
    with pytest.raises(ValueError, match="unknown format 'fp16'"):
        set_layer_format(model, "4", "fp16")
    with pytest.raises(ValueError, match="no layer 'nope'"):
        set_layer_format(model, "nope", "fp8")


def test_set_model_format_fp8_covers_pooling_and_exports(tmp_path):
    model = _cnn()
    assert set_model_format(model, "fp8", fp8_fallback=None) == {"0": "fp8", "4": "fp8"}
    assert model[2]._input_quantizer.num_bits == (4, 3)  # the pool's input too
    qdq.calibrate_model(model, [torch.randn(4, 3, 8, 8)], progress=False)
    info = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", dynamic_batch=True)
    assert verify(model, info.path, torch.randn(3, 3, 8, 8)).ok
    assert [f for f in check_tensorrt(info.path) if f.severity == "error"] == []


def test_set_model_format_fp8_keeps_what_tensorrt_has_no_fp8_kernel_for():
    """Depthwise and small convolutions and small Linear layers stay out of FP8 (ModelOpt's FP8 rule)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),               # 3 input channels
        torch.nn.Conv2d(32, 32, 3, padding=1, groups=32),   # depthwise: 1 input channel per group
        torch.nn.Conv2d(32, 16, 1),                         # 16 output channels
        torch.nn.Conv2d(16, 64, 1),                         # 16 input channels
        torch.nn.Conv2d(64, 64, 7, padding=3, groups=2),    # 32 per group, 49-element kernel
        torch.nn.Conv2d(64, 48, 3, padding=1, groups=2),    # 32 per group, 48 out: FP8
        torch.nn.Conv2d(48, 17, 1),                         # 17 out: FP8
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(17, 32),                            # FP8
        torch.nn.Linear(32, 10))                            # 10 outputs
    qdq.replace_to_quantization_module(model)
    expected = {"0": "float", "1": "float", "2": "float", "3": "float", "4": "float", "5": "fp8", "6": "fp8",
                "9": "fp8", "10": "float"}
    assert set_model_format(model, "fp8") == expected
    assert not model[1]._input_quantizer.is_enabled and model[5]._weight_quantizer.num_bits == (4, 3)
    assert model[7]._input_quantizer.num_bits == (4, 3)  # the pool's input follows the model's format
    mixed = set_model_format(model, "fp8", fp8_fallback="int8")
    assert mixed == {p: ("int8" if f == "float" else f) for p, f in expected.items()}
    assert set(set_model_format(model, "fp8", fp8_fallback=None).values()) == {"fp8"}
    assert set_model_format(model, "fp8", layers=["1"])["1"] == "fp8"  # an explicit list is taken as asked
    with pytest.raises(ValueError, match="fp8_fallback must be 'float', 'int8' or None, got 'fp16'"):
        set_model_format(model, "fp8", fp8_fallback="fp16")
    assert qdq.fp8_exclusion(model[4]) == "a 49-element kernel (FP8 convolutions take at most 32)"


def test_set_model_format_int4_leaves_other_layers():
    model = _cnn()
    assert set_model_format(model, "int4", block_size=32) == {"0": "int8", "4": "int8"}  # 8 features: not divisible
    model = _mlp()
    assert set_model_format(model, "int4") == {"0": "int4", "2": "int4", "4": "int4"}


def test_layer_flops_counts_multiply_adds():
    model = _cnn()
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
    model = _mlp()
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
    model = _mlp(1)
    x = torch.randn(64, 64)
    report = search_formats(model, [x], _metric_for(model, x), tolerance=0.0, example_input=x[:1], progress=False)
    assert report.met and set(report.formats.values()) == {"float"} and report.cost == pytest.approx(1.0)


def test_cost_table_is_documented_for_every_format():
    assert set(FORMAT_COSTS) == set(qdq.formats.FORMAT_NAMES)
    assert FORMAT_COSTS["float"] == 1.0 and FORMAT_COSTS["int8"] == FORMAT_COSTS["fp8"] < FORMAT_COSTS["int4"] < 1


def test_fp8_default_on_efficientnet_lite0_keeps_the_depthwise_convolutions_float():
    """The layers the rule keeps float on EfficientNet-Lite0 (whose convolutions are Conv2d subclasses): the 16
    depthwise convolutions, the 3-channel stem and the two 1x1 convolutions with 16 channels."""
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    model = efficientnet.EfficientNet.from_name("efficientnet-lite0")
    qdq.replace_to_quantization_module(model)
    formats = set_model_format(model, "fp8")
    kept = sorted(p for p, f in formats.items() if f == "float")
    depthwise = sorted(f"_blocks.{i}._depthwise_conv" for i in range(16))
    assert kept == sorted(depthwise + ["_conv_stem", "_blocks.0._project_conv", "_blocks.1._expand_conv"])
    assert list(formats.values()).count("fp8") == 31 and formats["_fc"] == "fp8"


def _depthwise_cnn():
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
    model = _depthwise_cnn()
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
    model = _depthwise_cnn()
    x = torch.randn(8, 3, 8, 8)
    report = search_formats(model, [x], _metric_for(model, x), tolerance=math.inf, example_input=x[:1],
                            formats=("fp8",), fp8_fallback=None, progress=False)
    assert set(report.formats.values()) == {"fp8"} and not any(c.fp8_excluded for c in report.choices)
    with pytest.raises(ValueError, match="fp8_fallback must be 'float', 'int8' or None, got 'fp16'"):
        search_formats(model, [x], _metric_for(model, x), tolerance=1.0, example_input=x[:1], fp8_fallback="fp16")
