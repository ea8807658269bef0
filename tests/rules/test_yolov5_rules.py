"""YOLOv5 recipes (qdq.rules.yolov5) on the example model: what is patched, float parity, calibration, QAT."""

import copy
import logging

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck as TorchvisionBottleneck

from qdq import calibrate_model, quant_modules
from qdq import nn as quant_nn
from qdq.transform.patching import ForwardPatch, apply_patch
from qdq.rules import apply_yolov5_rules, remove_yolov5_rules, yolov5_patches
from qdq.transform.switches import disable_quantization, quantizers
from qdq.tensor_quant import QuantDescriptor

from examples.yolov5 import model as yolo

NAMES = ["yolov5.bottleneck_add", "yolov5.c3_concat", "yolov5.sppf_concat", "yolov5.concat"]


def _float_model():
    return yolo.yolov5_tiny(nc=3, seed=0).eval()


def _quantized(float_model):
    model = copy.deepcopy(float_model)
    quant_modules.replace_to_quantization_module(model)
    done = apply_yolov5_rules(model)
    return model, done


def _batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 64, 64, generator=gen) for _ in range(n)]


@pytest.fixture(scope="module")
def calibrated():
    """A converted, patched and calibrated tiny model, with the max |input| each added op saw while calibrating."""
    model, _ = _quantized(_float_model())
    seen = {}

    def record(name):
        def hook(mod, args, out):
            xs = args[0] if len(args) == 1 else args
            seen[name] = max(seen.get(name, 0.0), max(float(x.abs().max()) for x in xs))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, (quant_nn.QuantAdd, quant_nn.QuantConcat)):
            m.register_forward_hook(record(name))
    calibrate_model(model, _batches(3), progress=False)
    for m in model.modules():
        m._forward_hooks.clear()
    return model, seen


def test_what_is_patched():
    model, done = _quantized(_float_model())
    assert list(done) == NAMES
    assert [len(done[n]) for n in NAMES] == [7, 8, 1, 4]
    assert done["yolov5.sppf_concat"] == ["backbone.sppf"]
    assert done["yolov5.concat"] == ["neck.cat_up4", "neck.cat_up3", "neck.cat_down4", "neck.cat_down5"]
    for path, m in model.named_modules():
        if isinstance(m, yolo.Bottleneck):
            assert hasattr(m, "addop") == m.add == path.startswith("backbone."), path
            if m.add:
                assert isinstance(m.addop, quant_nn.QuantAdd)
                assert m.addop._input0_quantizer is m.addop._input1_quantizer
        elif isinstance(m, (yolo.C3, yolo.SPPF, yolo.Concat)):
            assert isinstance(m.catop, quant_nn.QuantConcat) and m.catop.shared and m.catop.dim == 1
    assert model.backbone.sppf.catop.num_inputs == 4
    assert isinstance(model.backbone.sppf.m, nn.MaxPool2d)  # the max-pool chain is not touched
    added = [n for n, _ in quantizers(model) if ".addop." in n or ".catop." in n]
    assert len(added) == 7 + 8 + 1 + 4  # one quantizer per op: the add's two inputs share one
    assert "backbone.stage1.1.m.0.addop._input0_quantizer" in added


def test_disabled_quantizers_give_the_float_outputs_exactly():
    float_model = _float_model()
    model, _ = _quantized(float_model)
    x = torch.randn(1, 3, 64, 64)
    expected = float_model(x)
    with disable_quantization(model):
        got = model(x)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    patched_float = copy.deepcopy(float_model)  # the recipes alone, without converting the convs
    apply_yolov5_rules(patched_float)
    with disable_quantization(patched_float):
        got = patched_float(x)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_ops_are_on_the_forward_path_with_the_right_inputs():
    model, _ = _quantized(_float_model())
    calls = {"add": 0, "cat": 0}
    block = model.backbone.stage2[1].m[1]
    captured = {}
    block.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    block.addop.register_forward_hook(lambda m, args, out: captured.update(add_args=args))
    for m in model.modules():
        if isinstance(m, quant_nn.QuantAdd):
            m.register_forward_hook(lambda *a: calls.__setitem__("add", calls["add"] + 1))
        if isinstance(m, quant_nn.QuantConcat):
            m.register_forward_hook(lambda *a: calls.__setitem__("cat", calls["cat"] + 1))
    with disable_quantization(model):
        model(torch.randn(1, 3, 64, 64))
        x = captured["x"]
        assert captured["add_args"][0] is x
        assert torch.equal(captured["add_args"][1], block.cv2(block.cv1(x)))
    assert calls == {"add": 7, "cat": 13}
    spp_inputs = []
    model.backbone.sppf.catop.register_forward_hook(lambda m, args, out: spp_inputs.extend(args[0]))
    with disable_quantization(model):
        model(torch.randn(1, 3, 64, 64))
    x, y1, y2, y3 = spp_inputs
    assert torch.equal(y3, nn.functional.max_pool2d(x, 13, 1, 6))


@pytest.mark.filterwarnings("ignore::qdq.nn.modules.tensor_quantizer.DynamicAmaxWarning")  # uncalibrated on purpose
def test_applying_twice_patches_once():
    model, _ = _quantized(_float_model())
    count = len(list(quantizers(model)))
    again = apply_yolov5_rules(model)
    assert again == {n: [] for n in NAMES}
    again = apply_yolov5_rules(model, by_name=True)  # the same recipes, matched another way
    assert again == {n: [] for n in NAMES}
    assert len(list(quantizers(model))) == count
    model(torch.randn(1, 3, 64, 64))  # no recursion


def test_remove_restores_the_model():
    float_model = _float_model()
    model = copy.deepcopy(float_model)
    quant_modules.replace_to_quantization_module(model)
    before = [n for n, _ in quantizers(model)]
    apply_yolov5_rules(model)
    removed = remove_yolov5_rules(model)
    assert [len(removed[n]) for n in NAMES] == [7, 8, 1, 4]
    assert [n for n, _ in quantizers(model)] == before
    assert not any(hasattr(m, "addop") or hasattr(m, "catop") or "forward" in vars(m) for m in model.modules())
    x = torch.randn(1, 3, 64, 64)
    with disable_quantization(model):
        assert all(torch.equal(g, e) for g, e in zip(model(x), float_model(x)))
    assert [len(p) for p in apply_yolov5_rules(model).values()] == [7, 8, 1, 4]  # and it can be patched again


def test_calibration_gives_the_added_quantizers_an_amax(calibrated):
    model, seen = calibrated
    ops = {n: m for n, m in model.named_modules() if isinstance(m, (quant_nn.QuantAdd, quant_nn.QuantConcat))}
    assert len(ops) == 20
    for name, op in ops.items():
        q = op._input0_quantizer if isinstance(op, quant_nn.QuantAdd) else op._input_quantizer
        assert q.amax is not None, name
        # max calibration of one shared quantizer: the largest |value| over every input of every batch
        assert q.amax.item() == pytest.approx(seen[name], rel=1e-6), name


@pytest.mark.slow
def test_quantized_model_differs_from_float_and_trains(calibrated):
    model = copy.deepcopy(calibrated[0])
    float_model = _float_model()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)  # the calibration batch shape: no new kernels to set up
    with torch.no_grad():
        q_out, f_out = model(x), float_model(x)
    assert not torch.equal(q_out[0], f_out[0])
    assert torch.allclose(q_out[0], f_out[0], atol=0.5 * float(f_out[0].abs().max()))  # close, not equal
    model.train()
    sum(o.square().mean() for o in model(x)).backward()
    block = model.backbone.stage3[1].m[0]
    for p in (model.backbone.stem.conv.weight, block.cv1.conv.weight, model.neck.c3_out5.cv3.conv.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


class Bottleneck(nn.Module):
    """A user's own block with YOLOv5's name and layout (not the example's class)."""

    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2, self.add = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 3, padding=1), True

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C3(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2, self.cv3 = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(2 * c, c, 1)
        self.m = nn.Sequential(Bottleneck(c))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


def test_by_name_matches_own_classes_and_by_class_does_not(caplog):
    model = nn.Sequential(C3(4), Bottleneck(4))
    x = torch.randn(1, 4, 6, 6)
    expected = model(x)
    with caplog.at_level(logging.WARNING, logger="qdq.rules.yolov5"):
        done = apply_yolov5_rules(model, classes=yolo)
    assert done == {n: [] for n in NAMES}
    assert "no YOLOv5 block" in caplog.text
    done = apply_yolov5_rules(model, by_name=True)
    assert done["yolov5.bottleneck_add"] == ["0.m.0", "1"] and done["yolov5.c3_concat"] == ["0"]
    with disable_quantization(model):
        assert torch.equal(model(x), expected)
    with pytest.raises(ValueError, match="not both"):
        apply_yolov5_rules(model, classes=yolo, by_name=True)


def test_default_classes_come_from_the_models_module():
    with pytest.raises(ValueError, match="defines none of"):
        apply_yolov5_rules(nn.Sequential(yolo.Bottleneck(4, 4)))  # torch.nn's module has no YOLOv5 block
    model = nn.Sequential(yolo.Bottleneck(4, 4), yolo.C3(4, 4))
    done = apply_yolov5_rules(model, classes={"Bottleneck": yolo.Bottleneck})  # only the blocks given get recipes
    assert done == {"yolov5.bottleneck_add": ["0", "1.m.0"]}
    assert not hasattr(model[1], "catop") and hasattr(model[1].m[0], "addop")
    with pytest.raises(ValueError, match="unknown block names"):
        apply_yolov5_rules(model, classes={"Bottlenek": yolo.Bottleneck})
    with pytest.raises(TypeError, match="not an nn.Module subclass"):
        yolov5_patches({"C3": int})


def test_blocks_that_do_not_fit_are_skipped_with_a_warning(caplog):
    class OwnForward(yolo.Bottleneck):
        def forward(self, x):
            return super().forward(x) * 2

    class KeepsForward(yolo.Bottleneck):
        pass

    model = nn.Sequential(OwnForward(4, 4), KeepsForward(4, 4), TorchvisionBottleneck(16, 4))
    with caplog.at_level(logging.WARNING, logger="qdq.rules.yolov5"):
        done = apply_yolov5_rules(model, by_name=True)
    assert done["yolov5.bottleneck_add"] == ["1"]
    assert "overrides Bottleneck.forward" in caplog.text
    assert "has no attribute cv1, cv2, add" in caplog.text
    assert not hasattr(model[0], "addop") and not hasattr(model[2], "addop")


def test_quant_desc_reaches_the_added_quantizers():
    model = nn.Sequential(yolo.Bottleneck(4, 4), yolo.Concat(1))
    apply_yolov5_rules(model, classes=yolo, quant_desc=QuantDescriptor(num_bits=6, calib_method="histogram"))
    assert model[0].addop._input0_quantizer.num_bits == 6
    assert type(model[1].catop._input_quantizer.calibrator).__name__ == "HistogramCalibrator"


def test_bottleneck_recipe_on_a_block_without_add_adds_nothing_and_keeps_the_forward():
    """The op factory returns None for a block without add; the patched forward must still run it unchanged."""
    recipe = yolov5_patches(classes=yolo)[0]
    everything = ForwardPatch(recipe.name, match=yolo.Bottleneck, forward=recipe.forward, ops=recipe.ops)
    block = yolo.Bottleneck(4, 4, shortcut=False).eval()
    x = torch.randn(1, 4, 6, 6)
    expected = block(x)
    assert apply_patch(block, everything) == [""]
    assert not hasattr(block, "addop") and "forward" in vars(block)
    assert torch.equal(block(x), expected)
