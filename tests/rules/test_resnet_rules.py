"""torchvision ResNet recipes (qdq.rules.torchvision_resnet): skip-input-only residual adds, exact float parity."""

import copy
import inspect
import logging
import textwrap

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from qdq import calibrate_model, quant_modules
from qdq import nn as quant_nn
from qdq.rules import apply_resnet_rules, remove_resnet_rules
from qdq.rules import torchvision_resnet as recipes
from qdq.transform.switches import disable_quantization, quantizers
from qdq.tensor_quant import QuantDescriptor

NAMES = ["resnet.basic_block_add", "resnet.bottleneck_add"]


def _resnet(arch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()
    with torch.no_grad():  # running statistics that are not the identity, so BN is not a no-op in eval mode
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _body(fn):
    """The statements of a function, without its signature and docstring."""
    lines = textwrap.dedent(inspect.getsource(fn)).splitlines()
    body = lines[lines.index(next(line for line in lines if line.rstrip().endswith(":"))) + 1:]
    text = textwrap.dedent("\n".join(body)).strip()
    if text.startswith('"""'):
        text = text[text.index('"""', 3) + 3:].strip()
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("fn, cls", [(recipes.basic_block_forward, BasicBlock),
                                     (recipes.bottleneck_forward, Bottleneck)])
def test_forward_is_torchvisions_with_the_add_through_addop(fn, cls):
    """Guards against a torchvision release changing the block's forward under the recipe."""
    expected = [line.replace("out += identity", "out = self.addop(out, identity)") for line in _body(cls.forward)]
    assert _body(fn) == expected


@pytest.mark.parametrize("arch, blocks, name", [("resnet18", 8, NAMES[0]), ("resnet50", 16, NAMES[1])])
def test_one_skip_quantizing_addop_per_block_and_exact_float_outputs_when_disabled(arch, blocks, name):
    float_model = _resnet(arch)
    model = copy.deepcopy(float_model)
    quant_modules.replace_to_quantization_module(model)
    done = apply_resnet_rules(model)
    assert len(done[name]) == blocks and sum(len(p) for p in done.values()) == blocks
    adds = [m for m in model.modules() if isinstance(m, quant_nn.QuantAdd)]
    assert len(adds) == blocks
    for add in adds:
        assert add.quantized_inputs == (1,)
        assert isinstance(add._input1_quantizer, quant_nn.TensorQuantizer) and not hasattr(add, "_input0_quantizer")
    assert len([n for n, _ in quantizers(model) if ".addop." in n]) == blocks
    x = torch.randn(2, 3, 32, 32)
    with disable_quantization(model):
        assert torch.equal(model(x), float_model(x))


@pytest.mark.filterwarnings("ignore::qdq.nn.modules.tensor_quantizer.DynamicAmaxWarning")  # uncalibrated on purpose
def test_addop_inputs_are_branch_and_identity():
    model = _resnet("resnet18")
    apply_resnet_rules(model)
    seen = {}
    for path in ("layer1.0", "layer2.0"):  # without and with a downsample branch
        block = model.get_submodule(path)
        block.register_forward_pre_hook(lambda m, args, p=path: seen.setdefault(p, {}).update(x=args[0].clone()))
        block.addop.register_forward_hook(
            lambda m, args, out, p=path: seen[p].update(branch=args[0].clone(), identity=args[1].clone()))
        block.addop._input1_quantizer.register_forward_hook(
            lambda m, args, out, p=path: seen[p].update(quantized=args[0].clone()))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        for path, s in seen.items():
            block = model.get_submodule(path)
            x = s["x"]
            branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
            identity = x if block.downsample is None else block.downsample(x)
            assert torch.equal(s["branch"], branch) and torch.equal(s["identity"], identity), path
            assert torch.equal(s["quantized"], identity), path  # the quantizer sees the skip input, not the branch
    assert model.layer1[0].downsample is None and model.layer2[0].downsample is not None


def test_apply_twice_patches_once_and_remove_restores():
    float_model = _resnet("resnet18")
    model = copy.deepcopy(float_model)
    quant_modules.replace_to_quantization_module(model)
    before = [n for n, _ in quantizers(model)]
    assert len(apply_resnet_rules(model)[NAMES[0]]) == 8
    assert apply_resnet_rules(model) == {NAMES[0]: [], NAMES[1]: []}
    assert sum(isinstance(m, quant_nn.QuantAdd) for m in model.modules()) == 8
    removed = remove_resnet_rules(model)
    assert len(removed[NAMES[0]]) == 8
    assert [n for n, _ in quantizers(model)] == before
    assert not any(hasattr(m, "addop") or "forward" in vars(m) for m in model.modules())
    x = torch.randn(1, 3, 32, 32)
    with disable_quantization(model):
        assert torch.equal(model(x), float_model(x))


@pytest.mark.slow
def test_calibration_and_qat_gradients():
    model = _resnet("resnet18")
    quant_modules.replace_to_quantization_module(model)
    apply_resnet_rules(model)
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, quant_nn.QuantAdd):
            m.register_forward_hook(
                lambda mod, args, out, n=name: seen.__setitem__(n, max(seen.get(n, 0.0), float(args[1].abs().max()))))
    gen = torch.Generator().manual_seed(0)
    calibrate_model(model, [torch.randn(2, 3, 32, 32, generator=gen) for _ in range(2)], progress=False)
    for m in model.modules():
        m._forward_hooks.clear()
    for name, m in model.named_modules():
        if isinstance(m, quant_nn.QuantAdd):
            assert m._input1_quantizer.amax is not None
            assert m._input1_quantizer.amax.item() == pytest.approx(seen[name], rel=1e-6), name  # the skip input's max
    model.train()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(x).square().mean().backward()
    for p in (model.conv1.weight, model.layer1[0].conv1.weight, model.layer4[1].conv2.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_subclasses(caplog):
    class OwnForward(BasicBlock):
        def forward(self, x):
            return super().forward(x) * 2

    class KeepsForward(BasicBlock):
        pass

    model = nn.Sequential(OwnForward(8, 8), KeepsForward(8, 8))
    with caplog.at_level(logging.WARNING, logger="qdq.rules.torchvision_resnet"):
        done = apply_resnet_rules(model)
    assert done[NAMES[0]] == ["1"] and not hasattr(model[0], "addop")
    assert "overrides BasicBlock.forward" in caplog.text


def test_no_block_is_a_warning_and_quant_desc_is_used(caplog):
    with caplog.at_level(logging.WARNING, logger="qdq.rules.torchvision_resnet"):
        assert apply_resnet_rules(nn.Sequential(nn.Conv2d(3, 3, 1))) == {NAMES[0]: [], NAMES[1]: []}
    assert "no torchvision BasicBlock or Bottleneck" in caplog.text
    model = nn.Sequential(Bottleneck(16, 4))
    apply_resnet_rules(model, quant_desc=QuantDescriptor(num_bits=7))
    assert model[0].addop._input1_quantizer.num_bits == 7
