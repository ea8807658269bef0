"""Empirical bias correction: after it, each quantized layer's per-channel output mean is the float model's."""

import copy

import pytest
import torch
from torch import nn

import qdq
from qdq.tensor_quant import QuantDescriptor


def _model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 6, 3),
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).eval()
    qdq.replace_to_quantization_module(model)
    for m in model.modules():
        if hasattr(m, "_weight_quantizer"):
            m._weight_quantizer = qdq.TensorQuantizer(QuantDescriptor(num_bits=3, axis=0))
    return model


def _means(model, data, layer, quantized):
    sums = []
    h = layer.register_forward_hook(lambda m, a, out: sums.append(out.double().transpose(0, 1).flatten(1).mean(1)))
    with torch.no_grad():
        if quantized:
            [model(x) for x in data]
        else:
            with qdq.disable_quantization(model):
                [model(x) for x in data]
    h.remove()
    return torch.stack(sums).mean(0)


def test_output_means_match_the_float_model():
    model = _model()
    data = [torch.randn(16, 3, 6, 6) + 0.5 for _ in range(4)]
    qdq.calibrate_model(model, data, progress=False)
    reference = copy.deepcopy(model)  # the float model keeps its own biases
    before = (_means(model, data, model[2], True) - _means(reference, data, reference[2], False)).abs().max()
    report = qdq.bias_correction(model, data, progress=False)
    assert report.layers == ["0", "2", "4"] and report.bias_added == ["0"]
    for name in report.layers:
        layer = model.get_submodule(name)
        ref = reference.get_submodule(name)
        diff = (_means(model, data, layer, True) - _means(reference, data, ref, False)).abs().max()
        assert diff < 1e-4, name
    assert before > 1e-3  # there was something to correct
    assert report.batches == 4


def test_subset_of_layers_and_errors():
    model = _model()
    data = [torch.randn(4, 3, 6, 6)]
    qdq.calibrate_model(model, data, progress=False)
    bias = model[2].bias.detach().clone()
    report = qdq.bias_correction(model, data, layers=["4"], progress=False)
    assert report.layers == ["4"] and torch.equal(model[2].bias, bias)
    with pytest.raises(TypeError, match="one-shot"):
        qdq.bias_correction(model, iter(data), progress=False)
