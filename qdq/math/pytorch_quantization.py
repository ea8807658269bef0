"""pytorch_quantization's functions, under their names, with their arguments and results (``tensor_quant``,
``fake_tensor_quant``, ``fake_affine_tensor_quant``, ``scaled_e4m3``): code written for pytorch_quantization calls
them through :mod:`qdq.tensor_quant`; qdq itself calls :func:`~qdq.math.fake_quant.quantize_by_amax` and
:func:`~qdq.math.fake_quant.fake_quantize_by_amax`. docs/pytorch_quantization.md lists every difference.
"""

from __future__ import annotations

import torch

from qdq.math import formats as _formats
from qdq.math.fake_quant import fake_quantize_by_amax, quantize_by_amax
from qdq.math.ranges import maxbound
from qdq.math._tensors import float32_tensor

__all__ = ["tensor_quant", "fake_tensor_quant", "legacy_fake_tensor_quant", "fake_affine_tensor_quant", "scaled_e4m3"]

# --------------------------------------------------------------------------------------------------------------------
# pytorch_quantization's functions, under their names, with their arguments and results
# --------------------------------------------------------------------------------------------------------------------
# Code written for pytorch_quantization calls these; qdq itself calls quantize_by_amax / fake_quantize_by_amax. The
# numbers come from the same helpers; what differs is pytorch_quantization's conventions: narrow_range=True by
# default, the scale returned as maxbound / amax (``q / scale`` dequantizes), amax <= 2**-24 quantizing to exactly 0
# (scale 1), TypeError for negative unsigned data, ValueError when a half tensor's scale overflows fp16.
# docs/pytorch_quantization.md lists every difference.

_PQ_EPS = 2.0**-24


def _pq_check(inputs: torch.Tensor, amax, unsigned: bool) -> torch.Tensor:
    if not isinstance(amax, torch.Tensor):
        amax = torch.tensor(amax, dtype=torch.float32, device=inputs.device)
    if unsigned and inputs.numel() and bool(inputs.detach().min() < 0):
        raise TypeError("Negative values encountered in unsigned quantization.")
    if amax.numel() and bool(amax.detach().min() < 0):
        raise ValueError("Negative values in amax")
    return amax


def fake_tensor_quant(inputs: torch.Tensor, amax, num_bits: int = 8, unsigned: bool = False,
                      narrow_range: bool = True) -> torch.Tensor:
    """pytorch_quantization's ``fake_tensor_quant``: ``narrow_range=True`` by default, amax <= 2**-24 gives 0.

    The numbers are those of :func:`fake_quantize_by_amax` (round half to even, computed in float32, returned in the
    input's dtype), on every device; the straight-through gradient for ``inputs`` is the same, and amax gets none
    (qdq's learned amax uses :func:`fake_quantize_by_amax`).

    >>> x = torch.tensor([-2.0, -1.0, 0.5, 1.0])
    >>> fake_tensor_quant(x, torch.tensor(1.0)).tolist()[0]       # narrow range: clipped to -127 steps
    -1.0
    >>> fake_tensor_quant(x, torch.tensor(0.0)).tolist()
    [0.0, 0.0, 0.0, 0.0]
    """
    amax = _pq_check(inputs, amax, unsigned).detach()  # as in pytorch_quantization, amax gets no gradient here
    out = fake_quantize_by_amax(inputs, amax, num_bits, unsigned, narrow_range)
    tiny = amax.detach() <= _PQ_EPS
    return torch.where(tiny.to(out.device), torch.zeros((), dtype=out.dtype, device=out.device), out)


#: pytorch_quantization's CPU reference of :func:`fake_tensor_quant`; the same function here.
legacy_fake_tensor_quant = fake_tensor_quant


def tensor_quant(inputs: torch.Tensor, amax, num_bits: int = 8, unsigned: bool = False,
                 narrow_range: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """pytorch_quantization's ``tensor_quant``: ``(q, scale)`` with ``scale = maxbound / amax`` in the input's
    dtype (``q / scale`` dequantizes) and q in the input's dtype; ``narrow_range=True`` by default.

    qdq's own :func:`quantize_by_amax` returns the step ``amax / maxbound`` instead (ONNX's ``y_scale``).

    >>> q, scale = tensor_quant(torch.tensor([0.5, -3.0]), torch.tensor(2.0), num_bits=4)
    >>> q.tolist(), round(scale.item(), 4)
    ([2.0, -7.0], 3.5)
    """
    amax = _pq_check(inputs, amax, unsigned).detach()
    q, _ = quantize_by_amax(inputs, amax, num_bits, unsigned, narrow_range)
    amax_f = amax.detach().float().to(q.device)
    tiny = amax_f <= _PQ_EPS
    scale = torch.where(tiny, torch.ones((), device=q.device), maxbound(num_bits, unsigned) / amax_f.clamp_min(_PQ_EPS))
    q = torch.where(tiny, torch.zeros((), dtype=q.dtype, device=q.device), q)
    if inputs.dtype == torch.half and bool(scale.max() > 65504):
        raise ValueError(f"scale is too large for FP16 with amax={amax}")
    return q.to(inputs.dtype), scale.to(inputs.dtype)


class _FakeAffineTensorQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, min_range, max_range, num_bits=8):
        ctx.save_for_backward(inputs, min_range, max_range)
        step = (max_range - min_range) / (2.0**num_bits - 1)
        min_bound, max_bound = -(2.0 ** (num_bits - 1)), 2.0 ** (num_bits - 1) - 1
        quant_zero = torch.round(min_range / step) - min_bound
        quantized = torch.clamp(torch.round(inputs / step) - quant_zero, min_bound, max_bound)
        return (quantized + quant_zero) * step

    @staticmethod
    def backward(ctx, grad_out):
        inputs, min_range, max_range = ctx.saved_tensors
        inside = (inputs <= max_range) & (inputs >= min_range)
        return torch.where(inside, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device)), None, None, None


def fake_affine_tensor_quant(inputs: torch.Tensor, min_range: torch.Tensor, max_range: torch.Tensor,
                             num_bits: int = 8) -> torch.Tensor:
    """pytorch_quantization's gemmlowp-style affine fake quantization (per tensor, scalar ``min_range``/``max_range``).

    qdq's own asymmetric quantization is :func:`fake_affine_quant` (zero point from :func:`affine_qparams`).

    >>> x = torch.tensor([0.0, 0.5, 1.0])
    >>> [round(v * 255, 3) for v in fake_affine_tensor_quant(x, x.min(), x.max()).tolist()]
    [0.0, 127.0, 255.0]
    """
    return _FakeAffineTensorQuant.apply(inputs, min_range, max_range, num_bits)


class _ScaledE4M3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, amax=None, E=4, M=3):
        if (E, M) != (4, 3):
            raise NotImplementedError(f"scaled_e4m3: only E=4, M=3 is supported, got E={E}, M={M}")
        bound = torch.tensor(_formats.FP8_E4M3_MAX, device=inputs.device)
        amax_t = bound if amax is None else float32_tensor(amax, inputs.device)
        ctx.save_for_backward(inputs, amax_t)
        # qdq's one FP8 arithmetic (that of TensorQuantizer(num_bits=(4, 3)) and of the exported Q/DQ)
        y = _formats.fake_quantize_fp8(inputs, _formats.fp8_scale(amax_t.detach()))
        return torch.where(inputs.abs() < _PQ_EPS, torch.zeros((), device=inputs.device), y).to(inputs.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        inputs, amax = ctx.saved_tensors
        inside = inputs.abs() <= amax
        return torch.where(inside, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device)), None, None, None


def scaled_e4m3(inputs: torch.Tensor, amax: torch.Tensor | None = None, E: int = 4, M: int = 3) -> torch.Tensor:
    """pytorch_quantization's ``scaled_e4m3``: fake FP8 E4M3 with ``amax`` mapped to 448 (``None``: no scaling),
    saturating at +-448, magnitudes below 2**-24 set to 0; torch's float8_e4m3fn cast does the rounding.

    The arithmetic is :func:`qdq.formats.fake_quantize_fp8` with ``scale = amax / 448`` (divide, cast, multiply, as
    ONNX's FP8 QuantizeLinear/DequantizeLinear compute), so an FP8 :class:`~qdq.nn.TensorQuantizer` gives exactly
    ``scaled_e4m3(x, quantizer._get_amax(x))``. pytorch_quantization multiplied by ``448 / amax`` and divided by it:
    results can differ from it by one float32 ulp.

    >>> scaled_e4m3(torch.tensor([0.3, 500.0, -1e-9])).tolist()
    [0.3125, 448.0, 0.0]
    """
    return _ScaledE4M3.apply(inputs, amax, E, M)
