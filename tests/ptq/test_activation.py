"""The activation after a layer is found in the fx graph only where the layer's output goes into it alone."""

import logging

import torch
import torch.nn.functional as F
from torch import nn

import qdq
from ptq_models import low_bit_weights
from qdq.ptq.activation import following_activations
from qdq.ptq.equalize import ChannelClamp


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU6(inplace=True)
        self.b = nn.Conv2d(4, 4, 1)  # feeds a residual sum and a ReLU: no activation of its own
        self.c = nn.Conv2d(4, 4, 1)  # then F.relu
        self.d = nn.Conv2d(4, 4, 1)  # then a clamp equalization left
        self.clamp = ChannelClamp(torch.arange(1.0, 5.0))
        self.e = nn.Linear(4, 2)     # then nothing

    def forward(self, x):
        x = self.act(self.bn(self.a(x)))
        y = self.b(x)
        x = torch.relu(y) + y
        x = self.clamp(self.d(F.relu(self.c(x))))
        return self.e(x.mean(dim=(2, 3)))


def test_found_only_where_the_output_goes_into_the_activation_alone():
    model = _Net().eval()
    # the norm becomes an Identity, followed through; the model traces with the ChannelClamp in it
    assert qdq.fold_bn(model).folded == [("a", "bn")]
    found = following_activations(model, ["a", "b", "c", "d", "e"])
    assert sorted(found) == ["a", "c", "d"]
    assert found["a"].name == "act" and found["c"].name == "relu" and found["d"].name == "clamp"
    x = torch.linspace(-3, 9, 13).reshape(1, 1, 13).expand(1, 4, 13).clone()
    assert torch.equal(found["a"](x), x.clamp(0, 6))
    assert torch.equal(found["d"](x), torch.minimum(x.clamp(min=0), torch.arange(1.0, 5.0).reshape(1, 4, 1)))
    before = x.clone()
    found["a"](x)  # the module is in place; the function given is not
    assert torch.equal(x, before)


def test_untraceable_model_warns_and_finds_nothing(caplog):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)

        def forward(self, x):
            return torch.relu(self.a(x)) if x.sum() > 0 else x  # data-dependent control flow

    with caplog.at_level(logging.WARNING, logger="qdq.ptq.activation"):
        assert following_activations(Branchy(), ["a"]) == {}
    assert "does not trace" in caplog.text


def test_adaround_reconstructs_through_the_activation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[0].bias.fill_(-0.5)  # much of the output is clipped by the ReLU
    low_bit_weights(model)
    data = [torch.randn(16, 3, 6, 6) for _ in range(2)]
    qdq.calibrate_model(model, data, progress=False)
    with qdq.disable_quantization(model), torch.no_grad():
        target = torch.cat([torch.relu(model[0](x)) for x in data])
    report = qdq.adaround(model, data, iterations=80, batch_size=16, activation=True, holdout=0,
                          progress=False)
    first, last = report.layers["0"], report.layers["2"]
    assert first.activation == "1" and last.activation == ""
    # the loss reported is the error after the ReLU (the first layer's input is the model's input, so the rounded
    # layer's output here is what the loss saw)
    with torch.no_grad():
        model[0].weight_quantizer.disable()
        out = torch.cat([torch.relu(model[0](x)) for x in data])
    err = float(((out - target) ** 2).sum() / (out.numel() / out.shape[1]))
    assert abs(err - first.loss_adaround) <= 1e-4 * max(1.0, err)
    assert first.loss_adaround <= first.loss_nearest
