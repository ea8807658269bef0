"""The format search (qdq.calibrate.format_search): the cost table, FLOPs, and the search under a tolerance."""

import math

import pytest
import torch

import qdq
from qdq.calibrate.format_search import FORMAT_COSTS, layer_flops, search_formats
from qdq.onnx import export_onnx, verify
from qdq.transform.layer_formats import layer_formats


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
