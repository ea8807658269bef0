import torch
from torch import nn

from qdq import nn as quant_nn
from qdq.transform.switches import disable_quantization, enable_quantization, have_quantizer, quantizers


def _model():
    return nn.Sequential(quant_nn.QuantLinear(3, 3), nn.ReLU(), quant_nn.QuantLinear(3, 3))


def test_have_quantizer():
    model = _model()
    assert have_quantizer(model) and have_quantizer(model[0]) and not have_quantizer(model[1])


def test_apply_seed_style():
    model = _model()
    disable_quantization(model[0]).apply()
    assert [q.is_enabled for _, q in quantizers(model)] == [False, False, True, True]
    enable_quantization(model[0]).apply()
    assert all(q.is_enabled for _, q in quantizers(model))
    disable_quantization(model).apply(disabled=False)
    assert all(q.is_enabled for _, q in quantizers(model))


def test_context_managers_restore_previous_state():
    model = _model()
    model[2].input_quantizer.disable()
    before = [q.state() for _, q in quantizers(model)]
    with disable_quantization(model):
        assert not any(q.is_enabled for _, q in quantizers(model))
    assert [q.state() for _, q in quantizers(model)] == before
    with enable_quantization(model):
        assert all(q.is_enabled for _, q in quantizers(model))
    assert [q.state() for _, q in quantizers(model)] == before
    try:
        with disable_quantization(model):
            raise KeyError("boom")
    except KeyError:
        pass
    assert [q.state() for _, q in quantizers(model)] == before


def test_disabled_model_is_float():
    torch.manual_seed(0)
    model = _model()
    x = torch.randn(4, 3)
    with disable_quantization(model), torch.no_grad():
        out = model(x)
    ref = model[2].weight @ torch.relu(model[0].weight @ x.T + model[0].bias[:, None]) + model[2].bias[:, None]
    torch.testing.assert_close(out, ref.T.detach())
