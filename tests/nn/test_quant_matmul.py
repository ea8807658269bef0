"""QuantMatMul and QuantScaledDotProductAttention against torch, and their TensorRT placement."""

import logging

import pytest
import torch
import torch.nn.functional as F

from qdq import nn as quant_nn
from qdq.nn.modules.quant_matmul import additive_mask
from qdq.tensor_quant import fake_quantize_by_amax


def _disable(module):
    for q in module.modules():
        if isinstance(q, quant_nn.TensorQuantizer):
            q.disable()


def _qkv(batch=2, heads=4, q_len=20, kv_len=24, dim=16):
    return torch.randn(batch, heads, q_len, dim), torch.randn(batch, heads, kv_len, dim), torch.randn(batch, heads, kv_len, dim)


@pytest.mark.parametrize("case", ["plain", "bool-mask", "float-mask", "causal", "scale", "gqa"])
def test_sdpa_with_quantizers_off_equals_torch(case):
    attn = quant_nn.QuantScaledDotProductAttention()
    _disable(attn)
    q, k, v = _qkv()
    kwargs = {}
    if case == "bool-mask":
        mask = torch.rand(20, 24) > 0.3
        mask[:, 0] = True
        kwargs["attn_mask"] = mask
    elif case == "float-mask":
        kwargs["attn_mask"] = torch.randn(2, 1, 20, 24)
    elif case == "causal":
        k, v = k[:, :, :20], v[:, :, :20]
        kwargs["is_causal"] = True
    elif case == "scale":
        kwargs["scale"] = 0.3
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    torch.testing.assert_close(attn(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs),
                               atol=1e-6, rtol=1e-5)


def test_sdpa_quantizes_the_four_matmul_inputs_exactly():
    """BMM1 = fq(Q) @ fq(K^T), BMM2 = fq(softmax) @ fq(V), with the calibrated amax of each quantizer."""
    attn = quant_nn.QuantScaledDotProductAttention()
    q, k, v = _qkv()
    amax = {"q": 2.5, "k": 3.0, "p": 1.0, "v": 2.0}
    attn.q_bmm_quantizer.amax, attn.k_bmm_quantizer.amax = amax["q"], amax["k"]
    attn.softmax_quantizer.amax, attn.v_bmm_quantizer.amax = amax["p"], amax["v"]
    fq = lambda x, a: fake_quantize_by_amax(x, torch.tensor(a), 8, False, False)  # noqa: E731
    scores = fq(q, amax["q"]) @ fq(k.transpose(-2, -1), amax["k"]) / 4.0
    expected = fq(torch.softmax(scores, -1), amax["p"]) @ fq(v, amax["v"])
    assert torch.equal(attn(q, k, v), expected)


@pytest.mark.parametrize("shape,reason", [
    ((1, 2, 600, 16), "sequence length 600 > 512"),
    ((1, 2, 20, 8), "head size 8"),
    ((1, 2, 10, 32), "key length 10"),
])
def test_sdpa_placement_leaves_both_matmuls_in_float(shape, reason, caplog):
    attn = quant_nn.QuantScaledDotProductAttention()
    x = torch.randn(shape)
    with caplog.at_level(logging.WARNING):
        out = attn(x, x, x)
    assert reason in attn.float_reason and reason in caplog.text
    assert not any(q.is_enabled for q in attn.quantizers())
    torch.testing.assert_close(out, F.scaled_dot_product_attention(x, x, x), atol=1e-6, rtol=1e-5)


def test_sdpa_within_limits_is_quantized():
    attn = quant_nn.QuantScaledDotProductAttention()
    q, k, v = _qkv(q_len=512, kv_len=16, dim=16)
    attn(q, k, v)
    assert attn.float_reason == "" and all(q.is_enabled for q in attn.quantizers())


def test_additive_mask_conventions():
    mask = torch.tensor([True, False])
    assert additive_mask(mask, torch.float32).tolist() == [0.0, float("-inf")]
    assert additive_mask(mask, torch.float32, allowed_when_true=False).tolist() == [float("-inf"), 0.0]
    assert additive_mask(None, torch.float32) is None


def test_quant_matmul():
    mm = quant_nn.QuantMatMul()
    a, b = torch.randn(3, 5, 8), torch.randn(3, 8, 4)
    mm.input_quantizer.amax, mm.other_quantizer.amax = 2.0, 3.0
    expected = fake_quantize_by_amax(a, torch.tensor(2.0), 8, False, False) @ fake_quantize_by_amax(b, torch.tensor(3.0), 8, False, False)
    assert torch.equal(mm(a, b), expected)
    with pytest.raises(TypeError, match="QuantDescriptor"):
        quant_nn.QuantMatMul(quant_desc_input="8bit")
