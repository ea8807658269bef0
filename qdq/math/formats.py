"""Floor 1, the number formats beyond signed/unsigned integers: FP8 E4M3 and blocked INT4, as pure functions.

TensorRT runs three quantized formats (all symmetric, zero point 0, round half to even):

==================  ==========================================  ===================================================
format              descriptor                                  grid
==================  ==========================================  ===================================================
INT8                ``QuantDescriptor(num_bits=8)``             integers -128..127, ``scale = amax / 127``
FP8 E4M3            ``QuantDescriptor(num_bits=(4, 3))``        the ``float8_e4m3fn`` values (saturating at +-448,
                                                                no infinities), ``scale = amax / 448``
INT4 weight-only    ``QuantDescriptor(num_bits=4, axis=0,       integers -8..7, one ``scale = amax / 7`` per row
                    block_size=64)``                            and block of 64 consecutive input features
==================  ==========================================  ===================================================

``num_bits=(4, 3)`` counts exponent and mantissa bits, as ModelOpt's configs write it. E4M3 is the only FP8 format
TensorRT takes for Q/DQ, so other pairs (E5M2) are refused by the descriptor.

FP8 arithmetic, once for qdq (and exactly what ONNX QuantizeLinear with a ``float8e4m3fn`` zero point computes)::

    q     = float8_e4m3fn(clamp(x / scale, -448, 448))     # torch's cast rounds to nearest, ties to even
    x_hat = float32(q) * scale

The quotient is a true division (as ONNX defines it), not a product with the reciprocal as the integer path uses:
with FP8 there is no fused PyTorch kernel to match, so the division makes PyTorch and ONNX Runtime agree bit for bit.

On the CPU in eager execution two steps take a faster route to the same bits (tested against the NumPy reference and
torch's casts): the clamp is left to the cast where torch's cast saturates (torch 2.14: finite overflow and
infinities to +-448, NaN to NaN; probed once), and :func:`dequantize_fp8` of 16384 or more values builds the float32
bits from the FP8 bytes with in-place integer ops instead of torch's float8 -> float32 cast, a scalar loop 5-10x
slower (NaN values and ``torch.set_flush_denormal(True)`` take the cast). :func:`fake_quantize_fp8` runs both on
the quotient's buffer. Under torch.compile on the CPU it rounds in float32 arithmetic instead (the same bits), which
inductor vectorizes and fuses where its float8 casts are scalar code; eager execution on the CPU runs that arithmetic
compiled once per process for tensors of 65536 or more values: one vectorized loop instead of the division, the
scalar cast loop and the dequantization (:func:`use_compiled_fp8`).

Blocked INT4 quantization reshapes a 2-D weight ``(rows, features)`` to ``(rows, features / block, block)`` and
quantizes it with one amax per ``(row, block)`` with the integer arithmetic of :mod:`qdq.tensor_quant` (the same
reciprocal-and-round as INT8 and the same straight-through gradients). The amax of a blocked quantizer has the shape
``(rows, features / block, 1)``.

Example:
    >>> import torch
    >>> from qdq.math.formats import fake_fp8_quant, fp8_scale
    >>> x = torch.tensor([0.0, 0.3, -1.0, 5.0])
    >>> fake_fp8_quant(x, torch.tensor(1.0))                       # 5.0 saturates at amax
    tensor([ 0.0000,  0.2857, -1.0000,  1.0000])
    >>> float(fp8_scale(torch.tensor(448.0)))
    1.0
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import torch
from torch.utils._python_dispatch import _len_torch_dispatch_stack

from qdq.math._masks import float_mask_route, inside_as_float
from qdq.math._tensors import flat_view, float32_tensor

__all__ = [
    "UnsupportedFormatError",
    "FP8_E4M3",
    "FP8_E4M3_MAX",
    "BLOCK_SIZES",
    "FORMAT_NAMES",
    "is_fp8",
    "check_num_bits",
    "format_name",
    "fp8_scale",
    "quantize_fp8",
    "dequantize_fp8",
    "fake_quantize_fp8",
    "fake_fp8_quant",
    "use_compiled_fp8",
    "FakeFP8QuantFunction",
    "block_view",
    "fake_blocked_quant",
    "blocked_amax",
]

#: ``num_bits`` of FP8 E4M3: (exponent bits, mantissa bits).
FP8_E4M3 = (4, 3)
#: The largest finite ``float8_e4m3fn`` value: amax maps onto it.
FP8_E4M3_MAX = 448.0
#: Block sizes along the input features that TensorRT's INT4 weight-only kernels take.
BLOCK_SIZES = (32, 64, 128)
#: The format names of the API, the config file and the command line (``qdq ptq --format``).
FORMAT_NAMES = ("int8", "fp8", "int4", "float")

_FP8_DTYPE = torch.float8_e4m3fn

logger = logging.getLogger(__name__)


class UnsupportedFormatError(ValueError, TypeError):
    """``num_bits`` names a floating-point format other than FP8 E4M3 (E5M2, E7M3, ...).

    A ``ValueError`` (qdq: a value outside what TensorRT takes) and a ``TypeError`` (what pytorch_quantization raises
    for a ``num_bits`` tuple other than ``(4, 3)``), so code written for either catches it.
    """


def is_fp8(num_bits: Any) -> bool:
    """Whether ``num_bits`` names FP8 E4M3 (``(4, 3)``, also as a list from a JSON file).

    >>> is_fp8((4, 3)), is_fp8([4, 3]), is_fp8(8)
    (True, True, False)
    """
    return isinstance(num_bits, (tuple, list)) and tuple(num_bits) == FP8_E4M3


def check_num_bits(num_bits: Any, min_bits: int, max_bits: int) -> int | tuple[int, int]:
    """``num_bits`` validated: an int in ``[min_bits, max_bits]`` or the FP8 E4M3 pair ``(4, 3)``.

    >>> check_num_bits([4, 3], 2, 16)
    (4, 3)
    >>> check_num_bits((5, 2), 2, 16)
    Traceback (most recent call last):
    ...
    qdq.math.formats.UnsupportedFormatError: QuantDescriptor: num_bits=(5, 2): the only floating-point format is FP8 E4M3, num_bits=(4, 3) (TensorRT's FP8 Q/DQ type)
    """
    if isinstance(num_bits, (tuple, list)):
        pair = tuple(num_bits)
        if len(pair) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in pair):
            raise TypeError(f"QuantDescriptor: num_bits must be an int or (exponent, mantissa) bits, got {num_bits!r}")
        if pair != FP8_E4M3:
            raise UnsupportedFormatError(f"QuantDescriptor: num_bits={pair}: the only floating-point format is FP8 "
                                         "E4M3, num_bits=(4, 3) (TensorRT's FP8 Q/DQ type)")
        return pair
    if isinstance(num_bits, bool) or not isinstance(num_bits, int):
        raise TypeError(f"QuantDescriptor: num_bits must be an int, got {num_bits!r}")
    if not min_bits <= num_bits <= max_bits:
        raise ValueError(f"QuantDescriptor: num_bits must be in [{min_bits}, {max_bits}], got {num_bits}")
    return num_bits


def format_name(num_bits: Any, block_size: int | None = None) -> str:
    """A short label: ``"fp8_e4m3"``, ``"int8"``, ``"int4_block64"``.

    >>> format_name((4, 3)), format_name(8), format_name(4, 64)
    ('fp8_e4m3', 'int8', 'int4_block64')
    """
    if is_fp8(num_bits):
        return "fp8_e4m3"
    return f"int{num_bits}" + (f"_block{block_size}" if block_size else "")


# --------------------------------------------------------------------------------------------------------------------
# FP8 E4M3
# --------------------------------------------------------------------------------------------------------------------


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The float32 FP8 scale ``max(amax, 2**-24) / 448`` (ONNX QuantizeLinear's ``y_scale``).

    >>> fp8_scale(torch.tensor([448.0, 0.0]))
    tensor([1.0000e+00, 1.3305e-10])
    """
    from qdq.math.ranges import AMAX_EPS

    return float32_tensor(amax).clamp(min=AMAX_EPS) / FP8_E4M3_MAX


def _eager_cpu(t: torch.Tensor) -> bool:
    """An ordinary CPU tensor in eager execution (no tracing, compiling or tensor subclass): where the CPU shortcuts
    below apply. Compilers and exporters see the plain ops (clamp, cast, multiply)."""
    return (t.device.type == "cpu" and type(t) in (torch.Tensor, torch.nn.Parameter)
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


@functools.cache
def _cast_saturates() -> bool:
    """Whether torch's CPU cast to ``float8_e4m3fn`` saturates (finite overflow and +-inf to +-448, NaN to NaN), as
    torch 2.14's does; older releases gave NaN for overflow, where the clamp before the cast is needed."""
    probe = torch.tensor([464.0, -464.0, 1e30, -1e30, float("inf"), -float("inf"), 448.0, 0.5] * 9)  # vector + tail
    expected = torch.tensor([448.0, -448.0] * 3 + [448.0, 0.5]).repeat(9)
    nan = torch.tensor([float("nan")] * 33).to(_FP8_DTYPE).float()
    return torch.equal(probe.to(_FP8_DTYPE).float(), expected) and bool(nan.isnan().all())


def _keeps_denormals() -> bool:
    """False under ``torch.set_flush_denormal(True)`` (FTZ/DAZ on this thread), where the bit-level dequantization
    below would read FP8 subnormals as zero."""
    return bool(torch.full((1,), 2.0**-140).mul_(2.0) != 0)


def _quotient(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` in float32, a new tensor (the quantization step writes into it)."""
    return torch.div(x if x.dtype == torch.float32 else x.float(), scale)


def _to_fp8(y: torch.Tensor) -> torch.Tensor:
    """``float8_e4m3fn(clamp(y, -448, 448))``; ``y`` (a temporary) may be clamped in place. In eager CPU execution
    with a saturating cast (torch 2.14) the clamp is the cast's own saturation, so it is skipped: same bits."""
    if not (_eager_cpu(y) and _cast_saturates()):
        y = y.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return y.to(_FP8_DTYPE)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``float8_e4m3fn(clamp(x / scale, -448, 448))``: saturating, round to nearest even; a float8 tensor.

    >>> quantize_fp8(torch.tensor([1.0, 17.0, 1000.0]), torch.tensor(1.0)).float()
    tensor([  1.,  16., 448.])
    """
    return _to_fp8(_quotient(x, float32_tensor(scale, x.device)))


#: Below this many elements dequantize_fp8 uses torch's float8 -> float32 cast (a scalar CPU loop) directly.
_BITS_MIN_NUMEL = 1 << 14
#: The int32 mask keeping the sign and the 7 exponent and mantissa bits of an FP8 byte sign-extended and shifted
#: into float32's sign bit and bits 20-26 (0x87F00000).
_BITS_MASK = -0x78100000


def _dequantize_bits(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> bool:
    """``out = float32(q) * scale`` by bit arithmetic on ``out``'s memory, in place (four vectorized passes and two
    byte maxima instead of torch's scalar float8 cast loop, 5-10x slower on the CPU). False where that is not exact
    (``out`` may have been written).

    The FP8 byte ``s eeee mmm`` sign-extended to int32, shifted left by 20 and masked is the float32 ``s 0000eeee
    mmm0...``: the E4M3 value times 2**-120 exactly (E4M3 subnormals become float32 subnormals), so one product with
    ``scale * 2**120`` (exact: a power of two) rounds as ``float32(q) * scale`` does. NaN bytes would read as 480:
    a tensor with a NaN takes torch's cast instead. The NaN bytes are found on ``q`` itself: ``0x7F`` (+NaN) is the
    largest int8 and ``0xFF`` (-NaN) the largest uint8, so two maxima over q's bytes find them (a 25x96x56x56 tensor
    on 2 threads: 4.2 ms for the whole dequantization, 5.1 ms with an aminmax of the float32 result instead).
    """
    if not (_eager_cpu(q) and _eager_cpu(out) and q.numel() >= _BITS_MIN_NUMEL and _keeps_denormals()):
        return False
    q_bytes = flat_view(q)  # one row of q's memory, channels-last too
    positive_nan = q_bytes.view(torch.int8).max() == 0x7F  # 0.1111.111, the largest int8
    negative_nan = q_bytes.view(torch.uint8).max() == 0xFF  # 1.1111.111, the largest uint8
    if bool(positive_nan | negative_nan):  # one host read for both
        return False
    factor = scale * 2.0**120
    if not bool(torch.isfinite(factor).all()):  # a scale above 2**8: two exact steps
        factor = None
    bits = out.view(torch.int32)
    bits.copy_(q.view(torch.int8)).bitwise_left_shift_(20).bitwise_and_(_BITS_MASK)
    if factor is None:
        out.mul_(2.0**120).mul_(scale)
    else:
        out.mul_(factor)
    return True


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``float32(q) * scale``, written into ``out`` (a float32 tensor of ``q``'s shape) when given.

    >>> dequantize_fp8(torch.tensor([2.0, 448.0]).to(torch.float8_e4m3fn), torch.tensor(0.5))
    tensor([  1., 224.])
    """
    scale = float32_tensor(scale, q.device)
    if out is None:
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    elif out.shape != q.shape or out.dtype != torch.float32:
        raise ValueError(f"dequantize_fp8: out must be float32 of shape {tuple(q.shape)}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    if _dequantize_bits(q, scale, out):
        return out
    return out.copy_(q).mul_(scale)  # (also over a bit-level attempt that found a NaN)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``dequantize_fp8(quantize_fp8(x, scale), scale)`` in float32; no custom gradient.

    The two steps run on one float32 buffer: the quotient ``x / scale`` that :func:`quantize_fp8` casts is where
    :func:`dequantize_fp8` writes the result (on the CPU a fresh activation-sized tensor costs about as much as the
    arithmetic).

    >>> fake_quantize_fp8(torch.tensor([0.1, 0.3]), torch.tensor(1.0))
    tensor([0.1016, 0.3125])
    """
    scale = float32_tensor(scale, x.device)
    if _compiling_cpu(x):
        return _fake_quantize_fp8_arith(x, scale)
    if _compiled_kernel_applies(x):
        out = _fake_quantize_fp8_compiled(x, scale)
        if out is not None:
            return out
    y = _quotient(x, scale)
    return dequantize_fp8(_to_fp8(y), scale, out=y)


def _compiling_cpu(t: torch.Tensor) -> bool:
    """torch.compile on the CPU (not an export): where :func:`_fake_quantize_fp8_arith` replaces the casts."""
    return t.device.type == "cpu" and torch.compiler.is_compiling() and not torch.compiler.is_exporting()


#: The float32 exponent field; 2**-6 and 2**8 (FP8's lowest and highest normal binades) as float32 bits;
#: 2**e -> 1.5 * 2**(e + 20).
_EXPONENT_BITS = 0x7F800000
_FP8_MIN_NORMAL_BITS = (127 - 6) << 23
_FP8_MAX_BINADE_BITS = (127 + 8) << 23
_TO_ROUNDING_CONSTANT = (20 << 23) | 0x00400000


def _fake_quantize_fp8_arith(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`fake_quantize_fp8` in float32 arithmetic, bit for bit (sign of zero included; tested against the
    casts), for torch.compile on the CPU: inductor's float8 casts there are scalar code that keeps the loop fused
    around them from vectorizing (EfficientNet-Lite0 compiled: FP8 fake quantization took 1.32x the fp32 forward
    with the casts, INT8 1.05x).

    FP8 E4M3 keeps 3 mantissa bits: in the binade ``[2**e, 2**(e+1))`` its step is ``2**(e-3)``, and below 2**-6
    (subnormals) the step stays 2**-9. Adding ``m = 1.5 * 2**(e+20)`` (ulp ``2**(e-3)``) rounds ``y`` to that
    step, ties to even, in one float32 rounding, and subtracting ``m`` again is exact; ``e`` is ``y``'s exponent
    field (clamped to FP8's binades, 2**-6 to 2**8: a NaN's all-ones field cannot overflow the integer addition),
    ``m`` is built from it by integer addition on the bits.
    """
    y = torch.clamp(_quotient(x, scale), -FP8_E4M3_MAX, FP8_E4M3_MAX)
    bits = torch.bitwise_and(y.view(torch.int32), _EXPONENT_BITS).clamp(_FP8_MIN_NORMAL_BITS, _FP8_MAX_BINADE_BITS)
    m = (bits + _TO_ROUNDING_CONSTANT).view(torch.float32)
    return torch.copysign((y + m) - m, y) * scale  # copysign: -0 for negatives that round to zero, as the cast


#: Eager FP8 fake quantization on the CPU of this many elements or more runs the compiled kernel.
_COMPILED_MIN_NUMEL = 1 << 16


class _CompiledKernel:
    """The state of :func:`use_compiled_fp8`'s kernel: whether it is on, and the compiled function once built."""

    enabled = True
    function = None


def use_compiled_fp8(enabled: bool) -> bool:
    """Turns the compiled CPU kernel of eager FP8 fake quantization on (the default) or off; returns the previous
    setting.

    In eager execution on the CPU, :func:`fake_quantize_fp8` of 65536 or more values with one scale, or with one
    per index of dimension 0 of a contiguous tensor (weights per output channel), runs
    :func:`_fake_quantize_fp8_arith` compiled by torch.compile (inductor, dynamic shapes, two graphs per process; its
    C++ is cached on disk in inductor's cache directory): one vectorized loop where torch's float8 casts are scalar
    loops (25x96x56x56 float32 on 2 threads, torch 2.14.1: 3.3-4.0 ms against 10.7-11.1 ms for the casts and
    4.3-5.0 ms for INT8's fake quantization). The numbers are the same bits either way (tested). The first call
    compiles (14 s with an empty inductor cache, 3-4 s with a warm one; the second graph 0.2-1.4 s). Where compiling
    fails (no C++ compiler, an inductor error) a warning names the error and the casts run from then on. Off, the
    casts always run and nothing is compiled. CUDA tensors take the casts, which are vectorized kernels there.

    >>> previous = use_compiled_fp8(False)
    >>> use_compiled_fp8(previous)
    False
    """
    previous, _CompiledKernel.enabled = _CompiledKernel.enabled, bool(enabled)
    return previous


def _compiled_kernel_applies(x: torch.Tensor) -> bool:
    """Eager CPU execution of a large tensor with no autograd to record (the compiled function's own gradient
    would not be the casts' one) and no dispatch mode active (one sees every op: the casts' ops it gets): where
    :func:`_fake_quantize_fp8_compiled` is tried."""
    return (_CompiledKernel.enabled and x.numel() >= _COMPILED_MIN_NUMEL and _eager_cpu(x)
            and not (torch.is_grad_enabled() and x.requires_grad) and _len_torch_dispatch_stack() == 0)


@contextlib.contextmanager
def _without_function_modes():
    """No torch function mode active inside, the modes restored after: dynamo would trace an active mode's Python
    into the kernel (qdq's op-site mode, active in a model's forward, reads its caller's frame: that fails there).
    The modes do not see the kernel's ops."""
    modes = [torch._C._pop_torch_function_stack() for _ in range(torch._C._len_torch_function_stack())]
    try:
        yield
    finally:
        for mode in reversed(modes):
            torch._C._push_on_torch_function_stack(mode)


def _plain_tensor(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 ``t`` (dense in its memory order) as a contiguous tensor of ``shape`` of its own over the same memory:
    not a view (dynamo guards a view's base, so every base shape would compile again) and, made outside inference
    mode, not an inference tensor (another dispatch key set: another graph)."""
    if t.dtype != torch.float32:
        return t.float().view(shape)
    stride = (shape[1], 1) if len(shape) == 2 else (1,)
    plain = torch.empty(0, dtype=torch.float32, device=t.device)  # whatever torch's default dtype and device
    return plain.set_(t.untyped_storage(), t.storage_offset(), shape, stride)


def _kernel_operands(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]] | None:
    """``(x_dense, shape)``: ``x`` as one row of its memory with one scale, or as ``(channels, rest)`` with a scale
    per index of dimension 0 (a contiguous weight); None for other operands (they take the casts)."""
    if scale.numel() == 1:
        flat = flat_view(x)
        return (flat, (x.numel(),)) if flat.data_ptr() == x.data_ptr() else None  # else flat_view copied
    per_row = x.dim() >= 2 and scale.shape == (x.shape[0],) + (1,) * (x.dim() - 1)
    return (x, (x.shape[0], x.numel() // x.shape[0])) if per_row and x.is_contiguous() else None


def _fake_quantize_fp8_compiled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """:func:`fake_quantize_fp8` by the compiled kernel of :func:`use_compiled_fp8`; None where it does not apply
    (a scale per channel other than along dimension 0 of a contiguous tensor, a tensor that is not dense in any
    order) or compiling failed (then the caller runs the casts).

    The kernel sees two graphs: ``x`` as one float32 row of its memory and a 0-dim scale, or as ``(channels, rest)``
    and a ``(channels, 1)`` scale, plain tensors (not views, not inference tensors, no autograd) in grad mode off, so
    that no tensor rank, layout, dtype or autograd state of the caller makes dynamo compile again (it stops at 8
    graphs per function). The result gets ``x``'s shape and strides.
    """
    operands = _kernel_operands(x.detach(), scale)
    if operands is None:
        return None
    dense, shape = operands
    try:
        if _CompiledKernel.function is None:
            logger.info("FP8 fake quantization: compiling its CPU kernel (torch.compile, once per process)")
            _CompiledKernel.function = torch.compile(_fake_quantize_fp8_arith, dynamic=True, fullgraph=True)
        with torch.inference_mode(False), torch.no_grad(), _without_function_modes():
            out = _CompiledKernel.function(_plain_tensor(dense, shape),
                                           scale.reshape(shape[:1] + (1,) if len(shape) == 2 else ()).clone())
    except Exception as error:  # a compiler missing or failing: the casts give the same bits, slower
        _CompiledKernel.enabled = False
        logger.warning("FP8 fake quantization: the compiled CPU kernel failed (%s: %s); torch's float8 casts run "
                       "from now on (the same numbers, 2-3x the time)", type(error).__name__, error)
        return None
    return out.as_strided(x.shape, x.stride())


class FakeFP8QuantFunction(torch.autograd.Function):
    """FP8 fake quantization with the straight-through gradient: 1 where ``|x| <= amax``, 0 where saturated.

    amax gets no gradient (``learn_amax`` is refused for FP8 by the descriptor).
    """

    @staticmethod
    def forward(ctx, x, amax):
        amax = float32_tensor(amax, x.device)
        out = fake_quantize_fp8(x, fp8_scale(amax.detach())).to(x.dtype)
        ctx.float_mask = float_mask_route(x)  # compiled for the CPU: no bool saved (qdq.math._masks)
        if ctx.needs_input_grad[0]:
            if ctx.float_mask:
                ctx.save_for_backward(x.detach(), amax.detach())
            else:
                ctx.save_for_backward(x.detach().abs() <= amax.detach())
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.float_mask:
            x, amax = ctx.saved_tensors
            return grad_out * inside_as_float(x, amax).to(grad_out.dtype), None
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device)), None


def fake_fp8_quant(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Fake-quantizes ``x`` to FP8 E4M3 with ``amax`` (a scalar, or keepdims-shaped per channel); STE gradient.

    fp16/bf16 inputs are computed in float32 and returned in their dtype.

    >>> x = torch.tensor([-2.0, 0.3, 1.0], requires_grad=True)
    >>> fake_fp8_quant(x, torch.tensor(1.0)).sum().backward()
    >>> x.grad
    tensor([0., 1., 1.])
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return FakeFP8QuantFunction.apply(x, amax)
    # nothing to record (eval, no_grad, a weight that needs no gradient): the forward alone, no saturation mask
    amax = float32_tensor(amax, x.device)
    out = fake_quantize_fp8(x, fp8_scale(amax.detach()))
    return out if out.dtype == x.dtype else out.to(x.dtype)


# --------------------------------------------------------------------------------------------------------------------
# blocked integers (INT4 weight-only)
# --------------------------------------------------------------------------------------------------------------------


def block_view(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` of shape ``(rows, features)`` viewed as ``(rows, features / block_size, block_size)``.

    >>> block_view(torch.arange(8.0).reshape(2, 4), 2).shape
    torch.Size([2, 2, 2])
    """
    if x.dim() != 2:
        raise ValueError(f"blocked quantization takes 2-D weights (rows, input features), got shape {tuple(x.shape)}")
    rows, features = x.shape
    if features % block_size:
        raise ValueError(f"blocked quantization: {features} input features are not a multiple of block_size "
                         f"{block_size}")
    return x.reshape(rows, features // block_size, block_size)


def blocked_amax(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """abs-max per ``(row, block)``: shape ``(rows, features / block_size, 1)``, float32.

    >>> blocked_amax(torch.tensor([[1.0, -3.0, 0.5, 2.0]]), 2).flatten().tolist()
    [3.0, 2.0]
    """
    return block_view(x.detach(), block_size).abs().amax(dim=2, keepdim=True).float()


def fake_blocked_quant(
    x: torch.Tensor, amax: torch.Tensor, num_bits: int, block_size: int, narrow_range: bool = False
) -> torch.Tensor:
    """Fake-quantizes a 2-D weight with one amax per ``(row, block)`` (shape ``(rows, features / block, 1)``).

    The integer arithmetic and the gradients (straight-through for ``x``, LSQ-style for a learned amax) are those of
    :func:`qdq.math.fake_quant.fake_quantize_by_amax`.

    >>> w = torch.tensor([[0.7, -0.1, 0.05, 0.02]])
    >>> fake_blocked_quant(w, blocked_amax(w, 2), 4, 2)
    tensor([[ 0.7000, -0.1000,  0.0500,  0.0214]])
    """
    from qdq.math.fake_quant import fake_quantize_by_amax

    view = block_view(x, block_size)
    return fake_quantize_by_amax(view, amax, num_bits, False, narrow_range).reshape(x.shape)
