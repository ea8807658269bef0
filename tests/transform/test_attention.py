"""Attention MatMuls quantized in torchvision, timm and HuggingFace models: replace -> calibrate(strict) -> export
with both exporters -> verify -> check, with both attention MatMuls of every block in INT8."""

import logging

import pytest
import torch
from torch import nn

import qdq
from qdq import quant_modules
from qdq import nn as quant_nn
from qdq.transform.attention import (
    attention_modules,
    quantize_attention,
    register_attention_module,
    remove_attention_quantization,
)
from qdq.onnx import export_onnx, verify
from qdq.onnx.check import check_tensorrt
from qdq.onnx.check_attention import find_attentions


def tiny_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128,
                             num_classes=10), torch.randn(2, 3, 32, 32)


def tiny_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=10), torch.randn(2, 3, 32, 32)


def tiny_timm(name="vit_tiny_patch16_224"):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, img_size=64, depth=2), torch.randn(2, 3, 64, 64)


class Bert(nn.Module):
    """A small BertModel returning ``last_hidden_state`` (the raw model's output does not export)."""

    def __init__(self, attn_implementation="sdpa"):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, vocab_size=100, max_position_embeddings=64,
                                         attn_implementation=attn_implementation)
        self.bert = transformers.BertModel(config)

    def forward(self, ids):
        return self.bert(input_ids=ids).last_hidden_state


def tiny_bert(attn_implementation="sdpa"):
    return Bert(attn_implementation), torch.randint(0, 100, (2, 20))


def tiny_encoder():
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), torch.randn(2, 20, 64)


MODELS = {
    "torchvision-vit": tiny_vit,
    "torchvision-swin": tiny_swin,
    "timm-vit": tiny_timm,
    "timm-deit": lambda: tiny_timm("deit_tiny_patch16_224"),
    "bert-sdpa": tiny_bert,
    "bert-eager": lambda: tiny_bert("eager"),
    "transformer-encoder": tiny_encoder,
}
FAST = {"torchvision-vit", "bert-sdpa", "transformer-encoder"}


def _flow(make, tmp_path, dynamo, tolerance_steps=None):
    torch.manual_seed(0)
    model, x = make()
    model.eval()
    report = qdq.replace_to_quantization_module(model)
    assert report.unsupported == []
    qdq.calibrate_model(model, [x], progress=False, strict=True)
    attn = [m for m in model.modules() if isinstance(m, quant_nn.QuantScaledDotProductAttention)]
    assert attn and all(a.float_reason == "" and all(q.amax is not None for q in a.quantizers()) for a in attn)
    info = export_onnx(model, x, tmp_path / "m.onnx", dynamo=dynamo)
    result = verify(model, info.path, x) if tolerance_steps is None else \
        verify(model, info.path, x, output_tolerance_steps=tolerance_steps)
    assert result.rounding.max_step_difference <= 1, str(result)
    assert result.ok, str(result)
    findings = check_tensorrt(info.path)
    assert [f for f in findings if f.severity == "error"] == []
    from qdq.onnx.check import _Index

    found = find_attentions(_Index(info.model, ""))
    assert len(found) == len(attn)  # every attention block of the model is in the graph, both MatMuls quantized
    assert not [f for f in findings if f.rule.startswith("attention-")]
    return model, info, findings


@pytest.mark.parametrize("name", sorted(FAST))
def test_flow_torchscript(name, tmp_path):
    _flow(MODELS[name], tmp_path, dynamo=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(MODELS) - FAST))
def test_flow_torchscript_more_families(name, tmp_path):
    _flow(MODELS[name], tmp_path, dynamo=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_flow_dynamo(name, tmp_path):
    _flow(MODELS[name], tmp_path, dynamo=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b_16", "swin_t"])
@pytest.mark.parametrize("dynamo", [False, True])
def test_torchvision_full_size(name, dynamo, tmp_path):
    import torchvision

    # random-weight deep nets: last-bit float differences flip values at rounding boundaries and compound with depth,
    # so the outputs are judged in a few output steps; every QuantizeLinear must still agree within one step
    _flow(lambda: (getattr(torchvision.models, name)(weights=None), torch.randn(1, 3, 224, 224)), tmp_path, dynamo,
          tolerance_steps=8.0)


@pytest.mark.parametrize("name", ["timm-vit", "bert-eager", "torchvision-swin"])
def test_quantized_attention_output_is_close_to_float(name):
    torch.manual_seed(0)
    model, x = MODELS[name]()
    model.eval()
    with torch.no_grad():
        ref = model(x)
    qdq.replace_to_quantization_module(model)
    qdq.calibrate_model(model, [x], progress=False, strict=True)
    with torch.no_grad():
        out = model(x)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())
    assert sqnr > 15, float(sqnr)


def test_routed_forward_equals_the_float_forward_with_quantizers_off():
    for make in (tiny_swin, tiny_timm, lambda: tiny_bert("eager"), tiny_bert):
        torch.manual_seed(0)
        model, x = make()
        model.eval()
        with torch.no_grad():
            ref = model(x)
        assert quantize_attention(model)
        for q in model.modules():
            if isinstance(q, quant_nn.TensorQuantizer):
                q.disable()
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)


def test_patch_is_idempotent_and_reversible():
    model, x = tiny_swin()
    paths = quantize_attention(model)
    assert paths == attention_modules(model) and len(paths) == 4
    assert quantize_attention(model) == []
    assert remove_attention_quantization(model) == paths
    assert not any(hasattr(m, "attn_quant") for m in model.modules())


def test_ignore_policy_keeps_blocks_in_float_and_reports_their_functional_linears():
    """An ignored Swin block keeps its float forward, which hands qkv/proj weights to F.linear: those Linear layers
    are not converted (they would never run) and the report says why."""
    model, x = tiny_swin()
    report = qdq.replace_to_quantization_module(model, ignore_policy=r"features\.1\..*")
    left = dict(report.unsupported)
    assert set(left) == {"features.1.0.attn.qkv", "features.1.0.attn.proj", "features.1.1.attn.qkv",
                         "features.1.1.attn.proj"}
    assert all("passes its weight to a function" in why for why in left.values())
    qdq.calibrate_model(model, [x], progress=False, strict=True)  # no quantizer that never runs


def test_float_multihead_attention_out_proj_is_reported_not_converted():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model = Block()
    report = qdq.replace_to_quantization_module(model, ignore_policy="attn")
    assert report.ignored == ["attn"]
    assert [p for p, _ in report.unsupported] == ["attn.out_proj"]
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    without = quant_modules.quantizable_layers(Block())
    assert [(l.path, l.status) for l in without] == [("attn", "quantizable"), ("attn.out_proj", "quantizable")]


def test_attention_false_leaves_swin_linears_reported():
    model, _ = tiny_swin()
    report = qdq.replace_to_quantization_module(model, attention=False)
    assert report.attention == [] and len(report.unsupported) == 8


def test_registered_class_and_str(caplog):
    class Attention(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1), -1) @ v

    register_attention_module(Attention)
    model = nn.Sequential(Attention())
    report = qdq.replace_to_quantization_module(model)
    assert report.attention == ["0"] and "attention MatMuls quantized in 1 blocks" in str(report)
    q = torch.randn(1, 2, 20, 16)
    model[0](q, q, q)
    assert model[0].attn_quant.q_bmm_quantizer.amax is None and model[0].attn_quant.float_reason == ""
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_attention_module(len)


def test_mha_float_model_exports_with_torchscript_under_no_grad(tmp_path):
    """Regression: export_onnx ran under torch.no_grad(), which sends nn.MultiheadAttention to its fused fast path
    (aten::_native_multi_head_attention) that the TorchScript exporter cannot translate."""
    model, x = tiny_vit()
    info = export_onnx(model, x, tmp_path / "fp32.onnx", quantize=False)
    assert "MatMul" in {n.op_type for n in info.model.graph.node}
    assert torch.backends.mha.get_fastpath_enabled()


def test_long_sequences_stay_in_float_with_a_warning(caplog):
    model, _ = tiny_bert()
    qdq.replace_to_quantization_module(model)
    with caplog.at_level(logging.WARNING):
        qdq.calibrate_model(model, [torch.randint(0, 100, (1, 12))], progress=False, strict=True)
    attn = [m for m in model.modules() if isinstance(m, quant_nn.QuantScaledDotProductAttention)]
    assert all("key length 12" in a.float_reason for a in attn) and "left in float" in caplog.text
