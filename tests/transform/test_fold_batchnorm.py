import copy
import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from qdq import nn as quant_nn
from qdq.transform.fold_batchnorm import ChannelAffine, fold_bn
from qdq.transform.replace import replace_to_quantization_module
from qdq.transform.switches import disable_quantization, quantizers
from qdq.tensor_quant import QuantDescriptor, reduce_amax

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _randomize(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial running statistics and affine parameters for every norm; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BN):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                    m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
            elif isinstance(m, ChannelAffine):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


def _assert_same(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    scale = want.abs().max().item()
    assert scale > 1e-3, "degenerate reference output"
    err = (got - want).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} * {scale:.3g}"


def _check_fold(model: nn.Module, x: torch.Tensor, n_folded: int, rel: float = 1e-5):
    model = _randomize(model)
    with torch.no_grad():
        want = model(x)
    report = fold_bn(model)
    with torch.no_grad():
        got = model(x)
    _assert_same(got, want, rel)
    assert len(report.folded) == n_folded
    assert not any(isinstance(m, (*_BN, ChannelAffine)) for m in model.modules())
    return report


@pytest.mark.parametrize("conv, bn, shape", [
    (nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), (2, 3, 9)),
    (nn.Conv2d(3, 6, 3, stride=2), nn.BatchNorm2d(6), (2, 3, 9, 9)),
    (nn.Conv3d(3, 6, 3), nn.BatchNorm3d(6), (2, 3, 5, 5, 5)),
    (nn.Conv2d(6, 6, 3, groups=6, bias=False), nn.BatchNorm2d(6), (2, 6, 7, 7)),    # depthwise
    (nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6), (2, 4, 7, 7)),
    (nn.ConvTranspose1d(4, 6, 3, groups=2), nn.BatchNorm1d(6), (2, 4, 5)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False), nn.BatchNorm2d(6), (2, 4, 5, 5)),
    (nn.ConvTranspose3d(6, 4, 2, groups=2), nn.BatchNorm3d(4), (2, 6, 3, 3, 3)),
    (nn.Linear(5, 6), nn.BatchNorm1d(6), (4, 5)),
], ids=["conv1d", "conv2d", "conv3d", "depthwise", "grouped", "convT1d", "convT2d-nobias", "convT3d", "linear"])
def test_layer_bn_pairs(conv, bn, shape):
    model = nn.Sequential(conv, bn, nn.ReLU())
    weight = conv.weight
    report = _check_fold(model, torch.randn(shape), 1)
    assert report.folded == [("0", "1")] and report.discovery == "fx" and report.not_folded == []
    assert isinstance(model[1], nn.Identity) and model[0] is conv and conv.weight is weight
    assert isinstance(conv.bias, nn.Parameter) and conv.bias.requires_grad


def test_fold_math_reference():
    """The folded weight and bias equal the textbook formula, for a transposed conv with groups."""
    conv, bn = nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)
    model = _randomize(nn.Sequential(conv, bn))
    s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    want_w = conv.weight.detach().clone()
    for o in range(6):                       # output channel o: group o // 3, column o % 3 of its input rows
        g, j = divmod(o, 3)
        want_w[g * 2:(g + 1) * 2, j] *= s[o]
    want_b = (conv.bias.detach() - bn.running_mean) * s + bn.bias.detach()
    fold_bn(model)
    torch.testing.assert_close(conv.weight.detach(), want_w, rtol=1e-6, atol=0)
    torch.testing.assert_close(conv.bias.detach(), want_b, rtol=1e-6, atol=1e-7)


def test_affine_false_and_no_bias():
    conv, bn = nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5, affine=False)
    assert conv.bias is None and bn.weight is None
    _check_fold(nn.Sequential(conv, bn), torch.randn(2, 3, 6, 6), 1)
    assert conv.bias is not None


def test_channel_affine_chain():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), ChannelAffine(5), nn.ReLU(),
                          nn.Conv2d(5, 4, 1), ChannelAffine(4))
    report = _check_fold(model, torch.randn(2, 3, 6, 6), 3)
    assert report.folded == [("0", "1"), ("0", "2"), ("4", "5")]
    assert isinstance(model[2], nn.Identity) and isinstance(model[5], nn.Identity)


def test_channel_affine_module():
    affine = ChannelAffine(3)
    x = torch.randn(2, 3, 4)
    assert torch.equal(affine(x), x)
    with torch.no_grad():
        affine.weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
        affine.bias.copy_(torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(affine(x), x * torch.tensor([1.0, 2.0, -1.0])[:, None] + torch.tensor([0.0, 1.0, 0.5])[:, None])
    with pytest.raises(ValueError, match=r"ChannelAffine\(3\) expects a \(N, 3, \.\.\.\) input"):
        affine(torch.randn(2, 4))
    with pytest.raises(ValueError, match="num_features"):
        ChannelAffine(0)


def test_resnet18():
    model = torchvision.models.resnet18(num_classes=10)
    report = _check_fold(model, torch.randn(2, 3, 64, 64), 20, rel=1e-4)
    assert ("layer2.0.downsample.0", "layer2.0.downsample.1") in report.folded
    assert type(model) is torchvision.models.ResNet and isinstance(model.layer1[0].bn1, nn.Identity)


def test_inplace_false_leaves_the_model_alone():
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    before = copy.deepcopy(model.state_dict())
    report = fold_bn(model, inplace=False)
    assert report.model is not model and isinstance(report.model[1], nn.Identity)
    assert isinstance(model[1], nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        _assert_same(report.model(x), model(x))


def test_training_mode_folds_with_a_warning(caplog):
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        want = model(x)
    model.train()
    with caplog.at_level(logging.WARNING, logger="qdq.transform.fold_batchnorm"):
        report = fold_bn(model)
    assert report.folded == [("0", "1")]
    assert "1 is in training mode" in caplog.text
    with torch.no_grad():
        _assert_same(model.eval()(x), want)


# ----------------------------------------------------------------------------------------------------------------
# what is not folded
# ----------------------------------------------------------------------------------------------------------------
class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv1(x)) + self.bn(self.conv2(x))


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv_b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn_b(self.conv_b(x))
        return self.bn(y) + y + self.bn_b(self.relu(z)) * 0 + z   # bn_b is also called twice


class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.same_conv = self.conv
        self.bn = nn.BatchNorm2d(4)
        self.other, self.bn2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.tied, self.bn3 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.tied.weight = self.other.weight

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn2(self.other(x)) + self.bn3(self.tied(x))


class TokenLinear(nn.Module):
    """BatchNorm1d over the tokens axis of a (N, tokens, features) Linear output: not the Linear's channels."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


@pytest.mark.parametrize("model, shape, reasons", [
    (SharedBN(), (2, 3, 4, 4), {"bn": "called 2 times in forward"}),
    (Branching(), (2, 4, 4, 4), {"bn": "the output of 'conv' also feeds add()", "bn_b": "called 2 times"}),
    (Aliased(), (2, 3, 4, 4), {"bn": "the layer 'conv' is reachable as ['conv', 'same_conv']",
                               "bn2": "the weight of 'other' is shared: ['other.weight', 'tied.weight']",
                               "bn3": "the weight of 'tied' is shared"}),
    (TokenLinear(), (2, 5, 4), {"bn": "it has 5 channels and 'fc' (Linear) outputs 6"}),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)), (2, 3, 4, 4),
     {"2": "its input is '1' (ReLU), not the output of a conv"}),
], ids=["bn-used-twice", "conv-output-used-twice", "aliased-and-tied", "linear-tokens", "bn-after-relu"])
def test_not_folded(model, shape, reasons, caplog):
    model = _randomize(model)
    x = torch.randn(shape)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        want = model(x)
    with caplog.at_level(logging.WARNING, logger="qdq.transform.fold_batchnorm"):
        report = fold_bn(model)
    assert report.folded == [] and report.discovery == "fx"
    assert [path for path, _ in report.not_folded] == list(reasons)
    for path, why in report.not_folded:
        assert reasons[path] in why
        assert f"{path} ({type(model.get_submodule(path)).__name__}) not folded: {why}" in caplog.text
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_untraceable_model_falls_back_to_sequential(caplog):
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), ChannelAffine(4), nn.ReLU())
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            x = self.features(x)
            if x.sum() > 0:            # fx cannot trace this
                x = x * 2
            return self.bn(self.conv(x))

    model = _randomize(DataDependent())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = model(x)
    with caplog.at_level(logging.WARNING, logger="qdq.transform.fold_batchnorm"):
        report = fold_bn(model)
    assert "torch.fx could not trace DataDependent" in caplog.text and "falling back" in caplog.text
    assert report.discovery == "sequential"
    assert report.folded == [("features.0", "features.1"), ("features.0", "features.2")]
    assert report.not_folded == [("bn", "not directly after a conv, transposed conv or linear layer in an "
                                        "nn.Sequential (the model could not be traced, so only Sequential "
                                        "neighbours are paired)")]
    with torch.no_grad():
        _assert_same(model(x), want)
    # the caller knows better: explicit pairs need no tracing
    report = fold_bn(model, pairs=[("conv", "bn")])
    assert report.folded == [("conv", "bn")] and report.discovery == "pairs" and report.not_folded == []
    with torch.no_grad():
        _assert_same(model(x), want)


def test_sequential_fallback_distrusts_containers_with_their_own_forward(monkeypatch, caplog):
    class Reversed(nn.Sequential):
        def forward(self, x):
            for module in reversed(self):
                x = module(x)
            return x

    model = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), Reversed(nn.Conv2d(4, 4, 1),
                                                                                       nn.BatchNorm2d(4)))
    monkeypatch.setattr("qdq.transform.fold_batchnorm._LeafTracer.trace", lambda self, root: (_ for _ in ()).throw(TypeError("no")))
    report = fold_bn(model)
    assert report.discovery == "sequential" and report.folded == [("0.0", "0.1")]
    assert report.not_folded[0][0] == "1.1" and "has its own forward" in report.not_folded[0][1]


# ----------------------------------------------------------------------------------------------------------------
# explicit pairs
# ----------------------------------------------------------------------------------------------------------------
def _pairs_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Linear(2, 3), nn.BatchNorm2d(3))
    model.add_module("alias", model[1])
    return model


@pytest.mark.parametrize("pairs, error, match", [
    ([("0", "nope")], ValueError, r"pairs\[0\]: Sequential has no module 'nope'"),
    ([("3", "4"), ("missing.conv", "1")], ValueError, r"pairs\[1\]: Sequential has no module 'missing.conv'"),
    ([("2", "1")], TypeError, r"pairs\[0\]: '2' \(ReLU\) is not a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear"),
    ([("0", "2")], TypeError, r"'2' \(ReLU\) is not a BatchNorm1d/2d/3d, SyncBatchNorm or ChannelAffine"),
    ([("0", "4")], ValueError, r"\('0', '4'\) cannot be folded: '4': it has 3 channels and '0' \(Conv2d\) "
                               "outputs 4"),
    ([("0", "1")], ValueError, r"'1': it is reachable as \['1', 'alias'\]"),
    ([("0",)], TypeError, r"pairs\[0\] must be a \(layer path, norm path\) pair of strings"),
    ("0.1", TypeError, "pairs must be a list"),
])
def test_explicit_pair_errors(pairs, error, match):
    model = _pairs_model()
    with pytest.raises(error, match=match):
        fold_bn(model, pairs=pairs)
    assert isinstance(model[1], nn.BatchNorm2d) and model[0].weight.grad is None  # checked before any change


def test_explicit_pair_listed_twice():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
    with pytest.raises(ValueError, match=r"pairs\[1\]: '1' is listed twice"):
        fold_bn(model, pairs=[("0", "1"), ("2", "1")])
    assert isinstance(model[1], nn.BatchNorm2d)


def test_explicit_pairs_leave_the_rest(caplog):
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    with caplog.at_level(logging.INFO, logger="qdq.transform.fold_batchnorm"):
        report = fold_bn(model, pairs=[("2", "3")])
    assert report.folded == [("2", "3")] and report.not_folded == [("1", "not listed in pairs")]
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[3], nn.Identity)
    assert "1 not folded: not listed in pairs" in caplog.text
    assert fold_bn(model, pairs=[]).folded == []


@pytest.mark.parametrize("use_pairs", [False, True])
def test_no_running_stats_is_an_error(use_pairs):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4, track_running_stats=False))
    pairs = [("0", "1"), ("2", "3")] if use_pairs else None
    with pytest.raises(ValueError, match=r"'3' \(BatchNorm2d\) has no running statistics \(track_running_stats=Fa"):
        fold_bn(model, pairs=pairs)
    assert isinstance(model[1], nn.BatchNorm2d)  # nothing was folded
    assert fold_bn(model, pairs=[("0", "1")]).folded == [("0", "1")]


# ----------------------------------------------------------------------------------------------------------------
# quantized layers
# ----------------------------------------------------------------------------------------------------------------
def _quant_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8), ChannelAffine(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5),
    )


def _set_amax(model, x):
    """Max-calibrated weight amax, fixed input amax."""
    for name, q in quantizers(model):
        if name.endswith("_input_quantizer"):
            q.amax = torch.tensor(3.0)
    for m in model.modules():
        if isinstance(m, quant_nn.QuantMixin):
            m.weight_quantizer.amax = reduce_amax(m.weight, m.weight_quantizer.axis)


def test_quantized_model():
    x = torch.randn(4, 3, 8, 8)
    reference = _randomize(_quant_net())          # fold first, then quantize: what TensorRT sees
    model = copy.deepcopy(reference)
    fold_bn(reference)
    replace_to_quantization_module(reference)
    _set_amax(reference, x)

    replace_to_quantization_module(model)         # quantize, calibrate, then fold
    _set_amax(model, x)
    conv = model[3]
    s = (model[4].weight / torch.sqrt(model[4].running_var + model[4].eps)) * model[5].weight
    old_amax = conv.weight_quantizer.amax.clone()
    with torch.no_grad(), disable_quantization(model):
        want = model(x)
    report = fold_bn(model)

    assert report.folded == [("0", "1"), ("3", "4"), ("3", "5"), ("7", "8"), ("12", "13")]
    assert report.amax_recomputed == [f"{p}._weight_quantizer" for p in ("0", "3", "7", "12")]
    for m in (model[0], model[3], model[7], model[12]):
        assert torch.equal(m.weight_quantizer.amax, reduce_amax(m.weight, 0))
    assert model[7].weight_quantizer.amax.shape == (8, 1, 1, 1)   # transposed conv: per input channel, axis 0
    # per output channel, a max-calibrated amax just scales by |s|
    torch.testing.assert_close(conv.weight_quantizer.amax.flatten(), (old_amax.flatten() * s.abs()).detach(),
                               rtol=1e-6, atol=0)
    with torch.no_grad(), disable_quantization(model):
        _assert_same(model(x), want)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_quantized_per_tensor_and_calibrator_reset(caplog):
    conv = quant_nn.QuantConv2d(3, 4, 3, quant_desc_weight=QuantDescriptor(axis=None))
    model = _randomize(nn.Sequential(conv, nn.BatchNorm2d(4)))
    conv.weight_quantizer.disable_quant()
    conv.weight_quantizer.enable_calib()
    conv.input_quantizer.disable()
    model(torch.randn(1, 3, 5, 5))
    conv.weight_quantizer.load_calib_amax()
    conv.weight_quantizer.disable_calib()
    assert conv.weight_quantizer.calibrator.num_batches == 1
    with caplog.at_level(logging.INFO, logger="qdq.transform.fold_batchnorm"):
        report = fold_bn(model)
    assert report.amax_recomputed == ["0._weight_quantizer"]
    assert conv.weight_quantizer.amax.shape == () and conv.weight_quantizer.amax == conv.weight.abs().max()
    assert conv.weight_quantizer.calibrator.num_batches == 0
    assert "0._weight_quantizer: calibration statistics of the unfolded weight discarded" in caplog.text
    assert "0._weight_quantizer: amax recomputed as the folded weight's abs-max per tensor" in caplog.text


def test_quantized_layer_without_amax_is_left_dynamic():
    model = _randomize(nn.Sequential(quant_nn.QuantLinear(4, 3), nn.BatchNorm1d(3)))
    report = fold_bn(model)
    assert report.folded == [("0", "1")] and report.amax_recomputed == []
    assert model[0].weight_quantizer.amax is None


class StaticSamePadConv(nn.Conv2d):
    """Like EfficientNet's Conv2dStaticSamePadding: pads itself, then calls F.conv2d with self.bias."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


def test_generated_quantized_subclass():
    model = _randomize(nn.Sequential(StaticSamePadConv(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()))
    replace_to_quantization_module(model)
    assert type(model[0]).__name__ == "QuantStaticSamePadConv"
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad(), disable_quantization(model):
        want = model(x)
    assert fold_bn(model).folded == [("0", "1")]
    assert type(model[0]).__name__ == "QuantStaticSamePadConv" and model[0].bias is not None
    with torch.no_grad(), disable_quantization(model):
        _assert_same(model(x), want)


def test_efficientnet_lite0():
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    model = efficientnet.EfficientNet.from_name("efficientnet-lite0")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 49
    report = _check_fold(model, torch.randn(1, 3, 64, 64), 49, rel=1e-4)
    assert report.discovery == "fx" and report.not_folded == []
    assert ("_conv_stem", "_bn0") in report.folded and ("_blocks.3._depthwise_conv", "_blocks.3._bn1") in report.folded
