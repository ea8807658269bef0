"""Empirical bias correction: after it, each quantized layer's per-channel output mean is the float model's."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import qdq
from ptq_models import low_bit_weights


def _model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 6, 3),
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).eval()
    return low_bit_weights(model)


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


class _Residual(nn.Module):
    """A layer whose output is read twice (by the next layer and by the sum), as in a residual block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.body(x)
        return self.head(x.mean(dim=(2, 3)))


def _residual_model():
    torch.manual_seed(0)
    return low_bit_weights(_Residual().eval())


def test_paused_forwards_correct_as_recomputing_does():
    """One paused pass gives the biases that a pass per layer gives, bit for bit: the correction of a layer reaches
    everything after it, the residual sum included."""
    data = [torch.randn(8, 3, 8, 8) + 0.3 for _ in range(3)]
    paused = _residual_model()
    qdq.calibrate_model(paused, data, progress=False)
    recomputed = copy.deepcopy(paused)
    reference = copy.deepcopy(paused)
    modes = [m.training for m in paused.modules()]
    report = qdq.bias_correction(paused, data, progress=False)
    assert [m.training for m in paused.modules()] == modes
    qdq.bias_correction(recomputed, data, progress=False, recompute=True)
    assert report.layers == ["stem", "body.1", "body.3", "head"]
    for name in report.layers:
        assert torch.equal(paused.get_submodule(name).bias, recomputed.get_submodule(name).bias), name
        diff = (_means(paused, data, paused.get_submodule(name), True)
                - _means(reference, data, reference.get_submodule(name), False)).abs().max()
        assert diff < 1e-4, name
    assert max(report.shift.values()) > 1e-3  # there was something to correct


def test_paused_forwards_on_torchvision_resnet18():
    """torchvision's BasicBlock: in-place ReLU and ``out += identity`` on the corrected layers' outputs."""
    model = low_bit_weights(torchvision.models.resnet18(weights=None, num_classes=10).eval(), bits=8)
    qdq.fold_bn(model)
    data = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    qdq.calibrate_model(model, data, progress=False)
    recomputed = copy.deepcopy(model)
    report = qdq.bias_correction(model, data, progress=False)
    qdq.bias_correction(recomputed, data, progress=False, recompute=True)
    assert len(report.layers) == 21 and max(report.shift.values()) > 1e-3
    for name in report.layers:
        assert torch.equal(model.get_submodule(name).bias, recomputed.get_submodule(name).bias), name
