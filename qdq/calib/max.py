"""Running abs-max calibration, per tensor or per channel.

The statistics are the running abs max, signed min and signed max (:meth:`MaxCalibrator.stats`); they merge
exactly (elementwise max and min), so merged calibrators - also across torch.distributed ranks,
:func:`qdq.distributed.all_reduce_calibrators` - hold bit for bit what one calibrator would compute on all the data.
"""

from __future__ import annotations

import math

import torch

from qdq.calib.calibrator import NoDataCollectedError, ShapeChangedError, _Calibrator

__all__ = ["MaxCalibrator"]


class MaxCalibrator(_Calibrator):
    """Keeps the running maximum of ``|x|`` over everything collected (per kept channel when ``axis`` is set).

    The running max stays on the device of the data. NaN and Inf values are skipped, counted in
    ``num_nonfinite`` and reported with a warning.

    Args:
        num_bits, axis, unsigned: as in :class:`~qdq.math.descriptor.QuantDescriptor`.
        track_amax: also keep each batch's amax in ``amaxs`` (on the CPU; this calibrator's own batches only, also
            after a :meth:`merge`).

    Example:
        >>> import torch
        >>> cal = MaxCalibrator(8, axis=0, unsigned=False)
        >>> cal.collect(torch.tensor([[1.0, -4.0], [0.5, 2.0]]))
        >>> cal.collect(torch.tensor([[3.0, 0.0], [-1.0, 0.0]]))
        >>> cal.compute_amax().flatten().tolist()
        [4.0, 2.0]
    """

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False, track_amax: bool = False):
        super().__init__(num_bits, axis, unsigned)
        self._track_amax = track_amax
        self._calib_amax: torch.Tensor | None = None
        self._calib_min: torch.Tensor | None = None  # signed running min and max, for asymmetric quantization
        self._calib_max: torch.Tensor | None = None
        self._skipped: torch.Tensor | None = None  # NaN/Inf values counted on a GPU, not yet reported
        self.amaxs: list[torch.Tensor] = []

    def collect(self, x: torch.Tensor) -> None:
        """Updates the running max with ``x``."""
        if x.numel() == 0:
            return
        if x.device.type == "cpu":  # on a GPU no host read: compute_amax checks the running min instead
            self._check_unsigned(x)
        rows = self._rows(x)
        low, high = rows.amin(dim=1).float(), rows.amax(dim=1).float()
        # reading a CPU tensor is no device synchronisation; elsewhere the NaN/Inf-safe path always runs
        if x.device.type != "cpu" or not bool(torch.isfinite(low).all() & torch.isfinite(high).all()):
            clean = rows.float().abs()
            if x.device.type == "cpu":
                clean = self._skip_nonfinite(clean)  # -1 marks the skipped values
            else:  # counted without a host read; reported when amax is computed
                bad = ~torch.isfinite(clean)
                self._skipped = bad.sum() + (self._skipped if self._skipped is not None else 0)
                clean = torch.where(bad, torch.full_like(clean, -1.0), clean)
            keep = clean >= 0
            big = torch.finfo(torch.float32).max
            low = torch.where(keep, rows.float(), big).amin(dim=1)
            high = torch.where(keep, rows.float(), -big).amax(dim=1)
            empty = ~keep.any(dim=1)  # a channel with nothing finite contributes zeros
            low, high = torch.where(empty, 0.0, low), torch.where(empty, 0.0, high)
        shape = self._kept_shape(x)
        low, high = low.reshape(shape), high.reshape(shape)
        amax = torch.maximum(high, -low)
        if self._calib_amax is None:
            self._calib_amax, self._calib_min, self._calib_max = amax, low, high
        else:
            if amax.shape != self._calib_amax.shape:
                raise ShapeChangedError(
                    f"MaxCalibrator: per-channel amax shape changed: {tuple(amax.shape)} for this tensor "
                    f"{tuple(x.shape)} does not match the {tuple(self._calib_amax.shape)} collected so far"
                )
            device = self._calib_amax.device
            self._calib_amax = torch.maximum(self._calib_amax, amax.to(device))
            self._calib_min = torch.minimum(self._calib_min, low.to(device))
            self._calib_max = torch.maximum(self._calib_max, high.to(device))
        self.num_batches += 1
        if self._track_amax:
            self.amaxs.append(amax.cpu())

    def reset(self) -> None:
        """Forgets everything collected."""
        super().reset()
        self._calib_amax = self._calib_min = self._calib_max = self._skipped = None
        self.amaxs = []

    def compute_amax(self, *args, **kwargs) -> torch.Tensor:
        """The running max (a copy); :class:`NoDataCollectedError` if nothing was collected.

        Arguments such as ``method="max"`` are accepted and ignored, so model-wide code can call every calibrator
        the same way.
        """
        method = kwargs.get("method", args[0] if args else None)
        if method not in (None, "max"):
            raise ValueError(f"MaxCalibrator computes the max only, not {method!r}; use a histogram calibrator")
        if self._calib_amax is None:
            raise NoDataCollectedError("MaxCalibrator collected no data")
        if self._skipped is not None:  # NaN/Inf counted on a GPU without a host read
            skipped, self._skipped = int(self._skipped), None
            if skipped:
                self._warn_nonfinite(skipped, -1)
        if self._unsigned and bool((self._calib_min < 0).any()):
            raise ValueError(
                f"MaxCalibrator: unsigned quantizer got negative data (min {self._calib_min.min().item():.6g}); "
                "use a signed quantizer for this tensor"
            )
        return self._calib_amax.clone()

    # the statistics: named tensors and how they combine -----------------------------------------------------
    STATS = {"amax": "max", "min": "min", "max": "max"}

    def stats(self) -> dict[str, torch.Tensor]:
        """``{"amax", "min", "max"}``: the running abs max and the signed min and max (copies; ``{}`` without data).

        >>> cal = MaxCalibrator()
        >>> cal.collect(torch.tensor([-3.0, 1.0]))
        >>> cal.stats()
        {'amax': tensor(3.), 'min': tensor(-3.), 'max': tensor(1.)}
        """
        if self._calib_amax is None:
            return {}
        return {"amax": self._calib_amax.clone(), "min": self._calib_min.clone(), "max": self._calib_max.clone()}

    @property
    def stats_shape(self) -> tuple[int, ...] | None:
        return None if self._calib_amax is None else tuple(self._calib_amax.shape)

    def empty_stats(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """``-inf`` maxima and a ``+inf`` minimum: the neutral element of the running max and min."""
        def full(value: float) -> torch.Tensor:
            return torch.full(tuple(shape), value, dtype=torch.float32, device=device)

        return {"amax": full(-math.inf), "min": full(math.inf), "max": full(-math.inf)}

    def _load(self, stats: dict[str, torch.Tensor], shape: tuple[int, ...]) -> None:
        self._calib_amax, self._calib_min, self._calib_max = stats["amax"], stats["min"], stats["max"]

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The running ``(min, max)`` of the signed values (asymmetric quantization); copies."""
        if self._calib_amax is None:
            raise NoDataCollectedError("MaxCalibrator collected no data")
        return self._calib_min.clone(), self._calib_max.clone()

    def __repr__(self) -> str:
        if self._calib_amax is None:
            seen = "nothing collected"
        else:
            seen = f"amax=[{self._calib_amax.min().item():.4g}, {self._calib_amax.max().item():.4g}]"
        return f"MaxCalibrator(num_bits={self._num_bits}, axis={self._axis}, unsigned={self._unsigned}, {seen})"
