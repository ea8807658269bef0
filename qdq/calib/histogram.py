"""Histogram calibration: int64 counts of ``|x|`` with a bounded number of bins, and amax searches over them.

The histogram covers ``[0, R]`` with ``num_bins`` equal bins. The first batch sets ``R`` to its largest
magnitude. When a later batch goes beyond ``R``, the range grows by the smallest integer factor ``k`` that covers it
and every ``k`` neighbouring bins are merged into one: counts move exactly (no interpolation, no smearing), the
number of bins never changes, and the data always spans more than half of the bins. Counts are int64 and stay on
the device of the data.

Across torch.distributed ranks (:meth:`HistogramCalibrator.all_reduce`, a collective), each rank has grown its own
range ``R_r`` from its own data. The ranks first agree on a common range, ``R = max_r R_r`` per channel (one MAX
all-reduce, together with the exact maxima), then every rank moves its counts onto the ``num_bins`` bins of
``[0, R]`` (:func:`rebin`) and the counts are summed (a SUM all-reduce, int64, so the sum is exact):

* where ``R / R_r`` is an integer ``k`` (the rank with the largest range: ``k = 1``; ranges that differ by a
  power of two, ...) the ``k`` neighbouring bins merge, exactly as the range growth of one process does (the one
  value sitting on the rank's top edge ``R_r``, counted in its last bin, then lands in the bin just below its own,
  as it does when one process grows its range);
* otherwise each old bin's count moves to the new bin that holds the old bin's centre. An old bin is never wider
  than a new one, so every value lands in its own new bin or in a neighbour: **an error of at most one bin** per
  count, and nowhere else.

So the combined histogram is the histogram one process would collect over ``[0, R]`` on the union of the data, up
to moving counts by at most one bin, and ``max`` (the exact maximum) is the union's maximum exactly. The percentile
amax is then within one bin width (``R / num_bins``) of the single-process one; entropy, mse and kld search the
same histogram and move by a bin or so on smooth data (they are argmins, so no bound holds for every histogram).
``num_batches`` and ``num_nonfinite`` become sums over the ranks.

Example:
    >>> import torch
    >>> torch.manual_seed(0) is not None
    True
    >>> cal = HistogramCalibrator(8, None, False, num_bins=256)
    >>> cal.collect(torch.randn(10000))
    >>> cal.collect(torch.randn(10000) * 2)          # the range grows, the bins merge
    >>> cal.histogram()[0].shape, int(cal.histogram()[0].sum())
    (torch.Size([256]), 20000)
    >>> amax = cal.compute_amax("percentile", percentile=99.0)
    >>> 3.5 < amax.item() < 5.5
    True
"""

from __future__ import annotations

import logging
import math

import torch

from qdq.calib.amax_search import check_search_keywords, get_search, search_names
from qdq.calib.calibrator import NoDataCollectedError, _Calibrator

__all__ = ["HistogramCalibrator", "rebin"]

logger = logging.getLogger(__name__)

_HISTC_CHUNK = 1 << 24  # float32 histc counts are exact up to 2**24 per call
_RANGE_TOL = 4 * 2.0**-23  # relative slack for "R / R_r is an integer": float32 ranges carry one rounding each


def rebin(counts: torch.Tensor, old_range: torch.Tensor, new_range: torch.Tensor) -> torch.Tensor:
    """Moves histograms over ``[0, old_range]`` onto the same number of bins over ``[0, new_range]``.

    Where ``new_range / old_range`` is an integer ``k`` (to a float32 rounding), every ``k`` neighbouring bins merge
    (exact). Otherwise each old bin's count goes to the new bin holding the old bin's centre: as an old bin is never
    wider than a new one, each count lands in the bin of its value or in a neighbour (an error of at most one bin).
    An ``old_range <= 0`` (only zeros seen) keeps its counts in bin 0. Totals are preserved exactly.

    Args:
        counts: ``[..., n]`` integer counts.
        old_range: the top edge of each histogram, shape ``counts.shape[:-1]`` (or broadcastable to it).
        new_range: the new top edges, ``>= old_range``.

    Returns:
        The counts on the new bins, same shape and dtype as ``counts``.

    >>> c = torch.tensor([[1, 2, 3, 4]])
    >>> rebin(c, torch.tensor([2.0]), torch.tensor([4.0])).tolist()     # k = 2: exact merging
    [[3, 7, 0, 0]]
    >>> rebin(c, torch.tensor([3.0]), torch.tensor([4.0])).tolist()     # centres 0.375 1.125 1.875 2.625
    [[1, 5, 4, 0]]
    >>> rebin(c, torch.tensor([1.0]), torch.tensor([3.0])).tolist()     # k = 3: bins 0-2 merge, 3 opens bin 1
    [[6, 4, 0, 0]]
    """
    n = counts.shape[-1]
    flat = counts.reshape(-1, n)
    rows = flat.shape[0]
    old = torch.as_tensor(old_range, device=counts.device).double().expand(counts.shape[:-1]).reshape(rows)
    new = torch.as_tensor(new_range, device=counts.device).double().expand(counts.shape[:-1]).reshape(rows)
    if bool((new < old).any()):
        raise ValueError("rebin: the new range must cover the old one")
    seen = old > 0
    safe_old = torch.where(seen, old, torch.ones_like(old))
    k = torch.round(new / safe_old).clamp(min=1)
    integer = seen & ((k * safe_old - new).abs() <= _RANGE_TOL * new)
    j = torch.arange(n, device=counts.device, dtype=torch.float64)[None, :]
    merged = torch.div(j, k[:, None], rounding_mode="floor")
    centred = torch.floor((j + 0.5) * (safe_old / torch.where(new > 0, new, torch.ones_like(new)))[:, None])
    target = torch.where(integer[:, None], merged, centred)
    target = torch.where(seen[:, None], target, torch.zeros_like(target)).clamp(0, n - 1).to(torch.int64)
    return torch.zeros_like(flat).scatter_add_(1, target, flat).reshape(counts.shape)


class HistogramCalibrator(_Calibrator):
    """Collects a histogram of ``|x|`` (of ``x`` when unsigned), one per channel when ``axis`` is set.

    Args:
        num_bits, axis, unsigned: as in :class:`~qdq.tensor_quant.QuantDescriptor`.
        num_bins: bins of each histogram (2048, as TensorRT).
        grow_method: accepted for pytorch_quantization compatibility; ignored (growth is always exact merging).
        skip_zeros: leave exact zeros out of the histogram.
        torch_hist: accepted for pytorch_quantization compatibility (collection always runs in torch, on the data's
            device); the attribute ``_torch_hist`` may be set freely.

    NaN and Inf values are skipped, counted in ``num_nonfinite`` and reported with a warning. A first batch of
    zeros is counted in bin 0 and the range is set by the first batch with a non-zero value.
    """

    def __init__(
        self,
        num_bits: int = 8,
        axis=None,
        unsigned: bool = False,
        num_bins: int = 2048,
        grow_method: str | None = None,
        skip_zeros: bool = False,
        torch_hist: bool = True,
    ):
        super().__init__(num_bits, axis, unsigned)
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"HistogramCalibrator: num_bins must be an int >= 2, got {num_bins!r}")
        if grow_method is not None:
            logger.warning("HistogramCalibrator: grow_method=%r is ignored; ranges grow by exact bin merging", grow_method)
        self._num_bins = num_bins
        self._skip_zeros = skip_zeros
        self._torch_hist = torch_hist
        self._counts: torch.Tensor | None = None  # int64 [channels, num_bins]
        self._range: torch.Tensor | None = None  # float32 [channels], the top edge R
        self._max: torch.Tensor | None = None  # float32 [channels], largest magnitude seen
        self._shape: tuple[int, ...] | None = None  # shape of the amax

    num_bins = property(lambda self: self._num_bins)

    # collection -----------------------------------------------------------------------------------------------
    def collect(self, x: torch.Tensor) -> None:
        """Adds ``x`` to the histogram."""
        if x.numel() == 0:
            return
        self._check_unsigned(x)
        x = x.detach()
        if x.dtype != torch.float32:
            x = x.float()
        if self._axis is None:
            rows, batch_max = self._prepare_tensor(x)
        else:
            rows, batch_max = self._prepare_channels(x)
        shape = self._kept_shape(x)
        if self._counts is None:
            self._shape = shape
            self._counts = torch.zeros(batch_max.numel(), self._num_bins, dtype=torch.int64, device=x.device)
            self._range = batch_max.clone()
            self._max = batch_max.clone()
        else:
            if shape != self._shape:
                raise ValueError(
                    f"HistogramCalibrator: this tensor {tuple(x.shape)} has per-channel shape {shape}, "
                    f"but {self._shape} was collected so far"
                )
            batch_max = batch_max.to(self._counts.device)
            rows = rows.to(self._counts.device)
            self._grow(batch_max)
            self._max = torch.maximum(self._max, batch_max)
        self._counts += self._bin_tensor(rows) if self._axis is None else self._bin_channels(rows)
        self.num_batches += 1

    def _prepare_tensor(self, x: torch.Tensor):
        """Per tensor: the flat data (signed values are binned symmetrically and folded, saving an abs copy)."""
        flat = x.reshape(-1)
        low, high = torch.aminmax(flat)
        batch_max = high if self._unsigned else torch.maximum(high, -low)
        if not bool(torch.isfinite(batch_max)):
            finite = torch.isfinite(flat)
            self._warn_nonfinite(int(flat.numel() - finite.sum()), flat.numel())
            flat = flat[finite]
            batch_max = flat.abs().amax() if flat.numel() else torch.zeros((), device=flat.device)
        if self._skip_zeros:
            flat = flat[flat != 0]
        return flat, batch_max.reshape(1)

    def _prepare_channels(self, x: torch.Tensor):
        """Per channel: magnitudes as ``[channels, -1]`` rows, -1 marking values to skip."""
        rows = self._rows(x)
        if not self._unsigned:
            rows = rows.abs()
        batch_max = rows.amax(dim=1)
        if not bool(torch.isfinite(batch_max).all()):
            rows = self._skip_nonfinite(rows)
            batch_max = rows.amax(dim=1).clamp(min=0)
        if self._skip_zeros:
            rows = torch.where(rows == 0, torch.full_like(rows, -1.0), rows)
        return rows, batch_max

    def _grow(self, batch_max: torch.Tensor) -> None:
        """Widens the range where ``batch_max`` exceeds it, merging bins by an integer factor."""
        over = batch_max > self._range
        if not bool(over.any()):
            return
        unset = self._range <= 0  # only zeros so far: every count is in bin 0, just set the range
        factor = torch.ones_like(self._range, dtype=torch.int64)
        grow = over & ~unset
        if bool(grow.any()):
            k = torch.ceil(batch_max / torch.where(grow, self._range, torch.ones_like(self._range))).to(torch.int64)
            k = torch.where(grow, k.clamp(min=2), factor)
            # float rounding: make sure k * R covers the new max
            short = grow & (k.float() * self._range < batch_max)
            k = k + short.to(torch.int64)
            factor = k
            target = torch.arange(self._num_bins, device=self._counts.device)[None, :] // factor[:, None]
            merged = torch.zeros_like(self._counts).scatter_add_(1, target, self._counts)
            self._counts = merged
        self._range = torch.where(unset & over, batch_max, self._range * factor.float())

    def _top(self) -> torch.Tensor:
        return torch.where(self._range > 0, self._range, torch.ones_like(self._range))

    def _bin_tensor(self, flat: torch.Tensor) -> torch.Tensor:
        """Counts of the flat data in the current bins, int64 ``[1, num_bins]``.

        Signed data is binned over ``[-R, R]`` with twice the bins and folded onto ``[0, R]``: the counts of
        ``|x|`` without computing ``|x|``.
        """
        n = self._num_bins
        top = float(self._top()[0])
        signed = not self._unsigned
        hist = torch.zeros(2 * n if signed else n, dtype=torch.int64, device=flat.device)
        for part in flat.split(_HISTC_CHUNK):
            if signed:
                hist += torch.histc(part, bins=2 * n, min=-top, max=top).to(torch.int64)
            else:
                hist += torch.histc(part, bins=n, min=0.0, max=top).to(torch.int64)
        if signed:
            hist = hist[n:] + hist[:n].flip(0)
        return hist[None]

    def _bin_channels(self, rows: torch.Tensor) -> torch.Tensor:
        """Counts of ``rows`` (magnitudes, -1 = skip) in each channel's bins, int64 ``[channels, num_bins]``."""
        n = self._num_bins
        idx = (rows * (n / self._top())[:, None]).floor_().clamp_(max=n - 1).to(torch.int64)
        idx += (torch.arange(rows.shape[0], device=rows.device) * n)[:, None]
        idx = torch.where(rows >= 0, idx, rows.shape[0] * n)  # skipped values land past the end
        return torch.bincount(idx.reshape(-1), minlength=rows.shape[0] * n + 1)[:-1].reshape(rows.shape[0], n)

    def reset(self) -> None:
        """Forgets everything collected."""
        super().reset()
        self._counts = self._range = self._max = None
        self._shape = None

    # combining ranks -----------------------------------------------------------------------------------------
    def _stats_shape(self) -> tuple[int, ...] | None:
        return None if self._counts is None else tuple(self._shape)

    def _meta_extra(self) -> int:
        return 2 * self._num_bins + int(bool(self._skip_zeros))

    def _explain_extra(self, value: int) -> str:
        return f"num_bins={value // 2}, skip_zeros={bool(value % 2)}"

    def _max_payload(self, shape: tuple[int, ...], has_data: bool, device: torch.device) -> torch.Tensor:
        """``[range, max]`` per channel; zeros (nothing seen) without data."""
        if not has_data:
            return torch.zeros(2 * math.prod(shape), dtype=torch.float32, device=device)
        return torch.stack([self._range, self._max]).reshape(-1)

    def _sum_payload(
        self, maxed: torch.Tensor, shape: tuple[int, ...], has_data: bool, device: torch.device
    ) -> torch.Tensor:
        """This rank's counts moved onto the common range (the reduced ranges); zeros without data."""
        channels = math.prod(shape)
        if not has_data:
            return torch.zeros(channels * self._num_bins, dtype=torch.int64, device=device)
        top = maxed[:channels].to(device)
        return rebin(self._counts.to(device), self._range.to(device), top).reshape(-1)

    def _adopt(
        self, maxed: torch.Tensor, summed: torch.Tensor | None, shape: tuple[int, ...], has_data: bool,
        device: torch.device,
    ) -> None:
        channels = math.prod(shape)
        home = self._counts.device if has_data else device
        self._counts = summed.reshape(channels, self._num_bins).to(home).clone()
        self._range = maxed[:channels].to(home).clone()
        self._max = maxed[channels:].to(home).clone()
        self._shape = tuple(shape)

    # results --------------------------------------------------------------------------------------------------
    @property
    def collected(self) -> bool:
        """Whether any data was collected since the last reset."""
        return self._counts is not None

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts, edges)``: int64 ``[..., num_bins]`` and float32 ``[..., num_bins + 1]``.

        One histogram (1-D tensors) per tensor, or one row per channel.
        """
        if self._counts is None:
            raise NoDataCollectedError("HistogramCalibrator collected no data")
        steps = torch.linspace(0, 1, self._num_bins + 1, device=self._counts.device, dtype=torch.float64)
        top = self._top().double()
        edges = (top[:, None] * steps[None, :]).float()
        if self._axis is None:
            return self._counts[0], edges[0]
        return self._counts, edges

    def compute_amax(
        self,
        method: str | None = None,
        *,
        stride: int = 1,
        start_bin: int = 128,
        percentile: float = 99.99,
        **params,
    ) -> torch.Tensor:
        """amax by a histogram search: ``"entropy"``, ``"mse"``, ``"percentile"`` (or ``"max"``: the exact max seen).

        The result never exceeds the largest magnitude collected. Its shape is the quantizer's amax shape (a scalar
        per tensor, keepdims per channel).
        """
        if method is None:
            raise ValueError(
                "HistogramCalibrator.compute_amax needs a method: one of " + ", ".join(repr(m) for m in search_names())
            )
        search = get_search(method)
        check_search_keywords(params, "HistogramCalibrator.compute_amax: ")
        if self._counts is None:
            raise NoDataCollectedError("HistogramCalibrator collected no data")
        if method == "max":
            amax = self._max.clone()
        else:
            counts, edges = self._counts, self.histogram()[1].reshape(self._counts.shape[0], -1)
            amax = search(
                counts,
                edges,
                num_bits=self._num_bits,
                unsigned=self._unsigned,
                stride=stride,
                start_bin=start_bin,
                percentile=percentile,
                **params,
            )
            amax = torch.minimum(amax.to(self._max.device), self._max)
        return amax.reshape(self._shape)

    # pytorch_quantization attribute names ----------------------------------------------------------------------
    @property
    def _calib_hist(self):
        return None if self._counts is None else self.histogram()[0]

    @property
    def _calib_bin_edges(self):
        return None if self._counts is None else self.histogram()[1]

    def __repr__(self) -> str:
        if self._counts is None:
            seen = "nothing collected"
        else:
            seen = f"range=[0, {self._range.max().item():.4g}], {int(self._counts.sum())} values"
        return (
            f"HistogramCalibrator(num_bits={self._num_bits}, axis={self._axis}, unsigned={self._unsigned}, "
            f"num_bins={self._num_bins}, {seen})"
        )
