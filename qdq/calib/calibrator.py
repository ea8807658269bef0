"""The calibrator base: statistics of tensors, nothing about modules, nothing about processes.

A calibrator sees tensors through :meth:`~_Calibrator.collect`, forgets them with :meth:`~_Calibrator.reset` and
turns what it saw into an amax with :meth:`~_Calibrator.compute_amax`. It never learns which module or quantizer it
belongs to; errors that need a name are raised by the quantizer that owns it.

What it saw is a handful of **named tensors**, :meth:`~_Calibrator.stats`, and :attr:`~_Calibrator.STATS` says how
each one combines with another calibrator's: ``"max"`` (elementwise maximum), ``"min"`` (elementwise minimum) or
``"sum"`` (added, after :meth:`~_Calibrator._align` moved both onto the grid the combined ``"max"``/``"min"``
fields give, e.g. a histogram's wider bins). :meth:`~_Calibrator.merge` combines two calibrators (or a calibrator
and a statistics dict) that way: the result is what one calibrator would have collected on both shares of the data.
A calibrator that saw nothing has the empty statistics ``{}``, the neutral element: merging it changes nothing, and
:meth:`~_Calibrator.empty_stats` gives the same neutral element as tensors of a given shape.

    >>> import torch
    >>> from qdq.calib import MaxCalibrator
    >>> a, b = MaxCalibrator(), MaxCalibrator()
    >>> a.collect(torch.tensor([1.0, -3.0]))
    >>> b.collect(torch.tensor([2.0, 0.5]))
    >>> sorted(a.stats())
    ['amax', 'max', 'min']
    >>> a.merge(b).compute_amax(), a.num_batches
    (tensor(3.), 2)
    >>> a.stats()["max"]
    tensor(2.)
    >>> MaxCalibrator().stats()                       # nothing seen: the neutral element
    {}
    >>> a.merge(MaxCalibrator()).compute_amax()       # merging it changes nothing
    tensor(3.)

Combining the statistics of several torch.distributed ranks is :func:`qdq.distributed.all_reduce_calibrators`: it
runs the same combination with collectives (a MAX all-reduce of the ``"max"``/``"min"`` fields, a SUM all-reduce
of the aligned ``"sum"`` fields), so every rank ends with what :meth:`~_Calibrator.merge` would give on all ranks'
calibrators, bit for bit. This floor holds no collective.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import ClassVar, Mapping, Union

import torch

from qdq.math.ranges import _kept_dims, flat_view

__all__ = ["NoDataCollectedError", "NonFiniteWarning", "ShapeChangedError", "StatsMismatchError", "Stats"]

logger = logging.getLogger(__name__)

#: A calibrator's statistics: named tensors (``{}`` when nothing was collected).
Stats = dict

class NoDataCollectedError(RuntimeError):
    """``compute_amax`` was asked of a calibrator that collected nothing."""


class ShapeChangedError(ValueError, RuntimeError):
    """A calibrator got a tensor whose per-channel statistics shape differs from the one collected so far.

    Both a ``ValueError`` (qdq: a wrong value passed in) and a ``RuntimeError`` (what pytorch_quantization raises,
    "shape changed"), so code written for either catches it. The message names both shapes.

        >>> import torch
        >>> from qdq.calib import MaxCalibrator
        >>> cal = MaxCalibrator(8, axis=0)
        >>> cal.collect(torch.ones(2, 3))
        >>> cal.collect(torch.ones(4, 3))
        Traceback (most recent call last):
        ...
        qdq.calib.calibrator.ShapeChangedError: MaxCalibrator: per-channel amax shape changed: (4, 1) for this tensor (4, 3) does not match the (2, 1) collected so far
    """


class NonFiniteWarning(UserWarning):
    """Calibration data held NaN or Inf values; they were skipped and counted."""


class StatsMismatchError(ValueError):
    """Statistics that cannot be combined (different calibrators, settings, shapes or states).

    Across ranks (:mod:`qdq.distributed`) it is raised on every rank of the group alike, from the same gathered
    metadata, so no rank is left waiting.
    """


class _Calibrator:
    """Base of the calibrators: the contract every calibrator keeps.

    Args:
        num_bits: bits of the quantizer the amax is for.
        axis: ``None`` (one amax) or the kept dimension(s), as in :class:`~qdq.math.descriptor.QuantDescriptor`.
        unsigned: the quantizer is unsigned; negative data is then an error.

    A subclass implements :meth:`collect`, :meth:`reset` (calling this one), :meth:`compute_amax`, and, to be
    mergeable (also across ranks), :attr:`STATS`, :meth:`stats`, :meth:`empty_stats` and :meth:`_load`; a histogram
    also :meth:`_align` and :meth:`settings`. ``num_batches`` counts the tensors collected (summed by a merge),
    ``num_nonfinite`` the NaN/Inf values skipped.
    """

    #: How each named statistic combines: ``"max"``, ``"min"`` or ``"sum"``. ``"max"``/``"min"`` fields have the
    #: per-channel shape (``stats_shape``) and are exact in float32 (float32 values, or integers below ``2**24``):
    #: that is how they travel between ranks. ``"sum"`` fields may add trailing dimensions (bins).
    STATS: ClassVar[Mapping[str, str]] = {}

    def __init__(self, num_bits: int = 8, axis: int | tuple[int, ...] | None = None, unsigned: bool = False):
        self._num_bits = num_bits
        self._axis = axis
        self._unsigned = unsigned
        self.num_nonfinite = 0  # NaN/Inf values skipped since the last reset
        self.num_batches = 0  # tensors collected since the last reset
        self._combined_at: int | None = None  # num_batches right after a combination over ranks, None: never

    num_bits = property(lambda self: self._num_bits)
    axis = property(lambda self: self._axis)
    unsigned = property(lambda self: self._unsigned)

    # the contract ----------------------------------------------------------------------------------------------
    def collect(self, x: torch.Tensor) -> None:
        """Adds the tensor ``x`` to the statistics (an empty tensor is ignored)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forgets everything collected: the statistics become the empty ones, the counters zero."""
        self.num_nonfinite = 0
        self.num_batches = 0
        self._combined_at = None

    def compute_amax(self, *args, **kwargs) -> torch.Tensor:
        """The amax (a scalar, or the kept-dims shape per channel); :class:`NoDataCollectedError` without data."""
        raise NotImplementedError

    def stats(self) -> Stats:
        """The statistics as named tensors (copies), each of shape ``stats_shape`` (plus trailing dimensions such as
        bins); ``{}`` when nothing was collected."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its statistics (it cannot be merged)")

    @property
    def stats_shape(self) -> tuple[int, ...] | None:
        """The shape of the amax the statistics are for (``()`` per tensor); ``None`` when nothing was collected."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its statistics (it cannot be merged)")

    def empty_stats(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> Stats:
        """The neutral statistics of ``shape``: combined with any statistics ``s`` of that shape they give ``s``.

        >>> from qdq.calib import MaxCalibrator
        >>> MaxCalibrator().empty_stats(())
        {'amax': tensor(-inf), 'min': tensor(inf), 'max': tensor(-inf)}
        """
        raise NotImplementedError(f"{type(self).__name__} does not expose its statistics (it cannot be merged)")

    def settings(self) -> dict[str, int | bool]:
        """What two calibrators of this class must share, beyond ``num_bits`` and ``unsigned``, to be merged."""
        return {}

    def _align(self, stats: Stats, common: Stats) -> Stats:
        """``stats`` with its ``"sum"`` fields moved onto the grid of ``common`` (the combined ``"max"``/``"min"``
        fields); the default grid never changes. Exact: aligning twice equals aligning once onto the wider grid."""
        return stats

    def _load(self, stats: Stats, shape: tuple[int, ...]) -> None:
        """Takes ``stats`` (of ``shape``, not empty) as this calibrator's statistics."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its statistics (it cannot be merged)")

    # combining -------------------------------------------------------------------------------------------------
    @classmethod
    def mergeable(cls) -> bool:
        """Whether this class exposes named statistics and so can merge (and be combined across ranks)."""
        return bool(cls.STATS) and cls._load is not _Calibrator._load

    def combine_stats(self, many: list[Stats]) -> Stats:
        """The combination of several non-empty statistics of one shape, on the device of the first (what
        :meth:`merge` and :func:`qdq.distributed.all_reduce_calibrators` compute)."""
        device = next(iter(many[0].values())).device
        many = [{k: v.to(device) for k, v in s.items()} for s in many]
        common: Stats = {}
        for field, op in self.STATS.items():
            if op in ("max", "min"):
                fold = torch.maximum if op == "max" else torch.minimum
                value = many[0][field]
                for s in many[1:]:
                    value = fold(value, s[field])
                common[field] = value
        aligned = [self._align(s, common) for s in many]
        out = dict(common)
        for field, op in self.STATS.items():
            if op == "sum":
                value = aligned[0][field]
                for s in aligned[1:]:
                    value = value + s[field]
                out[field] = value
        return out

    def check_stats(self, stats: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> None:
        """Raises :class:`StatsMismatchError` unless ``stats`` has exactly this class's fields, with the shapes and
        dtypes of :meth:`empty_stats` of ``shape``."""
        name = type(self).__name__
        expected = self.empty_stats(shape)
        if set(stats) != set(expected):
            raise StatsMismatchError(
                f"{name}: statistics with fields {sorted(stats)} cannot be merged; a {name} has {sorted(expected)}"
            )
        for field, want in expected.items():
            got = stats[field]
            if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
                raise StatsMismatchError(
                    f"{name}: statistic {field!r} is {got.dtype} of shape {tuple(got.shape)}, expected {want.dtype} "
                    f"of shape {tuple(want.shape)} (per-channel shape {shape})"
                )

    def merge(self, other: Union["_Calibrator", Mapping[str, torch.Tensor]]) -> "_Calibrator":
        """Adds ``other``'s statistics (another calibrator's, or a statistics dict) to this one's, in place.

        Afterwards this calibrator holds what it would have collected on both shares of the data: its amax is the
        one computed on their union (for max and for histograms bit for bit, whatever the order of merges).
        Merging empty statistics changes nothing; merging into an empty calibrator copies ``other``. From a
        calibrator, ``num_batches`` and ``num_nonfinite`` add up.

        Args:
            other: a calibrator of the same class and settings, or statistics such as :meth:`stats` returns.

        Returns:
            ``self``.

        Raises:
            StatsMismatchError: other class, settings (bits, signedness, bins...), fields or per-channel shape.

        >>> import torch
        >>> from qdq.calib import HistogramCalibrator
        >>> a, b, both = (HistogramCalibrator(num_bins=16) for _ in range(3))
        >>> a.collect(torch.tensor([0.5, 1.0])); b.collect(torch.tensor([3.0, -7.0]))
        >>> both.collect(torch.tensor([0.5, 1.0, 3.0, -7.0]))
        >>> torch.equal(a.merge(b).histogram()[0], both.histogram()[0])
        True
        """
        name = type(self).__name__
        if not type(self).mergeable():
            raise NotImplementedError(f"{name} does not expose its statistics (it cannot be merged)")
        if isinstance(other, _Calibrator):
            if type(other) is not type(self):
                raise StatsMismatchError(f"{name}: cannot merge the statistics of a {type(other).__name__}")
            for what, mine, theirs in (("num_bits", self._num_bits, other._num_bits),
                                       ("unsigned", bool(self._unsigned), bool(other._unsigned)),
                                       ("settings", self.settings(), other.settings())):
                if mine != theirs:
                    raise StatsMismatchError(f"{name}: cannot merge {what} {theirs} into {what} {mine}")
            theirs, batches, nonfinite = other.stats(), other.num_batches, other.num_nonfinite
        else:
            theirs, batches, nonfinite = dict(other), 0, 0
        if theirs:
            mine = self.stats()
            if mine:
                self.check_stats(theirs, self.stats_shape)
                merged = self.combine_stats([mine, theirs])
            else:
                merged = {k: v.clone() for k, v in theirs.items()}
            changed = self._combined_at is not None
            self.load_stats(merged, num_batches=self.num_batches + batches,
                            num_nonfinite=self.num_nonfinite + nonfinite)
            if changed:
                self._combined_at = -1  # combined over ranks once, changed since
        return self

    def shape_of(self, stats: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        """The per-channel shape of non-empty ``stats``: that of its ``"max"``/``"min"`` fields."""
        field = next(f for f, op in self.STATS.items() if op != "sum")
        if field not in stats:
            raise StatsMismatchError(f"{type(self).__name__}: statistics without the field {field!r}: {sorted(stats)}")
        return tuple(stats[field].shape)

    def load_stats(self, stats: Mapping[str, torch.Tensor], *, num_batches: int, num_nonfinite: int = 0,
                   combined: bool = False) -> None:
        """Replaces the statistics by ``stats`` (``{}``: by nothing, as :meth:`reset`) and sets the counters.

        ``combined`` marks them as a process group's union (:func:`qdq.distributed.all_reduce_calibrators` sets
        it, to refuse combining the same data twice); collecting or merging more data makes them ``"changed"``.

        >>> import torch
        >>> from qdq.calib import MaxCalibrator
        >>> seen = MaxCalibrator()
        >>> seen.collect(torch.tensor([0.5, -2.0]))
        >>> fresh = MaxCalibrator()
        >>> fresh.load_stats(seen.stats(), num_batches=seen.num_batches)
        >>> fresh.compute_amax(), fresh.num_batches, fresh.combine_state
        (tensor(2.), 1, 'local')
        """
        if not stats:
            self.reset()
            return
        shape = self.shape_of(stats)
        self.check_stats(stats, shape)
        self._load(dict(stats), shape)
        self.num_batches = int(num_batches)
        self.num_nonfinite = int(num_nonfinite)
        self._combined_at = self.num_batches if combined else None

    @property
    def combined(self) -> bool:
        """Whether the statistics are a process group's union (:func:`qdq.distributed.all_reduce_calibrators`),
        unchanged since."""
        return self._combined_at is not None and self._combined_at == self.num_batches

    @property
    def combine_state(self) -> str:
        """``"local"`` (never combined over ranks), ``"combined"`` (unchanged since) or ``"changed"``."""
        if self._combined_at is None:
            return "local"
        return "combined" if self.combined else "changed"

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
            return flat_view(x).reshape(1, -1)  # channels-last data without a copy
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
