"""QuantMultiheadAttention against nn.MultiheadAttention."""

import pytest
import torch
from torch import nn

from qdq import nn as quant_nn

CONFIGS = [
    {"batch_first": True},
    {},
    {"kdim": 24, "vdim": 20},
    {"add_bias_kv": True, "add_zero_attn": True},
    {"bias": False, "batch_first": True},
]


def _twins(kwargs):
    ref = nn.MultiheadAttention(32, 4, **kwargs)
    quant = quant_nn.QuantMultiheadAttention(32, 4, **kwargs)
    quant.load_state_dict(ref.state_dict())
    return ref.eval(), quant.eval()


def _inputs(kwargs, cross=False):
    length, source, batch = 18, 20, 3
    bf = kwargs.get("batch_first", False)
    x = torch.randn(batch, length, 32) if bf else torch.randn(length, batch, 32)
    if "kdim" in kwargs:
        return x, torch.randn(source, batch, 24), torch.randn(source, batch, 20), source
    if cross:
        mem = torch.randn(batch, source, 32) if bf else torch.randn(source, batch, 32)
        return x, mem, mem, source
    return x, x, x, length


@pytest.mark.parametrize("kwargs", CONFIGS, ids=[str(c) for c in CONFIGS])
@pytest.mark.parametrize("masks", ["none", "attn_mask", "padding", "causal"])
def test_quantizers_off_equals_torch(kwargs, masks):
    ref, quant = _twins(kwargs)
    for q in quant.modules():
        if isinstance(q, quant_nn.TensorQuantizer):
            q.disable()
    query, key, value, source = _inputs(kwargs)
    args = {}
    if masks == "attn_mask":
        mask = torch.rand(18, source) > 0.7
        mask[:, 0] = False
        args["attn_mask"] = mask
    elif masks == "padding":
        padding = torch.zeros(3, source, dtype=torch.bool)
        padding[:, -2:] = True
        args.update(key_padding_mask=padding, average_attn_weights=False)
    elif masks == "causal":
        if source != 18:
            pytest.skip("causal masks are square")
        args.update(attn_mask=nn.Transformer.generate_square_subsequent_mask(18), is_causal=True)
    out_ref, w_ref = ref(query, key, value, **args)
    out, w = quant(query, key, value, **args)
    torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)


def test_unbatched_and_need_weights_false():
    ref, quant = _twins({})
    for q in quant.modules():
        if isinstance(q, quant_nn.TensorQuantizer):
            q.disable()
    x = torch.randn(18, 32)
    torch.testing.assert_close(quant(x, x, x)[0], ref(x, x, x)[0], atol=1e-6, rtol=1e-5)
    assert quant(x, x, x, need_weights=False)[1] is None


def test_quantized_every_part_sees_data():
    """Projections, out_proj (converted by the module map) and both MatMuls: every quantizer collects."""
    import qdq

    model = nn.Sequential(nn.MultiheadAttention(32, 2, batch_first=True))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = model[0]

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    wrapped = Wrap()
    report = qdq.replace_to_quantization_module(wrapped)
    assert report.replaced == ["attn", "attn.out_proj"] and report.unsupported == []
    qdq.calibrate_model(wrapped, [torch.randn(2, 20, 32)], progress=False, strict=True)
    names = [name for name, m in wrapped.named_modules() if isinstance(m, quant_nn.TensorQuantizer)]
    assert sorted(names) == sorted([
        "attn._input_quantizer", "attn._weight_quantizer", "attn.out_proj._input_quantizer",
        "attn.out_proj._weight_quantizer", "attn.attention._q_bmm_quantizer", "attn.attention._k_bmm_quantizer",
        "attn.attention._softmax_quantizer", "attn.attention._v_bmm_quantizer"])
    assert all(m.amax is not None for m in wrapped.modules() if isinstance(m, quant_nn.TensorQuantizer))
    x = torch.randn(2, 20, 32)
    ref = nn.MultiheadAttention(32, 2, batch_first=True)
    ref.load_state_dict(wrapped.attn.state_dict(), strict=False)
    err = (wrapped(x) - ref(x, x, x)[0]).abs().max()
    assert 0 < err < 0.05
