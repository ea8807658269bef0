"""FP8 E4M3 and blocked INT4 fake quantization against small NumPy references (qdq.formats)."""

import shutil
import sys

import numpy as np
import pytest
import torch

from qdq import formats
from qdq.nn import TensorQuantizer
from qdq.tensor_quant import AMAX_EPS, QuantDescriptor, amax_to_scale, fake_quantize_by_amax, maxbound, quant_range


def _fp8_grid() -> tuple[np.ndarray, np.ndarray]:
    """Every finite float8_e4m3fn value (sorted) and its bit pattern, decoded by hand from the bits."""
    bits = np.arange(256, dtype=np.int64)
    sign = np.where(bits >> 7, -1.0, 1.0)
    exp, man = (bits >> 3) & 0xF, bits & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0)) * sign
    finite = ~((exp == 0xF) & (man == 0x7))  # S.1111.111 is NaN; e4m3fn has no infinities
    value, bits = value[finite], bits[finite]
    order = np.argsort(value, kind="stable")
    value, bits = value[order], bits[order]
    keep = np.concatenate([[True], np.diff(value) > 0])  # -0 and +0: keep one
    return value[keep], bits[keep]


def _fp8_reference(v: np.ndarray) -> np.ndarray:
    """Round to the nearest E4M3 value, ties to the even mantissa, saturating at +-448."""
    grid, bits = _fp8_grid()
    v = np.clip(v.astype(np.float64), -448.0, 448.0)
    hi = np.clip(np.searchsorted(grid, v), 1, grid.size - 1)
    lo = hi - 1
    d_lo, d_hi = v - grid[lo], grid[hi] - v
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (bits[hi] % 2 == 0))
    return np.where(pick_hi, grid[hi], grid[lo])


def test_fp8_grid_has_the_e4m3_values():
    grid, _ = _fp8_grid()
    assert grid.size == 253 and grid.max() == 448.0 and np.min(grid[grid > 0]) == 2.0**-9


def test_torch_cast_matches_the_reference_including_ties():
    grid, _ = _fp8_grid()
    mids = (grid[1:] + grid[:-1]) / 2  # every tie
    v = np.concatenate([grid, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf), [500.0, -1e6]])
    got = formats.quantize_fp8(torch.tensor(v, dtype=torch.float32), torch.tensor(1.0)).float().numpy()
    np.testing.assert_array_equal(got, _fp8_reference(v.astype(np.float32)))


@pytest.mark.parametrize("amax", [1.0, 3.7, 448.0, 1e-3])
def test_fake_fp8_is_exact_against_the_reference(amax):
    torch.manual_seed(0)
    x = torch.randn(4096) * amax * 0.6
    x[:3] = torch.tensor([amax * 2, -amax * 5, 0.0])
    scale = np.float32(amax) / np.float32(448.0)
    expected = (_fp8_reference(x.numpy() / scale) * scale).astype(np.float32)
    out = formats.fake_fp8_quant(x, torch.tensor(amax))
    np.testing.assert_array_equal(out.numpy(), expected)
    assert out[0] == pytest.approx(amax) and out[1] == pytest.approx(-amax)  # saturation at amax


def test_fp8_per_channel_and_dispatch_from_tensor_quant():
    torch.manual_seed(1)
    w = torch.randn(6, 3, 3, 3)
    amax = w.abs().amax(dim=(1, 2, 3), keepdim=True)
    out = fake_quantize_by_amax(w, amax, num_bits=(4, 3))
    scale = (amax / 448.0).numpy()
    np.testing.assert_array_equal(out.numpy(), (_fp8_reference(w.numpy() / scale) * scale).astype(np.float32))
    assert maxbound((4, 3)) == 448 and quant_range((4, 3)) == (-448, 448)
    assert torch.equal(amax_to_scale(torch.tensor(0.0), (4, 3)), torch.tensor(AMAX_EPS / 448.0))


def test_fp8_straight_through_gradient():
    x = torch.tensor([-3.0, -1.0, 0.2, 1.0, 2.5], requires_grad=True)
    formats.fake_fp8_quant(x, torch.tensor(1.0)).mul(torch.arange(5.0)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 3.0, 0.0]


def test_fp8_half_precision_returns_its_dtype():
    x = torch.randn(64).half()
    out = formats.fake_fp8_quant(x, torch.tensor(2.0))
    assert out.dtype == torch.float16
    assert torch.equal(out, formats.fake_fp8_quant(x.float(), torch.tensor(2.0)).half())


def test_fp8_descriptor_checks():
    assert QuantDescriptor(num_bits=[4, 3]).num_bits == (4, 3)
    assert QuantDescriptor.from_dict(QuantDescriptor(num_bits=(4, 3), axis=0).dict()).num_bits == (4, 3)
    with pytest.raises(ValueError, match="only floating-point format is FP8 E4M3"):
        QuantDescriptor(num_bits=(5, 2))
    with pytest.raises(ValueError, match="unsigned"):
        QuantDescriptor(num_bits=(4, 3), unsigned=True)
    with pytest.raises(ValueError, match="learn_amax"):
        QuantDescriptor(num_bits=(4, 3), learn_amax=True)


def test_fp8_mse_search_runs_on_the_fp8_grid():
    """The mse search for FP8 must fake-quantize on the FP8 grid: with an 8-bit integer grid it picks another amax."""
    from qdq.calib.amax_search import mse_amax

    torch.manual_seed(0)
    x = torch.randn(200_000).abs()
    counts, edges = torch.histogram(x, bins=512, range=(0.0, float(x.max())))
    counts, edges = counts.long()[None], edges[None]
    amax_fp8 = mse_amax(counts, edges, num_bits=(4, 3))
    centers = (edges[0, 1:] + edges[0, :-1]) / 2

    def err(amax):
        q = formats.fake_quantize_fp8(centers, formats.fp8_scale(torch.tensor(float(amax))))
        return float(((q - centers) ** 2 * counts[0]).sum())

    cands = edges[0, 128:]
    errs = [err(a) for a in cands]
    assert err(amax_fp8) <= min(errs) * (1 + 1e-6)
    assert not torch.equal(amax_fp8, mse_amax(counts, edges, num_bits=8))


def test_fp8_quantizer_calibrates_and_refuses_entropy():
    q = TensorQuantizer(QuantDescriptor(num_bits=(4, 3), calib_method="histogram", name="act"))
    q.disable_quant(), q.enable_calib()
    q(torch.randn(5000))
    with pytest.raises(ValueError, match="act.*'entropy'"):
        q.load_calib_amax(method="entropy")
    q.load_calib_amax(method="percentile", percentile=99.9)
    q.enable_quant(), q.disable_calib()
    x = torch.randn(100)
    assert torch.equal(q(x), formats.fake_fp8_quant(x, q.amax))
    assert "fp8_e4m3" in repr(q)


# ---- blocked INT4 ---------------------------------------------------------------------------------------------------


def _int4_blocked_reference(w: np.ndarray, block: int) -> np.ndarray:
    rows, feats = w.shape
    v = w.reshape(rows, feats // block, block).astype(np.float32)
    amax = np.maximum(np.abs(v).max(axis=2, keepdims=True), np.float32(AMAX_EPS))
    scale = (amax / np.float32(7)).astype(np.float32)
    q = np.clip(np.rint(v * (np.float32(1) / scale)), -8, 7)  # np.rint rounds half to even
    return (q * scale).astype(np.float32).reshape(rows, feats)


@pytest.mark.parametrize("block", [32, 64, 128])
def test_blocked_int4_matches_numpy(block):
    torch.manual_seed(block)
    w = torch.randn(12, 256)
    w[3, :block] = 0.0  # a zero block
    q = TensorQuantizer(QuantDescriptor(num_bits=4, axis=0, block_size=block))
    q.enable_calib()
    q(w)
    q.load_calib_amax()
    q.disable_calib()
    assert tuple(q.amax.shape) == (12, 256 // block, 1)
    np.testing.assert_array_equal(q(w).detach().numpy(), _int4_blocked_reference(w.numpy(), block))


def test_blocked_int4_gradient_is_straight_through():
    w = torch.randn(4, 64, requires_grad=True)
    amax = formats.blocked_amax(w, 32) * 0.5
    formats.fake_blocked_quant(w, amax, 4, 32).sum().backward()
    inside = formats.block_view(w.detach().abs(), 32) <= amax
    assert torch.equal(w.grad, inside.reshape(4, 64).float())


def test_blocked_errors_are_clear():
    with pytest.raises(ValueError, match="not a multiple of block_size 64"):
        formats.block_view(torch.randn(2, 96), 64)
    with pytest.raises(ValueError, match="2-D weights"):
        formats.block_view(torch.randn(2, 3, 64), 32)
    with pytest.raises(ValueError, match="max-calibrated"):
        QuantDescriptor(num_bits=4, block_size=64, calib_method="histogram")
    with pytest.raises(ValueError, match="axis must be 0 or None"):
        QuantDescriptor(num_bits=4, block_size=64, axis=1)


def test_fp8_and_blocked_amax_round_trip_through_state_dict():
    w = torch.randn(8, 64)
    for desc in (QuantDescriptor(num_bits=(4, 3), axis=0), QuantDescriptor(num_bits=4, axis=0, block_size=32)):
        q = TensorQuantizer(desc)
        q.enable_calib()
        q(w)
        q.load_calib_amax()
        q.disable_calib()
        fresh = TensorQuantizer(desc)
        fresh.load_state_dict(q.state_dict())
        assert torch.equal(fresh.amax, q.amax) and torch.equal(fresh(w), q(w))


def test_fp8_max_calibrated_quantizer_is_exact_per_channel():
    """A per-channel FP8 weight quantizer reproduces the reference with the calibrated per-row amax."""
    torch.manual_seed(3)
    w = torch.randn(16, 3, 3, 3)
    q = TensorQuantizer(QuantDescriptor(num_bits=(4, 3), axis=0))
    q.enable_calib()
    q(w)
    q.load_calib_amax()
    q.disable_calib()
    scale = (q.amax / 448.0).numpy()
    np.testing.assert_array_equal(q(w).numpy(), (_fp8_reference(w.numpy() / scale) * scale).astype(np.float32))


def test_dequantize_fp8_never_writes_into_its_input():
    q = torch.tensor([1.0, 2.0])
    formats.dequantize_fp8(q, torch.tensor(0.5))
    assert q.tolist() == [1.0, 2.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fake_quantize_fp8_is_bit_for_bit_quantize_then_dequantize(dtype):
    """The buffer-reusing fake quantization gives the same bits as the two documented steps (ties, -0, NaN,
    saturation, per-channel scales) and never writes into its input."""
    grid, _ = _fp8_grid()
    mids = (grid[1:] + grid[:-1]) / 2
    v = np.concatenate([grid, mids, -mids, [1e9, -1e9, -0.0, np.nan, 2.0**-12, -(2.0**-12)]]).astype(np.float32)
    x = torch.tensor(v).reshape(1, -1).repeat(3, 1).to(dtype)
    before = x.clone()
    for scale in (torch.tensor(1.0), torch.tensor([[0.5], [3.0], [1e-3]])):
        got = formats.fake_quantize_fp8(x, scale)
        expected = formats.dequantize_fp8(formats.quantize_fp8(x, scale), scale)
        assert got.dtype == torch.float32 and torch.equal(got.view(torch.int32), expected.view(torch.int32))
    assert torch.equal(x.view(torch.int16 if dtype == torch.float16 else torch.int32),
                       before.view(torch.int16 if dtype == torch.float16 else torch.int32))


def _hard_values(n: int, seed: int = 0) -> torch.Tensor:
    """n float32 values covering every E4M3 value and tie, subnormals, -0, overflow and infinities."""
    grid, _ = _fp8_grid()
    mids = (grid[1:] + grid[:-1]) / 2
    special = np.concatenate([grid, mids, -mids, np.nextafter(mids, np.inf), [1e9, -1e9, np.inf, -np.inf, -0.0,
                                                                                2.0**-12, -(2.0**-10), 2.0**-7]])
    torch.manual_seed(seed)
    v = torch.randn(n) * 100
    v[::7] *= 1e-3  # subnormal quotients
    v[: special.size] = torch.tensor(special, dtype=torch.float32)
    return v[torch.randperm(n)]


@pytest.mark.parametrize("scale", [torch.tensor(1.0), torch.tensor(0.37), torch.tensor(2.0**20), torch.tensor(1e-30)])
def test_large_tensor_fake_fp8_is_exact_against_the_reference(scale):
    """Tensors of >= 16384 elements take the bit-level dequantization (and on torch 2.14 the cast's own saturation
    instead of the clamp): the same bits as the NumPy reference and as torch's float8 -> float32 cast, for every E4M3
    value and tie, subnormals, overflow, infinities and a scale whose 2**120 multiple overflows."""
    x = _hard_values(3 * formats._BITS_MIN_NUMEL)
    got = formats.fake_quantize_fp8(x, scale)
    s = np.float32(scale.item())
    with np.errstate(over="ignore"):
        expected = (_fp8_reference(x.numpy() / s).astype(np.float32) * s).astype(np.float32)
    np.testing.assert_array_equal(got.numpy(), expected)
    cast = formats.quantize_fp8(x, scale).to(torch.float32) * scale  # torch's own cast, then the product
    assert torch.equal(got.view(torch.int32), cast.view(torch.int32))
    clamped = torch.div(x, scale).clamp_(-448, 448).to(torch.float8_e4m3fn)  # the clamp the cast may replace
    assert torch.equal(formats.quantize_fp8(x, scale).view(torch.uint8), clamped.view(torch.uint8))


def test_large_tensor_fake_fp8_per_channel_strided_nan_and_flush_denormal(monkeypatch):
    """The casts and the bit-level dequantization (the compiled kernel, off here, has its own tests below)."""
    monkeypatch.setattr(formats._CompiledKernel, "enabled", False)
    x = _hard_values(64 * 1024).reshape(64, 1024)
    scale = torch.rand(64, 1) + 0.01
    reference = lambda t: (formats.quantize_fp8(t, scale).float() * scale).view(torch.int32)  # noqa: E731
    assert torch.equal(formats.fake_quantize_fp8(x, scale).view(torch.int32), reference(x))
    xt = x.t().contiguous().t()  # non-contiguous
    assert torch.equal(formats.fake_quantize_fp8(xt, scale).view(torch.int32), reference(xt))
    xn = x.clone()
    xn[3, 5], xn[40, 7] = float("nan"), -float("nan")  # NaN bytes: torch's cast, NaN in the output
    got = formats.fake_quantize_fp8(xn, scale)
    assert torch.equal(got.view(torch.int32), reference(xn)) and int(got.isnan().sum()) == 2
    q = formats.quantize_fp8(x, scale)
    assert formats._dequantize_bits(q, scale, torch.empty(q.shape))  # these tensors do take the bit-level path
    assert not formats._dequantize_bits(formats.quantize_fp8(xn, scale), scale, torch.empty(q.shape))
    if torch.set_flush_denormal(True):  # FTZ/DAZ (x86): the bit path would read FP8 subnormals as zero
        try:
            assert not formats._keeps_denormals() and not formats._dequantize_bits(q, scale, torch.empty(q.shape))
            assert torch.equal(formats.fake_quantize_fp8(x, scale).view(torch.int32), reference(x))
        finally:
            torch.set_flush_denormal(False)
    assert formats._keeps_denormals()


@pytest.mark.parametrize("byte", [0x7F, 0xFF])
@pytest.mark.parametrize("where", [0, -1])
def test_bit_level_dequantization_finds_either_nan_byte_anywhere_in_memory(byte, where):
    """The NaN check reads q's bytes: one +NaN (0x7F) or -NaN (0xFF) byte, first or last in memory order of a
    channels-last tensor, sends the tensor to torch's cast; +-448 (0x7E, 0xFE), the largest finite bytes, do not."""
    full = torch.tensor([0x7E, 0xFE, 0x01, 0x80], dtype=torch.uint8).repeat(formats._BITS_MIN_NUMEL // 4)
    q = full.view(torch.float8_e4m3fn).reshape(4, 4, 32, 32).contiguous(memory_format=torch.channels_last)
    scale = torch.tensor(0.25)
    out = torch.empty(q.shape).contiguous(memory_format=torch.channels_last)
    assert formats._dequantize_bits(q, scale, out)
    assert torch.equal(out.view(torch.int32), (q.float() * scale).view(torch.int32))
    q.permute(0, 2, 3, 1).reshape(-1).view(torch.uint8)[where] = byte  # memory order of channels-last
    assert not formats._dequantize_bits(q, scale, out)
    got = formats.dequantize_fp8(q, scale, out=out)
    assert int(got.isnan().sum()) == 1
    assert torch.equal(got.nan_to_num().view(torch.int32), (q.float() * scale).nan_to_num().view(torch.int32))


def test_torch_cast_saturates_as_the_clamp_skip_assumes():
    """On torch 2.14 the float8_e4m3fn cast saturates (overflow and infinities to +-448, NaN stays NaN); where a torch
    does not, the probe says so and the clamp stays."""
    v = torch.tensor([464.0, 1e38, float("inf"), -float("inf"), float("nan")] * 20000)
    cast = v.to(torch.float8_e4m3fn).float()
    saturates = bool(torch.equal(cast[:4], torch.tensor([448.0, 448.0, 448.0, -448.0])) and cast[4].isnan())
    assert formats._cast_saturates() == saturates


def test_dequantize_fp8_out_is_checked():
    q = torch.zeros(4).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="out must be float32 of shape \\(4,\\)"):
        formats.dequantize_fp8(q, torch.tensor(1.0), out=torch.empty(3))


@pytest.mark.parametrize("scale", [torch.tensor(1.0), torch.tensor(0.37), torch.tensor(2.0**20), torch.tensor(1e-30)])
def test_fp8_arithmetic_rounding_is_the_cast_bit_for_bit(scale):
    """The float32-arithmetic route torch.compile takes on the CPU: every E4M3 value and tie, their neighbours,
    subnormals, overflow, infinities, NaN and the sign of zero give the bits of torch's cast."""
    x = _hard_values(3 * formats._BITS_MIN_NUMEL)
    x[:6] = torch.tensor([float("nan"), -0.0, -(2.0**-40), 2.0**-40, -float("inf"), 1e-45])
    got = formats._fake_quantize_fp8_arith(x, scale)
    cast = formats.quantize_fp8(x, scale).to(torch.float32) * scale
    same = (got.view(torch.int32) == cast.view(torch.int32)) | (got.isnan() & cast.isnan())
    assert bool(same.all()), x[~same][:5]
    assert got[1].item() == 0.0 and torch.signbit(got[1:3]).all()  # -0 and a negative that rounds to zero
    grid, _ = _fp8_grid()
    mids = (grid[1:] + grid[:-1]) / 2
    v = torch.tensor(np.concatenate([grid, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)]),
                     dtype=torch.float32)
    np.testing.assert_array_equal(formats._fake_quantize_fp8_arith(v, torch.tensor(1.0)).numpy(),
                                  _fp8_reference(v.numpy()))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_fake_fp8_takes_the_arithmetic_route_with_the_same_bits(backend, monkeypatch):
    """Under torch.compile on the CPU fake_quantize_fp8 rounds in float32 arithmetic (which inductor vectorizes);
    its bits are eager's (inductor compiles without reassociating ``(y + m) - m``)."""
    calls = []
    arith = formats._fake_quantize_fp8_arith
    monkeypatch.setattr(formats, "_fake_quantize_fp8_arith", lambda x, s: calls.append(1) or arith(x, s))
    x = _hard_values(3 * formats._BITS_MIN_NUMEL).reshape(48, -1)
    scale = torch.rand(48, 1) + 0.01
    torch._dynamo.reset()
    got = torch.compile(formats.fake_quantize_fp8, backend=backend, fullgraph=True)(x, scale)
    assert calls, "the compiled function did not take the arithmetic route"
    eager = formats.fake_quantize_fp8(x, scale)
    assert torch.equal(got.view(torch.int32), eager.view(torch.int32))


class _KernelSpy:
    """Counts the calls the compiled CPU kernel answered (not None); skips where inductor has no C++ compiler."""

    def __init__(self, monkeypatch):
        if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            pytest.skip("no C++ compiler: inductor cannot build the compiled FP8 kernel (the casts run, tested here)")
        self.answered = 0
        compiled = formats._fake_quantize_fp8_compiled

        def spy(x, scale):
            out = compiled(x, scale)
            self.answered += out is not None
            return out

        monkeypatch.setattr(formats, "_fake_quantize_fp8_compiled", spy)
        monkeypatch.setattr(formats._CompiledKernel, "enabled", True)


def _with_casts(x, scale):
    previous = formats.use_compiled_fp8(False)
    try:
        return formats.fake_quantize_fp8(x, scale)
    finally:
        formats.use_compiled_fp8(previous)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.stride() == b.stride() and bool(((a.view(torch.int32) == b.view(torch.int32))
                                              | (a.isnan() & b.isnan())).all())


_N = 4 * formats._COMPILED_MIN_NUMEL


def _kernel_operand(case: str) -> torch.Tensor:
    """A tensor of _hard_values (two NaNs included) in the layout, dtype or wrapping ``case`` names."""
    x = _hard_values(_N + 64).reshape(-1)
    x[[70, 777]] = torch.tensor([float("nan"), -float("nan")])
    if case == "storage offset":
        return x[64:]
    x = x[:_N].reshape(64, 64, 8, 8)
    if case == "channels-last":
        return x.contiguous(memory_format=torch.channels_last)
    if case == "transposed view":
        return x.transpose(0, 1)
    if case in ("float16", "bfloat16", "per row, float16"):
        return x.to(getattr(torch, case.split()[-1]))
    if case == "per row, 2-D":
        return x.reshape(512, -1)
    if case == "parameter":
        return torch.nn.Parameter(x)
    return x


_KERNEL_CASES = ["contiguous", "channels-last", "transposed view", "storage offset", "float16", "bfloat16",
                 "parameter", "inference mode", "per row", "per row, float16", "per row, 2-D"]


def _kernel_scale(case: str, x: torch.Tensor) -> torch.Tensor:
    """One scale, or one per index of dimension 0 for the "per row" cases."""
    if not case.startswith("per row"):
        return torch.tensor(300.0 / 448)
    return formats.fp8_scale(x.detach().float().nan_to_num().abs().amax(dim=tuple(range(1, x.dim())), keepdim=True))


@pytest.mark.parametrize("case", _KERNEL_CASES)
def test_compiled_cpu_kernel_gives_the_bits_and_layout_of_the_casts(case, monkeypatch):
    """Eager FP8 fake quantization of >= 65536 values on the CPU, with one scale or one per row, runs the compiled
    kernel: for every E4M3 value and tie, subnormals, overflow, infinities, NaN and -0, in any dense layout, input
    dtype and grad mode, it gives the bits and strides of torch's casts."""
    spy = _KernelSpy(monkeypatch)
    x = _kernel_operand(case)
    scale = _kernel_scale(case, x)
    if case == "inference mode":
        with torch.inference_mode():
            got = formats.fake_quantize_fp8(x, scale)
    else:
        with torch.no_grad():
            got = formats.fake_quantize_fp8(x, scale)
    assert spy.answered == 1, "the compiled kernel did not run"
    assert got.dtype == torch.float32 and _same_bits(got, _with_casts(x.detach(), scale))
    assert int(got.isnan().sum()) == 2


def test_compiled_cpu_kernel_compiles_two_graphs_for_every_caller(monkeypatch):
    """Sizes, layouts, dtypes, parameters and grad modes all reuse the kernel's two graphs (one scale, a scale per
    row): dynamo stops compiling at 8 graphs per function, which would leave a model's later layers on the casts."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    spy = _KernelSpy(monkeypatch)
    torch._dynamo.reset()
    for case in _KERNEL_CASES:
        x = _kernel_operand(case)
        scale = _kernel_scale(case, x)
        with torch.inference_mode() if case == "inference mode" else torch.no_grad():
            formats.fake_quantize_fp8(x, scale)
        more = torch.cat([x.detach()] * 2)  # another size, grad mode on
        formats.fake_quantize_fp8(more, torch.cat([scale] * 2) if scale.dim() else scale)
    assert spy.answered == 2 * len(_KERNEL_CASES)
    entries = _debug_get_cache_entry_list(formats._fake_quantize_fp8_arith.__code__)
    assert len(entries) == 2, f"{len(entries)} compiled graphs: one per tensor, one per row"


def test_compiled_cpu_kernel_leaves_other_operands_to_the_casts(monkeypatch):
    """Small tensors, tensors that are not dense in any order, scales per channel on other axes than 0 or of a
    non-contiguous tensor and inputs whose autograd is recorded take the casts; a gradient through fake_fp8_quant
    is the straight-through one either way."""
    spy = _KernelSpy(monkeypatch)
    x = _hard_values(2 * _N).reshape(128, 64, 8, 8)
    per_row = formats.fp8_scale(x.abs().amax(dim=(1, 2, 3), keepdim=True))
    for operand, scale in ((x[:1, :8], torch.tensor(1.0)), (x[:, ::2], torch.tensor(1.0)),
                           (x, formats.fp8_scale(x.abs().amax(dim=(0, 2, 3), keepdim=True))),
                           (x.contiguous(memory_format=torch.channels_last), per_row),
                           (x.reshape(-1)[:512 * 512].reshape(512, 512), torch.rand(512) + 0.01)):  # last axis
        assert _same_bits(formats.fake_quantize_fp8(operand, scale), _with_casts(operand, scale))
    assert spy.answered == 0
    w = x.clone().requires_grad_()
    formats.fake_quantize_fp8(w, torch.tensor(1.0))
    assert spy.answered == 0
    formats.fake_fp8_quant(w, torch.tensor(1.0)).sum().backward()  # the autograd function's forward: the kernel
    assert spy.answered == 1
    assert torch.equal(w.grad, (x.abs() <= 1.0).float())


def test_compiled_cpu_kernel_runs_under_a_function_mode_and_leaves_dispatch_modes_the_casts(monkeypatch):
    """A torch function mode (qdq's op-site mode is one, in a model's forward) is set aside while the kernel runs
    and restored; under a dispatch mode, which sees every aten op, the casts run."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Frames(TorchFunctionMode):  # reads its caller's frame, as the op-site mode does
        def __torch_function__(self, func, types, args=(), kwargs=None):
            sys._getframe(1).f_locals
            return func(*args, **(kwargs or {}))

    class Ops(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    spy = _KernelSpy(monkeypatch)
    x, scale = _kernel_operand("contiguous"), torch.tensor(0.25)
    with Frames():
        got = formats.fake_quantize_fp8(x, scale)
        assert torch._C._len_torch_function_stack() == 1
    assert spy.answered == 1 and _same_bits(got, _with_casts(x, scale))
    with Ops():
        got = formats.fake_quantize_fp8(x, scale)
    assert spy.answered == 1 and Ops.seen and _same_bits(got, _with_casts(x, scale))


def test_compiled_cpu_kernel_under_another_default_dtype(monkeypatch):
    spy = _KernelSpy(monkeypatch)
    x, scale = _kernel_operand("contiguous"), torch.tensor(0.25)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = formats.fake_quantize_fp8(x, scale)
    finally:
        torch.set_default_dtype(previous)
    assert spy.answered == 1 and got.dtype == torch.float32 and _same_bits(got, _with_casts(x, scale))


def test_compiled_cpu_kernel_that_fails_warns_once_and_the_casts_take_over(monkeypatch, caplog):
    def no_compiler(function, **options):
        def fail(*args):
            raise RuntimeError("C++ compiler not found")
        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(formats._CompiledKernel, "function", None)
    monkeypatch.setattr(formats._CompiledKernel, "enabled", True)
    x = _hard_values(_N)
    with caplog.at_level("WARNING", logger="qdq.math.formats"):
        first = formats.fake_quantize_fp8(x, torch.tensor(0.5))
        formats.fake_quantize_fp8(x, torch.tensor(0.5))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "RuntimeError: C++ compiler not found" in warnings[0], warnings
    assert not formats._CompiledKernel.enabled
    assert _same_bits(first, _with_casts(x, torch.tensor(0.5)))


def test_use_compiled_fp8_off_never_compiles(monkeypatch):
    monkeypatch.setattr(formats._CompiledKernel, "function", None)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled while turned off"))
    previous = formats.use_compiled_fp8(False)
    try:
        x = _hard_values(_N)
        assert torch.equal(formats.fake_quantize_fp8(x, torch.tensor(2.0)).nan_to_num(),
                           (formats.quantize_fp8(x, torch.tensor(2.0)).float() * 2.0).nan_to_num())
    finally:
        formats.use_compiled_fp8(previous)
    assert formats._CompiledKernel.function is None
