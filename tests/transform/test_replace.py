import inspect
import logging
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from qdq import nn as quant_nn
from qdq import quant_modules
from qdq.transform import subclasses
from qdq.transform.ignore_policy import compile_ignore_policy
from qdq.transform.replace import replace_to_quantization_module
from qdq.transform.switches import quantizers
from qdq.tensor_quant import QuantDescriptor


class StaticSamePadConv(nn.Conv2d):
    """Like EfficientNet's Conv2dStaticSamePadding: pads itself, then calls F.conv2d."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((1, 1, 1, 1))

    def forward(self, x):
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SuperCallConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class PlainSubConv(nn.Conv2d):
    def extra(self):
        return "kept"


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        StaticSamePadConv(3, 4, 3), nn.ReLU(), SuperCallConv(4, 4, 1), PlainSubConv(4, 4, 1), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4, 3),
    )


@pytest.mark.filterwarnings("ignore::qdq.nn.modules.tensor_quantizer.DynamicAmaxWarning")  # uncalibrated on purpose
def test_keeps_objects_parameters_and_hooks():
    model = torchvision.models.resnet18(num_classes=10)
    conv = model.layer1[0].conv1
    weight = conv.weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    calls = []
    handle = conv.register_forward_hook(lambda *a: calls.append(1))
    report = replace_to_quantization_module(model)
    assert model.layer1[0].conv1 is conv and conv.weight is weight
    assert isinstance(conv, quant_nn.QuantConv2d) and isinstance(conv, nn.Conv2d)
    assert len(report.replaced) == 20 + 1 + 1  # convs, fc, avgpool
    assert isinstance(model.avgpool, quant_nn.QuantAdaptiveAvgPool2d)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # the optimizer still owns the very same parameters
    assert calls == [1]
    handle.remove()
    model(torch.randn(2, 3, 32, 32))
    assert calls == [1]
    assert conv.weight_quantizer.name == "layer1.0.conv1._weight_quantizer"


@pytest.mark.filterwarnings("ignore::qdq.nn.modules.tensor_quantizer.DynamicAmaxWarning")  # uncalibrated on purpose
def test_mobilenet_v2_every_conv_and_linear():
    model = torchvision.models.mobilenet_v2(num_classes=10)
    n_conv = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    report = replace_to_quantization_module(model)
    assert len(report.replaced) == n_conv
    assert all(isinstance(m, (quant_nn.QuantConv2d, quant_nn.QuantLinear)) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))
    model.eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_subclassed_convs_are_quantized_with_their_forward():
    model = _net()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    report = replace_to_quantization_module(model)
    assert report.replaced == ["0", "2", "3", "4", "6"]
    assert type(model[0]).__name__ == "QuantStaticSamePadConv"
    assert isinstance(model[0], StaticSamePadConv) and isinstance(model[0], quant_nn.QuantConv2d)
    assert model[3].extra() == "kept"
    for _, q in quantizers(model):
        q.disable()
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # behaviour preserved
    # enabled: the subclass forward runs on the quantized input and weight
    for _, q in quantizers(model):
        q.enable()
    model[0].input_quantizer.amax = 0.5
    model[0].weight_quantizer.amax = torch.full((4, 1, 1, 1), 0.05)
    with torch.no_grad():
        got = model[0](x)
        ref = F.conv2d(F.pad(model[0].input_quantizer(x), (1, 1, 1, 1)), model[0].weight_quantizer(model[0].weight),
                       model[0].bias)
    assert torch.equal(got, ref)
    assert isinstance(model[0].weight, nn.Parameter)  # the parameter is back after the forward
    # the super() path quantizes once (input calibrated once per forward)
    model[2].input_quantizer.disable_quant()
    model[2].input_quantizer.enable_calib()
    model[2](torch.randn(1, 4, 2, 2))
    assert model[2].input_quantizer.calibrator.num_batches == 1


@pytest.mark.filterwarnings("ignore::qdq.nn.modules.tensor_quantizer.DynamicAmaxWarning")  # uncalibrated on purpose
def test_quantized_subclasses_pickle_and_deepcopy(tmp_path):
    """torch.save(model) and pickle find a generated class through the classes it is made from."""
    import copy
    import pickle

    model = _net().eval()
    replace_to_quantization_module(model)
    model[0].input_quantizer.amax = 0.5
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    torch.save(model, tmp_path / "model.pt")
    for other in (torch.load(tmp_path / "model.pt", weights_only=False), pickle.loads(pickle.dumps(model)),
                  copy.deepcopy(model)):
        assert type(other[0]) is type(model[0]) and type(other[0]).__name__ == "QuantStaticSamePadConv"
        assert other[0].weight is not model[0].weight
        assert float(other[0].input_quantizer.amax) == 0.5
        with torch.no_grad():
            assert torch.equal(other(x), expected)


def test_subclass_forward_binds_the_input_by_name():
    """Regression: a quantized subclass called as ``m(input=x)`` ran without input quantization."""
    model = _net()
    replace_to_quantization_module(model)
    layer = model[0]
    layer.input_quantizer.amax = 0.5
    layer.weight_quantizer.amax = torch.full((4, 1, 1, 1), 0.05)
    x = torch.randn(2, 3, 8, 8)
    name = list(inspect.signature(StaticSamePadConv.forward).parameters)[1]  # the forward's own input name
    with torch.no_grad():
        assert torch.equal(layer(**{name: x}), layer(x))
        assert not torch.equal(layer(**{name: x}), F.conv2d(F.pad(x, (1, 1, 1, 1)), layer.weight_quantizer(layer.weight),
                                                            layer.bias))
    with pytest.raises(TypeError, match="got no input.*StaticSamePadConv.forward"):
        layer()


class ReadsWeight(nn.Linear):
    """A subclass whose own forward reads ``self.weight`` (and records what it saw there)."""

    def forward(self, x, scale=1.0):
        self.seen = (self.weight, "weight" in self.__dict__)
        return F.linear(x, self.weight, self.bias) * scale


def test_subclass_forward_reads_the_quantized_weight_without_shadowing_it():
    """Regression: the fake-quantized weight was put into the instance ``__dict__`` for the forward's duration."""
    torch.manual_seed(0)
    model = nn.Sequential(ReadsWeight(4, 3))
    replace_to_quantization_module(model)
    layer = model[0]
    param = layer.weight
    layer.input_quantizer.amax = 2.0
    layer.weight_quantizer.amax = torch.full((3, 1), 0.25)
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = F.linear(layer.input_quantizer(x), layer.weight_quantizer(param), layer.bias) * 3.0
        for call in (lambda: layer(x, 3.0), lambda: layer(x=x, scale=3.0), lambda: layer(scale=3.0, x=x)):
            assert torch.equal(call(), expected)
            seen, shadowed = layer.seen
            assert not shadowed and not isinstance(seen, nn.Parameter)
            assert torch.equal(seen, layer.weight_quantizer(param))
        first = layer.seen[0]
        layer(x)
        assert layer.seen[0] is first  # eval mode: the quantizer's weight cache serves the second forward
    assert layer.weight is param and isinstance(layer.weight, nn.Parameter)  # outside the forward: the Parameter
    assert "weight" not in layer.__dict__ and dict(layer.named_parameters())["weight"] is param
    with pytest.raises(RuntimeError):
        layer(torch.randn(5, 7))  # a failing forward leaves the Parameter in place too
    assert layer.weight is param


def test_subclass_forward_sees_its_own_weight_when_nested():
    """A quantized subclass called inside another's forward: each forward reads its own quantized weight."""

    class Outer(ReadsWeight):
        def __init__(self):
            super().__init__(4, 4)
            self.inner = ReadsWeight(4, 4)

        def forward(self, x, scale=1.0):
            y = F.linear(x, self.weight)
            self.before = self.weight
            y = self.inner(y)
            self.after = self.weight
            return y

    torch.manual_seed(0)
    model = nn.Sequential(Outer())
    replace_to_quantization_module(model)
    outer = model[0]
    for q in (outer.input_quantizer, outer.inner.input_quantizer):
        q.amax = 4.0
    outer.weight_quantizer.amax, outer.inner.weight_quantizer.amax = torch.full((4, 1), 0.3), torch.full((4, 1), 0.7)
    with torch.no_grad():
        model(torch.randn(2, 4))
    assert outer.before is outer.after and torch.equal(outer.after, outer.weight_quantizer(outer.weight))
    assert torch.equal(outer.inner.seen[0], outer.inner.weight_quantizer(outer.inner.weight))


class SamePadLinear(nn.Linear):
    """Its own forward, reading ``self.weight``, calling itself ``depth`` times (nested forwards of one module)."""

    def forward(self, x, depth=0):
        y = F.linear(x, self.weight, self.bias)
        return self(y, depth - 1) if depth > 0 else y


def _calibrated_same_pad():
    torch.manual_seed(0)
    model = nn.Sequential(SamePadLinear(4, 4))
    replace_to_quantization_module(model)
    model[0].input_quantizer.amax, model[0].weight_quantizer.amax = 4.0, torch.full((4, 1), 0.3)
    return model.eval()


def test_subclass_forward_nested_in_itself_reads_the_quantized_weight():
    layer = _calibrated_same_pad()[0]
    x = torch.randn(2, 4)
    with torch.no_grad():
        got = layer(x, depth=2)
        w, fq_in = layer.weight_quantizer(layer.weight), layer.input_quantizer
        expected = F.linear(fq_in(F.linear(fq_in(F.linear(fq_in(x), w, layer.bias)), w, layer.bias)), w, layer.bias)
    assert torch.equal(got, expected)
    assert isinstance(layer.weight, nn.Parameter) and layer.__dict__[subclasses._VIEWS] == []


def test_subclass_forward_compiles_fullgraph_with_the_same_numbers():
    model = _calibrated_same_pad()
    x = torch.randn(3, 4)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x)
    assert torch.equal(compiled, eager)


def test_subclass_with_its_own_weight_property_keeps_it_and_says_so(caplog):
    class DerivedWeight(nn.Linear):
        @property
        def weight(self):
            return self.raw * 2

        def __init__(self):
            super().__init__(4, 2)
            self.raw = nn.Parameter(self._parameters.pop("weight").detach())

        def forward(self, x):
            return F.linear(x, self.weight, self.bias)

    with caplog.at_level(logging.WARNING, logger="qdq.transform.subclasses"):
        cls = subclasses._quant_subclass(DerivedWeight, quant_nn.QuantLinear, nn.Linear)
    assert "defines its own 'weight' attribute" in caplog.text
    assert vars(cls).get("weight") is None


def test_subclass_forward_without_a_positional_input_is_refused():
    class KeywordOnly(nn.Conv2d):
        def forward(self, *, x):
            return super().forward(x)

    model = nn.Sequential(KeywordOnly(3, 4, 1))
    report = replace_to_quantization_module(model)
    assert report.replaced == [] and type(model[0]) is KeywordOnly
    assert [p for p, _ in report.unsupported] == ["0"]
    assert "cannot tell which argument to quantize" in report.unsupported[0][1]


@pytest.mark.filterwarnings("ignore::qdq.nn.modules.tensor_quantizer.DynamicAmaxWarning")  # uncalibrated on purpose
def test_subclass_forward_gradients():
    model = _net()
    replace_to_quantization_module(model)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    model(x).sum().backward()
    assert model[0].weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("policy,ignored", [
    ("6", ["6"]),
    (["0", "6"], ["0", "6"]),
    (r"[0-3]", ["0", "2", "3"]),
    (re.compile(r"\d"), ["0", "2", "3", "4", "6"]),
    (lambda path: path.endswith("2"), ["2"]),
])
def test_ignore_policies(policy, ignored):
    model = _net()
    report = replace_to_quantization_module(model, ignore_policy=policy)
    assert report.ignored == ignored
    assert sorted(report.replaced + report.ignored) == ["0", "2", "3", "4", "6"]
    for path in ignored:
        assert not quant_modules.is_quantized(model.get_submodule(path))


def test_ignore_subtree_not_prefix():
    model = nn.Sequential()
    model.add_module("head", nn.Sequential(nn.Linear(2, 2)))
    model.add_module("header", nn.Linear(2, 2))
    report = replace_to_quantization_module(model, ignore_policy="head")
    assert report.ignored == ["head.0"] and report.replaced == ["header"]


def test_bad_regex_is_named():
    with pytest.raises(ValueError, match=r"'layer\[1' is not a valid regular expression"):
        compile_ignore_policy(["ok", "layer[1"])
    with pytest.raises(TypeError, match="ignore_policy"):
        compile_ignore_policy([3])


def test_quant_map_validation_and_custom_entries():
    with pytest.raises(TypeError, match="not an nn.Module subclass"):
        replace_to_quantization_module(nn.Linear(2, 2), quant_map={nn.Linear: int})
    with pytest.raises(TypeError, match="pairs"):
        replace_to_quantization_module(nn.Linear(2, 2), quant_map=[nn.Linear])
    model = nn.Sequential(nn.MaxPool2d(2), nn.Linear(2, 2))
    report = replace_to_quantization_module(model, quant_map={nn.MaxPool2d: quant_nn.QuantMaxPool2d})
    assert report.replaced == ["0", "1"]
    assert isinstance(model[0], quant_nn.QuantMaxPool2d)


def test_root_module_and_shared_module():
    root = nn.Linear(3, 3)
    replace_to_quantization_module(root)
    assert isinstance(root, quant_nn.QuantLinear)
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = replace_to_quantization_module(model)
    assert report.replaced == ["0"] and model[0] is model[2]
    assert len(list(quantizers(model))) == 2


def test_second_call_does_not_requantize():
    model = _net()
    replace_to_quantization_module(model)
    report = replace_to_quantization_module(model)
    assert report.replaced == [] and len(report.already_quantized) == 5


def test_uses_class_default_descriptors():
    old = quant_nn.QuantConv2d.default_quant_desc_input
    try:
        quant_nn.QuantConv2d.set_default_quant_desc_input(QuantDescriptor(calib_method="histogram", num_bits=7))
        model = _net()
        replace_to_quantization_module(model)
        assert model[0].input_quantizer.num_bits == 7  # subclass conv follows QuantConv2d's defaults
        assert model[6].input_quantizer.num_bits == 8
    finally:
        quant_nn.QuantConv2d.set_default_quant_desc_input(old)


@pytest.mark.filterwarnings("ignore::qdq.nn.modules.tensor_quantizer.DynamicAmaxWarning")  # uncalibrated on purpose
def test_lstm_in_model():
    model = nn.Sequential(nn.LSTM(4, 5, num_layers=2))
    replace_to_quantization_module(model)
    assert isinstance(model[0], quant_nn.QuantLSTM) and len(model[0]._input_quantizers) == 2
    out, _ = model[0](torch.randn(3, 2, 4))
    assert out.shape == (3, 2, 5)


def test_initialize_and_deactivate():
    quant_modules.initialize()
    try:
        quant_modules.initialize()  # twice patches once
        assert nn.Conv2d is quant_nn.QuantConv2d
        built = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Linear(1, 1))
        assert isinstance(built[0], quant_nn.QuantConv2d) and isinstance(built[1], quant_nn.QuantLinear)
        assert built[0](torch.randn(1, 1, 2, 2)).shape == (1, 1, 2, 2)  # no recursion
    finally:
        quant_modules.deactivate()
    assert nn.Conv2d is not quant_nn.QuantConv2d and nn.Conv2d.__name__ == "Conv2d"
    assert type(nn.Conv2d(1, 1, 1)) is nn.Conv2d


def test_report_logged(caplog):
    with caplog.at_level(logging.INFO, logger="qdq"):
        replace_to_quantization_module(_net(), ignore_policy="6")
    assert "quantized 4 layers, ignored 1" in caplog.text and "Quantization: 6 is ignored" in caplog.text


def test_default_map_entries():
    names = [e.mod_name for e in quant_modules._DEFAULT_QUANT_MAP]
    assert "Conv2d" in names and "LSTMCell" in names and "AdaptiveAvgPool3d" in names
    entry = quant_modules._DEFAULT_QUANT_MAP[1]
    assert getattr(entry.orig_mod, entry.mod_name) is nn.Conv2d and entry.replace_mod is quant_nn.QuantConv2d


def test_new_quantizers_live_on_the_layer_device():
    """Regression: converted layers on another device got CPU quantizers (amax moved on every forward)."""
    model = nn.Sequential(nn.Linear(2, 2)).to("meta")
    replace_to_quantization_module(model)
    assert model[0].input_quantizer._device.type == "meta"
    model[0].input_quantizer.amax = 1.0
    assert model[0].input_quantizer.amax.device.type == "meta"


def test_per_layer_descriptors_build_each_quantizer_from_its_descriptor():
    from qdq.calib import HistogramCalibrator

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(2), nn.Linear(4, 2))
    entropy = QuantDescriptor(calib_method="entropy", calib_args={"num_bins": 512})
    w4 = QuantDescriptor(num_bits=4, axis=None)
    report = replace_to_quantization_module(model, descriptors={"0": {"input": entropy, "weight": w4},
                                                                "1": {"input": QuantDescriptor(num_bits=6)}})
    assert report.replaced == ["0", "1", "2"]
    assert model[0].input_quantizer.quant_desc == entropy and model[0].weight_quantizer.quant_desc == w4
    assert isinstance(model[0].input_quantizer.calibrator, HistogramCalibrator)
    assert model[0].input_quantizer.calibrator.num_bins == 512
    assert model[1].input_quantizer.num_bits == 6
    assert model[2].weight_quantizer.axis == 0  # no entry: the class defaults


def test_per_layer_descriptors_are_checked():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(2), nn.ReLU())
    with pytest.raises(ValueError, match=r"descriptors: 'head': no quantizable layer of the model has this path; "
                                         r"'1': QuantAvgPool2d has no 'weight' quantizer .*'2': no quantizable"):
        replace_to_quantization_module(model, descriptors={"head": {}, "1": {"weight": QuantDescriptor()},
                                                           "2": {}})
    with pytest.raises(ValueError, match=r"'0'\['input'\]: must be a QuantDescriptor, got dict"):
        replace_to_quantization_module(model, descriptors={"0": {"input": {"num_bits": 8}}})
    assert not any(quant_modules.is_quantized(m) for m in model.modules())  # checked before anything changes


class _Dense(nn.Module):
    """A layer of its own with a weight matrix (as transformers' Conv1D): no quantized class maps to it."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.weight


def test_layers_with_a_weight_matrix_but_no_quantized_class_are_reported(caplog):
    model = nn.Sequential(nn.Embedding(10, 4), _Dense(), nn.Linear(4, 4), nn.LayerNorm(4), _Dense())
    with caplog.at_level("WARNING", logger="qdq.transform.replace"):
        report = replace_to_quantization_module(model)
    assert report.replaced == ["2"]
    assert [path for path, _ in report.unsupported] == ["1", "4"]  # not the embedding, the norm or the linear
    assert all("_Dense has a weight matrix but no quantized class" in why for _, why in report.unsupported)
    assert "not quantized: 2 _Dense layers (1, 4)" in caplog.text
    ignored = replace_to_quantization_module(
        nn.Sequential(_Dense(), nn.Linear(4, 4)), ignore_policy=["0"])
    assert ignored.unsupported == []
