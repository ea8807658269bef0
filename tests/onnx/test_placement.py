"""Automatic Q/DQ placement: the flow replace -> rules step (placement + shared scales) -> calibrate -> export is rated
fully INT8 by the fusion predictor, passes the checker, and ONNX Runtime agrees with PyTorch on every Q node."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import qdq
from qdq import nn as quant_nn
from qdq.onnx import export_onnx, verify
from qdq.onnx.check import check_tensorrt
from qdq.onnx.fusion import predict_fusion
from qdq.onnx.placement import place_quantizers, remove_placement
from qdq.onnx.rules import apply_custom_rules_to_quantizer
from qdq.transform.op_sites import record_sites, site_quantizers
from qdq.rules import apply_resnet_rules


EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo", marks=pytest.mark.slow)]


def flow(model, shape, tmp_path, dynamo=False, **rules):
    model.eval()
    qdq.replace_to_quantization_module(model)
    x = torch.randn(shape)
    apply_custom_rules_to_quantizer(model, x, dynamo=dynamo, **rules)
    qdq.calibrate_model(model, [torch.randn(shape) for _ in range(2)], progress=False)
    info = export_onnx(model, x, tmp_path / "m.onnx", dynamo=dynamo, output_names=None)
    return model, x, info


def assert_fully_int8(info, model, x, min_share=1.0):
    findings = check_tensorrt(info.model)
    assert not [f for f in findings if f.severity != "info"], findings
    fusion = predict_fusion(info.model)
    assert fusion.int8_share >= min_share, fusion.summary()
    assert fusion.float_residual_adds == [] and fusion.mismatched_groups == 0, fusion.summary()
    report = verify(model, info.path, x)
    assert report.rounding.num_quantizers > 0 and report.rounding.max_step_difference <= 1, str(report)
    return fusion


def test_resnet18_without_recipe_fuses_every_residual_add(tmp_path):
    model, x, info = flow(torchvision.models.resnet18(weights=None, num_classes=10), (1, 3, 32, 32), tmp_path)
    fusion = assert_fully_int8(info, model, x)
    assert fusion.fused_adds == 8
    # the placement the ResNet recipe writes by hand: the identity (input 1) of each block's add
    placed = [(kind, slot, attr) for _, kind, slot, attr in site_quantizers(model)]
    assert placed == [("add", 1, "_add0_input1_quantizer")] * 8
    # a block's identity is the previous block's output, which the next conv reads too: one quantizer for both
    assert model.layer1[1]._add0_input1_quantizer is model.layer1[1].conv1._input_quantizer
    assert verify(model, info.path, x).rounding.max_step_difference <= 1


def test_recipe_takes_precedence_and_a_second_run_adds_nothing():
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    qdq.replace_to_quantization_module(model)
    apply_resnet_rules(model)
    x = torch.randn(1, 3, 32, 32)
    assert place_quantizers(model, x).placed == []
    remove_placement(model)
    plain = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    qdq.replace_to_quantization_module(plain)
    first = place_quantizers(plain, x)
    assert len(first.placed) == 8 and first.sites >= 8
    assert place_quantizers(plain, x).placed == []
    assert remove_placement(plain) == 8 and not list(site_quantizers(plain))


class LoopedResidual(nn.Module):
    """Residual adds written once in a loop of the parent's forward, as HRNet fuses its branches."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)) for _ in range(3))

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return x


def test_residual_adds_in_a_loop_get_one_quantizer_each(tmp_path):
    model, x, info = flow(LoopedResidual(), (1, 3, 16, 16), tmp_path)
    assert [(kind, slot) for _, kind, slot, _ in site_quantizers(model)] == [("add", 0)] * 3
    # each iteration's shortcut is the tensor its block's conv reads: that conv's quantizer, three different ones
    for i, block in enumerate(model.blocks):
        assert getattr(model, f"_add{i}_input0_quantizer") is block[0]._input_quantizer
    fusion = assert_fully_int8(info, model, x)
    assert fusion.fused_adds == 3


class HFViT(nn.Module):
    """A small HuggingFace ViTModel returning ``last_hidden_state``: its residual adds are in the layer whose
    forward transformers wraps for gradient checkpointing."""

    def __init__(self):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, image_size=32, patch_size=8)
        self.vit = transformers.ViTModel(config)

    def forward(self, x):
        return self.vit(pixel_values=x).last_hidden_state


@pytest.mark.slow
def test_hf_vit_dynamo_export_keeps_the_placed_quantizers(tmp_path):
    torch.manual_seed(0)
    model, x, info = flow(HFViT(), (2, 3, 32, 32), tmp_path, dynamo=True)
    placed = [attr for *_, attr in site_quantizers(model)]
    assert len(placed) == 4  # the two residual adds of each layer
    names = [n.name for n in info.model.graph.node if n.op_type == "QuantizeLinear"]
    torchscript = export_onnx(model, x, tmp_path / "ts.onnx")
    assert len(names) == sum(n.op_type == "QuantizeLinear" for n in torchscript.model.graph.node)
    report = verify(model, info.path, x)
    assert report.ok, str(report)


class WindowPartition(nn.Module):
    """A window partition as timm's TinyViT writes it: the padded height is computed with ``+`` from the input's
    shape, which the tagged TorchScript export traces as 0-dim integer tensors."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        batch, height, width, channels = x.shape
        padded = height + (7 - height % 7) % 7
        return (x + self.fc(x)).view(batch, padded // 7, 7, width // 7, 7, channels).sum(dim=(2, 4))


def test_shape_arithmetic_gets_no_quantizer():
    model = WindowPartition().eval()
    qdq.replace_to_quantization_module(model)
    x = torch.randn(2, 14, 14, 8)
    report = place_quantizers(model, x)  # used to quantize `height + pad` and break the view
    assert [(kind, slot) for _, kind, slot, _ in site_quantizers(model)] == [("add", 0)]
    assert len(report.placed) == 1
    assert model(x).shape == (2, 2, 2, 8)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_swin_v2_attention_bias_and_masks_stay_in_float(dynamo, tmp_path):
    """Swin V2 adds a relative position bias (and, in shifted windows, a mask) to the attention scores, edits its qkv
    bias in the forward and builds the mask from the input's shape. None of those adds gets a quantizer: TensorRT's
    fused attention takes the bias and the mask in float, and the rest is folded at build time."""
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                            num_classes=10, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)
    model, x, info = flow(model, (2, 3, 32, 32), tmp_path, dynamo=dynamo)
    assert not [name for name, _ in model.named_modules() if ".attn._add" in name]
    findings = check_tensorrt(info.model)
    assert not [f for f in findings if f.severity != "info"], [str(f) for f in findings]
    attention = [m for m in model.modules() if isinstance(m, quant_nn.QuantScaledDotProductAttention)]
    assert len(attention) == 4 and all(not a.float_reason for a in attention)
    report = verify(model, info.path, x)
    assert report.ok and report.rounding.max_step_difference <= 1, str(report)


@pytest.mark.slow
def test_mobilenet_v3_small_leaves_se_gating_in_float(tmp_path):
    model, x, info = flow(torchvision.models.mobilenet_v3_small(weights=None, num_classes=10), (1, 3, 64, 64),
                          tmp_path)
    fusion = assert_fully_int8(info, model, x, min_share=0.99)
    assert fusion.fused_adds >= 3
    assert {kind for _, kind, _, _ in site_quantizers(model)} <= {"add", "cat", "pool"}


class TinyInception(nn.Module):
    """Branches joined by torch.cat: a conv branch, a max-pool branch (quantized through the pool), an average-pool
    branch written functionally; then a residual add of two concats and a functional global pool."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2 = nn.Conv2d(8, 4, 3, padding=1)
        self.proj = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.b1(x)), F.relu(self.b2(x)), F.max_pool2d(x, 3, 1, 1)], 1)
        y = torch.cat([y[:, :12], F.avg_pool2d(y[:, 12:], 3, 1, 1)], 1)
        z = self.proj(y) + y
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(z), 1), 1))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_concats_pools_and_adds_of_an_inline_forward(dynamo, tmp_path):
    model, x, info = flow(TinyInception(), (1, 3, 8, 8), tmp_path, dynamo=dynamo)
    assert_fully_int8(info, model, x)
    attrs = {attr for *_, attr in site_quantizers(model)}
    assert "_pool1_input0_quantizer" in attrs and any(a.startswith("_add0") for a in attrs), attrs


@pytest.mark.slow
def test_shufflenet_dynamo_split_keeps_scales(tmp_path):
    """Regression: on dynamo files (chunk exported as Split) the scale groups stopped at Split."""
    model, x, info = flow(torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10), (1, 3, 32, 32),
                          tmp_path, dynamo=True)
    assert_fully_int8(info, model, x)


class Reread(nn.Module):
    """Sites reading tensors an earlier site read: two identical concats, adds of the concats' inputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1)
        self.proj = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a, b = F.relu(self.b1(x)), F.relu(self.b2(x))
        y1, y2 = torch.cat([a, b], 1), torch.cat([a, b], 1)
        s = self.proj(y1) + x
        return s + y2 + F.avg_pool2d(torch.cat([x[:, :4], a + b], 1), 3, 1, 1)


def _placed_and_probes(model, x, monkeypatch, reuse, dynamo=False):
    from qdq.onnx import placement

    seen = []
    decide = placement.decide_placement

    def spy(onnx_model, probe_of, q_names):
        seen.append(len(probe_of))
        return decide(onnx_model, probe_of, q_names)

    monkeypatch.setattr(placement, "decide_placement", spy)
    monkeypatch.setattr(placement._Probe, "reuse", reuse)
    report = place_quantizers(model, x, dynamo=dynamo)
    return sorted((p.path, p.reason, p.shares) for p in report.placed), seen[0]



@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("build, shape, rereads", [
    (Reread, (1, 3, 8, 8), True),
    (TinyInception, (1, 3, 8, 8), False),
    (lambda: torchvision.models.DenseNet(growth_rate=4, block_config=(3, 2), num_init_features=8, bn_size=2,
                                         num_classes=5), (1, 3, 32, 32), True),
], ids=["reread", "inception", "densenet"])
def test_a_tensor_read_again_reuses_its_probe_with_the_same_placement(build, shape, rereads, dynamo, monkeypatch):
    """A tensor read by several sites gets one probe pair in the analysed export; what is placed is the same."""
    torch.manual_seed(0)
    model = build().eval()
    qdq.replace_to_quantization_module(model)
    x = torch.randn(shape)
    without, pairs_without = _placed_and_probes(copy.deepcopy(model), x, monkeypatch, reuse=False, dynamo=dynamo)
    placed, pairs = _placed_and_probes(model, x, monkeypatch, reuse=True, dynamo=dynamo)
    assert placed == without and placed
    assert pairs < pairs_without if rereads else pairs == pairs_without
    if isinstance(model, torchvision.models.DenseNet):
        # each concat reads one feature map no earlier concat read (the newest): one pair per site, not per input
        sites = record_sites(model, x)
        assert pairs_without == sum(s.num_inputs if s.kind != "pool" else 1 for s in sites) > pairs == len(sites)


class DataDependent(nn.Module):
    """torch.fx cannot trace this forward (a branch on a tensor value); placement needs only an export."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.a(x)
        if float(y.mean()) > -1e9:
            y = self.b(F.relu(y)) + y
        return y


def test_model_fx_cannot_trace(tmp_path):
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(DataDependent())
    model, x, info = flow(DataDependent(), (1, 3, 4, 4), tmp_path)
    assert_fully_int8(info, model, x)


def test_skip_and_opt_out(caplog):
    model = TinyInception().eval()
    qdq.replace_to_quantization_module(model)
    x = torch.randn(1, 3, 8, 8)
    assert place_quantizers(model, x, skip=[""]).placed == []
    apply_custom_rules_to_quantizer(model, x, placement=False)
    assert not list(site_quantizers(model))
    with pytest.raises(ValueError, match="example_inputs"):
        place_quantizers(model)


def test_placed_quantizers_use_the_conv_default_descriptor():
    saved = quant_nn.QuantConv2d.default_quant_desc_input
    try:
        quant_nn.QuantConv2d.set_default_quant_desc_input(qdq.tensor_quant.QuantDescriptor(calib_method="histogram"))
        model = DataDependent().eval()
        qdq.replace_to_quantization_module(model)
        report = place_quantizers(model, torch.randn(1, 3, 4, 4))
        (placed,) = report.placed
        assert model.get_submodule(placed.path).quant_desc.calib_method == "histogram"
    finally:
        quant_nn.QuantConv2d.set_default_quant_desc_input(saved)
