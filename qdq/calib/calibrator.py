"""The calibrator base: statistics of tensors, nothing about modules.

A calibrator sees tensors through :meth:`~_Calibrator.collect`, forgets them with :meth:`~_Calibrator.reset`
and turns what it saw into an amax with :meth:`~_Calibrator.compute_amax`. It never learns which module or
quantizer it belongs to; errors that need a name are raised by the quantizer that owns it.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch

from qdq.tensor_quant import _kept_dims

__all__ = ["_Calibrator", "NoDataCollectedError", "NonFiniteWarning"]

logger = logging.getLogger(__name__)


class NoDataCollectedError(RuntimeError):
    """``compute_amax`` was asked of a calibrator that collected nothing."""


class NonFiniteWarning(UserWarning):
    """Calibration data held NaN or Inf values; they were skipped and counted."""


class _Calibrator:
    """Base of the calibrators.

    Args:
        num_bits: bits of the quantizer the amax is for.
        axis: ``None`` (one amax) or the kept dimension(s), as in :class:`~qdq.tensor_quant.QuantDescriptor`.
        unsigned: the quantizer is unsigned; negative data is then an error.
    """

    def __init__(self, num_bits: int = 8, axis: int | tuple[int, ...] | None = None, unsigned: bool = False):
        self._num_bits = num_bits
        self._axis = axis
        self._unsigned = unsigned
        self.num_nonfinite = 0  # NaN/Inf values skipped since the last reset
        self.num_batches = 0  # tensors collected since the last reset

    num_bits = property(lambda self: self._num_bits)
    axis = property(lambda self: self._axis)
    unsigned = property(lambda self: self._unsigned)

    def collect(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        self.num_nonfinite = 0
        self.num_batches = 0

    def compute_amax(self, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    # helpers shared by the subclasses -------------------------------------------------------------------------
    def _check_unsigned(self, x: torch.Tensor) -> None:
        if self._unsigned:
            low = x.detach().amin()
            if bool(low < 0):
                raise ValueError(
                    f"{type(self).__name__}: unsigned quantizer got negative data (min {low.item():.6g}); "
                    "use a signed quantizer for this tensor"
                )

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` detached, kept dimensions first, flattened to ``[channels, -1]`` (one row when axis is None)."""
        x = x.detach()
        if self._axis is None:
            return x.reshape(1, -1)
        kept = _kept_dims(self._axis, x.dim())
        rest = [d for d in range(x.dim()) if d not in kept]
        return x.permute(*kept, *rest).reshape(math.prod(x.shape[d] for d in kept), -1)

    def _kept_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """Shape of a per-channel amax for ``x``: kept dims keep their size, the others are 1."""
        if self._axis is None:
            return ()
        kept = _kept_dims(self._axis, x.dim())
        return tuple(x.shape[d] if d in kept else 1 for d in range(x.dim()))

    def _skip_nonfinite(self, v: torch.Tensor) -> torch.Tensor:
        """Replaces NaN/Inf magnitudes by -1 (never counted, never a max), counting and warning."""
        bad = ~torch.isfinite(v)
        self._warn_nonfinite(int(bad.sum()), v.numel())
        return torch.where(bad, torch.full_like(v, -1.0), v)

    def _warn_nonfinite(self, nbad: int, numel: int) -> None:
        self.num_nonfinite += nbad
        msg = (
            f"{type(self).__name__}: skipped {nbad} NaN/Inf values of {numel} in this batch "
            f"({self.num_nonfinite} since reset)"
        )
        logger.warning(msg)
        warnings.warn(msg, NonFiniteWarning, stacklevel=4)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_bits={self._num_bits}, axis={self._axis}, unsigned={self._unsigned})"
