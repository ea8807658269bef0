"""Histogram calibration: int64 counts of ``|x|`` with a bounded number of bins, and amax searches over them.

The bins are ``2**e`` wide: bin ``k`` holds the magnitudes ``v`` with ``floor(v / 2**e) == k``, and ``e`` is the
smallest integer for which every finite magnitude seen is below the top edge ``num_bins * 2**e``. So the data spans
more than half of the bins, and the grid is a function of the largest magnitude alone. When a batch goes beyond the
top edge, ``e`` grows by ``d`` and every ``2**d`` neighbouring bins merge into one (:func:`merge_bins`): since
``floor(floor(v / 2**e) / 2**d) == floor(v / 2**(e + d))``, the merged counts are exactly those of binning all the
data on the wider grid directly. ``v / 2**e`` is exact in floating point, so no value ever lands on the wrong side
of an edge. Hence the histogram (and every amax searched on it) is **bit-identical whatever the order of the
batches, their sizes or their split across ranks**: it depends on the multiset of values only.

Collection never reads a device tensor on the host (no synchronisation on GPUs): the exponent, the merging, the
running maximum and the count of skipped NaN/Inf values all stay on the data's device. Counts are int64.

The statistics (:meth:`HistogramCalibrator.stats`: bin exponent, maxima, counts) merge the same way: both sides
move onto the wider grid and the counts add. So merged calibrators - also across torch.distributed ranks
(:func:`qdq.distributed.all_reduce_calibrators`) - hold bit for bit the histogram one calibrator would collect on
the union of the data; ``num_batches`` and ``num_nonfinite`` add up.

:func:`rebin` (moving counts between arbitrary ranges, at most one bin of error) is kept for histograms from other
sources; the calibrator itself never needs it.

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
import warnings

import torch

from qdq.calib.amax_search import check_search_keywords, get_search, search_names
from qdq.calib.calibrator import NoDataCollectedError, NonFiniteWarning, ShapeChangedError, _Calibrator
from qdq.math.descriptor import DEFAULT_NUM_BINS
from qdq.math.ranges import flat_view

__all__ = ["HistogramCalibrator", "rebin", "merge_bins", "bin_exponent"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20  # per-tensor collection bins chunks of this many values (a reused 4 MB buffer)
_HISTC_BINS = 1 << 11  # off the CPU, histc bins integer-valued floats exactly while (2 * num_bins)**2 <= 2**24; above, scatter_add
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


#: Bin exponents: a histogram's bins are ``2**e`` wide, ``E_MIN <= e``; ``2**-e`` is a normal float32 for every e used.
E_MIN = -126


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """``2.0 ** k`` as float32, exactly (built from the exponent bits), for integer ``k`` in ``[-126, 127]``."""
    return ((k.to(torch.int32) + 127) << 23).view(torch.float32)


def bin_exponent(m: torch.Tensor, num_bins: int) -> torch.Tensor:
    """The smallest ``e >= E_MIN`` with ``m < num_bins * 2**e``: the bin width ``2**e`` that makes ``[0, m]`` fit in
    ``num_bins`` bins with the top edge strictly above ``m`` (int64, elementwise, on ``m``'s device, no host sync).

    >>> bin_exponent(torch.tensor([3.0, 4.0, 0.0]), 4).tolist()     # 3 < 4 * 1; 4 < 4 * 2; zeros: the finest grid
    [0, 1, -126]
    """
    f, p = torch.frexp(m.float())
    g, q = math.frexp(num_bins)
    e = p.to(torch.int64) - q + (f >= g).to(torch.int64)
    return torch.where(m > 0, e, torch.full_like(e, E_MIN)).clamp(min=E_MIN)


def merge_bins(counts: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Histograms on bins ``2**e`` wide moved onto bins ``2**(e + shift)`` wide: every ``2**shift`` neighbouring bins
    merge into one (exact, totals preserved). ``counts`` is ``[channels, n]``, ``shift`` ``[channels]``, ``>= 0``.

    >>> merge_bins(torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]]), torch.tensor([1, 0])).tolist()
    [[3, 7, 0, 0], [1, 2, 3, 4]]
    """
    n = counts.shape[-1]
    target = torch.arange(n, device=counts.device)[None, :] >> shift.clamp(0, 62)[:, None]
    return torch.zeros_like(counts).scatter_add_(1, target.expand_as(counts), counts)


def _count_bincount(flat: torch.Tensor, scale: torch.Tensor, n: int, finite: bool) -> torch.Tensor:
    """Counts of ``floor(|x| * scale)`` over ``[0, n)`` (int64), for ``|x| * scale < n``: ``bincount`` of int32
    indices, chunk by chunk in reused buffers. NaN and Inf (when ``finite`` is False) are not counted.

    ``bincount`` reads its largest index on the host, so this is the CPU's way (about 4x faster there than
    :func:`_count_histc`, which gives the same counts).

    >>> _count_bincount(torch.tensor([0.5, -1.0, 3.9, float("nan")]), torch.tensor(1.0), 4, False).tolist()
    [1, 1, 0, 1]
    """
    size = min(flat.numel(), _CHUNK)
    buf = torch.empty(size, dtype=torch.float32, device=flat.device)
    index = torch.empty(size, dtype=torch.int32, device=flat.device)
    counts = torch.zeros(n + 1, dtype=torch.int64, device=flat.device)
    for part in flat.split(_CHUNK):
        scaled = torch.abs(part, out=buf[: part.numel()]).mul_(scale)  # exact: scale is a power of two
        if not finite:  # NaN and Inf go to the extra bin n, dropped below
            scaled.masked_fill_(~torch.isfinite(scaled), float(n))
        counts += torch.bincount(index[: part.numel()].copy_(scaled), minlength=n + 1)  # copy_ truncates
    return counts[:n]


def _count_histc(flat: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """The counts of :func:`_count_bincount` without reading the device on the host: ``histc`` of
    ``trunc(x * scale)`` over ``[-n, n]`` with ``2n`` bins puts the integer ``t`` in bin ``t + n`` exactly while
    ``(t + n) * 2n < 2**24`` (``n <= 2048``), then the negative half folds onto the positive one. ``histc`` skips
    NaN and Inf by itself; its float32 counts are exact up to ``2**24`` per chunk.

    >>> _count_histc(torch.tensor([0.5, -1.0, 3.9, float("nan")]), torch.tensor(1.0), 4).tolist()
    [1, 1, 0, 1]
    """
    buf = torch.empty(min(flat.numel(), _CHUNK), dtype=torch.float32, device=flat.device)
    hist = torch.zeros(2 * n, dtype=torch.float32, device=flat.device)
    for part in flat.split(_CHUNK):
        t = torch.mul(part, scale, out=buf[: part.numel()]).trunc_()
        hist += torch.histc(t, bins=2 * n, min=-n, max=n)
    hist = hist.to(torch.int64)
    counts = hist[n:].clone()
    counts[1:] += hist[1:n].flip(0)
    return counts


class HistogramCalibrator(_Calibrator):
    """Collects a histogram of ``|x|`` (of ``x`` when unsigned), one per channel when ``axis`` is set.

    Args:
        num_bits, axis, unsigned: as in :class:`~qdq.math.descriptor.QuantDescriptor`.
        num_bins: bins of each histogram (:data:`qdq.math.descriptor.DEFAULT_NUM_BINS`, 2048 as TensorRT).
        grow_method: accepted for pytorch_quantization compatibility; ignored (growth is always exact merging).
        skip_zeros: leave exact zeros out of the histogram.
        torch_hist: accepted for pytorch_quantization compatibility (collection always runs in torch, on the data's
            device); the attribute ``_torch_hist`` may be set freely.

    The bins are ``2**e`` wide (see the module docstring), so the histogram depends on the data only, never on the
    order of the batches, their sizes or how they were split across ranks. NaN and Inf values are skipped, counted in
    ``num_nonfinite`` and reported with a warning when the histogram is read. Collection never synchronises the host
    with the device; an unsigned calibrator that saw negative data raises when amax is computed.
    """

    def __init__(
        self,
        num_bits: int = 8,
        axis=None,
        unsigned: bool = False,
        num_bins: int = DEFAULT_NUM_BINS,
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
        self._exp: torch.Tensor | None = None  # int64 [channels]: bins are 2**exp wide
        self._max: torch.Tensor | None = None  # float32 [channels], largest finite magnitude seen
        self._low: torch.Tensor | None = None  # float32 [channels], smallest value seen (unsigned: must be >= 0)
        self._skipped: torch.Tensor | None = None  # int64 scalar on the device: NaN/Inf values skipped
        self._shape: tuple[int, ...] | None = None  # shape of the amax

    num_bins = property(lambda self: self._num_bins)

    @property
    def num_nonfinite(self) -> int:
        """NaN and Inf values skipped since the last reset (reading it synchronises with the device)."""
        return self._nonfinite_host + (0 if self._skipped is None else int(self._skipped))

    @num_nonfinite.setter
    def num_nonfinite(self, value: int) -> None:
        self._nonfinite_host = int(value)
        if getattr(self, "_skipped", None) is not None:
            self._skipped = torch.zeros_like(self._skipped)
        self._nonfinite_warned = int(value)

    @property
    def _range(self) -> torch.Tensor:
        """The top edge of each histogram, ``num_bins * 2**exp`` (float32, exact)."""
        return (self._num_bins * _pow2(self._exp)) if self._exp is not None else None

    # collection -----------------------------------------------------------------------------------------------
    def collect(self, x: torch.Tensor) -> None:
        """Adds ``x`` to the histogram (no host synchronisation: everything stays on ``x``'s device)."""
        if x.numel() == 0:
            return
        x = x.detach()
        if x.dtype != torch.float32:
            x = x.float()
        shape = self._kept_shape(x)
        channels = math.prod(shape) if shape else 1
        if self._counts is None:
            self._shape = shape
            dev = x.device
            self._counts = torch.zeros(channels, self._num_bins, dtype=torch.int64, device=dev)
            self._exp = torch.full((channels,), E_MIN, dtype=torch.int64, device=dev)
            self._max = torch.zeros(channels, dtype=torch.float32, device=dev)
            self._low = torch.full((channels,), math.inf, dtype=torch.float32, device=dev)
            self._skipped = torch.zeros((), dtype=torch.int64, device=dev)
        elif shape != self._shape:
            raise ShapeChangedError(
                f"HistogramCalibrator: per-channel shape changed: this tensor {tuple(x.shape)} has per-channel "
                f"shape {shape}, but {self._shape} was collected so far"
            )
        x = x.to(self._counts.device)
        if self._axis is None and (x.device.type == "cpu" or self._num_bins <= _HISTC_BINS):
            self._collect_tensor(flat_view(x))
        else:
            self._collect_channels(self._rows(x))
        self.num_batches += 1

    def _clean(self, values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Magnitudes (the values when unsigned) of ``values`` in ``out``, with -1 marking what is not binned: NaN and
        Inf (counted) and, with ``skip_zeros``, zeros."""
        if self._unsigned:
            out.copy_(values)
        else:
            torch.abs(values, out=out)
        torch.nan_to_num_(out, nan=-1.0, posinf=-1.0, neginf=-1.0)
        self._skipped += (out == -1.0).sum()
        if self._skip_zeros:
            out.masked_fill_(out == 0, -1.0)
        return out

    def _collect_tensor(self, flat: torch.Tensor) -> None:
        """Per tensor: the range (one min/max pass), then the bin of every magnitude, counted.

        ``|x| * 2**-e`` is exact (a power-of-two scaling) and below ``num_bins``, so its integer part is the bin:
        :func:`_count_bincount` counts them on the CPU, :func:`_count_histc` elsewhere (the same counts).
        """
        n = self._num_bins
        low, high = torch.aminmax(flat)
        if self._unsigned:
            self._low = torch.fmin(self._low, low.reshape(1))
        m = high if self._unsigned else torch.maximum(high, -low)
        on_cpu = flat.device.type == "cpu"
        # reading a CPU tensor is no device synchronisation: there, the data is cleaned only when it needs it
        finite_data = on_cpu and bool(torch.isfinite(m))
        if not finite_data:
            finite = torch.isfinite(flat)
            self._skipped += flat.numel() - finite.sum()
            m = torch.where(finite, flat if self._unsigned else flat.abs(), 0.0).amax()
        m = m.clamp(min=0).reshape(1)
        e = bin_exponent(m, n)
        scale = _pow2(-e)
        counts = _count_bincount(flat, scale, n, finite_data) if on_cpu else _count_histc(flat, scale, n)
        if self._skip_zeros:
            counts[0] -= (flat == 0).sum()
        self._merge(counts[None], e, m)

    def _collect_channels(self, rows: torch.Tensor) -> None:
        """Per channel: ``rows`` is ``[channels, -1]``."""
        n, channels = self._num_bins, rows.shape[0]
        if self._unsigned:
            self._low = torch.fmin(self._low, rows.amin(dim=1))
        a = self._clean(rows, torch.empty_like(rows))
        m = a.amax(dim=1).clamp(min=0)
        e = bin_exponent(m, n)
        idx = a.mul_(_pow2(-e)[:, None]).floor_()
        offsets = (torch.arange(channels, device=rows.device) * n)[:, None]
        idx = torch.where(idx >= 0, idx.to(torch.int64) + offsets, channels * n)  # skipped values land past the end
        if rows.device.type == "cpu":  # bincount reads its largest index on the host: only where that is free
            hist = torch.bincount(idx.reshape(-1), minlength=channels * n + 1)
        else:
            hist = torch.zeros(channels * n + 1, dtype=torch.int64, device=rows.device)
            hist.scatter_add_(0, idx.reshape(-1), torch.ones_like(idx).reshape(-1))
        self._merge(hist[:-1].reshape(channels, n), e, m)

    def _merge(self, hist: torch.Tensor, exp: torch.Tensor, batch_max: torch.Tensor) -> None:
        """Adds histograms on bins ``2**exp`` wide: both sides move onto the wider of the two grids (exact)."""
        top = torch.maximum(self._exp, exp)
        self._counts = merge_bins(self._counts, top - self._exp) + merge_bins(hist, top - exp)
        self._exp = top
        self._max = torch.maximum(self._max, batch_max)

    def reset(self) -> None:
        """Forgets everything collected."""
        self._counts = self._exp = self._max = self._low = self._skipped = None
        self._shape = None
        super().reset()

    # the statistics: named tensors and how they combine -----------------------------------------------------
    STATS = {"exp": "max", "max": "max", "low": "min", "counts": "sum"}

    def stats(self) -> dict[str, torch.Tensor]:
        """``{"exp", "max", "low", "counts"}`` (copies; ``{}`` without data), each of the amax's shape, the counts
        with a trailing bins dimension: bins ``2**exp`` wide (int64), the largest finite magnitude seen (float32),
        the smallest value seen (float32; tracked for unsigned calibrators only, ``+inf`` otherwise), the int64
        counts.

        >>> cal = HistogramCalibrator(num_bins=4)
        >>> cal.collect(torch.tensor([0.5, -3.0]))
        >>> {name: value.tolist() for name, value in cal.stats().items()}
        {'exp': 0, 'max': 3.0, 'low': inf, 'counts': [1, 0, 0, 1]}
        """
        if self._counts is None:
            return {}
        shape = self._shape
        return {"exp": self._exp.reshape(shape).clone(), "max": self._max.reshape(shape).clone(),
                "low": self._low.reshape(shape).clone(), "counts": self._counts.reshape(*shape, self._num_bins).clone()}

    @property
    def stats_shape(self) -> tuple[int, ...] | None:
        return None if self._counts is None else tuple(self._shape)

    def empty_stats(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The finest grid, nothing seen: the neutral element of the merge."""
        shape = tuple(shape)
        return {"exp": torch.full(shape, E_MIN, dtype=torch.int64, device=device),
                "max": torch.zeros(shape, dtype=torch.float32, device=device),
                "low": torch.full(shape, math.inf, dtype=torch.float32, device=device),
                "counts": torch.zeros(*shape, self._num_bins, dtype=torch.int64, device=device)}

    def settings(self) -> dict[str, int | bool]:
        return {"num_bins": self._num_bins, "skip_zeros": bool(self._skip_zeros)}

    def _align(self, stats: dict[str, torch.Tensor], common: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The counts merged onto the common grid (the largest bin exponent): exact."""
        n = self._num_bins
        exp, top = stats["exp"].reshape(-1), common["exp"].reshape(-1).to(stats["exp"].device)
        counts = merge_bins(stats["counts"].reshape(-1, n), top - exp).reshape(stats["counts"].shape)
        return {**stats, "exp": common["exp"], "counts": counts}

    def _load(self, stats: dict[str, torch.Tensor], shape: tuple[int, ...]) -> None:
        channels = math.prod(shape)
        self._counts = stats["counts"].reshape(channels, self._num_bins)
        self._exp = stats["exp"].reshape(channels)
        self._max = stats["max"].reshape(channels)
        self._low = stats["low"].reshape(channels)
        self._skipped = torch.zeros((), dtype=torch.int64, device=self._counts.device)
        self._shape = tuple(shape)

    # results --------------------------------------------------------------------------------------------------
    @property
    def collected(self) -> bool:
        """Whether any data was collected since the last reset."""
        return self._counts is not None

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts, edges)``: int64 ``[..., num_bins]`` and float32 ``[..., num_bins + 1]``.

        One histogram (1-D tensors) per tensor, or one row per channel. The edges are ``k * 2**e``, exact.
        """
        if self._counts is None:
            raise NoDataCollectedError("HistogramCalibrator collected no data")
        self._report_nonfinite()
        steps = torch.arange(self._num_bins + 1, device=self._counts.device, dtype=torch.float32)
        edges = steps[None, :] * _pow2(self._exp)[:, None]
        if self._axis is None:
            return self._counts[0], edges[0]
        return self._counts, edges

    def _report_nonfinite(self) -> None:
        """Warns about NaN/Inf values skipped since the last report (reads the device's count: one sync)."""
        total = self.num_nonfinite
        if total > self._nonfinite_warned:
            self._warn_nonfinite(total - self._nonfinite_warned, None)
            self._nonfinite_warned = total

    def _warn_nonfinite(self, nbad: int, numel: int | None) -> None:
        msg = f"HistogramCalibrator: skipped {nbad} NaN/Inf values ({self.num_nonfinite} since reset)"
        logger.warning(msg)
        warnings.warn(msg, NonFiniteWarning, stacklevel=4)

    def _check_low(self) -> None:
        if self._unsigned and bool((self._low < 0).any()):
            raise ValueError(
                f"HistogramCalibrator: unsigned quantizer got negative data (min {self._low.min().item():.6g}); "
                "use a signed quantizer for this tensor"
            )

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
        self._check_low()
        self._report_nonfinite()
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
