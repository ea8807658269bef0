import logging

import numpy as np
import pytest
import torch
from torch import nn

import reference as ref
from qdq import calib
from qdq.nn import TensorQuantizer
from qdq.tensor_quant import QuantDescriptor, data_checks, fake_quantize_by_amax


def test_defaults_and_descriptor():
    q = TensorQuantizer()
    assert (q.num_bits, q.axis, q.unsigned, q.narrow_range, q.fake_quant) == (8, None, False, False, True)
    assert q.amax is None and q._amax is None
    assert isinstance(q._calibrator, calib.MaxCalibrator)
    h = TensorQuantizer(QuantDescriptor(calib_method="histogram", axis=0, num_bits=4))
    assert isinstance(h._calibrator, calib.HistogramCalibrator) and h.axis == 0 and h.maxbound == 7
    with pytest.raises(TypeError, match="QuantDescriptor"):
        TensorQuantizer({"num_bits": 8})


def test_fixed_amax_matches_reference():
    q = TensorQuantizer(QuantDescriptor(amax=2.0))
    x = torch.randn(100) * 3
    np.testing.assert_array_equal(q(x).numpy(), ref.fake_quant(x.numpy(), np.float32(2.0)))
    assert q.scale.item() == pytest.approx(2.0 / 127)


def test_dynamic_when_no_amax(caplog):
    q = TensorQuantizer(QuantDescriptor(axis=0))
    x = torch.randn(4, 10)
    with caplog.at_level(logging.INFO, logger="qdq"):
        out = q(x)
    amax = x.abs().amax(1, keepdim=True)
    np.testing.assert_array_equal(out.numpy(), ref.fake_quant(x.numpy(), amax.numpy()))
    assert "quantizing each batch with its own abs-max" in caplog.text


def test_switches():
    q = TensorQuantizer(QuantDescriptor(amax=1.0))
    x = torch.randn(10) * 3
    q.disable()
    assert q(x) is x
    q.enable()
    q.disable_quant()
    assert torch.equal(q(x), x)
    q.enable_quant()
    assert not torch.equal(q(x), x)
    state = q.state()
    q.disable(); q.enable_calib()
    q.set_state(state)
    assert q.state() == state


def test_calibrate_and_quantize_in_same_forward():
    q = TensorQuantizer(QuantDescriptor(amax=1.0), if_calib=True)
    x = torch.randn(50) * 4
    out = q(x)
    np.testing.assert_array_equal(out.numpy(), ref.fake_quant(x.numpy(), np.float32(1.0)))
    q.load_calib_amax()
    assert q.amax.item() == x.abs().max().item()


@pytest.mark.parametrize("method,kw", [("entropy", {}), ("mse", {}), ("percentile", {"percentile": 99.9})])
def test_histogram_load_calib_amax(method, kw):
    q = TensorQuantizer(QuantDescriptor(calib_method="histogram"))
    q._calibrator._torch_hist = True  # as the seed code does
    q.disable_quant()
    q.enable_calib()
    for _ in range(3):
        q(torch.randn(5000))
    q.load_calib_amax(method=method, **kw)
    assert q.amax.dim() == 0 and 1.0 < q.amax.item() < 5.0


def test_load_calib_amax_without_data_names_quantizer(caplog):
    q = TensorQuantizer()
    q.name = "backbone.conv1._input_quantizer"
    with pytest.raises(RuntimeError, match=r"'backbone.conv1._input_quantizer'.*collected no data"):
        q.load_calib_amax()
    with caplog.at_level(logging.WARNING):
        q.load_calib_amax(strict=False)
    assert "collected no data" in caplog.text and q.amax is None


def test_histogram_without_method():
    q = TensorQuantizer(QuantDescriptor(calib_method="histogram"), if_calib=True, if_quant=False)
    q(torch.randn(10))
    with pytest.raises(ValueError, match="needs a method"):
        q.load_calib_amax()


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_amax_assignment(bad):
    q = TensorQuantizer()
    with pytest.raises(ValueError, match="amax must be finite"):
        q.amax = bad


def test_per_channel_shape_mismatch_names_quantizer():
    q = TensorQuantizer(QuantDescriptor(axis=0, amax=[[1.0], [2.0]]))
    q.name = "fc._weight_quantizer"
    with pytest.raises(ValueError, match=r"'fc._weight_quantizer'.*does not match"):
        q(torch.randn(3, 4))


def test_state_dict_round_trip_into_fresh_quantizer():
    src = TensorQuantizer(QuantDescriptor(axis=0), if_calib=True)
    src(torch.randn(6, 3))
    src.load_calib_amax()
    dst = TensorQuantizer(QuantDescriptor(axis=0))
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.amax, src.amax)
    # an uncalibrated quantizer has no amax entry (as in pytorch_quantization)
    assert "_amax" not in TensorQuantizer().state_dict()


@pytest.mark.filterwarnings("ignore:for _amax.*meta")
def test_state_dict_loads_on_module_device():
    """Regression: pytorch_quantization created missing amax buffers with a hard-coded .cuda()."""
    src = TensorQuantizer(QuantDescriptor(amax=3.0))
    dst = TensorQuantizer().to("meta")  # a device other than the checkpoint's, available without a GPU
    dst.load_state_dict(src.state_dict())
    assert dst.amax.device.type == "meta"
    back = TensorQuantizer().to("meta").to_empty(device="cpu")
    back.load_state_dict(src.state_dict())
    assert back.amax.device.type == "cpu" and back.amax.item() == 3.0


def test_state_dict_bad_values_and_shapes():
    dst = TensorQuantizer(QuantDescriptor(axis=0))
    with pytest.raises(RuntimeError, match="amax must be finite"):
        dst.load_state_dict({"_amax": torch.tensor([-1.0])})
    learned = TensorQuantizer(QuantDescriptor(amax=[[1.0], [2.0]], axis=0, learn_amax=True))
    with pytest.raises(RuntimeError, match=r"shape \(3, 1\).*\(2, 1\)"):
        learned.load_state_dict({"_amax": torch.ones(3, 1)})


def test_state_dict_in_a_model():
    model = nn.Sequential(nn.Linear(3, 3))
    model.q = TensorQuantizer(QuantDescriptor(amax=1.5))
    other = nn.Sequential(nn.Linear(3, 3))
    other.q = TensorQuantizer()
    other.load_state_dict(model.state_dict())
    assert other.q.amax.item() == 1.5


def test_half_keeps_amax_float32():
    q = TensorQuantizer(QuantDescriptor(amax=1.0)).half()
    assert q.amax.dtype == torch.float32
    out = q(torch.randn(8).half())
    assert out.dtype == torch.float16


def test_learned_amax_gets_gradient_and_round_trips():
    q = TensorQuantizer(QuantDescriptor(amax=3.0, learn_amax=True))
    assert isinstance(q._amax, nn.Parameter) and q.learn_amax
    assert [n for n, _ in q.named_parameters()] == ["_amax"]
    x = torch.randn(100, requires_grad=True)
    ((q(x) - x.detach()) ** 2).sum().backward()
    assert q._amax.grad is not None and q._amax.grad.item() != 0
    fresh = TensorQuantizer(QuantDescriptor(learn_amax=True))
    fresh.load_state_dict(q.state_dict())
    assert fresh.amax.item() == 3.0


def test_learn_amax_after_calibration():
    q = TensorQuantizer(QuantDescriptor(learn_amax=True), if_calib=True)
    q(torch.randn(20))
    q.load_calib_amax()
    assert isinstance(q._amax, nn.Parameter)
    with pytest.raises(RuntimeError, match="calibrate first"):
        TensorQuantizer().init_learn_amax()


def test_clip_stage():
    q = TensorQuantizer(QuantDescriptor(amax=1.0), if_clip=True, if_quant=False)
    assert q(torch.tensor([-3.0, 0.5, 2.0])).tolist() == [-1.0, 0.5, 1.0]


def test_scale_amax_is_applied():
    q = TensorQuantizer(QuantDescriptor(amax=2.0, scale_amax=0.5))
    x = torch.randn(30) * 2
    np.testing.assert_array_equal(q(x).numpy(), ref.fake_quant(x.numpy(), np.float32(1.0)))


def test_real_quant_returns_integers():
    q = TensorQuantizer(QuantDescriptor(amax=1.0, fake_quant=False))
    out = q(torch.tensor([0.5, -2.0]))
    assert out.tolist() == [64.0, -128.0] and q._scale.item() == pytest.approx(1 / 127)


def test_repr():
    q = TensorQuantizer(QuantDescriptor(calib_method="histogram", axis=0, amax=[[0.5], [2.0]], unsigned=True))
    text = repr(q)
    for part in ["8bit", "unsigned", "axis=0", "amax=[0.5000, 2.0000](2)", "calibrator=HistogramCalibrator", "quant"]:
        assert part in text, (part, text)
    q.disable()
    assert "disabled" in repr(q)
    assert "amax=dynamic" in repr(TensorQuantizer())


def test_unsigned_negative_input_named():
    q = TensorQuantizer(QuantDescriptor(unsigned=True, amax=1.0))
    q.name = "relu_out"
    with data_checks(), pytest.raises(ValueError, match="'relu_out'.*negative"):
        q(torch.tensor([-1.0]))


def test_weights_are_collected_once_per_version():
    """Calibration feeds many batches; an unchanged weight is collected once (its statistics would not change)."""
    q = TensorQuantizer(QuantDescriptor(axis=0, calib_method="histogram"), if_calib=True, if_quant=False)
    w = nn.Parameter(torch.randn(3, 4))
    for _ in range(5):
        q(w)
    assert q.calibrator.num_batches == 1
    with torch.no_grad():
        w.mul_(2)  # an optimizer step changes the version
    q(w)
    assert q.calibrator.num_batches == 2
    q.reset_calib()
    q(w)
    assert q.calibrator.num_batches == 1
    for _ in range(3):
        q(torch.randn(3, 4))  # activations: every batch counts
    assert q.calibrator.num_batches == 4


def _cached(q):
    return q.__dict__.get("_weight_cache")


def test_weight_cache_reused_and_invalidated():
    """In eval (no gradient recorded) a weight is fake-quantized once while neither it nor amax changes; every kind
    of change is seen: in-place writes, a new amax, an amax copied in place, a device/dtype move, a new Parameter."""
    q = TensorQuantizer(QuantDescriptor(axis=0, amax=[[1.0], [2.0]]))
    w = nn.Parameter(torch.randn(2, 5))

    def fresh():
        return TensorQuantizer(QuantDescriptor(axis=0, amax=q.amax.tolist()))(w.detach())

    with torch.no_grad():
        first = q(w)
        assert q(w) is first and torch.equal(first, fresh())
        w.mul_(0.5)  # an optimizer step
        second = q(w)
        assert second is not first and torch.equal(second, fresh())
        q.amax = torch.tensor([[0.5], [0.5]])  # a new amax tensor
        assert torch.equal(q(w), fresh())
        q._amax.copy_(torch.tensor([[3.0], [3.0]]))  # amax written in place (load_state_dict does this)
        assert torch.equal(q(w), fresh())
        q.load_state_dict({"_amax": torch.tensor([[0.25], [4.0]])})
        assert torch.equal(q(w), fresh())
        out = q(w.double().float())  # not a Parameter: never cached
        assert torch.equal(out, fresh())
        w.data = torch.randn(2, 5)  # new storage
        assert torch.equal(q(w), fresh())
        other = nn.Parameter(w.detach().clone() * 2)
        assert torch.equal(q(other), TensorQuantizer(QuantDescriptor(axis=0, amax=q.amax.tolist()))(other.detach()))
        q.enable_clip()
        assert torch.equal(q(w), fresh().clamp(-q.amax, q.amax))
        q.disable_clip()
    # when a gradient is recorded the weight goes through the autograd function every time
    out = q(w)
    assert out.grad_fn is not None
    out.sum().backward()
    assert w.grad is not None
    q.half()
    assert _cached(q) is None  # moves forget the cache
    import pickle
    with torch.no_grad():
        q.float()(w)
    assert _cached(q) is not None and "_weight_cache" not in pickle.loads(pickle.dumps(q)).__dict__
    q.clear_cache()
    assert _cached(q) is None


def test_weight_cache_inference_mode_kept_apart():
    q = TensorQuantizer(QuantDescriptor(amax=1.0))
    w = nn.Parameter(torch.randn(4))
    with torch.inference_mode():
        a = q(w)
    with torch.no_grad():
        b = q(w)
    assert a.is_inference() and not b.is_inference() and torch.equal(a, b)


def test_activation_scale_computed_once_per_amax_and_refreshed():
    """In eval a calibrated quantizer computes its scale once per amax; every kind of amax change is seen (a new
    amax, in place, load_state_dict, a learned amax's step, scale_amax) and the numbers are fake_quantize_by_amax's."""
    q = TensorQuantizer(QuantDescriptor(amax=2.0))
    x = torch.randn(64) * 3

    def expected():
        return fake_quantize_by_amax(x, q.effective_amax())

    with torch.no_grad():
        assert torch.equal(q(x), expected())
        params = q.__dict__["_params_cache"][2]
        q(x)
        assert q.__dict__["_params_cache"][2] is params  # reused
        for change in (lambda: setattr(q, "amax", 1.5), lambda: q._amax.copy_(torch.tensor(0.7)),
                       lambda: q.load_state_dict({"_amax": torch.tensor(4.0)})):
            change()
            assert torch.equal(q(x), expected())
        q.init_learn_amax()
        opt = torch.optim.SGD(q.parameters(), lr=0.1)
    q(x).sum().backward()  # training: the autograd function, amax gets a gradient
    assert q._amax.grad is not None
    opt.step()
    with torch.no_grad():
        assert torch.equal(q(x), expected())
    s = TensorQuantizer(QuantDescriptor(amax=2.0, scale_amax=0.5))
    with torch.no_grad():
        assert torch.equal(s(x), fake_quantize_by_amax(x, torch.tensor(1.0)))
    import pickle
    assert "_params_cache" not in pickle.loads(pickle.dumps(q)).__dict__
    q.clear_cache()
    assert "_params_cache" not in q.__dict__


def test_activation_scale_cache_keeps_the_checks():
    """A wrong amax shape still names the quantizer; data_checks() still checks each call."""
    q = TensorQuantizer(QuantDescriptor(axis=0, amax=[1.0, 2.0, 3.0]))
    q.name = "block.q"
    with torch.no_grad(), pytest.raises(ValueError, match="block.q"):
        q(torch.randn(4, 5))
    u = TensorQuantizer(QuantDescriptor(amax=1.0, unsigned=True))
    with torch.no_grad():
        assert u(torch.tensor([-0.5, 0.5])).tolist() == [0.0, fake_quantize_by_amax(torch.tensor(0.5),
                                                                                  torch.tensor(1.0), 8, True).item()]
        with data_checks(), pytest.raises(ValueError, match="negative data"):
            u(torch.tensor([-0.5, 0.5]))


def test_descriptor_amax_loads_as_the_same_float32_values():
    d = QuantDescriptor(amax=[3.142, 2.718])
    q = TensorQuantizer(d)
    np.testing.assert_array_equal(q.amax.numpy(), d.amax)
    q.load_state_dict(q.state_dict())
    np.testing.assert_array_equal(q.amax.numpy(), d.amax)


@pytest.mark.parametrize("axis", [None, 1])
def test_fp8_quantizer_equals_scaled_e4m3_with_its_get_amax(axis):
    """pytorch_quantization's relation: quantizer(x) == scaled_e4m3(x, quantizer._get_amax(x)), bit for bit."""
    from qdq.math.formats import fake_fp8_quant
    from qdq.tensor_quant import reduce_amax, scaled_e4m3

    torch.manual_seed(0)
    q = TensorQuantizer(QuantDescriptor(num_bits=(4, 3), axis=axis))
    x = torch.rand(3, 63, 7, 7)
    with pytest.warns(UserWarning, match="dynamic quantization"):
        out = q(x)
    amax = q._get_amax(x)
    assert torch.equal(amax, reduce_amax(x, axis, keepdims=True)) and amax.dtype == torch.float32
    assert torch.equal(out, scaled_e4m3(x, amax, 4, 3))
    assert torch.equal(out, fake_fp8_quant(x, amax))


def test_get_amax_is_the_amax_forward_uses():
    q = TensorQuantizer(QuantDescriptor(amax=2.0, scale_amax=0.5))
    assert q._get_amax(torch.ones(3)).item() == 1.0
    q.amax = 4.0
    assert q._get_amax(torch.ones(3)).item() == 2.0
    assert not q._get_amax(torch.ones(3)).requires_grad


def test_unsupported_float_format_is_value_and_type_error():
    from qdq.math.formats import UnsupportedFormatError

    for pair in [(5, 2), (7, 3)]:
        with pytest.raises(TypeError, match="only floating-point format is FP8 E4M3"):
            QuantDescriptor(num_bits=pair)
        with pytest.raises(ValueError, match=r"num_bits=\(%d, %d\)" % pair):
            QuantDescriptor(num_bits=pair)
    assert issubclass(UnsupportedFormatError, ValueError) and issubclass(UnsupportedFormatError, TypeError)


def test_calibration_shape_change_through_the_quantizer_keeps_its_class():
    from qdq.calib import ShapeChangedError

    q = TensorQuantizer(QuantDescriptor(axis=0), if_calib=True, if_quant=False)
    q.name = "conv1.weight_quantizer"
    q(torch.ones(2, 3))
    with pytest.raises(RuntimeError, match=r"'conv1.weight_quantizer'.*shape changed: \(4, 1\).*\(2, 1\)") as info:
        q(torch.ones(4, 3))
    assert isinstance(info.value, ShapeChangedError) and isinstance(info.value, ValueError)


def test_learned_range_clip_view_reads_and_writes_amax():
    q = TensorQuantizer(QuantDescriptor(amax=0.5, learn_amax=True), if_quant=False, if_clip=True)
    assert hasattr(q, "clip") and not hasattr(TensorQuantizer(QuantDescriptor(amax=0.5)), "clip")
    assert q.clip.clip_value_max is q.amax and q.clip.clip_value_min.item() == -0.5
    x = torch.linspace(-1, 1, 21)
    assert torch.equal(q(x).detach(), x.clamp(-0.5, 0.5)) and torch.equal(q.clip(x).detach(), x.clamp(-0.5, 0.5))
    q.clip.clip_value_max.data.copy_(torch.tensor(0.25))  # pytorch_quantization's way of setting the range
    assert q.amax.item() == 0.25 and q.clip.clip_value_min.item() == -0.25
    (q.clip(x) * x).sum().backward()
    assert q.amax.grad.item() == pytest.approx(float(x[x.abs() > 0.25].abs().sum()))


@pytest.mark.parametrize("write", [lambda t: t.data.copy_(torch.tensor(1.0)), lambda t: t.copy_(torch.tensor(1.0)),
                                   lambda t: t.fill_(0.0), lambda t: t.__setitem__((), 2.0)])
def test_learned_range_min_cannot_be_written(write):
    q = TensorQuantizer(QuantDescriptor(amax=0.5, learn_amax=True))
    with pytest.raises(RuntimeError, match="symmetric"):
        write(q.clip.clip_value_min)
    assert q.amax.item() == 0.5


def test_load_calib_amax_without_data_says_pytorch_quantizations_words():
    q = TensorQuantizer(QuantDescriptor(axis=0))
    q.enable_calib()
    with pytest.raises(RuntimeError, match="Calibrator returned None.*collected no data|collected no data.*Calibrator "
                                           "returned None"):
        q.load_calib_amax()
