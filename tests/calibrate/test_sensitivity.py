import pytest
import torch
from torch import nn

from qdq import calibrate_model, quant_modules
from qdq.calibrate.sensitivity import auto_skip_sensitive_layers, build_sensitivity_profile, quantized_layers
from qdq.transform.switches import quantizers


def _fragile_setup():
    """Four layers; layer 'b' gets a 4-bit weight quantizer with a tiny amax: it must rank first."""
    torch.manual_seed(0)
    model = nn.Sequential()
    for name in "abcd":
        model.add_module(name, nn.Linear(16, 16))
    quant_modules.replace_to_quantization_module(model)
    x = torch.randn(256, 16)
    calibrate_model(model, [x], progress=False)
    model.b.weight_quantizer.amax = model.b.weight_quantizer.amax * 0.05
    with torch.no_grad(), torch.enable_grad():
        pass
    with torch.no_grad():
        for _, q in quantizers(model):
            q.disable()
        ref = model(x)
        for _, q in quantizers(model):
            q.enable()

    def metric(m):
        with torch.no_grad():
            return -float(((m(x) - ref) ** 2).mean())

    return model, metric


@pytest.mark.parametrize("mode", ["disable_one", "enable_one"])
def test_fragile_layer_ranks_first(mode, capsys):
    model, metric = _fragile_setup()
    before = [q.state() for _, q in quantizers(model)]
    profile = build_sensitivity_profile(model, metric, mode=mode, progress=False)
    assert profile.rows[0].layer == "b"
    assert profile.float_metric == 0.0 and profile.quantized_metric < 0
    assert [q.state() for _, q in quantizers(model)] == before
    out = capsys.readouterr().out
    assert "sensitivity" in out and "   1  b" in out


def test_lower_is_better_direction():
    model, metric = _fragile_setup()
    profile = build_sensitivity_profile(model, lambda m: -metric(m), higher_is_better=False, print_table=False,
                                        progress=False)
    assert profile.rows[0].layer == "b"


def test_auto_skip_disables_fragile_layer_first():
    model, metric = _fragile_setup()
    tolerance = abs(metric(model)) * 0.05
    disabled = auto_skip_sensitive_layers(model, metric, tolerance=tolerance, progress=False)
    assert disabled[0] == "b"
    assert abs(metric(model)) <= tolerance
    assert not model.b.input_quantizer.is_enabled and model.a.input_quantizer.is_enabled


def test_auto_skip_nothing_when_within_tolerance():
    model, metric = _fragile_setup()
    assert auto_skip_sensitive_layers(model, metric, tolerance=1e9, progress=False) == []


def test_quantized_layers_grouping():
    model, _ = _fragile_setup()
    layers = quantized_layers(model)
    assert list(layers) == ["a", "b", "c", "d"] and len(layers["a"]) == 2
    model.a.input_quantizer.disable()
    assert len(quantized_layers(model)["a"]) == 1


def test_errors():
    model, metric = _fragile_setup()
    with pytest.raises(ValueError, match="mode"):
        build_sensitivity_profile(model, metric, mode="one")
    with pytest.raises(ValueError, match=r"\['zz'\]"):
        build_sensitivity_profile(model, metric, layers=["zz"])
    with pytest.raises(ValueError, match="tolerance"):
        auto_skip_sensitive_layers(model, metric, tolerance=-1)
