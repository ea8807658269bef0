"""Cross-layer equalization keeps the float model equal (torchvision MobileNetV2, depthwise convolutions and ReLU6
included) and evens out the weight ranges of the equalized pairs."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import qdq
from qdq.ptq.equalize import ChannelClamp


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.2, 2)
            m.bias.data.uniform_(-1, 2)


@pytest.mark.slow
def test_mobilenet_v2_stays_equal():
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = model(x)
    report = qdq.equalize(model, absorb_high_bias=False)
    assert len(report.pairs) == 36 and len(report.folded) == 52
    assert sum(isinstance(m, ChannelClamp) for m in model.modules()) == 34
    with torch.no_grad():
        assert torch.allclose(model(x), expected, rtol=1e-4, atol=1e-5)


def _chain():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    _randomize_bn(model)
    with torch.no_grad():
        model[0].weight[:3] *= 30
        model[3].weight[5:] *= 0.01
    return model


def test_depthwise_chain_is_equal_and_ranges_even_out():
    model = _chain()
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        expected = model(x)
    out_range = lambda w: w.detach().abs().flatten(1).amax(1)
    in_range = lambda w, groups: w.detach().abs().transpose(0, 1).flatten(1).amax(1) if groups == 1 else out_range(w)
    before = out_range(model[0].weight) / in_range(model[3].weight, 8)
    assert float(before.max() / before.min()) > 100
    report = qdq.equalize(model, absorb_high_bias=False)
    assert report.pairs == [("0", "2", "3"), ("3", "5", "6")]
    assert isinstance(model[2], ChannelClamp)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, rtol=1e-4, atol=1e-5)
    # each pair's ranges match channel by channel (the last pair exactly, the first to the rounds' tolerance)
    assert torch.allclose(out_range(model[3].weight), in_range(model[6].weight, 1), rtol=1e-4)
    assert torch.allclose(out_range(model[0].weight), in_range(model[3].weight, 8), rtol=0.05)


@pytest.mark.parametrize("strength", [0.0, 0.5])
def test_partial_strength_scales_by_a_power_of_the_settled_scales(strength):
    full = _chain()
    partial = copy.deepcopy(full)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        expected = full(x)
    folded = copy.deepcopy(full)
    qdq.fold_bn(folded)
    qdq.equalize(full, absorb_high_bias=False)
    report = qdq.equalize(partial, absorb_high_bias=False, strength=strength)
    with torch.no_grad():
        assert torch.allclose(partial(x), expected, rtol=1e-4, atol=1e-5)  # still the same function
    # the last layer's input channels: folded * s ** strength, where full equalization applied s
    s = (full[6].weight / folded[6].weight).detach().double()
    got = (partial[6].weight / folded[6].weight).detach().double()
    torch.testing.assert_close(got, s ** strength, rtol=1e-5, atol=0)
    lo, hi = report.scale_range["3"]
    assert (lo, hi) == pytest.approx((float(s[0].min() ** strength), float(s[0].max() ** strength)), rel=1e-5)
    if strength == 0:
        for i in (0, 3, 6):
            torch.testing.assert_close(partial[i].weight, folded[i].weight, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="strength"):
        qdq.equalize(_chain(), strength=1.5)


def test_high_bias_absorption_moves_bias_and_stays_close():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[1].bias.fill_(4.0)  # beta - 3 gamma = 1 > 0: the pre-activation is (almost) always positive
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    report = qdq.equalize(model, absorb_high_bias=True)
    assert report.absorbed and max(report.absorbed.values()) > 0
    with torch.no_grad():
        out = model(x)
    assert (out - expected).abs().max() < 1e-2 * expected.abs().max()  # exact above beta - 3 gamma only


def test_relu6_modes_and_errors():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(), nn.Conv2d(8, 4, 1)).eval()
    assert qdq.equalize(copy.deepcopy(model), relu6="skip").pairs == []
    relu = copy.deepcopy(model)
    assert qdq.equalize(relu, relu6="relu").pairs == [("0", "1", "2")] and isinstance(relu[1], nn.ReLU)
    with pytest.raises(ValueError, match="relu6"):
        qdq.equalize(model, relu6="bad")
    qdq.replace_to_quantization_module(model)
    qdq.calibrate_model(model, [torch.randn(2, 3, 4, 4)], progress=False)
    with pytest.raises(ValueError, match="before calibrate_model"):
        qdq.equalize(model)


def test_quantized_model_before_calibration():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].weight[0] *= 50
    qdq.replace_to_quantization_module(model)
    x = torch.randn(5, 6)
    with qdq.disable_quantization(model), torch.no_grad():
        expected = model(x)
    assert qdq.equalize(model).pairs == [("0", "1", "2")]
    with qdq.disable_quantization(model), torch.no_grad():
        assert torch.allclose(model(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_resnet_basic_blocks_with_a_reused_relu_stay_equal():
    """torchvision's BasicBlock calls one ReLU module twice; its conv1 -> relu -> conv2 pairs are still equalized."""
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    _randomize_bn(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    report = qdq.equalize(model, absorb_high_bias=False)
    assert ("layer1.0.conv1", "layer1.0.relu", "layer1.0.conv2") in report.pairs and len(report.pairs) == 8
    with torch.no_grad():
        assert torch.allclose(model(x), expected, rtol=1e-4, atol=1e-4)


class _SharedReLU6(nn.Module):
    """One ReLU6 module called twice (as EfficientNet's blocks do with their ``_swish``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, groups=6), nn.Conv2d(6, 4, 1)
        self.act = nn.ReLU6()

    def forward(self, x):
        return self.c(self.act(self.b(self.act(self.a(x)))))


def test_a_relu6_called_twice_is_left_with_clamp_and_equalized_as_relu():
    torch.manual_seed(0)
    model = _SharedReLU6().eval()
    with torch.no_grad():
        model.a.weight[:3] *= 30
    report = qdq.equalize(copy.deepcopy(model), absorb_high_bias=False)
    assert report.pairs == [] and any("called more than once" in why for _, why in report.not_equalized)
    relu = copy.deepcopy(model)
    report = qdq.equalize(relu, relu6="relu", absorb_high_bias=False)
    assert report.pairs == [("a", "act", "b"), ("b", "act", "c")] and isinstance(relu.act, nn.ReLU)
    x = torch.rand(2, 3, 5, 5) * 0.01  # small inputs: no pre-activation reaches 6, where ReLU and ReLU6 agree
    reference = copy.deepcopy(model)
    reference.act = nn.ReLU()
    torch.testing.assert_close(relu(x), reference(x), rtol=1e-4, atol=1e-6)
    ranges = relu.a.weight.detach().flatten(1).abs().amax(1)
    assert float(ranges.max() / ranges.min()) < float(model.a.weight.detach().flatten(1).abs().amax(1).max() /
                                                      model.a.weight.detach().flatten(1).abs().amax(1).min()) / 3
