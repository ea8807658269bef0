"""pytorch_quantization's public names on qdq: the functions with its conventions, the helpers its scripts import,
and the import alias of benchmarks/pytorch_quantization_suite.py."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import qdq
from qdq import calib, cuda_ext, tensor_quant
from qdq import nn as quant_nn
from qdq import utils as quant_utils
from qdq.nn import functional as QF
from qdq.optim import helper


def _quant_np(x, amax, num_bits=8, fake=False, narrow_range=True, unsigned=False):
    """pytorch_quantization's reference (its tests/utils.py): scale = maxbound / amax."""
    intmax = 2.0 ** (num_bits - 1 + unsigned) - 1
    intmin = 0 if unsigned else (-intmax if narrow_range else -intmax - 1)
    scale = intmax / amax
    q = np.clip(np.round(x * scale), intmin, intmax)
    return q / scale if fake else q


@pytest.mark.parametrize("num_bits,unsigned,narrow", [(8, False, True), (8, False, False), (4, False, True),
                                                       (8, True, True)])
def test_tensor_quant_has_pytorch_quantization_results(num_bits, unsigned, narrow):
    g = torch.Generator().manual_seed(num_bits)
    x = torch.randn(4096, generator=g) * 3
    if unsigned:
        x = x.abs()
    amax = torch.tensor(2.0)  # clips: the narrow range matters
    q, scale = tensor_quant.tensor_quant(x, amax, num_bits, unsigned, narrow)
    expected = _quant_np(x.numpy().astype(np.float64), 2.0, num_bits, False, narrow, unsigned)
    np.testing.assert_array_equal(q.numpy(), expected)
    assert scale.item() == pytest.approx(tensor_quant.maxbound(num_bits, unsigned) / 2.0)
    fq = tensor_quant.fake_tensor_quant(x, amax, num_bits, unsigned, narrow)
    np.testing.assert_allclose(fq.numpy(), expected / scale.item(), rtol=1e-6, atol=1e-7)


def test_pytorch_quantization_defaults_and_edge_cases():
    x = torch.tensor([-3.0, -1.0, 0.5, 1.0])
    assert tensor_quant.tensor_quant(x, torch.tensor(1.0))[0][0] == -127  # narrow_range=True by default
    assert tensor_quant.quantize_by_amax(x, torch.tensor(1.0))[0][0] == -128  # qdq's own default
    q, scale = tensor_quant.tensor_quant(x, torch.tensor(0.0))
    assert torch.equal(q, torch.zeros(4)) and scale.item() == 1.0
    assert torch.equal(tensor_quant.fake_tensor_quant(x, torch.tensor(0.0)), torch.zeros(4))
    with pytest.raises(TypeError, match="Negative values encountered"):
        tensor_quant.tensor_quant(x, torch.tensor(1.0), 8, True)
    with pytest.raises(ValueError, match="scale is too large for FP16"):
        tensor_quant.tensor_quant(x.half(), torch.tensor(1e-4).half())
    # the straight-through gradient; amax gets none (pytorch_quantization's functions)
    xg = x.clone().requires_grad_(True)
    amax = torch.tensor(1.0, requires_grad=True)
    tensor_quant.fake_tensor_quant(xg, amax).sum().backward()
    assert xg.grad.tolist() == [0.0, 1.0, 1.0, 1.0] and amax.grad is None


def test_legacy_affine_and_e4m3():
    x = torch.tensor([-1.0, 0.0, 0.25, 1.0])
    assert torch.equal(tensor_quant.legacy_fake_tensor_quant(x, torch.tensor(1.0)),
                       tensor_quant.fake_tensor_quant(x, torch.tensor(1.0)))
    out = tensor_quant.fake_affine_tensor_quant(x, x.min(), x.max())
    assert (out - x).abs().max() <= (2.0 / 255) / 2 + 1e-7
    e4m3 = tensor_quant.scaled_e4m3(torch.tensor([1000.0, 3.0, 1e-9, -0.3]))
    assert e4m3.tolist() == [448.0, 3.0, 0.0, -0.3125]
    with pytest.raises(NotImplementedError):
        tensor_quant.scaled_e4m3(x, None, 5, 2)


def test_cuda_ext_functions_and_message():
    x = torch.rand(3, 4, 5)
    amax = torch.tensor([0.5, 0.6, 0.7, 0.8])
    assert torch.equal(cuda_ext.fake_tensor_quant_with_axis(x, amax, 1),
                       tensor_quant.fake_tensor_quant(x, amax.view(1, 4, 1)))
    y = x.clone()
    cuda_ext.fake_tensor_quant_(y, x.abs().max())
    assert torch.equal(y, cuda_ext.fake_tensor_quant(x, x.abs().max()))
    with pytest.raises(AttributeError, match="no compiled CUDA extension"):
        cuda_ext.fake_e4m3fy  # noqa: B018


def test_utils_reduce_amax_reduces_the_named_axes():
    x = torch.randn(3, 4, 5)
    assert quant_utils.reduce_amax(x, axis=(1, 2)).shape == (3, 1, 1)
    assert torch.equal(quant_utils.reduce_amax(x, axis=(1, 2), keepdims=False), x.abs().amax(dim=(1, 2)))
    assert torch.equal(quant_utils.reduce_amax(x), x.abs().max())
    with pytest.raises(ValueError, match="cannot reduce"):
        quant_utils.reduce_amax(x, axis=(0, 1, 2, 3))


def test_clip_function_and_module_gradients():
    x = torch.tensor([-2.0, 0.0, 2.0], requires_grad=True)
    low, high = torch.tensor(-1.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    y = QF.clip(x, low, high)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert y.tolist() == [-1.0, 0.0, 1.0] and x.grad.tolist() == [0.0, 2.0, 0.0]
    assert (low.grad.item(), high.grad.item()) == (1.0, 3.0)
    with pytest.raises(ValueError, match="can only be scalar"):
        QF.clip(x, torch.zeros(3, requires_grad=True), torch.ones(3)).sum().backward()
    clip = quant_nn.Clip(-0.5, 0.5, learn_min=True, learn_max=True)
    assert len(list(clip.parameters())) == 2
    with pytest.raises(ValueError, match="scalar"):
        quant_nn.Clip(torch.zeros(2), 1.0, learn_min=True)


def test_clip_learnable_bounds_start_from_numbers_as_in_pytorch_quantization():
    with pytest.raises(ValueError, match="must be scalar.*not a tensor"):
        quant_nn.Clip(torch.tensor(0.3), torch.tensor(0.7), learn_min=True)
    with pytest.raises(ValueError, match="must be scalar.*shape \\(2,\\)"):
        quant_nn.Clip(np.zeros(2), 1.0, learn_min=True)
    clip = quant_nn.Clip(np.array([-0.25]), np.float32(0.5), learn_min=True, learn_max=True)
    assert (clip.clip_value_min.item(), clip.clip_value_max.item()) == (-0.25, 0.5)
    assert clip.clip_value_min.shape == () and clip.clip_value_min.requires_grad
    fixed = quant_nn.Clip(torch.tensor(-1.0), torch.tensor([1.0, 2.0]))  # fixed bounds: tensors as before
    assert fixed(torch.tensor([-3.0, 3.0])).tolist() == [-1.0, 2.0]


def test_optim_helper():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    groups = helper.group_parameters(model, [["^0"], ["^1"]], lrs=[0.1, 0.2], momentums=[0.9, 0.8])
    assert [len(list(g["params"])) for g in groups] == [2, 2] and groups[1]["momentum"] == 0.8
    with pytest.raises(TypeError, match="must match"):
        helper.group_parameters(model, [["^0"]], weight_decays=[0.1, 0.2])
    with pytest.raises(TypeError, match="list of list"):
        helper.group_parameters(model, ["^0"])
    qlinear = quant_nn.QuantLinear(4, 3)
    expected = qlinear.weight_quantizer(qlinear.weight).detach()
    helper.quant_weight_inplace(qlinear)
    assert torch.equal(qlinear.weight.detach(), expected)


@pytest.mark.parametrize("method", ["max", "percentile", "mse"])
def test_calibrate_weights_matches_per_channel_calibrators(method):
    torch.manual_seed(0)
    conv = quant_nn.QuantConv2d(3, 4, 3)
    calib.calibrate_weights(conv, method=method)
    amax = conv.weight_quantizer.amax
    assert amax.shape == (4, 1, 1, 1)
    for i in range(4):
        cal = calib.HistogramCalibrator(8, None, False)
        cal.collect(conv.weight[i])
        ref = conv.weight[i].abs().max() if method == "max" else cal.compute_amax(method, percentile=99.99)
        assert amax[i].item() == ref.item()


def test_quant_instancenorm_and_layers_refuse_real_quantization():
    norm = quant_nn.QuantInstanceNorm1d(3, affine=True)
    x = torch.randn(2, 3, 7)
    ref = nn.functional.instance_norm(quant_nn.TensorQuantizer()(x), weight=norm.weight, bias=norm.bias)
    assert torch.allclose(norm(x), ref)
    with pytest.raises(ValueError, match="Only fake quantization is supported"):
        quant_nn.QuantLinear(3, 2, quant_desc_weight=tensor_quant.QuantDescriptor(fake_quant=False))
    with pytest.raises(ValueError, match="Only fake quantization is supported"):
        quant_nn.QuantMaxPool2d(2, quant_desc_input=tensor_quant.QuantDescriptor(fake_quant=False))


def test_quantizer_setters_follow_the_descriptor():
    q = quant_nn.TensorQuantizer()
    q.num_bits, q.unsigned = 7, True
    assert (q.num_bits, q.unsigned, q.quant_desc.num_bits, q.maxbound) == (7, True, 7, 127)
    with pytest.raises(ValueError):
        q.num_bits = 40


def test_pre_quant_scale_multiplies_before_quantizing_and_round_trips():
    q = quant_nn.TensorQuantizer(tensor_quant.QuantDescriptor(axis=1, amax=127.0))
    x = torch.tensor([[0.0, 0.4, 1.1, 2.0]])
    q.pre_quant_scale = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert q(x).tolist() == [[0.0, 1.0, 3.0, 8.0]]
    q2 = quant_nn.TensorQuantizer(tensor_quant.QuantDescriptor(axis=1, amax=127.0))
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.pre_quant_scale, q.pre_quant_scale)


def test_use_fb_fake_quant_and_enable_onnx_export_give_qdq_nodes(tmp_path):
    import onnx

    model = nn.Sequential(quant_nn.QuantLinear(4, 3))
    qdq.calibrate_model(model, [torch.randn(2, 4)], progress=False)
    for i, switch in enumerate(["use_fb_fake_quant", "enable_onnx_export"]):
        path = tmp_path / f"{switch}.onnx"
        if switch == "use_fb_fake_quant":
            quant_nn.TensorQuantizer.use_fb_fake_quant = True
            try:
                torch.onnx.export(model, (torch.randn(2, 4),), str(path), dynamo=False)
            finally:
                quant_nn.TensorQuantizer.use_fb_fake_quant = False
        else:
            with qdq.enable_onnx_export():
                torch.onnx.export(model, (torch.randn(2, 4),), str(path), dynamo=False)
            assert quant_nn.TensorQuantizer._enable_onnx_export is False
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 2


def test_replacement_helper_patches_and_restores():
    helper_ = qdq.quant_modules.QuantModuleReplacementHelper()
    helper_.prepare_state(float_module_list=["Linear"], custom_map=[(torch.nn, "Linear", quant_nn.QuantLinear)])
    original = torch.nn.Conv2d
    helper_.apply_quant_modules()
    try:
        assert torch.nn.Conv2d is quant_nn.QuantConv2d and torch.nn.Linear is quant_nn.QuantLinear
    finally:
        helper_.restore_float_modules()
    assert torch.nn.Conv2d is original and torch.nn.Linear is not quant_nn.QuantLinear


def test_suite_runner_alias_and_cuda_as_cpu():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        suite = importlib.import_module("pytorch_quantization_suite")
    finally:
        sys.path.pop(0)
    finder = suite.install_alias()
    try:
        import pytorch_quantization.nn.modules.tensor_quantizer as aliased
        from pytorch_quantization import cuda_ext as aliased_ext
        assert aliased is sys.modules["qdq.nn.modules.tensor_quantizer"] and aliased_ext is cuda_ext
        assert aliased.__spec__.name == "qdq.nn.modules.tensor_quantizer"  # the real module keeps its spec
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] == "pytorch_quantization"]:
            del sys.modules[name]
    with suite.cuda_as_cpu():
        t = torch.randn(2).cuda()
        assert t.device.type == "cpu" and torch.zeros(2, device="cuda").device.type == "cpu"
        assert nn.Linear(2, 2).cuda().weight.device.type == "cpu"
    assert torch.Tensor.cuda is not None and torch.load.__module__.startswith("torch")
