"""The quadratic form of qdq.ptq.gram against the direct float64 reconstruction error over the same samples, for
every layer shape it accepts, and its use by qdq.adaround."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qdq
from ptq_models import low_bit_weights
from qdq.ptq.gram import GramNotApplicable, gram_applies, layer_gram

_LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (7, 6)),
    "linear-tokens": (lambda: nn.Linear(6, 5), (3, 4, 6)),
    "linear-few-rows": (lambda: nn.Linear(16, 5), (5, 16)),  # fewer rows than inputs: the patch form
    "conv-few-rows": (lambda: nn.Conv2d(8, 3, 2), (1, 8, 3, 3)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (5, 4, 11)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (5, 4, 7, 7)),
    "strided-dilated": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2), (5, 4, 9, 8)),
    "grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (5, 4, 6, 6)),
    "depthwise": (lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6), (5, 6, 8, 8)),
    "pointwise": (lambda: nn.Conv2d(6, 4, 1), (5, 6, 5, 5)),
    "pointwise-grouped": (lambda: nn.Conv2d(6, 4, 1, groups=2), (5, 6, 5, 5)),
    "same": (lambda: nn.Conv2d(4, 6, (3, 2), padding="same"), (5, 4, 6, 6)),
    "reflect": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (5, 4, 6, 6)),
    "no-bias": (lambda: nn.Conv2d(4, 6, 3, bias=False), (5, 4, 6, 6)),
}


def _direct(layer, x, y, w):
    """Squared error summed over channels, mean over samples and positions, in float64."""
    layer64 = layer.double()
    out = F.linear(x.double(), w, layer64.bias) if isinstance(layer, nn.Linear) else \
        layer64._conv_forward(x.double(), w, layer64.bias)
    cdim = -1 if isinstance(layer, nn.Linear) else 1
    return (out - y.double()).pow(2).sum() / (out.numel() / out.shape[cdim])


@pytest.mark.parametrize("kind", list(_LAYERS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_loss_and_gradient_match_the_direct_error(kind, channels_last):
    make, shape = _LAYERS[kind]
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(shape)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif channels_last:
        pytest.skip("channels-last is 4-D")
    with torch.no_grad():
        y = layer(x) + 0.05 * torch.randn_like(layer(x))
    gram = layer_gram(layer, x, y)
    w = (layer.weight.detach() + 0.02 * torch.randn_like(layer.weight)).requires_grad_(True)
    loss = gram.loss(w)
    w64 = w.detach().double().requires_grad_(True)
    expected = _direct(layer, x, y, w64)
    assert torch.isclose(loss.double(), expected, rtol=1e-4), (float(loss), float(expected))
    loss.backward()
    expected.backward()
    assert torch.allclose(w.grad.double(), w64.grad, rtol=1e-3, atol=1e-6 * float(w64.grad.abs().max()))
    assert gram.rows == y.numel() // y.shape[-1 if kind.startswith("linear") else 1]  # samples x positions
    assert (gram.g is None) == kind.endswith("few-rows")
    gram.reduce(lambda tensors: None)  # one process: the G form of the same data
    assert gram.g is not None and torch.isclose(gram.loss(w.detach()).double(), expected.detach(), rtol=1e-4)


def test_input_quantizer_and_chunks_are_applied():
    torch.manual_seed(1)
    layer = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(9, 3, 6, 6)
    y = layer(x).detach()
    quantize = lambda t: torch.round(t * 4) / 4  # noqa: E731 - a coarse grid the direct error sees too
    run = lambda w, t: F.conv2d(quantize(t), w, layer.bias, padding=1)  # noqa: E731
    import qdq.ptq.gram as gram_module
    whole = layer_gram(run, x, y, layer.weight)
    old = gram_module._CHUNK_ELEMENTS
    gram_module._CHUNK_ELEMENTS = 3 * 3 * 36 * 2  # two samples per pass
    try:
        chunked = layer_gram(run, x, y, layer.weight)
    finally:
        gram_module._CHUNK_ELEMENTS = old
    w = layer.weight.detach()
    expected = _direct(layer, quantize(x), y, w.double())
    assert torch.isclose(whole.loss(w).double(), expected, rtol=1e-4)
    assert torch.isclose(chunked.loss(w).double(), expected, rtol=1e-4)
    assert expected > 0  # the quantized input leaves an error the float weight cannot remove


class _SamePad(nn.Conv2d):
    """TensorFlow's "same" padding done in the forward, as EfficientNet's convolutions do (one more row below)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, [0, 1, 0, 1]), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_a_subclass_that_pads_in_its_forward():
    torch.manual_seed(3)
    layer = _SamePad(4, 6, 3, stride=2, groups=2)
    x = torch.randn(5, 4, 8, 8)
    y = layer(x).detach() + 0.05 * torch.randn(5, 6, 4, 4)
    w = layer.weight.detach() + 0.02 * torch.randn_like(layer.weight)
    out = F.conv2d(F.pad(x, [0, 1, 0, 1]).double(), w.double(), layer.bias.double(), 2, 0, 1, 2)
    expected = (out - y.double()).pow(2).sum() / (out.numel() / 6)
    assert torch.isclose(layer_gram(layer, x, y).loss(w).double(), expected, rtol=1e-4)
    model = low_bit_weights(nn.Sequential(layer).eval(), 4)  # qdq's class made from the subclass keeps its forward
    data = [x[:3], x[3:]]
    qdq.calibrate_model(model, data, progress=False)
    report = qdq.adaround(model, data, iterations=20, progress=False)
    assert report.layers["0"].objective == "gram"
    assert report.layers["0"].loss_adaround <= report.layers["0"].loss_nearest


def test_only_linear_and_1d_2d_convolutions():
    assert gram_applies(nn.Linear(2, 2)) and gram_applies(nn.Conv1d(2, 2, 1)) and gram_applies(nn.Conv2d(2, 2, 1))
    assert not gram_applies(nn.Conv3d(2, 2, 1)) and not gram_applies(nn.ConvTranspose2d(2, 2, 1))
    with pytest.raises(GramNotApplicable, match="up: its forward makes 0 linear/convolution calls"):
        layer_gram(nn.ConvTranspose2d(2, 2, 1), torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3), name="up")


def _quantized():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5)).eval()
    model = low_bit_weights(model, 4)
    data = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    qdq.calibrate_model(model, data, progress=False)
    return model, data


def test_adaround_takes_the_quadratic_objective_where_it_applies():
    torch.manual_seed(0)
    model, data = _quantized()
    report = qdq.adaround(model, data, iterations=50, progress=False)
    assert {r.objective for r in report.layers.values()} == {"gram"}
    for name, r in report.layers.items():
        assert r.loss_adaround <= r.loss_nearest, name
    torch.manual_seed(0)
    model, data = _quantized()
    report = qdq.adaround(model, data, iterations=50, objective="sampled", batch_size=8, progress=False)
    assert {r.objective for r in report.layers.values()} == {"sampled"}


def test_reported_losses_are_the_errors_over_every_sample():
    torch.manual_seed(2)
    model, data = _quantized()
    inputs = torch.cat(data)
    with torch.no_grad(), qdq.disable_quantization(model):
        target = model[0](inputs)
    layer = model[0]
    report = qdq.adaround(model, data, iterations=30, layers=["0"], holdout=0, progress=False)
    with torch.no_grad():
        q = layer.weight_quantizer
        layer.weight_quantizer.disable()
        out = layer(inputs)
        q.enable()
    direct = float((out - target).pow(2).sum(1).mean())
    assert report.layers["0"].loss_adaround == pytest.approx(direct, rel=1e-4)


class _Scaled(qdq.nn.QuantConv2d):
    """A subclass whose forward does more than its weight on its quantized input."""

    def forward(self, input):
        return 2 * super().forward(input)


def test_a_forward_that_is_not_the_layer_falls_back_with_a_warning(caplog):
    torch.manual_seed(0)
    layer = _Scaled(3, 4, 3, padding=1, quant_desc_weight=qdq.QuantDescriptor(num_bits=4, axis=(0,)))
    model = nn.Sequential(layer).eval()
    data = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    qdq.calibrate_model(model, data, progress=False)
    with caplog.at_level("WARNING", logger="qdq.ptq.adaround"):
        report = qdq.adaround(model, data, iterations=5, batch_size=4, progress=False)
    assert report.layers["0"].objective == "sampled"
    assert "0: its forward changes the result of its conv2d call" in caplog.text
    with pytest.raises(ValueError, match="use objective='sampled'"):
        qdq.adaround(model, data, iterations=5, objective="gram", progress=False)


def test_objective_errors_name_the_unit():
    torch.manual_seed(0)
    model, data = _quantized()
    with pytest.raises(ValueError, match="objective must be"):
        qdq.adaround(model, data, objective="exact", progress=False)
    with pytest.raises(ValueError, match="with activation=True"):
        qdq.adaround(model, data, iterations=2, activation=True, objective="gram", progress=False)
    block = low_bit_weights(nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))).eval())
    qdq.calibrate_model(block, data, progress=False)
    with pytest.raises(ValueError, match="unit '0' is a block"):
        qdq.adaround(block, data, iterations=2, blocks=["0"], objective="gram", progress=False)


def test_a_learned_rounding_that_wins_on_held_out_samples_is_learned_again_on_all():
    runs = {}
    for holdout in (0.0, 0.25):
        torch.manual_seed(0)
        model, data = _quantized()
        report = qdq.adaround(model, data, iterations=40, holdout=holdout, progress=False)
        runs[holdout] = report, {n: model.get_submodule(n).weight.detach().clone() for n in report.layers}
    (whole, whole_w), (checked, checked_w) = runs[0.0], runs[0.25]
    refit = [n for n, r in checked.layers.items() if r.refit]
    assert refit and all(not checked.layers[n].kept_nearest for n in refit)
    assert all(r.held_out == 6 for r in checked.layers.values()) and not any(r.refit for r in whole.layers.values())
    for name in refit:  # the second optimisation is the one a run without holdout does
        assert torch.equal(checked_w[name], whole_w[name]), name


@pytest.mark.parametrize("kind", ["conv2d", "linear-few-rows"])
def test_the_forms_of_two_sample_sets_add_up_to_the_form_of_both(kind):
    make, shape = _LAYERS[kind]
    torch.manual_seed(4)
    layer = make()
    x = torch.randn(shape)
    with torch.no_grad():
        y = layer(x) + 0.05 * torch.randn_like(layer(x))
    w = layer.weight.detach() + 0.02 * torch.randn_like(layer.weight)
    both = layer_gram(layer, x[:2], y[:2]) + layer_gram(layer, x[2:], y[2:])
    whole = layer_gram(layer, x, y)
    assert both.rows == whole.rows and (both.g is None) == (whole.g is None)
    assert torch.isclose(both.loss(w), whole.loss(w), rtol=1e-5)
    assert torch.isclose(both.loss(w).double(), _direct(layer, x, y, w.double()), rtol=1e-4)
