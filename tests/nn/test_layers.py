"""Every quantized layer against its float twin."""

import pytest
import torch
from torch import nn

import reference as ref
from qdq import nn as quant_nn
from qdq.nn.modules._utils import pop_quant_desc_in_kwargs
from qdq.tensor_quant import QuantDescriptor

# (quant class, float class, constructor args, constructor kwargs, input shape)
LAYERS = [
    (quant_nn.QuantConv1d, nn.Conv1d, (4, 6, 3), {"padding": "same", "padding_mode": "reflect"}, (2, 4, 9)),
    (quant_nn.QuantConv2d, nn.Conv2d, (4, 6, 3), {"stride": 2, "dilation": 2, "bias": False}, (2, 4, 11, 9)),
    (quant_nn.QuantConv2d, nn.Conv2d, (4, 8, 3), {"groups": 2, "padding": 1, "padding_mode": "circular"}, (2, 4, 7, 7)),
    (quant_nn.QuantConv3d, nn.Conv3d, (2, 3, 2), {"padding": "same"}, (1, 2, 5, 4, 5)),
    (quant_nn.QuantConvTranspose1d, nn.ConvTranspose1d, (4, 6, 3), {"stride": 2, "output_padding": 1}, (2, 4, 7)),
    (quant_nn.QuantConvTranspose2d, nn.ConvTranspose2d, (4, 6, 3), {"stride": 2, "groups": 2}, (2, 4, 5, 6)),
    (quant_nn.QuantConvTranspose3d, nn.ConvTranspose3d, (2, 3, 2), {"bias": False}, (1, 2, 3, 4, 3)),
    (quant_nn.QuantLinear, nn.Linear, (12, 5), {}, (3, 7, 12)),
    (quant_nn.QuantLinear, nn.Linear, (12, 5), {"bias": False}, (4, 12)),
    (quant_nn.QuantMaxPool1d, nn.MaxPool1d, (3,), {"stride": 2}, (2, 3, 11)),
    (quant_nn.QuantMaxPool2d, nn.MaxPool2d, (3,), {"stride": 2, "padding": 1, "ceil_mode": True}, (2, 3, 9, 8)),
    (quant_nn.QuantMaxPool3d, nn.MaxPool3d, (2,), {}, (1, 2, 4, 4, 4)),
    (quant_nn.QuantAvgPool1d, nn.AvgPool1d, (3,), {}, (2, 3, 11)),
    (quant_nn.QuantAvgPool2d, nn.AvgPool2d, (2,), {"count_include_pad": False, "padding": 1}, (2, 3, 9, 8)),
    (quant_nn.QuantAvgPool3d, nn.AvgPool3d, (2,), {}, (1, 2, 4, 4, 4)),
    (quant_nn.QuantAdaptiveAvgPool1d, nn.AdaptiveAvgPool1d, (4,), {}, (2, 3, 11)),
    (quant_nn.QuantAdaptiveAvgPool2d, nn.AdaptiveAvgPool2d, ((3, 2),), {}, (2, 3, 9, 8)),
    (quant_nn.QuantAdaptiveAvgPool3d, nn.AdaptiveAvgPool3d, (1,), {}, (1, 2, 4, 4, 4)),
]
IDS = [f"{q.__name__}-{i}" for i, (q, *_) in enumerate(LAYERS)]


def _twins(qcls, fcls, args, kwargs):
    torch.manual_seed(0)
    fl = fcls(*args, **kwargs)
    torch.manual_seed(0)
    ql = qcls(*args, **kwargs)
    ql.load_state_dict(fl.state_dict(), strict=False)
    return fl, ql


def _quantizers(layer):
    return [m for m in layer.modules() if isinstance(m, quant_nn.TensorQuantizer)]


@pytest.mark.parametrize("qcls,fcls,args,kwargs,shape", LAYERS, ids=IDS)
def test_subclass_of_float_twin_and_same_parameters(qcls, fcls, args, kwargs, shape):
    fl, ql = _twins(qcls, fcls, args, kwargs)
    assert isinstance(ql, fcls)
    assert [n for n, _ in fl.named_parameters()] == [n for n, _ in ql.named_parameters()]
    for (n, p), (_, q) in zip(fl.named_parameters(), ql.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("qcls,fcls,args,kwargs,shape", LAYERS, ids=IDS)
def test_disabled_quantizers_give_the_float_result_exactly(qcls, fcls, args, kwargs, shape):
    fl, ql = _twins(qcls, fcls, args, kwargs)
    for q in _quantizers(ql):
        q.disable()
    x = torch.randn(shape)
    assert torch.equal(ql(x), fl(x))


def _fq(t, q):
    """The NumPy reference fake quantization of t with quantizer q's amax."""
    amax = q.amax if q.amax is not None else (t.detach().abs().amax() if q.axis is None else None)
    return torch.from_numpy(ref.fake_quant(t.detach().numpy(), amax.detach().numpy(), q.num_bits, q.unsigned,
                                           q.narrow_range))


@pytest.mark.parametrize("qcls,fcls,args,kwargs,shape", LAYERS, ids=IDS)
def test_enabled_quantizers_give_float_op_on_fake_quantized_operands(qcls, fcls, args, kwargs, shape):
    fl, ql = _twins(qcls, fcls, args, kwargs)
    x = torch.randn(shape) * 2
    ql.input_quantizer.amax = 1.5
    if hasattr(ql, "_weight_quantizer"):
        w = ql.weight_quantizer
        w.amax = ql.weight.detach().abs().amax(dim=tuple(range(1, ql.weight.dim())), keepdim=True) * 0.8
        fl.weight.data = _fq(fl.weight, w)
    expected = fl(_fq(x, ql.input_quantizer))
    assert torch.equal(ql(x), expected)


@pytest.mark.parametrize("qcls,fcls,args,kwargs,shape", LAYERS, ids=IDS)
def test_gradients_flow(qcls, fcls, args, kwargs, shape):
    _, ql = _twins(qcls, fcls, args, kwargs)
    ql.input_quantizer.amax = 3.0
    x = torch.randn(shape, requires_grad=True)
    ql(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if hasattr(ql, "weight"):
        assert ql.weight.grad is not None and ql.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("qcls,fcls,args,kwargs,shape", LAYERS[:9], ids=IDS[:9])
def test_device_dtype_kwargs(qcls, fcls, args, kwargs, shape):
    ql = qcls(*args, **kwargs, device="cpu", dtype=torch.float64)
    assert ql.weight.dtype == torch.float64
    ql.input_quantizer.disable()
    ql.weight_quantizer.disable()
    assert ql(torch.randn(shape, dtype=torch.float64)).dtype == torch.float64


def test_conv_transpose_output_size_and_weight_axis():
    ql = quant_nn.QuantConvTranspose2d(4, 6, 3, stride=2)
    fl = nn.ConvTranspose2d(4, 6, 3, stride=2)
    fl.load_state_dict(ql.state_dict(), strict=False)
    x = torch.randn(1, 4, 5, 5)
    for q in _quantizers(ql):
        q.disable()
    assert torch.equal(ql(x, output_size=[12, 12]), fl(x, output_size=[12, 12]))
    # per input channel: axis 0 of (in, out / groups, kh, kw)
    ql.weight_quantizer.enable()
    ql.weight_quantizer.disable_quant()
    ql.weight_quantizer.enable_calib()
    ql(x)
    ql.weight_quantizer.load_calib_amax()
    assert ql.weight_quantizer.amax.shape == (4, 1, 1, 1)


def test_quant_desc_kwargs():
    ql = quant_nn.QuantConv2d(3, 4, 3, quant_desc_input=QuantDescriptor(num_bits=4, unsigned=True),
                              quant_desc_weight=QuantDescriptor(num_bits=6, axis=0))
    assert (ql.input_quantizer.num_bits, ql.input_quantizer.unsigned, ql.weight_quantizer.num_bits) == (4, True, 6)
    with pytest.raises(TypeError, match="quant_desc_inptu"):
        quant_nn.QuantConv2d(3, 4, 3, quant_desc_inptu=QuantDescriptor())
    with pytest.raises(TypeError, match="QuantDescriptor"):
        quant_nn.QuantLinear(3, 4, quant_desc_weight={"num_bits": 4})
    with pytest.raises(TypeError, match="quant_desc_weight"):
        quant_nn.QuantMaxPool2d(2, quant_desc_weight=QuantDescriptor())


def test_pop_quant_desc_in_kwargs_leaves_torch_kwargs():
    d_in = pop_quant_desc_in_kwargs(quant_nn.QuantAvgPool2d, input_only=True, device="cpu", dtype=torch.float16)
    assert d_in == quant_nn.QuantAvgPool2d.default_quant_desc_input
    d_in, d_w = pop_quant_desc_in_kwargs(quant_nn.QuantLinear, quant_desc_weight=QuantDescriptor(num_bits=4))
    assert d_w.num_bits == 4


def test_set_default_quant_desc_per_class():
    old = quant_nn.QuantConv2d.default_quant_desc_input
    try:
        quant_nn.QuantConv2d.set_default_quant_desc_input(QuantDescriptor(calib_method="histogram"))
        assert quant_nn.QuantConv2d(1, 1, 1).input_quantizer._calibrator.__class__.__name__ == "HistogramCalibrator"
        assert quant_nn.QuantConv1d(1, 1, 1).input_quantizer._calibrator.__class__.__name__ == "MaxCalibrator"
        with pytest.raises(TypeError):
            quant_nn.QuantConv2d.set_default_quant_desc_weight("max")
    finally:
        quant_nn.QuantConv2d.set_default_quant_desc_input(old)


def test_init_quantizer_num_layers():
    m = quant_nn.QuantLinear(2, 2)
    m.init_quantizer(QuantDescriptor(), QuantDescriptor(axis=0), num_layers=3)
    assert len(m._input_quantizers) == 3 and len(m._weight_quantizers) == 3


def test_pytorch_quantization_aliases():
    assert quant_nn.Conv2d is quant_nn.QuantConv2d and quant_nn.Linear is quant_nn.QuantLinear
    assert quant_nn.MaxPool2d is quant_nn.QuantMaxPool2d and quant_nn.LSTM is quant_nn.QuantLSTM


# ------------------------------------------------------------------------------------------------------------------
# QuantAdd / QuantConcat
# ------------------------------------------------------------------------------------------------------------------
def test_quant_add_per_input_and_shared():
    x, y = torch.randn(2, 3) * 3, torch.randn(2, 3)
    add = quant_nn.QuantAdd()
    assert add._input0_quantizer is not add._input1_quantizer
    add._input0_quantizer.amax, add._input1_quantizer.amax = 2.0, 0.5
    expected = _fq(x, add._input0_quantizer) + _fq(y, add._input1_quantizer)
    assert torch.equal(add(x, y), expected)
    shared = quant_nn.QuantAdd(shared=True)
    shared._input0_quantizer.amax = 1.0
    assert shared._input1_quantizer.amax.item() == 1.0
    assert len([m for m in shared.modules() if isinstance(m, quant_nn.TensorQuantizer)]) == 1
    assert set(shared.state_dict()) == {"_input0_quantizer._amax", "_input1_quantizer._amax"}
    plain = quant_nn.QuantAdd(False)
    assert torch.equal(plain(x, y), x + y) and not list(plain.children())


def test_quant_add_residual_form_and_errors():
    add = quant_nn.QuantAdd(quantize=(1,))
    assert not hasattr(add, "_input0_quantizer")
    add._input1_quantizer.amax = 1.0
    x, y = torch.randn(4), torch.randn(4) * 3
    assert torch.equal(add(x, y), x + _fq(y, add._input1_quantizer))
    with pytest.raises(ValueError, match="expects 2 inputs"):
        add(x)
    with pytest.raises(ValueError, match="outside"):
        quant_nn.QuantAdd(quantize=(2,))


def test_quant_concat():
    cat = quant_nn.QuantConcat(dim=1)
    cat._input_quantizer.amax = 1.0
    x, y = torch.randn(2, 3), torch.randn(2, 4) * 2
    expected = torch.cat([_fq(x, cat._input_quantizer), _fq(y, cat._input_quantizer)], 1)
    assert torch.equal(cat(x, y), expected)
    assert torch.equal(cat([x, y]), expected)
    per = quant_nn.QuantConcat(dim=0, shared=False, num_inputs=2)
    for q in _quantizers(per):
        q.disable()
    assert torch.equal(per(x, x), torch.cat([x, x], 0))
    with pytest.raises(ValueError, match="num_inputs"):
        quant_nn.QuantConcat(shared=False)


# ------------------------------------------------------------------------------------------------------------------
# LSTM
# ------------------------------------------------------------------------------------------------------------------
LSTM_CASES = [
    dict(num_layers=1),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=3, batch_first=True),
    dict(num_layers=2, bidirectional=True, batch_first=True, bias=False),
    dict(num_layers=2, proj_size=3),
]


def _lstm_twins(kw):
    torch.manual_seed(0)
    fl = nn.LSTM(5, 7, **kw)
    ql = quant_nn.QuantLSTM(5, 7, **kw)
    ql.load_state_dict(fl.state_dict(), strict=False)
    return fl, ql


@pytest.mark.parametrize("kw", LSTM_CASES)
def test_lstm_disabled_equals_float(kw):
    fl, ql = _lstm_twins(kw)
    for q in _quantizers(ql):
        q.disable()
    x = torch.randn(4, 3, 5)
    out_f, (h_f, c_f) = fl(x)
    out_q, (h_q, c_q) = ql(x)
    assert torch.equal(out_f, out_q) and torch.equal(h_f, h_q) and torch.equal(c_f, c_q)


@pytest.mark.parametrize("kw", LSTM_CASES)
def test_lstm_layerwise_path_matches_float(kw):
    """The per-layer path with quantizers that do nothing (quant off, calib on) equals the fused float LSTM."""
    fl, ql = _lstm_twins(kw)
    for q in _quantizers(ql):
        q.disable_quant()
        q.enable_calib()
    x = torch.randn(4, 3, 5)
    h0 = (torch.randn(fl.num_layers * (2 if fl.bidirectional else 1), 4 if fl.batch_first else 3,
                      fl.proj_size or 7),
          torch.randn(fl.num_layers * (2 if fl.bidirectional else 1), 4 if fl.batch_first else 3, 7))
    out_f, (h_f, c_f) = fl(x, h0)
    out_q, (h_q, c_q) = ql(x, h0)
    torch.testing.assert_close(out_q, out_f, rtol=0, atol=1e-6)
    torch.testing.assert_close(h_q, h_f, rtol=0, atol=1e-6)
    torch.testing.assert_close(c_q, c_f, rtol=0, atol=1e-6)


def test_lstm_quantized_equals_layer_by_layer_reference():
    fl, ql = _lstm_twins(dict(num_layers=2, bidirectional=True))
    x = torch.randn(6, 2, 5) * 2
    for i, q in enumerate(ql._input_quantizers):
        q.amax = 1.0 + i
    for q in ql._weight_quantizers:
        q.amax = torch.full((28, 1), 0.2)
    # reference: float single-layer LSTMs on fake-quantized inputs and weights
    inp = x
    for layer in range(2):
        single = nn.LSTM(5 if layer == 0 else 14, 7, bidirectional=True)
        for d, sfx in enumerate(["", "_reverse"]):
            k = layer * 2 + d
            for name in ["weight_ih", "weight_hh"]:
                w = getattr(fl, f"{name}_l{layer}{sfx}")
                getattr(single, f"{name}_l0{sfx}").data = _fq(w, ql._weight_quantizers[k])
            for name in ["bias_ih", "bias_hh"]:
                getattr(single, f"{name}_l0{sfx}").data = getattr(fl, f"{name}_l{layer}{sfx}").data
        inp, _ = single(_fq(inp, ql._input_quantizers[layer]))
    out, _ = ql(x)
    assert torch.equal(out, inp)


def test_lstm_packed_and_unbatched():
    fl, ql = _lstm_twins(dict(num_layers=2))
    for q in _quantizers(ql):
        q.disable_quant()
        q.enable_calib()
    seqs = [torch.randn(5, 5), torch.randn(3, 5)]
    packed = nn.utils.rnn.pack_sequence(seqs)
    pf, _ = fl(packed)
    pq, _ = ql(packed)
    torch.testing.assert_close(pq.data, pf.data, rtol=0, atol=1e-6)
    un = torch.randn(4, 5)
    torch.testing.assert_close(ql(un)[0], fl(un)[0], rtol=0, atol=1e-6)


def test_lstm_cell():
    torch.manual_seed(0)
    fc = nn.LSTMCell(5, 6)
    qc = quant_nn.QuantLSTMCell(5, 6)
    qc.load_state_dict(fc.state_dict(), strict=False)
    x, h, c = torch.randn(3, 5), torch.randn(3, 6), torch.randn(3, 6)
    qc.input_quantizer.disable()
    qc.weight_quantizer.disable()
    assert all(torch.equal(a, b) for a, b in zip(qc(x, (h, c)), fc(x, (h, c))))
    qc.input_quantizer.enable()
    qc.weight_quantizer.enable()
    qc.input_quantizer.amax = 1.0
    qc.weight_quantizer.amax = torch.full((24, 1), 0.3)
    ref_cell = nn.LSTMCell(5, 6)
    ref_cell.load_state_dict(fc.state_dict())
    ref_cell.weight_ih.data = _fq(fc.weight_ih, qc.weight_quantizer)
    ref_cell.weight_hh.data = _fq(fc.weight_hh, qc.weight_quantizer)
    got = qc(x, (h, c))
    expected = ref_cell(_fq(x, qc.input_quantizer), (_fq(h, qc.input_quantizer), c))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert qc(torch.randn(5))[0].shape == (6,)
