"""Hostile eval_fn results in sensitivity profiling: NaN is an error naming the layer, infinities are metrics."""

import math

import pytest
import torch
from torch import nn

import qdq
from qdq.calibrate.sensitivity import auto_skip_sensitive_layers, build_sensitivity_profile


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    qdq.replace_to_quantization_module(model)
    qdq.calibrate_model(model, [torch.randn(16, 4)], progress=False)
    return model


def _enabled(model):
    return [q.is_enabled for _, q in qdq.quantizers(model)]


def test_nan_metric_is_an_error_naming_the_layer():
    """Regression: an eval_fn returning NaN produced a ranked table of NaN."""
    model = _model()
    before = _enabled(model)
    calls = []

    def eval_fn(m):
        calls.append(1)
        return float("nan") if len(calls) == 4 else 1.0  # float, quantized, layer '0', then layer '2'

    with pytest.raises(ValueError, match=r"eval_fn returned NaN with layer '2' float"):
        build_sensitivity_profile(model, eval_fn, print_table=False, progress=False)
    assert _enabled(model) == before  # switches restored
    with pytest.raises(ValueError, match=r"eval_fn returned NaN with every layer float"):
        build_sensitivity_profile(model, lambda m: torch.tensor(float("nan")), print_table=False, progress=False)
    with pytest.raises(ValueError, match=r"eval_fn returned NaN with only layer '0' quantized"):
        build_sensitivity_profile(model, lambda m: math.nan if calls.append(1) or len(calls) > 6 else 0.0,
                                  mode="enable_one", print_table=False, progress=False)


def test_non_number_metric_is_a_type_error():
    with pytest.raises(TypeError, match=r"eval_fn must return a number; with every layer float it returned 'good'"):
        build_sensitivity_profile(_model(), lambda m: "good", print_table=False, progress=False)


def test_infinite_metric_is_a_metric():
    """The SQNR of the float model against itself is +inf: kept."""
    calls = []

    def eval_fn(m):
        calls.append(1)
        return math.inf if len(calls) == 1 else float(len(calls))

    profile = build_sensitivity_profile(_model(), eval_fn, print_table=False, progress=False)
    assert profile.float_metric == math.inf and len(profile.rows) == 2


def test_a_string_for_layers_is_refused():
    with pytest.raises(TypeError, match=r"layers must be a list of layer paths, got the string '0'"):
        build_sensitivity_profile(_model(), lambda m: 1.0, layers="0", print_table=False, progress=False)


@pytest.mark.parametrize("tolerance", [float("nan"), -1.0, math.inf, "0.1"])
def test_auto_skip_refuses_a_bad_tolerance(tolerance):
    with pytest.raises(ValueError, match=r"tolerance must be a finite number >= 0"):
        auto_skip_sensitive_layers(_model(), lambda m: 1.0, tolerance, progress=False)


def test_auto_skip_refuses_a_negative_max_layers():
    with pytest.raises(ValueError, match=r"max_layers must be None or an int >= 0, got -1"):
        auto_skip_sensitive_layers(_model(), lambda m: 1.0, 0.1, max_layers=-1, progress=False)


def test_auto_skip_nan_after_disabling_names_the_layer():
    calls = []

    def eval_fn(m):
        calls.append(1)
        return float("nan") if len(calls) > 4 else [0, 1.0, 0.5, 0.6, 0.7][len(calls)]

    with pytest.raises(ValueError, match=r"eval_fn returned NaN with layer '.' disabled"):
        auto_skip_sensitive_layers(_model(), eval_fn, 0.01, progress=False)


def test_eval_fn_must_be_callable():
    with pytest.raises(TypeError, match=r"eval_fn must be a callable model -> metric, got None"):
        build_sensitivity_profile(_model(), None, print_table=False, progress=False)
