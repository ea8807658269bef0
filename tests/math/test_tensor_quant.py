"""qdq.tensor_quant against the NumPy reference, exactly (atol=0)."""

import itertools
import math
import pickle

import numpy as np
import pytest
import torch

import reference as ref
from qdq import tensor_quant as tq
from qdq.math import fake_quant as fake_quant_module
from qdq.math import quantize as quantize_module
from qdq.tensor_quant import QuantDescriptor


# ------------------------------------------------------------------------------------------------------------------
# descriptor
# ------------------------------------------------------------------------------------------------------------------
class TestQuantDescriptor:
    def test_defaults_match_pytorch_quantization(self):
        d = QuantDescriptor()
        assert (d.num_bits, d.name, d.fake_quant, d.axis, d.amax) == (8, None, True, None, None)
        assert (d.learn_amax, d.scale_amax, d.calib_method, d.unsigned, d.narrow_range) == (
            False, None, "max", False, False)
        assert tq.ScaledQuantDescriptor is QuantDescriptor

    def test_round_trip_every_field(self):
        d = QuantDescriptor(num_bits=4, name="x", fake_quant=False, axis=(0, 2), amax=[[1.0], [2.0]],
                            learn_amax=True, scale_amax=0.5, calib_method="histogram", unsigned=True,
                            narrow_range=True)
        data = d.dict()
        assert set(data) == set(QuantDescriptor._FIELDS)
        assert QuantDescriptor.from_dict(data) == d
        assert pickle.loads(pickle.dumps(d)) == d
        assert hash(QuantDescriptor.from_dict(data)) == hash(d)

    def test_immutable(self):
        d = QuantDescriptor()
        with pytest.raises(AttributeError, match="immutable"):
            d.num_bits = 4
        assert d.replace(num_bits=4).num_bits == 4 and d.num_bits == 8

    def test_unknown_keys_named(self):
        with pytest.raises(TypeError, match=r"\['bits', 'calib'\]"):
            QuantDescriptor(bits=8, calib="max")
        with pytest.raises(TypeError, match="'nope'"):
            QuantDescriptor.from_dict({"num_bits": 8, "nope": 1})

    @pytest.mark.parametrize("bits", [1, 17, 0, -3])
    def test_num_bits_range(self, bits):
        with pytest.raises(ValueError, match="num_bits"):
            QuantDescriptor(num_bits=bits)

    @pytest.mark.parametrize("bad", [True, 8.0, "8"])
    def test_num_bits_type(self, bad):
        with pytest.raises(TypeError, match="num_bits"):
            QuantDescriptor(num_bits=bad)

    @pytest.mark.parametrize("amax", [-1.0, float("nan"), float("inf"), [1.0, -0.5]])
    def test_bad_amax(self, amax):
        with pytest.raises(ValueError, match="amax"):
            QuantDescriptor(amax=amax)

    def test_amax_forms(self):
        """amax reads back as a read-only float32 array (pytorch_quantization's type); dict() keeps plain values."""
        d = QuantDescriptor(amax=torch.tensor([1.0, 2.0]))
        assert isinstance(d.amax, np.ndarray) and d.amax.dtype == np.float32
        np.testing.assert_array_equal(d.amax, np.float32([1.0, 2.0]))
        assert d.dict()["amax"] == (1.0, 2.0)
        with pytest.raises(ValueError, match="read-only"):
            d.amax[0] = 5.0
        assert d.amax[0] == 1.0
        assert QuantDescriptor(amax=np.float32(3.0)).amax == 3.0
        np.testing.assert_array_equal(QuantDescriptor(amax=np.array([[0.5], [0.25]])).amax, [[0.5], [0.25]])

    def test_amax_is_rounded_to_float32_like_the_quantizer(self):
        d = QuantDescriptor(amax=[3.142, 2.718])
        assert d.dict()["amax"] == (float(np.float32(3.142)), float(np.float32(2.718)))
        assert QuantDescriptor.from_dict(d.dict()) == d
        with pytest.raises(ValueError, match="overflows float32"):
            QuantDescriptor(amax=1e39)

    @pytest.mark.parametrize("kw", [dict(num_bits=2, name="a", axis=(1, 2), amax=3.1415926536), dict(amax=[0.1, 0.2]),
                                    dict(num_bits=(4, 3), axis=0), dict(unsigned=True, narrow_range=True,
                                                                         calib_method="histogram", scale_amax=0.5)])
    def test_yaml_round_trip(self, kw):
        pytest.importorskip("yaml")
        d = QuantDescriptor(**kw)
        text = d.to_yaml()
        assert QuantDescriptor.from_yaml(text) == d
        assert "num_bits:" in text and "name:" in text and "fake_quant" not in text  # defaults left out

    def test_yaml_values_and_errors(self):
        yaml = pytest.importorskip("yaml")
        d = QuantDescriptor(num_bits=4, axis=(1, 2), amax=0.5)
        assert yaml.safe_load(d.to_yaml()) == {"num_bits": 4, "name": None, "axis": [1, 2], "amax": 0.5}
        with pytest.raises(TypeError, match="mapping of fields"):
            QuantDescriptor.from_yaml("- 1\n- 2\n")
        with pytest.raises(TypeError, match="unknown keys"):
            QuantDescriptor.from_yaml("num_bit: 8\n")

    def test_yaml_without_pyyaml_is_a_clear_error(self, monkeypatch):
        import builtins

        real_import = builtins.__import__

        def no_yaml(name, *args, **kwargs):
            if name == "yaml":
                raise ImportError("No module named 'yaml'")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_yaml)
        with pytest.raises(ImportError, match="to_yaml needs PyYAML"):
            QuantDescriptor().to_yaml()

    def test_amax_type_error_names_the_accepted_types(self):
        with pytest.raises(TypeError, match="must be float, list or ndarray"):
            QuantDescriptor(amax="oops")

    def test_calib_method_error_lists_every_method(self):
        with pytest.raises(ValueError, match=r"calib_method must be one of \('max', 'histogram', 'entropy', 'mse', "
                                             r"'percentile', 'kld'.*got 'entrophy'"):
            QuantDescriptor(calib_method="entrophy")

    @pytest.mark.parametrize("method,args", [("entropy", {"num_bins": 2048, "start_bin": 128, "stride": 1}),
                                             ("mse", {"num_bins": 2048, "start_bin": 128, "stride": 1}),
                                             ("percentile", {"num_bins": 2048, "percentile": 99.99}),
                                             ("kld", {"num_bins": 2048}), ("histogram", {"num_bins": 2048}),
                                             ("max", {})])
    def test_a_descriptor_names_the_search_and_shows_its_parameters(self, method, args):
        d = QuantDescriptor(calib_method=method)
        assert d.calib_args == args and d.search == (None if method in ("max", "histogram") else method)
        assert QuantDescriptor.from_dict(d.dict()) == d and hash(QuantDescriptor.from_dict(d.dict())) == hash(d)
        assert pickle.loads(pickle.dumps(d)) == d

    def test_calib_args_defaults_are_those_the_searches_declare(self):
        from qdq.calib import get_search
        from qdq.calib.amax_search import _declared_defaults

        for method in ("entropy", "mse", "percentile", "kld"):
            declared = _declared_defaults(get_search(method))
            args = QuantDescriptor(calib_method=method).calib_args
            assert {k: v for k, v in args.items() if k != "num_bins"} == declared, method

    @pytest.mark.parametrize("method,args,match", [
        ("max", {"num_bins": 64}, "calib_method 'max' takes none"),
        ("mse", {"percentile": 99.0}, r"calib_args \['percentile'\] do not apply to calib_method 'mse'"),
        ("histogram", {"stride": 2}, "do not apply to calib_method 'histogram'"),
        ("percentile", {"percentile": 101}, r"calib_args\['percentile'\] must be a number in \(0, 100\]"),
        ("entropy", {"start_bin": 0}, r"calib_args\['start_bin'\] must be an int >= 1"),
        ("entropy", {"num_bins": True}, r"calib_args\['num_bins'\] must be an int >= 2"),
        ("kld", {"num_bins": 8}, "'kld' needs at least 16 bins"),
    ])
    def test_bad_calib_args(self, method, args, match):
        with pytest.raises(ValueError, match=match):
            QuantDescriptor(calib_method=method, calib_args=args)

    def test_a_named_search_is_a_histogram_so_no_zero_point(self):
        with pytest.raises(ValueError, match="asymmetric quantization is calibrated with min/max"):
            QuantDescriptor(calib_method="entropy", symmetric=False)

    @pytest.mark.parametrize("axis,expected", [(0, 0), ((1,), 1), ([0, 1], (0, 1)), (None, None)])
    def test_axis(self, axis, expected):
        assert QuantDescriptor(axis=axis).axis == expected

    @pytest.mark.parametrize("axis", [(), (0, 0), 1.5, "0", True])
    def test_bad_axis(self, axis):
        with pytest.raises((TypeError, ValueError), match="axis"):
            QuantDescriptor(axis=axis)

    def test_predefined(self):
        assert tq.QUANT_DESC_8BIT_PER_TENSOR.axis is None
        assert tq.QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR.unsigned
        for name in ["CONV1D", "CONV2D", "CONV3D", "CONVTRANSPOSE1D", "CONVTRANSPOSE2D", "CONVTRANSPOSE3D"]:
            assert getattr(tq, f"QUANT_DESC_8BIT_{name}_WEIGHT_PER_CHANNEL").axis == 0
        assert tq.QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW.axis == 0

    def test_version_checked(self):
        with pytest.raises(ValueError, match="version"):
            QuantDescriptor.from_dict({"version": 99})


# ------------------------------------------------------------------------------------------------------------------
# math against the reference
# ------------------------------------------------------------------------------------------------------------------
def _amax_for(x, axis, rng):
    """A per-tensor or per-channel (keepdims) amax: some below, some above the data's range."""
    if axis is None:
        return np.float32(np.abs(x).max() * rng.uniform(0.3, 1.2))
    keep = [i == axis for i in range(x.ndim)]
    shape = [n if k else 1 for n, k in zip(x.shape, keep)]
    return (rng.uniform(0.05, 3.0, size=shape)).astype(np.float32)


CASES = list(itertools.product([2, 3, 4, 7, 8, 12, 16], [False, True], [False, True], [None, 0, 1, -1]))


@pytest.mark.parametrize("num_bits,unsigned,narrow_range,axis", CASES)
def test_fake_tensor_quant_matches_reference(num_bits, unsigned, narrow_range, axis):
    rng = np.random.default_rng(num_bits * 100 + unsigned * 10 + narrow_range + (axis or 0) * 7)
    shape = tuple(rng.integers(1, 9, size=int(rng.integers(2, 5))))
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 10)).astype(np.float32)
    if unsigned:
        x = np.abs(x)
    amax = _amax_for(x, axis if axis is None else axis % x.ndim, rng)
    got = tq.fake_quantize_by_amax(torch.from_numpy(x), torch.from_numpy(np.asarray(amax)), num_bits, unsigned,
                               narrow_range)
    expected = ref.fake_quant(x, amax, num_bits, unsigned, narrow_range)
    np.testing.assert_array_equal(got.numpy(), expected)
    q, s = tq.quantize_by_amax(torch.from_numpy(x), torch.from_numpy(np.asarray(amax)), num_bits, unsigned, narrow_range)
    rq, rs = ref.quantize(x, amax, num_bits, unsigned, narrow_range)
    np.testing.assert_array_equal(q.numpy(), rq)
    np.testing.assert_array_equal(s.numpy(), rs)


def test_large_random_tensor_exact():
    """Millions of values: the fused kernel and the reference agree on every element, ties included."""
    x = (torch.randn(2_000_000) * 3).numpy()
    x[:1000] = (np.arange(1000) - 500) * np.float32(2.5 / 127) / 2  # exact half steps: round half to even
    got = tq.fake_quantize_by_amax(torch.from_numpy(x), torch.tensor(2.5))
    np.testing.assert_array_equal(got.numpy(), ref.fake_quant(x, np.float32(2.5)))


def test_round_half_to_even():
    s = 1.0 / 127  # amax 1 -> scale 1/127
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5]) * torch.tensor(s, dtype=torch.float32)
    q, _ = tq.quantize_by_amax(x, torch.tensor(1.0))
    ref_q, _ = ref.quantize(x.numpy(), np.float32(1.0))
    np.testing.assert_array_equal(q.numpy(), ref_q)
    np.testing.assert_array_equal(np.abs(ref_q) % 2, 0)  # ties went to even


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(dtype):
    x = (torch.randn(4, 16) * 4).to(dtype)
    amax = torch.tensor(3.0)
    got = tq.fake_quantize_by_amax(x, amax)
    assert got.dtype == dtype
    expected = torch.from_numpy(ref.fake_quant(x.float().numpy(), np.float32(3.0))).to(dtype)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("amax", [65504.0, 1e-3, 1e-6])
def test_fp16_overflow_region(amax):
    """x / scale overflows fp16 for large x and small amax; the math runs in fp32, so nothing becomes inf or NaN."""
    x = torch.tensor([60000.0, -65504.0, 1.0, -3e-4, 0.0], dtype=torch.float16)
    got = tq.fake_quantize_by_amax(x, torch.tensor(amax))
    assert torch.isfinite(got).all()
    assert torch.equal(got, torch.from_numpy(ref.fake_quant(x.float().numpy(), np.float32(amax))).half())


@pytest.mark.parametrize("axis", [None, 0, 2])
def test_non_contiguous(axis):
    base = torch.randn(6, 5, 4)
    x = base.transpose(0, 2)  # (4, 5, 6), not contiguous
    assert not x.is_contiguous()
    amax = torch.rand([n if i == axis else 1 for i, n in enumerate(x.shape)]) + 0.1 if axis is not None \
        else torch.tensor(1.3)
    got = tq.fake_quantize_by_amax(x, amax)
    np.testing.assert_array_equal(got.numpy(), ref.fake_quant(x.contiguous().numpy(), amax.numpy()))


def test_multi_axis_plain_path_matches_and_logs(caplog, monkeypatch):
    """Where the fused kernels run (GPUs, tracing), a scale varying along two dimensions takes plain math, logged."""
    for module in (fake_quant_module, quantize_module):  # every module that calls it
        monkeypatch.setattr(module, "_tensor_ops_path", lambda x, scale=None: False)
    x = torch.randn(3, 4, 5)
    amax = torch.rand(3, 4, 1) + 0.2
    with caplog.at_level("INFO", logger="qdq.math.quantize"):
        quantize_module._logged_plain_paths.clear()
        got = tq.fake_quantize_by_amax(x, amax)
    np.testing.assert_array_equal(got.numpy(), ref.fake_quant(x.numpy(), amax.numpy()))
    assert "plain tensor math" in caplog.text


def _fused(x, scale, zero_point, qmin, qmax, axis):
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point.to(torch.int32), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale.reshape(-1), zero_point.reshape(-1).to(torch.int32), axis,
                                                  qmin, qmax)


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (-127, 127), (0, 255), (-8, 7)])
@pytest.mark.parametrize("with_zero_point", [False, True])
def test_tensor_ops_path_path_equals_fused_kernels(axis, qmin, qmax, with_zero_point):
    """Eager CPU code runs tensor ops instead of the fused kernels: the same numbers, bit for bit, ties included."""
    torch.manual_seed(0)
    x = torch.randn(6, 40, 7) * 3
    shape = [1, 1, 1]
    if axis is not None:
        shape[axis] = x.shape[axis]
    scale = torch.rand(shape) * 0.05 + 0.01
    x[0, :20, 0] = (torch.arange(20) - 10 + 0.5) * scale.reshape(-1)[0]  # exact ties, rounded half to even
    x[1, 0, :3] = torch.tensor([1e6, -1e6, 0.0])  # saturation
    zero_point = torch.randint(qmin, qmax + 1, shape).float() if with_zero_point else torch.zeros(shape)
    assert quantize_module._tensor_ops_path(x)
    got = tq.fake_quantize(x, scale, zero_point, qmin, qmax)
    expected = _fused(x, scale.reshape(()) if axis is None else scale, zero_point.reshape(()) if axis is None
                      else zero_point, qmin, qmax, axis)
    assert torch.equal(got, expected)
    inv = (np.float32(1) / scale.numpy()).astype(np.float32)
    q = np.clip(np.rint((x.numpy() * inv).astype(np.float32)) + zero_point.numpy(), qmin, qmax)
    np.testing.assert_array_equal(got.numpy(), ((q - zero_point.numpy()) * scale.numpy()).astype(np.float32))


def test_fused_kernels_where_traced_or_recorded():
    """jit tracing (the TorchScript ONNX exporter) sees the fused op; autograd gets its straight-through gradient."""
    scale = torch.tensor(0.1)
    traced = torch.jit.trace(lambda t: tq.fake_quantize(t, scale), torch.randn(4))
    assert "fake_quantize_per_tensor_affine" in str(traced.graph)
    x = torch.tensor([0.05, 0.2, 50.0], requires_grad=True)
    assert not quantize_module._tensor_ops_path(x)
    tq.fake_quantize(x, scale).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]
    with torch.no_grad():
        assert quantize_module._tensor_ops_path(x)
    scale_grad = torch.tensor(0.1, requires_grad=True)
    assert not quantize_module._tensor_ops_path(torch.randn(3), scale_grad)  # a gradient for the scale: the fused op's rules apply


def test_tensor_ops_path_path_keeps_nan():
    """A NaN input stays NaN in the eager CPU path (torch's fused kernel would give qmin * scale), pinned here."""
    out = tq.fake_quantize(torch.tensor([float("nan"), 0.25, -1e9]), torch.tensor(0.5))
    assert torch.isnan(out[0]) and out[1:].tolist() == [0.0, -64.0]


def test_replace_switches_calib_method_with_its_own_settings():
    d = QuantDescriptor(calib_method="entropy", calib_args={"num_bins": 512})
    assert d.replace(calib_method="max").calib_args == {}
    assert d.replace(calib_method="percentile").calib_args == {"num_bins": 512, "percentile": 99.99}
    assert QuantDescriptor(calib_method="histogram").replace(calib_method="max") == QuantDescriptor()


def test_fake_quant_is_dequantize_of_quantize():
    x = torch.randn(64, 33) * 5
    for amax in [torch.tensor(2.0), torch.rand(64, 1) + 0.5]:
        s = tq.amax_to_scale(amax)
        composed = tq.dequantize(tq.quantize(x, s), s)
        assert torch.equal(tq.fake_quantize(x, s), composed)
        assert torch.equal(tq.fake_quantize_by_amax(x, amax), composed)


def test_zero_amax_is_eps():
    x = torch.tensor([0.0, 1.0, -1.0])
    got = tq.fake_quantize_by_amax(x, torch.tensor(0.0))
    np.testing.assert_array_equal(got.numpy(), ref.fake_quant(x.numpy(), np.float32(0.0)))
    assert got[0] == 0 and got.abs().max() <= 2.0**-24 * 128 / 127
    # per channel: an all-zero channel stays exactly zero
    w = torch.randn(3, 4)
    w[1] = 0
    out = tq.fake_quantize_by_amax(w, tq.reduce_amax(w, axis=0))
    assert torch.equal(out[1], torch.zeros(4))


# ------------------------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unsigned", [False, True])
def test_straight_through_gradient(unsigned):
    x = torch.linspace(-3, 3, 601)
    if unsigned:
        x = x.abs()
    x.requires_grad_(True)
    amax = torch.tensor(1.7)
    tq.fake_quantize_by_amax(x, amax, unsigned=unsigned).backward(torch.full_like(x, 2.0))
    expected = torch.where(x.detach().abs() <= amax, 2.0, 0.0)
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("num_bits", [4, 8])
def test_amax_gradient_matches_reference(axis, num_bits):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, 5, 3)) * 2).astype(np.float32)
    amax = _amax_for(x, axis, rng)
    g = rng.standard_normal(x.shape).astype(np.float32)
    amax_t = torch.tensor(np.asarray(amax), requires_grad=True)
    xt = torch.tensor(x, requires_grad=True)
    tq.fake_quantize_by_amax(xt, amax_t, num_bits).backward(torch.from_numpy(g))
    expected = ref.amax_grad(x, amax, g, num_bits)
    np.testing.assert_allclose(amax_t.grad.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(xt.grad, torch.from_numpy(g) * (xt.detach().abs() <= amax_t.detach()))


def test_learned_amax_descends():
    """With the amax gradient, a too-large amax shrinks under an MSE loss on data much narrower than it."""
    x = torch.randn(4096)
    amax = torch.tensor(20.0, requires_grad=True)
    opt = torch.optim.SGD([amax], lr=5.0)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = ((tq.fake_quantize_by_amax(x, amax, 4) - x) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert amax.item() < 10 and losses[-1] < losses[0] / 4


# ------------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amax", [-1.0, float("nan"), float("inf")])
def test_bad_amax_function(amax):
    """A Python number is checked on the host always; a tensor amax when data checks are on (a sync per call)."""
    with pytest.raises(ValueError, match="finite and >= 0"):
        tq.fake_quantize_by_amax(torch.randn(4), amax)
    with tq.data_checks(), pytest.raises(ValueError, match="finite and >= 0"):
        tq.fake_quantize_by_amax(torch.randn(4), torch.tensor(amax))
    assert not tq.data_checks_enabled()  # restored on the way out of the exception


def test_negative_amax_tensor_quantizes_as_eps_without_checks():
    """The hot path never reads amax on the host: a negative amax clamps to AMAX_EPS, as a zero one does."""
    x = torch.tensor([0.0, 1e-9, -1.0])
    assert torch.equal(tq.fake_quantize_by_amax(x, torch.tensor(-1.0)), tq.fake_quantize_by_amax(x, torch.tensor(0.0)))


def test_unsigned_negative_data():
    with tq.data_checks(), pytest.raises(ValueError, match="unsigned quantization of negative data"):
        tq.fake_quantize_by_amax(torch.tensor([1.0, -0.5]), torch.tensor(1.0), unsigned=True)
    # without the checks (the default: no host sync per call) negative values clamp to 0
    assert tq.fake_quantize_by_amax(torch.tensor([1.0, -0.5]), torch.tensor(1.0), unsigned=True).tolist() == [1.0, 0.0]


def test_per_channel_shape_mismatch():
    with pytest.raises(ValueError, match=r"amax of shape \(5, 1\) does not match the tensor of shape \(4, 3\)"):
        tq.fake_quantize_by_amax(torch.randn(4, 3), torch.ones(5, 1))


@pytest.mark.parametrize("bits", [1, 17])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="num_bits"):
        tq.fake_quantize_by_amax(torch.randn(4), torch.tensor(1.0), bits)


def test_ranges():
    assert tq.quant_range(8) == (-128, 127)
    assert tq.quant_range(8, narrow_range=True) == (-127, 127)
    assert tq.quant_range(4, unsigned=True) == (0, 15)
    assert tq.maxbound(16) == 32767
    assert math.isclose(tq.amax_to_scale(torch.tensor(2.54)).item(), 0.02, rel_tol=1e-6)


@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("num_bits,unsigned,narrow_range", [(8, False, False), (8, False, True), (8, True, False),
                                                             (4, False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fake_quantize_with_params_equals_fake_quantize_by_amax(axis, num_bits, unsigned, narrow_range, dtype):
    """The scale computed ahead gives the numbers of fake_quantize_by_amax bit for bit (ties, saturation, NaN)."""
    torch.manual_seed(0)
    x = torch.randn(6, 40, 7) * 3
    amax = torch.rand(1, 40, 1) + 0.5 if axis is not None else torch.tensor(2.5)
    if unsigned:
        x = x.abs()
    step = float(tq.amax_to_scale(amax, num_bits, unsigned).reshape(-1)[0])
    x[0, 0, :6] = (torch.arange(6) + 0.5) * step  # exact ties
    x[1, 0, :2] = torch.tensor([1e6, float("nan")])
    x = x.to(dtype)
    params = tq.fake_quant_params(amax, num_bits, unsigned, narrow_range)
    got = tq.fake_quantize_with_params(x, params)
    expected = tq.fake_quantize_by_amax(x, amax, num_bits, unsigned, narrow_range)
    assert got.dtype == dtype
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())
    traced = torch.jit.trace(lambda t: tq.fake_quantize_with_params(t, params), x.float().nan_to_num(),
                             check_trace=False)  # traced: the fused kernels
    assert "fake_quantize_per" in str(traced.graph)


def test_fake_quant_params_refuses_fp8_and_a_bad_shape():
    with pytest.raises(ValueError, match="integer formats only"):
        tq.fake_quant_params(torch.tensor(1.0), (4, 3))
    with pytest.raises(ValueError, match="num_bits"):
        tq.fake_quant_params(torch.tensor(1.0), 1)
    with pytest.raises(ValueError, match="does not match"):
        tq.fake_quantize_with_params(torch.randn(3, 4), tq.fake_quant_params(torch.ones(5, 1)))


@pytest.mark.parametrize("per_channel", [False, True])
def test_training_forward_equals_fused_kernels_with_its_gradient(per_channel, monkeypatch):
    """The QAT forward (|x| and the output share one buffer on eager CPU) gives the fused kernels' numbers and the
    straight-through mask |x| <= amax, values exactly at +-amax and beyond included."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 2
    amax = torch.rand(1, 3, 1, 1) + 0.5 if per_channel else torch.tensor(1.25)
    x[0, :, 0, 0] = amax.reshape(-1)[0]
    x[0, :, 0, 1] = -amax.reshape(-1)[0]
    x[0, :, 0, 2] = torch.nextafter(amax.reshape(-1)[0], torch.tensor(10.0))

    def run():
        xr = x.clone().requires_grad_(True)
        out = tq.fake_quantize_by_amax(xr, amax)
        out.backward(torch.arange(out.numel(), dtype=torch.float32).reshape(out.shape))
        return out.detach(), xr.grad

    out, grad = run()
    for module in (fake_quant_module, quantize_module):  # every module that calls it
        monkeypatch.setattr(module, "_tensor_ops_path", lambda x, scale=None: False)
    fused_out, fused_grad = run()
    assert torch.equal(out, fused_out) and torch.equal(grad, fused_grad)
    upstream = torch.arange(x.numel(), dtype=torch.float32).reshape(x.shape)
    assert torch.equal(grad, torch.where(x.abs() <= amax, upstream, 0.0))
    assert grad[0, 0, 0, 0] == upstream[0, 0, 0, 0] and grad[0, 0, 0, 2] == 0
