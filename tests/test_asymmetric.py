"""Asymmetric (zero point) quantization: math against NumPy, calibration, state, export to ONNX Runtime."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import qdq
import reference as ref
from qdq import nn as quant_nn
from qdq.calib import MaxCalibrator
from qdq.onnx import export_onnx, verify
from qdq.tensor_quant import QuantDescriptor, affine_qparams, fake_affine_quant

ASYM = QuantDescriptor(symmetric=False)
ASYM_U8 = QuantDescriptor(symmetric=False, unsigned=True)


@pytest.mark.parametrize("num_bits,unsigned", [(8, False), (8, True), (4, False), (4, True), (16, False)])
@pytest.mark.parametrize("lo,hi", [(-1.0, 3.0), (0.5, 2.0), (-4.0, -1.0), (-2.0, 2.0), (0.0, 0.0)])
def test_fake_affine_matches_reference(num_bits, unsigned, lo, hi):
    x = (torch.randn(3000) * 3 + (lo + hi) / 2).numpy()
    got = fake_affine_quant(torch.from_numpy(x), torch.tensor(lo), torch.tensor(hi), num_bits, unsigned)
    np.testing.assert_array_equal(got.numpy(), ref.fake_affine(x, lo, hi, num_bits, unsigned))
    s, zp = affine_qparams(torch.tensor(lo), torch.tensor(hi), num_bits, unsigned)
    rs, rzp = ref.affine_qparams(lo, hi, num_bits, unsigned)
    assert s.item() == rs and zp.item() == rzp


def test_zero_is_exact_and_range_covered():
    x = torch.tensor([0.0, -1.0, 3.0])
    out = fake_affine_quant(x, torch.tensor(-1.0), torch.tensor(3.0), unsigned=True)
    assert out[0] == 0.0
    assert abs(out[1] + 1) <= 4 / 255 and abs(out[2] - 3) <= 4 / 255


def test_per_channel_affine():
    x = torch.randn(4, 10) * torch.arange(1, 5.0)[:, None] + 1
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    got = fake_affine_quant(x, lo, hi)
    np.testing.assert_array_equal(got.numpy(), ref.fake_affine(x.numpy(), lo.numpy(), hi.numpy()))


def test_gradient_inside_range_only():
    x = torch.linspace(-3, 5, 81, requires_grad=True)
    fake_affine_quant(x, torch.tensor(-1.0), torch.tensor(3.0)).sum().backward()
    assert torch.equal(x.grad, ((x >= -1) & (x <= 3)).float())


def test_descriptor_rules():
    assert QuantDescriptor().symmetric and not ASYM.symmetric
    assert QuantDescriptor.from_dict(ASYM.dict()) == ASYM
    with pytest.raises(ValueError, match="min/max"):
        QuantDescriptor(symmetric=False, calib_method="histogram")
    with pytest.raises(ValueError, match="learn_amax"):
        QuantDescriptor(symmetric=False, learn_amax=True)


def test_calibrator_tracks_signed_range():
    cal = MaxCalibrator(8, 0, False)
    cal.collect(torch.tensor([[1.0, -4.0], [0.5, 2.0]]))
    cal.collect(torch.tensor([[3.0, 0.0], [1.0, 1.5]]))
    low, high = cal.compute_range()
    assert low.flatten().tolist() == [-4.0, 0.5] and high.flatten().tolist() == [3.0, 2.0]


def test_unsigned_asymmetric_takes_negative_data():
    q = quant_nn.TensorQuantizer(ASYM_U8, if_calib=True)
    x = torch.linspace(-2, 6, 100)
    out = q(x)  # dynamic range while calibrating
    q.load_calib_amax()
    assert q.amin.item() == -2.0 and q.zero_point.item() == 64.0
    assert (out - x).abs().max() <= q.scale.item() / 2 + 1e-6


def test_quantizer_calibrates_min_max_and_round_trips():
    q = quant_nn.TensorQuantizer(ASYM_U8, if_calib=True, if_quant=False)
    x = torch.rand(1000) * 5 + 1.0  # all positive: the range is widened to contain 0
    q(x)
    q.load_calib_amax()
    q.enable_quant()
    q.disable_calib()
    assert q.amin.item() == x.min().item() and q.amax.item() == x.max().item()
    np.testing.assert_array_equal(q(x).numpy(), ref.fake_affine(x.numpy(), x.min().item(), x.max().item(), 8, True))
    assert q.zero_point.item() == 0.0  # amin clamps to 0 -> zero point at qmin
    fresh = quant_nn.TensorQuantizer(ASYM_U8)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))
    assert "asymmetric" in repr(q)
    with pytest.raises(ValueError, match="asymmetric quantizers"):
        quant_nn.TensorQuantizer().amin = 1.0


def test_model_calibration_keeps_min_max_for_asymmetric_with_histogram_method():
    model = nn.Sequential(quant_nn.QuantLinear(4, 4, quant_desc_input=ASYM), nn.ReLU())
    qdq.calibrate_model(model, [torch.randn(32, 4)], method="entropy", progress=False)
    assert isinstance(model[0].input_quantizer.calibrator, MaxCalibrator)
    assert model[0].input_quantizer.amin.item() < 0


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("desc", [ASYM, ASYM_U8], ids=["int8", "uint8"])
def test_export_with_zero_points_runs_in_onnxruntime(desc, dynamo, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(quant_nn.QuantLinear(6, 3, quant_desc_input=desc), nn.Sigmoid(),
                          quant_nn.QuantLinear(3, 2, quant_desc_input=desc))
    data = [torch.randn(16, 6) + 0.5 for _ in range(2)]
    qdq.calibrate_model(model, data, progress=False)
    info = export_onnx(model, data[0][:1], tmp_path / "a.onnx", dynamo=dynamo, dynamic_batch=True)
    zps = []
    for node in info.model.graph.node:
        if node.op_type == "QuantizeLinear":
            init = next(i for i in info.model.graph.initializer if i.name == node.input[2])
            zps.append(numpy_helper.to_array(init))
    expected_type = np.uint8 if desc.unsigned else np.int8
    assert any(z.dtype == expected_type and z.any() for z in zps)  # a non-zero zero point, in the right type
    assert verify(model, info.path, torch.randn(20, 6) + 0.5).ok
    onnx.checker.check_model(info.model)
