import pytest
import torch
from torch import nn

import qdq
from qdq import nn as quant_nn
from qdq.transform.qat import Distiller, freeze_bn_stats, make_teacher, qat_learning_rate
from qdq.transform.switches import quantizers
from qdq.tensor_quant import QuantDescriptor


def _model(weight_bits=8):
    torch.manual_seed(0)
    w = QuantDescriptor(num_bits=weight_bits, axis=0)
    model = nn.Sequential(quant_nn.QuantConv2d(3, 8, 3, quant_desc_weight=w), nn.BatchNorm2d(8), nn.ReLU(),
                          quant_nn.QuantConv2d(8, 4, 3, quant_desc_weight=w), nn.Flatten(),
                          quant_nn.QuantLinear(4 * 4 * 4, 5, quant_desc_weight=w))
    qdq.calibrate_model(model, [torch.randn(16, 3, 8, 8) for _ in range(2)], progress=False)
    return model


def test_teacher_is_float_copy():
    model = _model()
    teacher = make_teacher(model)
    assert all(not q.is_enabled for _, q in quantizers(teacher))
    assert all(q.is_enabled for _, q in quantizers(model))
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), qdq.disable_quantization(model):
        model.eval()
        assert torch.equal(teacher(x), model(x))


@pytest.mark.slow
def test_distillation_reduces_the_gap():
    model = _model(weight_bits=3)  # 3-bit weights: quantization hurts
    distiller = Distiller(model, layers=["2", "5"], weights=[0.5, 1.0])
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(32, 3, 8, 8, generator=g) for _ in range(4)]
    model.train()
    freeze_bn_stats(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=qat_learning_rate(0.1), momentum=0.9)

    def gap():
        with torch.no_grad():
            return sum(float(distiller(x)[1]) for x in data)

    before = gap()
    for _ in range(30):
        for x in data:
            _, loss = distiller(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert gap() < before * 0.9
    distiller.remove()
    assert not model[2]._forward_hooks


def test_output_distillation_and_errors():
    model = _model()
    out, loss = Distiller(model)(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 5) and loss.item() >= 0
    with pytest.raises(ValueError, match="no module 'nope'"):
        Distiller(model, layers=["nope"])
    with pytest.raises(ValueError, match="weights"):
        Distiller(model, layers=["2"], weights=[1, 2])
    with pytest.raises(ValueError):
        qat_learning_rate(0.1, 0)


def test_freeze_bn_stats():
    model = _model()
    model.train()
    assert freeze_bn_stats(model) == 1 and not model[1].training and model[0].training
