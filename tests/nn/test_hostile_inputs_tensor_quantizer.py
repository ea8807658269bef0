"""Hostile inputs to TensorQuantizer: every error names the quantizer; the dynamic fallback warns; TorchScript is
refused with a hint."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qdq
from qdq.nn import TensorQuantizer
from qdq.nn.modules.tensor_quantizer import DynamicAmaxWarning
from qdq.tensor_quant import QuantDescriptor


def _q(**kw):
    return TensorQuantizer(QuantDescriptor(name="block.q", **kw))


@pytest.mark.parametrize("value", ["1.0", b"1", True, object(), [1.0, "x"], {"a": 1}, torch.tensor([True]),
                                   torch.tensor([1 + 2j])])
def test_amax_of_a_wrong_type_is_a_type_error_naming_the_quantizer(value):
    """Regression: ``q.amax = "1.0"`` gave torch's ``new(): invalid data type 'str'``; ``q.amax = True`` set 1.0."""
    q = _q()
    with pytest.raises(TypeError, match=r"TensorQuantizer 'block.q': amax must be a number"):
        q.amax = value
    assert q.amax is None


@pytest.mark.parametrize("value", [[], torch.empty(0), np.zeros((2, 0))])
def test_empty_amax_is_an_error(value):
    q = _q()
    with pytest.raises(ValueError, match=r"'block.q': amax is empty"):
        q.amax = value


@pytest.mark.parametrize("value", [float("nan"), -1.0, [1.0, float("inf")]])
def test_non_finite_or_negative_amax_names_the_quantizer(value):
    q = _q()
    with pytest.raises(ValueError, match=r"'block.q': amax must be finite and >= 0"):
        q.amax = value


@pytest.mark.parametrize("value,expected", [(2, [2.0]), (np.float64(0.5), [0.5]), ([1.0, 2.0], [1.0, 2.0]),
                                            (torch.tensor(3, dtype=torch.int64), [3.0])])
def test_valid_amax_values_are_taken(value, expected):
    q = _q()
    q.amax = value
    assert q.amax.dtype == torch.float32 and q.amax.flatten().tolist() == expected


def test_axis_out_of_range_names_the_quantizer_when_quantizing_and_calibrating():
    """Regression: an out-of-range axis raised without the quantizer's name."""
    q = _q(axis=5)
    with pytest.warns(DynamicAmaxWarning), pytest.raises(ValueError, match=r"'block.q': axis 5 is out of range"):
        q(torch.randn(2, 3))
    q = _q(axis=-4, calib_method="histogram")
    q.disable_quant()
    q.enable_calib()
    with pytest.raises(ValueError, match=r"'block.q': axis -4 is out of range"):
        q(torch.randn(2, 3))


@pytest.mark.parametrize("calib_method", ["max", "histogram"])
def test_unsigned_calibrated_on_negative_data_names_the_quantizer(calib_method):
    """Regression: the calibrator's error did not say which quantizer got the negative data."""
    q = _q(unsigned=True, calib_method=calib_method)
    q.disable_quant()
    q.enable_calib()
    with pytest.raises(ValueError, match=r"TensorQuantizer 'block.q': .*unsigned quantizer got negative data"):
        # the max calibrator checks as it collects; the histogram one (no host sync per batch) when amax is computed
        q(torch.tensor([-1.0, 2.0]))
        q.load_calib_amax("max" if calib_method == "max" else "mse")


def test_dynamic_fallback_warns_once_naming_the_quantizer():
    """Regression: a quantizer without amax switched to per-batch abs-max quantization with an INFO log only."""
    q = _q()
    with pytest.warns(DynamicAmaxWarning, match=r"'block.q' has no amax: quantizing each batch with its own abs-max"):
        q(torch.randn(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q(torch.randn(8))  # once per quantizer
    q.amax = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q(torch.randn(8))  # calibrated: static, no warning


def test_torch_jit_script_of_a_quantized_model_fails_with_a_hint():
    """Regression: torch.jit.script failed deep inside its compiler with no word about what to do."""
    model = nn.Sequential(nn.Linear(4, 4))
    qdq.replace_to_quantization_module(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        with pytest.raises(RuntimeError, match=r"'0._input_quantizer': a quantized model cannot be compiled by "
                                               r"torch.jit.script.*qdq.export_onnx.*torch.jit.trace"):
            torch.jit.script(model)


def test_torch_jit_trace_of_a_quantized_model_still_works():
    model = nn.Sequential(nn.Linear(4, 4))
    qdq.replace_to_quantization_module(model)
    qdq.calibrate_model(model, [torch.randn(8, 4)], progress=False)
    x = torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x, check_trace=False)
    assert torch.equal(traced(x), model(x))


def test_amin_of_a_wrong_type_names_the_quantizer():
    q = _q(symmetric=False)
    with pytest.raises(TypeError, match=r"'block.q': amin must be a number"):
        q.amin = "x"


@pytest.mark.parametrize("scale", [float("nan"), -1.0, 0.0, float("inf"), "a", True])
def test_a_bad_export_scale_is_refused(scale):
    """Regression: set_export_mode(True, scale=nan) (or -1) was accepted and would write that scale."""
    q = _q()
    with pytest.raises(ValueError, match=r"'block.q': an export scale must be a finite number > 0"):
        q.set_export_mode(True, scale=scale)
    assert not q.export_mode


def test_set_state_with_missing_switches_names_them():
    q = _q()
    with pytest.raises(KeyError, match=r"'block.q': the saved state lacks \['if_quant', 'if_calib', 'if_clip'\]"):
        q.set_state({"disabled": True})
    assert q.is_enabled  # nothing changed
