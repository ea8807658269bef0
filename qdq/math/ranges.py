"""Integer grids and scales: ``maxbound`` and ``[qmin, qmax]`` per bit width, scale from amax, the checks of amax, and
the reductions that compute amax (:func:`reduce_amax`, :func:`reduce_range`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qdq.math import formats as _formats
from qdq.math._tensors import flat_view, float32_tensor

__all__ = [
    "AMAX_EPS",
    "maxbound",
    "quant_range",
    "amax_to_scale",
    "amax_problem",
    "check_amax",
    "reduce_amax",
    "reduce_range",
    "flat_view",
]

#: amax values below this are treated as this value (2**-24, the smallest fp16 subnormal).
AMAX_EPS = 2.0**-24


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A Python int or float (bool excluded: ``True`` is an int)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


MIN_BITS, MAX_BITS = 2, 16


# --------------------------------------------------------------------------------------------------------------------
# Ranges and scales
# --------------------------------------------------------------------------------------------------------------------


def _check_bits(num_bits: int) -> None:
    if not _is_int(num_bits) or not MIN_BITS <= num_bits <= MAX_BITS:
        raise ValueError(f"num_bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {num_bits!r}")


def maxbound(num_bits: int = 8, unsigned: bool = False) -> int:
    """The integer that amax maps to: ``2**(num_bits - 1 + unsigned) - 1`` (127 for signed 8 bit).

    >>> maxbound(8), maxbound(8, unsigned=True), maxbound(4), maxbound((4, 3))
    (127, 255, 7, 448)
    """
    if _formats.is_fp8(num_bits):
        return int(_formats.FP8_E4M3_MAX)
    _check_bits(num_bits)
    return 2 ** (num_bits - 1 + int(unsigned)) - 1


def quant_range(num_bits: int = 8, unsigned: bool = False, narrow_range: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)`` of the integer grid.

    >>> quant_range(8), quant_range(8, narrow_range=True), quant_range(8, unsigned=True)
    ((-128, 127), (-127, 127), (0, 255))
    """
    if _formats.is_fp8(num_bits):
        return -int(_formats.FP8_E4M3_MAX), int(_formats.FP8_E4M3_MAX)
    qmax = maxbound(num_bits, unsigned)
    if unsigned:
        return 0, qmax
    return (-qmax if narrow_range else -qmax - 1), qmax


def amax_to_scale(amax: torch.Tensor, num_bits: int = 8, unsigned: bool = False) -> torch.Tensor:
    """The float32 step size ``max(amax, AMAX_EPS) / maxbound`` (ONNX QuantizeLinear's ``y_scale``).

    >>> amax_to_scale(torch.tensor([127.0, 0.0]))
    tensor([1.0000e+00, 4.6933e-10])
    """
    amax = float32_tensor(amax)
    if _formats.is_fp8(num_bits):
        return _formats.fp8_scale(amax)
    return amax.to(torch.float32).clamp(min=AMAX_EPS) / maxbound(num_bits, unsigned)


def amax_problem(amax: torch.Tensor | float, *, nonnegative: bool = True) -> str | None:
    """What makes ``amax`` (a tensor or a Python number) invalid, or ``None``: not a number, NaN, infinite or, with
    ``nonnegative``, negative. One device sync for a tensor. The one amax check: :func:`check_amax` raises with it.

    >>> amax_problem(torch.tensor([1.0, -2.0, float("nan")]))
    'must be finite and >= 0; got [-2.0, nan] among its values'
    >>> amax_problem(-1.0, nonnegative=False) is None, amax_problem("1")
    (True, 'must be a number, got str')
    """
    rule = "finite and >= 0" if nonnegative else "finite"
    if isinstance(amax, torch.Tensor):
        bad = ~torch.isfinite(amax)
        if nonnegative:
            bad |= amax < 0
        if bool(bad.any()):
            return f"must be {rule}; got {amax[bad].flatten()[:4].tolist()} among its values"
        return None
    if not _is_number(amax):
        return f"must be a number, got {type(amax).__name__}"
    if not math.isfinite(amax) or (nonnegative and amax < 0):
        return f"must be {rule}; got {amax!r}"
    return None


def check_amax(amax: torch.Tensor | float, what: str = "amax", *, nonnegative: bool = True,
               error: type[Exception] = ValueError) -> None:
    """Raises ``error`` (``ValueError``) naming ``what`` (e.g. the quantizer's amax) when :func:`amax_problem`
    finds one.

    >>> check_amax(torch.tensor(-1.0), "TensorQuantizer 'conv1._input_quantizer': amax")
    Traceback (most recent call last):
        ...
    ValueError: TensorQuantizer 'conv1._input_quantizer': amax must be finite and >= 0; got [-1.0] among its values
    """
    problem = amax_problem(amax, nonnegative=nonnegative)
    if problem is not None:
        raise error(f"{what} {problem}")


def reduce_amax(x: torch.Tensor, axis: int | tuple[int, ...] | None = None, keepdims: bool = True) -> torch.Tensor:
    """abs-max of ``x`` over every dimension except ``axis`` (the kept ones); float32, a scalar for ``axis=None``.

    >>> reduce_amax(torch.tensor([[1.0, -3.0], [0.5, 2.0]]), axis=0).flatten().tolist()
    [3.0, 2.0]
    """
    if axis is None:
        return x.detach().abs().amax().float()
    kept = _kept_dims(axis, x.dim())
    dims = [d for d in range(x.dim()) if d not in kept]
    if not dims:
        return x.detach().abs().float()
    return x.detach().abs().amax(dim=dims, keepdim=keepdims).float()


def reduce_range(x: torch.Tensor, axis: int | tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of ``x`` over every dimension except ``axis``, keepdims, float32 (scalars when ``axis=None``).

    >>> [t.flatten().tolist() for t in reduce_range(torch.tensor([[1.0, -3.0], [0.5, 2.0]]), axis=0)]
    [[-3.0, 0.5], [1.0, 2.0]]
    """
    x = x.detach()
    if axis is None:
        low, high = torch.aminmax(flat_view(x))
        return low.float(), high.float()
    kept = _kept_dims(axis, x.dim())
    dims = [d for d in range(x.dim()) if d not in kept]
    if not dims:
        return x.float(), x.float()
    return x.amin(dim=dims, keepdim=True).float(), x.amax(dim=dims, keepdim=True).float()


def _kept_dims(axis: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    kept = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
        kept.append(a % ndim)
    return tuple(sorted(kept))
