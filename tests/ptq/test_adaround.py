"""AdaRound: the learned rounding lowers the layer's reconstruction error, lands on the quantizer's grid, survives
export (ONNX Runtime's QuantizeLinear gives the chosen integers) and a later calibrate_model."""

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

import qdq
from ptq_models import low_bit_weights
from qdq.onnx.parity import run_onnxruntime


def _model(bits=4):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.ReLU(), nn.Conv2d(8, 6, 1), nn.Flatten(), nn.Linear(6 * 6 * 6, 5)).eval()
    return low_bit_weights(model, bits)


def _data(n=4):
    return [torch.randn(8, 3, 6, 6) for _ in range(n)]


def _integers(layer):
    q = layer.weight_quantizer
    scale = q.amax / q.maxbound
    return torch.round(layer.weight.detach() / scale)


def test_rounding_lowers_loss_and_stays_on_grid():
    model, data = _model(), _data()
    qdq.calibrate_model(model, data, progress=False)
    nearest = {n: _integers(m) for n, m in model.named_modules() if hasattr(m, "_weight_quantizer")}
    report = qdq.adaround(model, data, iterations=60, batch_size=16, progress=False)
    assert list(report.layers) == ["0", "2", "4", "6"]
    assert sum(r.flipped for r in report.layers.values()) > 0
    for name, r in report.layers.items():
        assert r.loss_adaround <= r.loss_nearest * 1.05, name
        layer = model.get_submodule(name)
        q = layer.weight_quantizer
        ratio = layer.weight.detach() / (q.amax / q.maxbound)
        assert torch.allclose(ratio, torch.round(ratio), atol=1e-4)
        assert (torch.round(ratio) - nearest[name]).abs().max() <= 1  # up or down, never further
        assert q.calibrator is None


def test_fixed_seed_reproduces():
    data = _data()
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = _model()
        qdq.calibrate_model(model, data, progress=False)
        qdq.adaround(model, data, iterations=20, batch_size=8, seed=3, progress=False)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 3, 1)
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.c(x + self.b(torch.relu(self.a(x))))


def _rounded(recompute):
    torch.manual_seed(0)
    model = low_bit_weights(_Residual().eval())
    data = _data(3)
    qdq.calibrate_model(model, data, progress=False)
    float_model = _Residual().eval()
    float_model.load_state_dict({k: v for k, v in model.state_dict().items() if "quantizer" not in k}, strict=False)
    report = qdq.adaround(model, data, iterations=40, batch_size=8, recompute=recompute, holdout=0,
                          progress=False)
    return model, float_model, data, report


@pytest.mark.slow
def test_paused_forwards_and_recompute_round_alike_against_the_float_model():
    paused, float_model, data, report = _rounded(False)
    recomputed, _, _, report_r = _rounded(True)
    for name in ("a", "b", "c"):
        assert torch.equal(paused.get_submodule(name).weight, recomputed.get_submodule(name).weight), name
        assert report.layers[name].loss_nearest == pytest.approx(report_r.layers[name].loss_nearest, rel=1e-6)
        assert report.layers[name].samples == 24
        assert 0 < report.layers[name].capture_seconds <= report.layers[name].seconds
    # the reference of the last layer is the float model's own output (the float weights of the layers rounded
    # before it): its nearest-rounding loss is recomputed here from scratch
    x = torch.cat(data)
    target = float_model(x)
    with torch.no_grad():
        inner = recomputed.b(torch.relu(recomputed.a(x)))  # the quantized model's input to c
        c = recomputed.c
        q = c.weight_quantizer
        scale = q.amax / q.maxbound
        nearest = torch.clamp(torch.round(float_model.c.weight / scale), -q.maxbound, q.maxbound) * scale
        q.disable()
        out = torch.nn.functional.conv2d(c.input_quantizer(x + inner), nearest, c.bias)
        q.enable()
    expected = float((out - target).pow(2).sum(1).mean())
    assert report_r.layers["c"].loss_nearest == pytest.approx(expected, rel=1e-4)


def test_a_rounding_worse_than_nearest_is_not_kept():
    model, data = _model(), _data()
    qdq.calibrate_model(model, data, progress=False)
    nearest = {n: _integers(m) for n, m in model.named_modules() if hasattr(m, "_weight_quantizer")}
    report = qdq.adaround(model, data, iterations=3, lr=50.0, warmup=0.0, progress=False)  # steps far too large
    kept = [n for n, r in report.layers.items() if r.kept_nearest]
    assert kept
    for name in kept:
        assert torch.equal(_integers(model.get_submodule(name)), nearest[name]), name
        result = report.layers[name]
        assert result.flipped == 0 and result.loss_adaround == result.loss_nearest
    assert all(r.loss_adaround <= r.loss_nearest for r in report.layers.values())


def test_calibrate_model_keeps_the_frozen_weight_amax():
    model, data = _model(), _data()
    qdq.calibrate_model(model, data, progress=False)
    qdq.adaround(model, data, iterations=10, progress=False)
    amax = model[0].weight_quantizer.amax.clone()
    chosen = _integers(model[0])
    report = qdq.calibrate_model(model, [d * 3 for d in data], progress=False)
    assert "0._weight_quantizer" in report.frozen and len(report.frozen) == 4
    assert torch.equal(model[0].weight_quantizer.amax, amax)
    assert torch.equal(_integers(model[0]), chosen)
    with pytest.raises(RuntimeError, match="has no calibrator"):
        model[0].weight_quantizer.enable_calib()


@pytest.mark.slow
def test_blocks_are_reconstructed_together():
    model, data = _model(), _data()
    qdq.calibrate_model(model, data, progress=False)
    block = nn.Sequential(*list(model)[:5])  # the conv part as one block (a new container of the same layers)
    wrapped = nn.Sequential()
    wrapped.add_module("block", block)
    wrapped.add_module("head", nn.Sequential(*list(model)[5:]))
    report = qdq.adaround(wrapped, data, iterations=30, blocks=["block"], progress=False)
    assert list(report.layers) == ["block", "head.1"]
    assert report.layers["block"].layers == ["block.0", "block.2", "block.4"]
    assert report.layers["block"].loss_adaround <= report.layers["block"].loss_nearest * 1.05


def test_errors_name_the_problem():
    model, data = _model(), _data()
    with pytest.raises(RuntimeError, match="no amax; calibrate"):
        qdq.adaround(model, data, iterations=1, progress=False)
    qdq.calibrate_model(model, data, progress=False)
    with pytest.raises(TypeError, match="one-shot iterator"):
        qdq.adaround(model, iter(data), iterations=1, progress=False)
    with pytest.raises(ValueError, match="'nope'"):
        qdq.adaround(model, data, layers=["nope"], progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("deploy", [False, True], ids=["float-weights", "int8-weights"])
def test_export_gives_the_chosen_integers_in_onnxruntime(deploy, tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    qdq.replace_to_quantization_module(model)  # 8-bit: what TensorRT's explicit quantization takes
    data = _data()
    qdq.calibrate_model(model, data, progress=False)
    qdq.adaround(model, data, iterations=40, progress=False)
    chosen = {n: _integers(model.get_submodule(n)).numpy() for n in ("0", "2")}
    path = tmp_path / "adaround.onnx"
    qdq.export_onnx(model, torch.zeros(1, 3, 6, 6), path, deploy=deploy)
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    found = []
    if deploy:  # int8 initializers feeding DequantizeLinear
        found = [v for v in inits.values() if v.dtype == np.int8 and v.ndim == 4]
    else:  # float weights into QuantizeLinear: run the graph with those outputs exposed
        outs = [n.output[0] for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]
        for name in outs:
            proto.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.INT8, None))
        found = run_onnxruntime(proto, [np.zeros((1, 3, 6, 6), np.float32)])[1:]
    assert len(found) == 2
    by_shape = {v.shape: v for v in found}
    for name, q in chosen.items():
        assert np.array_equal(by_shape[q.shape].astype(np.int64), q.astype(np.int64)), name


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_reconstruction_loss_and_gradient_match_the_float64_formula(layout):
    from qdq.ptq.adaround import _recon

    torch.manual_seed(0)
    out, target = torch.randn(3, 5, 4, 6), torch.randn(3, 5, 4, 6)
    if layout == "channels_last":
        out, target = (t.contiguous(memory_format=torch.channels_last) for t in (out, target))
    elif layout == "transposed":
        out, target = out.transpose(1, 3), target.transpose(1, 3)
    out.requires_grad_(True)
    loss = _recon(out, target, 1)
    loss.backward()
    ref_out = out.detach().double().requires_grad_(True)
    ref = (ref_out - target.double()).pow(2).sum(1).mean()
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    torch.testing.assert_close(out.grad.double(), ref_out.grad, rtol=1e-6, atol=1e-9)
    with pytest.raises(RuntimeError, match="runs once"):
        again = _recon(out, target, 1)
        again.backward(retain_graph=True)
        again.backward()


def test_conv_units_round_on_channels_last_tensors_as_on_nchw_ones():
    from qdq.ptq.adaround import _gather

    x = torch.randn(2, 3, 4, 5)
    calls = [((x,), {}, x + 1), ((x * 2,), {}, x)]
    image, _ = _gather(calls, "u", "input", channels_last=True)
    plain, _ = _gather(calls, "u", "input")
    assert image.is_contiguous(memory_format=torch.channels_last) and plain.is_contiguous()
    assert torch.equal(image, plain)
    flat, _ = _gather([((torch.randn(2, 3),), {}, None)], "u", "input", channels_last=True)
    assert flat.is_contiguous()


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def test_weights_the_algorithms_cannot_reach_are_named(caplog):
    torch.manual_seed(0)
    model = _Attention().eval()
    qdq.replace_to_quantization_module(model)
    data = [torch.randn(4, 5, 8) for _ in range(2)]
    qdq.calibrate_model(model, data, progress=False)
    in_proj = model.attn.in_proj_weight.detach().clone()
    with caplog.at_level("WARNING"):
        ada = qdq.adaround(model, data, iterations=5, progress=False)
        bc = qdq.bias_correction(model, data, progress=False)
    assert ada.left_out == ["attn"] and bc.left_out == ["attn"]
    assert "adaround: 1 module(s) with quantized weights are left as they are" in caplog.text
    assert "bias_correction: 1 module(s)" in caplog.text and "attn" in caplog.text
    assert "attn.out_proj" in ada.layers and "head" in ada.layers
    assert torch.equal(model.attn.in_proj_weight, in_proj)


def test_held_out_samples_decide_between_learned_and_nearest_rounding():
    # 64 inputs per output and 40 samples: the optimised samples can be fitted far better than any others
    torch.manual_seed(0)
    data = [torch.randn(8, 64) for _ in range(5)]
    fresh = torch.randn(400, 64)
    results = {}
    for holdout in (0.0, 0.125):
        model = nn.Sequential(nn.Linear(64, 4)).eval()
        qdq.replace_to_quantization_module(model)
        qdq.calibrate_model(model, data, progress=False)
        nearest, float_weight = _integers(model[0]), model[0].weight.detach().clone()
        report = qdq.adaround(model, data, iterations=300, holdout=holdout, progress=False)
        layer, q = model[0], model[0].weight_quantizer

        def error(x, integers):
            with torch.no_grad():
                target = torch.nn.functional.linear(x, float_weight, layer.bias)
                out = torch.nn.functional.linear(layer.input_quantizer(x), integers * q.amax / q.maxbound, layer.bias)
            return float((out - target).pow(2).sum(1).mean())

        results[holdout] = (report.layers["0"], {name: (error(x, _integers(layer)), error(x, nearest))
                                                 for name, x in (("held", torch.cat(data)[-5:]), ("fresh", fresh))})
    fitted, errors = results[0.0]
    assert fitted.held_out == 0 and fitted.loss_adaround < 0.8 * fitted.loss_nearest  # on the samples it fitted
    assert errors["fresh"][0] > errors["fresh"][1]  # and worse than nearest on others: what holdout guards against
    checked, errors = results[0.125]
    assert checked.held_out == 5 and checked.samples == 40
    assert checked.loss_nearest == pytest.approx(errors["held"][1], rel=1e-4)  # reported on the held-out samples
    assert errors["held"][0] <= errors["held"][1]  # what is kept is no worse than nearest rounding there
