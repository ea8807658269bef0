"""Quantize, dequantize and fake-quantize with an explicit scale and zero point (per tensor or per channel), and the
affine (asymmetric) fake quantization with its gradient; the fast eager-CPU path and torch's fused kernels give the
same numbers.
"""

from __future__ import annotations

import logging

import torch

from qdq.math.ranges import AMAX_EPS, _check_bits, quant_range
from qdq.math._masks import float_mask_route, inside_as_float
from qdq.math._tensors import float32_tensor

__all__ = ["quantize", "dequantize", "fake_quantize", "affine_qparams", "fake_affine_quant"]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# Quantize / dequantize / fake-quantize with explicit scale
# --------------------------------------------------------------------------------------------------------------------


def _channel_axis(scale: torch.Tensor, x: torch.Tensor) -> int | None:
    """The one dimension along which ``scale`` varies, or None if it is a single value.

    Raises if ``scale`` does not broadcast to ``x`` or varies along more than one dimension (those cases are
    handled by the caller's plain-math path).
    """
    if scale.numel() == 1:
        return None
    if scale.dim() > x.dim():
        raise ValueError(f"scale/amax of shape {tuple(scale.shape)} has more dimensions than the tensor {tuple(x.shape)}")
    shape = [1] * (x.dim() - scale.dim()) + list(scale.shape)
    for d, (s, n) in enumerate(zip(shape, x.shape)):
        if s not in (1, n):
            raise ValueError(
                f"amax of shape {tuple(scale.shape)} does not match the tensor of shape {tuple(x.shape)}: "
                f"dimension {d} has {s} values for {n} channels"
            )
    varying = [d for d, s in enumerate(shape) if s != 1]
    return varying[0] if len(varying) == 1 else -1


_EAGER_TYPES = (torch.Tensor, torch.nn.Parameter)


def _tensor_ops_path(x: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
    """Whether :func:`fake_quantize` runs as vectorized tensor ops on one buffer instead of PyTorch's fused kernels.

    It does where autograd records nothing through the call (as inside :class:`FakeTensorQuantFunction`, whose
    forward runs without it) and

    * in eager execution on CPU, outside any tracing: the fused kernels' CPU loop is scalar, 3-30x slower on one
      core, the more the smaller the tensor (``benchmarks/core_ops.py``);
    * under ``torch.compile`` (not an export): inductor has no lowering of the fused kernels and would call them as
      opaque kernels; the tensor ops fuse with the clipping mask and the neighbouring ops into one loop.

    For finite inputs the numbers are the same (tested, ties included); a NaN stays NaN here, where the fused kernel
    gives ``qmin * scale``. Under the exporters (jit tracing, torch.export, both ONNX exporters), on other devices in
    eager execution and when autograd records through the call, the fused kernels run: the exporters turn them into
    QuantizeLinear/DequantizeLinear, and their gradient is the straight-through one.
    """
    if torch.is_grad_enabled() and (x.requires_grad or (scale is not None and scale.requires_grad)):
        return False
    if torch.compiler.is_compiling():
        return not torch.compiler.is_exporting()
    return type(x) in _EAGER_TYPES and x.device.type == "cpu" and not torch.jit.is_tracing()


def _standard_layout(x: torch.Tensor) -> bool:
    """Contiguous, or channels-last for 4-D and 5-D tensors: the layouts an output keeps. Any other input (a
    transposed or permuted view: attention's Q, K and V, a Linear input in ``(length, batch)`` order) gets a
    contiguous output, written in the same pass, so that the MatMul or Linear reading it makes no copy of its own
    (torch.matmul copies a permuted operand into a contiguous batch)."""
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


def _fake_quantize_eager(x, scale, zero_point, qmin: int, qmax: int, out: torch.Tensor | None = None,
                         inv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The fused kernels' arithmetic in tensor ops: ``(clamp(round_half_even(x * (1 / scale)) + zp) - zp) * scale``
    (float32; ``zero_point`` None for 0), written into ``out`` if given (a float32 buffer of ``x``'s shape; else a new
    one, contiguous unless ``x`` has a :func:`_standard_layout`); ``inv_scale`` is ``torch.reciprocal(scale)``,
    computed here when None."""
    if inv_scale is None:
        inv_scale = torch.reciprocal(scale)
    if out is None and not _standard_layout(x) and not torch.compiler.is_compiling():  # inductor lays out its own
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    q = (torch.mul(x, inv_scale) if out is None else torch.mul(x, inv_scale, out=out)).round_()
    if zero_point is None:
        return q.clamp_(qmin, qmax).mul_(scale)
    return q.add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


_logged_plain_paths: set[str] = set()


def _log_plain_path(reason: str) -> None:
    if reason not in _logged_plain_paths:
        _logged_plain_paths.add(reason)
        logger.info("fake quantization uses plain tensor math instead of the fused kernel: %s", reason)


def _quantize_plain(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int):
    inv_scale = torch.reciprocal(scale)
    return torch.clamp(torch.round(x * inv_scale) + zero_point, qmin, qmax)


def _resolve_range(qmin: int | None, qmax: int | None, num_bits: int, unsigned: bool, narrow_range: bool):
    """``(qmin, qmax)``: the ones given, the others from ``quant_range(num_bits, unsigned, narrow_range)``."""
    if qmin is None or qmax is None:
        low, high = quant_range(num_bits, unsigned, narrow_range)
        qmin, qmax = (low if qmin is None else qmin), (high if qmax is None else qmax)
    if qmin > qmax:
        raise ValueError(f"qmin {qmin} is above qmax {qmax}")
    return qmin, qmax


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | int = 0,
    qmin: int | None = None,
    qmax: int | None = None,
    *,
    num_bits: int = 8,
    unsigned: bool = False,
    narrow_range: bool = False,
) -> torch.Tensor:
    """Integer values ``clamp(round_half_even(x * (1 / scale)) + zero_point, qmin, qmax)`` as float32.

    ``scale`` (and ``zero_point``) broadcast against ``x``. Computed in float32 whatever ``x``'s dtype. ``qmin`` and
    ``qmax`` default to :func:`quant_range` of ``num_bits``, ``unsigned`` and ``narrow_range`` (the signed 8-bit
    ``[-128, 127]`` by default), so a 4-bit scale saturates on the 4-bit grid when ``num_bits=4`` is passed.

    >>> quantize(torch.tensor([0.25, 0.75, 300.0]), torch.tensor(0.5))
    tensor([  0.,   2., 127.])
    >>> from qdq.math.ranges import amax_to_scale
    >>> quantize(torch.tensor([0.25, 0.75, 300.0]), amax_to_scale(torch.tensor(3.5), 4), num_bits=4)
    tensor([0., 2., 7.])
    """
    qmin, qmax = _resolve_range(qmin, qmax, num_bits, unsigned, narrow_range)
    scale = float32_tensor(scale, x.device)
    zero_point = float32_tensor(zero_point, x.device)
    return _quantize_plain(x.float(), scale, zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int = 0) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32.

    >>> dequantize(torch.tensor([0.0, 2.0, 127.0]), torch.tensor(0.5))
    tensor([ 0.0000,  1.0000, 63.5000])
    """
    scale = float32_tensor(scale, q.device)
    zero_point = float32_tensor(zero_point, q.device)
    return (q.float() - zero_point) * scale


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | int = 0,
    qmin: int | None = None,
    qmax: int | None = None,
    *,
    num_bits: int = 8,
    unsigned: bool = False,
    narrow_range: bool = False,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` through PyTorch's fused kernels; float32 result, no custom gradient.

    This is the op the ONNX export traces: both exporters turn the fused kernels into QuantizeLinear ->
    DequantizeLinear. ``scale`` is a single value or varies along exactly one dimension of ``x``; anything else
    (several kept dimensions) is computed with the same math in plain tensor ops, and logged once.

    ``qmin``/``qmax`` default to the grid of ``num_bits``, ``unsigned`` and ``narrow_range``, as in :func:`quantize`.

    >>> fake_quantize(torch.tensor([0.25, 0.75, 300.0]), torch.tensor(0.5))
    tensor([ 0.0000,  1.0000, 63.5000])
    >>> fake_quantize(torch.tensor([300.0]), torch.tensor(0.5), num_bits=4)
    tensor([3.5000])
    """
    qmin, qmax = _resolve_range(qmin, qmax, num_bits, unsigned, narrow_range)
    x = x.float()
    scale = float32_tensor(scale, x.device)
    if _tensor_ops_path(x, scale):
        _channel_axis(scale, x)  # the shape check, with its message
        zp = None
        if isinstance(zero_point, torch.Tensor):
            zp = torch.broadcast_to(zero_point.to(x.device).float().round(), scale.shape)
        elif zero_point != 0:
            zp = torch.full((), float(round(zero_point)), dtype=torch.float32, device=x.device)
        return _fake_quantize_eager(x, scale, zp, qmin, qmax)
    if isinstance(zero_point, torch.Tensor):
        zero_point = zero_point.to(x.device)
    else:  # a fill on the device, not a copy from the host (which would synchronise a GPU)
        zero_point = torch.full((), zero_point, dtype=torch.float32, device=x.device)
    axis = _channel_axis(scale, x)
    if axis is None:
        zp = zero_point.reshape(()).round().to(torch.int32)
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zp, qmin, qmax)
    if axis >= 0:
        zp = torch.broadcast_to(zero_point, scale.shape).reshape(-1).round().to(torch.int32)
        return torch.fake_quantize_per_channel_affine(x, scale.reshape(-1), zp, axis, qmin, qmax)
    _log_plain_path("scale varies along several dimensions")
    zp = zero_point.float()
    return (_quantize_plain(x, scale, zp, qmin, qmax) - zp) * scale


def affine_qparams(
    amin: torch.Tensor, amax: torch.Tensor, num_bits: int = 8, unsigned: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` of asymmetric quantization mapping ``[amin, amax]`` onto ``[qmin, qmax]``.

    The range is first widened to contain 0 (so that zero, e.g. padding, is exact); then
    ``scale = (amax - amin) / (qmax - qmin)`` (at least ``AMAX_EPS / (qmax - qmin)``) and
    ``zero_point = clamp(round_half_even(qmin - amin / scale), qmin, qmax)``, as a float32 tensor of integers.

    >>> scale, zp = affine_qparams(torch.tensor(-1.0), torch.tensor(3.0), unsigned=True)
    >>> round(scale.item(), 6), zp.item()
    (0.015686, 64.0)
    """
    qmin, qmax = quant_range(num_bits, unsigned, False)
    amin = float32_tensor(amin).clamp(max=0)
    amax = float32_tensor(amax).clamp(min=0)
    scale = (amax - amin).clamp(min=AMAX_EPS) / (qmax - qmin)
    zero_point = torch.clamp(torch.round(qmin - amin / scale), qmin, qmax)
    return scale, zero_point


class FakeAffineQuantFunction(torch.autograd.Function):
    """Asymmetric fake quantization; straight-through gradient inside ``[amin, amax]``, none for the range."""

    @staticmethod
    def forward(ctx, x, amin, amax, num_bits=8, unsigned=False):
        _check_bits(num_bits)
        amin = float32_tensor(amin, x.device)
        amax = float32_tensor(amax, x.device)
        _channel_axis(amax, x)
        if not bool(torch.isfinite(amin).all() & torch.isfinite(amax).all() & (amin <= amax).all()):
            raise ValueError("amin and amax must be finite with amin <= amax")
        scale, zero_point = affine_qparams(amin, amax, num_bits, unsigned)
        qmin, qmax = quant_range(num_bits, unsigned, False)
        xd = x.detach()
        ctx.float_mask = float_mask_route(xd)  # compiled for the CPU: no bool saved (qdq.math._masks)
        if ctx.float_mask:
            ctx.save_for_backward(xd, amin.clamp(max=0), amax.clamp(min=0))
        else:
            ctx.save_for_backward((xd >= amin.clamp(max=0)) & (xd <= amax.clamp(min=0)))
        return fake_quantize(x, scale, zero_point, qmin, qmax).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.float_mask:
            x, lo, hi = ctx.saved_tensors
            return grad_out * inside_as_float(x, hi, lo).to(grad_out.dtype), None, None, None, None
        (inside,) = ctx.saved_tensors
        zero = torch.zeros((), dtype=grad_out.dtype, device=grad_out.device)
        return torch.where(inside, grad_out, zero), None, None, None, None


def fake_affine_quant(
    x: torch.Tensor, amin: torch.Tensor, amax: torch.Tensor, num_bits: int = 8, unsigned: bool = False
) -> torch.Tensor:
    """Asymmetric fake quantization of ``x`` over ``[amin, amax]`` (see :func:`affine_qparams`).

    >>> fake_affine_quant(torch.tensor([-1.0, 0.0, 0.5, 3.0, 9.0]), torch.tensor(-1.0), torch.tensor(3.0),
    ...                   unsigned=True)
    tensor([-1.0039,  0.0000,  0.5020,  2.9961,  2.9961])
    """
    return FakeAffineQuantFunction.apply(x, amin, amax, num_bits, unsigned)


def _register_missing_fake_kernels() -> None:
    """torch ships no fake (meta) kernel for the op behind ``fake_quantize_per_tensor_affine`` with tensor scale,
    so torch.export / torch.compile cannot trace fake quantization with dynamic shapes. Register one: it only
    describes output shapes and dtypes; the numbers still come from torch's kernel."""
    try:

        @torch.library.register_fake("aten::_fake_quantize_per_tensor_affine_cachemask_tensor_qparams")
        def _(x, scale, zero_point, fake_quant_enabled, quant_min, quant_max):
            return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)

    except (RuntimeError, ValueError) as err:  # torch already has one: nothing to do
        logger.debug("fake kernel not registered: %s", err)


_register_missing_fake_kernels()
