"""The amax-based functions with straight-through gradients that QAT and the quantizers call:
:func:`fake_quantize_by_amax`, :func:`quantize_by_amax` and their autograd functions, and the per-call data checks
(:func:`data_checks`) the hot path leaves off.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch

from qdq.math import formats as _formats
from qdq.math._masks import float_mask_route, inside_as_float
from qdq.math.quantize import _channel_axis, _fake_quantize_eager, _quantize_plain, _tensor_ops_path, fake_quantize
from qdq.math.ranges import _check_bits, amax_to_scale, check_amax, maxbound, quant_range
from qdq.math._tensors import float32_tensor

__all__ = [
    "TensorQuantFunction",
    "FakeTensorQuantFunction",
    "data_checks",
    "data_checks_enabled",
    "quantize_by_amax",
    "fake_quantize_by_amax",
    "FakeQuantParams",
    "fake_quant_params",
    "fake_quantize_with_params",
]

# --------------------------------------------------------------------------------------------------------------------
# amax-based functions with gradients (QAT)
# --------------------------------------------------------------------------------------------------------------------


# Checks of the values of amax and of the data cost a device-to-host synchronisation on every call (``bool(t)``), so
# the hot path does not run them: amax is validated where it is set (the quantizer's setter, calibration, state_dict
# loading, export), a learned amax is clamped to ``AMAX_EPS`` by :func:`amax_to_scale`, and unsigned quantization
# clamps negative data to 0. ``data_checks()`` turns the per-call checks back on, for debugging.
_DATA_CHECKS = [False]


def data_checks_enabled() -> bool:
    """Whether the quantization functions check amax and the data on every call (see :func:`data_checks`)."""
    return _DATA_CHECKS[0]


@contextlib.contextmanager
def data_checks(enabled: bool = True) -> Iterator[None]:
    """Within the block, every quantization call checks its amax (finite, ``>= 0``) and, when unsigned, that the
    data has no negative value, raising ``ValueError``; the previous setting is restored on exit.

    Off by default: each check is a device-to-host synchronisation per call, which stalls a GPU and breaks
    ``torch.compile(fullgraph=True)``. Without the checks a negative amax quantizes as ``AMAX_EPS`` and unsigned
    quantization clamps negative values to 0.

    >>> fake_quantize_by_amax(torch.tensor([-0.5, 1.0]), torch.tensor(1.0), unsigned=True)
    tensor([0., 1.])
    >>> with data_checks():
    ...     fake_quantize_by_amax(torch.tensor([-0.5, 1.0]), torch.tensor(1.0), unsigned=True)
    Traceback (most recent call last):
    ...
    ValueError: unsigned quantization of negative data (min -0.5); use a signed quantizer for this tensor
    """
    previous = _DATA_CHECKS[0]
    _DATA_CHECKS[0] = bool(enabled)
    try:
        yield
    finally:
        _DATA_CHECKS[0] = previous


def _prepare(x: torch.Tensor, amax: torch.Tensor, num_bits: int, unsigned: bool, narrow_range: bool):
    """amax as a tensor on ``x``'s device and ``(qmin, qmax)``; host-side checks only (bits, shapes, a Python
    number amax), the value checks when :func:`data_checks` is on."""
    _check_bits(num_bits)
    if not isinstance(amax, torch.Tensor):
        check_amax(amax)
        amax = torch.full((), float(amax), dtype=torch.float32, device=x.device)
    if amax.device != x.device:
        amax = amax.to(x.device)
    _channel_axis(amax, x)  # shape check with a clear message
    if _DATA_CHECKS[0]:
        check_amax(amax.detach())
        if unsigned and x.numel() and bool((x.detach().amin() < 0)):
            raise ValueError(
                f"unsigned quantization of negative data (min {x.detach().amin().item():.6g}); "
                "use a signed quantizer for this tensor"
            )
    qmin, qmax = quant_range(num_bits, unsigned, narrow_range)
    return amax, qmin, qmax


def _fake_tensor_quant_nograd(x, amax, num_bits, unsigned, narrow_range):
    """The forward of :class:`FakeTensorQuantFunction` alone, for calls that record no gradient (eval, no_grad):
    no mask of the clipped values is computed or kept."""
    amax_t, qmin, qmax = _prepare(x, amax, num_bits, unsigned, narrow_range)
    scale = amax_to_scale(amax_t.detach(), num_bits, unsigned)
    out = fake_quantize(x, scale, 0, qmin, qmax)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _clip_interval(amax: torch.Tensor) -> tuple[float, float] | None:
    """``(lo, hi)``, the float32 neighbours of ``-amax`` and ``amax`` outward, so that ``lo < x < hi`` is
    ``|x| <= amax`` for every float32 ``x`` (NaN aside); None unless ``amax`` is one CPU value, finite and normal.

    Reading the value is free on CPU, the only place it is called (a device would synchronise).

    >>> _clip_interval(torch.tensor(1.0))
    (-1.0000001192092896, 1.0000001192092896)
    """
    if amax.numel() != 1 or amax.device.type != "cpu":
        return None
    a = amax.reshape(()).float()
    if not (torch.finfo(torch.float32).tiny <= float(a) < float("inf")):
        return None
    hi = float(torch.nextafter(a, torch.full((), float("inf"))))
    return -hi, hi


class FakeTensorQuantFunction(torch.autograd.Function):
    """Fake quantization with a straight-through gradient and an LSQ-style gradient for amax.

    Backward:

    * ``d x_hat / d x`` is 1 where ``|x| <= amax`` and 0 elsewhere (pytorch_quantization's straight-through
      estimator; for a NaN input, whose output is NaN, the eager CPU path with one amax passes the gradient);
    * ``d x_hat / d amax``, when amax requires grad, is ``(q - x / scale) / maxbound`` where ``|x| <= amax`` and
      ``q / maxbound`` where the input is clipped (q the clamped integer), summed over the elements that share an
      amax: the learned step size gradient of LSQ expressed for amax.
    """

    @staticmethod
    def forward(ctx, x, amax, num_bits=8, unsigned=False, narrow_range=False):
        amax_t, qmin, qmax = _prepare(x, amax, num_bits, unsigned, narrow_range)
        amax_f = amax_t.detach().float()
        scale = amax_to_scale(amax_f, num_bits, unsigned)
        xd = x.detach()
        learned = isinstance(amax, torch.Tensor) and amax.requires_grad
        ctx.clip = None
        ctx.float_mask = False
        if xd.dtype == torch.float32 and _tensor_ops_path(xd, scale) and not torch.compiler.is_compiling():
            clip = None if learned else _clip_interval(amax_f)
            if clip is not None:
                # eager CPU, one amax: no mask. The backward passes the gradient where lo < x < hi, which for
                # float32 x is |x| <= amax, in one vectorized kernel; a bool mask costs a scalar loop each way
                # (torch's comparisons into bool and torch.where on CPU), 2-4x the time of the quantization itself
                ctx.clip = clip
                ctx.save_for_backward(x)
                return _fake_quantize_eager(xd, scale, None, qmin, qmax)
            # eager CPU: |x| and then the output go into one buffer, a large allocation fewer per call (the shape
            # of amax, and so of scale, was checked by _prepare)
            out = torch.abs(xd)
            inside = out <= amax_f
            out = _fake_quantize_eager(xd, scale, None, qmin, qmax, out=out)
        else:
            out = fake_quantize(x, scale, 0, qmin, qmax)
            # compiled for the CPU: the backward computes the mask from x, so that no bool is saved (qdq.math._masks)
            ctx.float_mask = float_mask_route(xd)
            inside = amax_f if ctx.float_mask else xd.abs() <= amax_f
        ctx.learned = learned
        if learned:
            ctx.save_for_backward(inside, x, scale, amax_t)
            ctx.bounds = (qmin, qmax, maxbound(num_bits, unsigned))
        elif ctx.float_mask:
            ctx.save_for_backward(inside, x)
        else:
            ctx.save_for_backward(inside)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.clip is not None:
            (x,) = ctx.saved_tensors
            return torch.ops.aten.hardtanh_backward(grad_out, x, *ctx.clip), None, None, None, None
        saved = ctx.saved_tensors
        if ctx.float_mask:
            inside = inside_as_float(saved[1], saved[0])  # saved: amax and x
            grad_x = grad_out * inside.to(grad_out.dtype)
        else:
            inside = saved[0]
            grad_x = torch.where(inside, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device))
        grad_amax = None
        if ctx.learned:
            _, x, scale, amax = saved
            qmin, qmax, mb = ctx.bounds
            xs = x.float() * torch.reciprocal(scale)
            q = torch.clamp(torch.round(xs), qmin, qmax)
            dscale = q - xs * inside.float() if ctx.float_mask else torch.where(inside, q - xs, q)
            g = (grad_out.float() * dscale) / mb
            # sum over the broadcast dimensions down to amax's shape
            lead = g.dim() - amax.dim()
            if lead:
                g = g.sum(dim=tuple(range(lead)))
            dims = tuple(d for d, s in enumerate(amax.shape) if s == 1 and g.shape[d] != 1)
            if dims:
                g = g.sum(dim=dims, keepdim=True)
            grad_amax = g.reshape(amax.shape).to(amax.dtype)
        return grad_x, grad_amax, None, None, None


class TensorQuantFunction(torch.autograd.Function):
    """Real quantization: returns ``(q, scale)``, q the integer values in float32 (exact for every supported bit
    width, which fp16/bf16 are not); straight-through gradient."""

    @staticmethod
    def forward(ctx, x, amax, num_bits=8, unsigned=False, narrow_range=False):
        amax_t, qmin, qmax = _prepare(x, amax, num_bits, unsigned, narrow_range)
        amax_f = amax_t.detach().float()
        scale = amax_to_scale(amax_f, num_bits, unsigned)
        ctx.save_for_backward(x.detach().abs() <= amax_f)
        q = _quantize_plain(x.float(), scale, torch.zeros((), device=x.device), qmin, qmax)
        ctx.mark_non_differentiable(scale)
        return q, scale

    @staticmethod
    def backward(ctx, grad_q, grad_scale):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad_q, torch.zeros((), dtype=grad_q.dtype, device=grad_q.device)), None, None, None, None


def fake_quantize_by_amax(
    x: torch.Tensor,
    amax: torch.Tensor,
    num_bits: int = 8,
    unsigned: bool = False,
    narrow_range: bool = False,
) -> torch.Tensor:
    """Fake-quantizes ``x`` with the given ``amax`` (a scalar, or keepdims-shaped for per-channel).

    fp16/bf16 inputs are computed in float32 and returned in their dtype. See :class:`FakeTensorQuantFunction`
    for the gradients.

    >>> x = torch.tensor([-2.0, -1.0, 0.3, 1.0], requires_grad=True)
    >>> y = fake_quantize_by_amax(x, torch.tensor(1.0))
    >>> y.sum().backward()
    >>> x.grad
    tensor([0., 1., 1., 1.])
    """
    if _formats.is_fp8(num_bits):
        return _formats.fake_fp8_quant(x, amax)
    if torch.is_grad_enabled() and (x.requires_grad or (isinstance(amax, torch.Tensor) and amax.requires_grad)):
        return FakeTensorQuantFunction.apply(x, amax, num_bits, unsigned, narrow_range)
    return _fake_tensor_quant_nograd(x, amax, num_bits, unsigned, narrow_range)


class FakeQuantParams(NamedTuple):
    """What symmetric integer fake quantization with one amax needs, computed once by :func:`fake_quant_params`:
    the float32 step ``scale`` (:func:`amax_to_scale`), its reciprocal and the integer range."""

    scale: torch.Tensor
    inv_scale: torch.Tensor
    qmin: int
    qmax: int


def fake_quant_params(amax: torch.Tensor, num_bits: int = 8, unsigned: bool = False,
                      narrow_range: bool = False) -> FakeQuantParams:
    """The :class:`FakeQuantParams` of ``amax`` (a tensor: a scalar or keepdims-shaped per channel; detached) for
    :func:`fake_quantize_with_params`. Integer formats only (FP8 has its own path, :mod:`qdq.math.formats`).

    >>> p = fake_quant_params(torch.tensor(1.0), num_bits=4)
    >>> round(p.scale.item(), 6), p.qmin, p.qmax
    (0.142857, -8, 7)
    """
    if _formats.is_fp8(num_bits):
        raise ValueError("fake_quant_params: integer formats only; FP8 quantizes through qdq.math.formats")
    _check_bits(num_bits)
    scale = amax_to_scale(torch.as_tensor(amax).detach(), num_bits, unsigned)
    qmin, qmax = quant_range(num_bits, unsigned, narrow_range)
    return FakeQuantParams(scale, torch.reciprocal(scale), qmin, qmax)


def fake_quantize_with_params(x: torch.Tensor, params: FakeQuantParams) -> torch.Tensor:
    """:func:`fake_quantize_by_amax` with the scale computed ahead (:func:`fake_quant_params`): the same numbers,
    in ``x``'s dtype, without recomputing the scale on every call. For forwards that record no gradient (eval,
    ``no_grad``): training goes through :func:`fake_quantize_by_amax` (its straight-through and amax gradients).
    The per-call value checks of :func:`data_checks` are not made here.

    >>> x = torch.tensor([-2.0, 0.3, 1.0])
    >>> p = fake_quant_params(torch.tensor(1.0))
    >>> torch.equal(fake_quantize_with_params(x, p), fake_quantize_by_amax(x, torch.tensor(1.0)))
    True
    """
    scale = params.scale
    if scale.device != x.device:
        scale = scale.to(x.device)
    xf = x.float()
    if _tensor_ops_path(xf, scale):
        _channel_axis(scale, xf)  # the shape check, with its message
        out = _fake_quantize_eager(xf, scale, None, params.qmin, params.qmax,
                                   inv_scale=params.inv_scale if params.inv_scale.device == x.device else None)
    else:
        out = fake_quantize(xf, scale, 0, params.qmin, params.qmax)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def quantize_by_amax(
    x: torch.Tensor,
    amax: torch.Tensor,
    num_bits: int = 8,
    unsigned: bool = False,
    narrow_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes ``x``: returns the integer values (in a float tensor) and the float32 step ``scale``.

    >>> q, scale = quantize_by_amax(torch.tensor([0.5, -3.0]), torch.tensor(2.0), num_bits=4)
    >>> q, scale
    (tensor([ 2., -8.]), tensor(0.2857))
    """
    if _formats.is_fp8(num_bits):  # the FP8 values (as float32) and the scale
        amax = float32_tensor(amax, x.device)
        scale = _formats.fp8_scale(amax.detach())
        return _formats.quantize_fp8(x, scale).float(), scale
    return TensorQuantFunction.apply(x, amax, num_bits, unsigned, narrow_range)
