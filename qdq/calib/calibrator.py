"""The calibrator base: statistics of tensors, nothing about modules.

A calibrator sees tensors through :meth:`~_Calibrator.collect`, forgets them with :meth:`~_Calibrator.reset`
and turns what it saw into an amax with :meth:`~_Calibrator.compute_amax`. It never learns which module or
quantizer it belongs to; errors that need a name are raised by the quantizer that owns it.

Several processes (torch.distributed ranks) that each collected their share of the data combine their statistics
with :meth:`~_Calibrator.all_reduce`: afterwards every rank holds the statistics of the union of the data, so every
rank computes the same amax. It is a collective: every rank of the group calls it, also ranks that collected
nothing (they contribute empty statistics). In a single process (torch.distributed not initialised) it does
nothing: the process is the whole group.

    >>> import torch
    >>> from qdq.calib import MaxCalibrator
    >>> cal = MaxCalibrator()
    >>> cal.collect(torch.tensor([1.0, -3.0]))
    >>> cal.all_reduce()          # one process: nothing to combine, no bytes sent
    0
    >>> cal.compute_amax()
    tensor(3.)

How ranks agree: first an all-gather of each rank's metadata (whether it has data, batches collected, calibrator
kind, bits, statistics shape), so that a rank without data knows the shape of the neutral statistics it must
contribute and every rank checks, from the same gathered table, that the calibrators match. A mismatch is raised on
every rank alike (naming the ranks at fault), never left to hang a collective. Then one MAX all-reduce (max
calibrators: ``[amax, -min, max]``; histograms: their ranges and exact maxima) and one SUM all-reduce (histograms:
their counts, moved onto the common range). :func:`all_reduce_calibrators` does this for many calibrators at once
- three collectives whatever their number, each carrying the concatenated payloads - and
:meth:`~_Calibrator.all_reduce` for one.

Calling :meth:`~_Calibrator.all_reduce` again on statistics that are already combined (for example, computing
amax twice with two methods) is a no-op on every rank. Collecting more data after combining and combining again
would count the earlier union once per rank; that is an error (``reset()`` first).
"""

from __future__ import annotations

import logging
import math
import warnings
import zlib
from typing import Sequence

import torch
import torch.distributed as dist

from qdq.tensor_quant import _kept_dims

__all__ = ["NoDataCollectedError", "NonFiniteWarning", "ShapeChangedError", "StatsMismatchError",
           "all_reduce_calibrators", "collective_device", "distributed_ready", "rank_label"]

logger = logging.getLogger(__name__)


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
    """Ranks hold statistics that cannot be combined (different calibrators, shapes or states).

    Raised on every rank of the group alike, from the same gathered metadata, so no rank is left waiting.
    """


# -----------------------------------------------------------------------------------------------------------------
# torch.distributed helpers shared by the calibrators and by qdq.distributed
# -----------------------------------------------------------------------------------------------------------------
def distributed_ready() -> bool:
    """Whether torch.distributed is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device every rank uses for qdq's collectives in ``group``, decided from the backend alone.

    NCCL (and any backend whose name includes it, such as ``"cpu:gloo,cuda:nccl"``) gives the current CUDA device,
    so set it (``torch.cuda.set_device(local_rank)``) before calibrating; every other backend (gloo, mpi, ...) gives
    the CPU. The choice never depends on where a rank's statistics happen to be, so a rank that collected nothing
    calls the same collectives on the same kind of device as the others.
    """
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_label(group: dist.ProcessGroup | None, group_rank: int) -> str:
    """``"rank 3"``: the global rank of ``group_rank`` in ``group``, for error messages."""
    if group is None or group is dist.group.WORLD:
        return f"rank {group_rank}"
    try:
        return f"rank {dist.get_global_rank(group, group_rank)}"
    except (RuntimeError, ValueError):
        return f"group rank {group_rank}"


_META_DIMS = 16  # statistics of up to 16 dimensions (amax keeps the dimensions of the tensor)
_META_FIXED = 9  # has_data, state, num_batches, num_nonfinite, kind, num_bits, unsigned, extra, ndim
_LOCAL, _COMBINED, _CHANGED = 0, 1, 2  # states: never combined / combined and unchanged / collected since


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
        self._combined_at: int | None = None  # num_batches right after all_reduce, None when never combined

    num_bits = property(lambda self: self._num_bits)
    axis = property(lambda self: self._axis)
    unsigned = property(lambda self: self._unsigned)

    def collect(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        self.num_nonfinite = 0
        self.num_batches = 0
        self._combined_at = None

    def compute_amax(self, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    # combining ranks ------------------------------------------------------------------------------------------
    @property
    def combined(self) -> bool:
        """Whether the statistics are those of every rank of a group (:meth:`all_reduce`), unchanged since."""
        return self._combined_at is not None and self._combined_at == self.num_batches

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> int:
        """Replaces this rank's statistics by those of all ranks of ``group`` (default: the whole world).

        A collective: every rank of ``group`` must call it, in the same order for every calibrator, also a rank that
        collected nothing. Afterwards every rank holds identical statistics and ``num_batches`` /
        ``num_nonfinite`` count over all ranks. Without an initialised process group it returns at once. To combine
        many calibrators, :func:`all_reduce_calibrators` does it in three collectives for all of them.

        Args:
            group: the process group (``None``: the default group).

        Returns:
            The bytes this rank contributed to the collectives (metadata included).

        Raises:
            StatsMismatchError: on every rank, when the ranks' calibrators differ (kind, bits, signedness, bins,
                statistics shape) or some ranks collected more data after an earlier ``all_reduce``; the message
                names the ranks.
        """
        return all_reduce_calibrators([self], group)[0]

    # what the subclasses provide: the statistics' shape, and the payloads of the two reductions
    def _stats_shape(self) -> tuple[int, ...] | None:
        """Shape of the statistics (``None`` without data); the subclasses define it."""
        raise NotImplementedError(f"{type(self).__name__} cannot combine statistics across ranks (no all_reduce)")

    def _meta_extra(self) -> int:
        """An integer that must agree across ranks besides bits and signedness (e.g. the number of bins)."""
        return 0

    def _explain_extra(self, value: int) -> str:
        """What a value of :meth:`_meta_extra` means, for error messages."""
        return f"settings code {value}"

    def _max_payload(self, shape: tuple[int, ...], has_data: bool, device: torch.device) -> torch.Tensor:
        """The flat float32 values this rank contributes to the MAX all-reduce (neutral ones without data)."""
        raise NotImplementedError(f"{type(self).__name__} cannot combine statistics across ranks (no all_reduce)")

    def _sum_payload(
        self, maxed: torch.Tensor, shape: tuple[int, ...], has_data: bool, device: torch.device
    ) -> torch.Tensor | None:
        """The flat int64 values for the SUM all-reduce, given the reduced MAX payload; ``None``: nothing to sum."""
        return None

    def _adopt(
        self, maxed: torch.Tensor, summed: torch.Tensor | None, shape: tuple[int, ...], has_data: bool,
        device: torch.device,
    ) -> None:
        """Takes the reduced payloads as this calibrator's statistics (the only step that changes it)."""
        raise NotImplementedError(f"{type(self).__name__} cannot combine statistics across ranks (no all_reduce)")

    def _meta(self) -> torch.Tensor:
        shape = self._stats_shape()
        if self._combined_at is None:
            state = _LOCAL
        else:
            state = _COMBINED if self._combined_at == self.num_batches else _CHANGED
        dims = list(shape) if shape is not None else []
        ndim = len(dims) if len(dims) <= _META_DIMS else -1
        dims = (dims if ndim >= 0 else []) + [0] * (_META_DIMS - (len(dims) if ndim >= 0 else 0))
        kind = zlib.crc32(type(self).__name__.encode()) & 0x7FFFFFFF
        bits = self._num_bits if isinstance(self._num_bits, int) else 100 * self._num_bits[0] + self._num_bits[1]
        values = [int(shape is not None), state, self.num_batches, self.num_nonfinite, kind, bits,
                  int(bool(self._unsigned)), self._meta_extra(), ndim] + dims
        return torch.tensor(values, dtype=torch.int64)

    def _check_meta(self, rows: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[int, ...]:
        """Checks the gathered metadata (identically on every rank); the statistics shape the ranks agree on."""
        name = type(self).__name__
        explain = {4: lambda v: "another calibrator class", 5: lambda v: f"num_bits={v}",
                   6: lambda v: f"unsigned={bool(v)}", 7: self._explain_extra}
        for col in (4, 5, 6, 7):
            odd = (rows[:, col] != rows[0, col]).nonzero().flatten().tolist()
            if odd:
                theirs, first = int(rows[odd[0], col]), int(rows[0, col])
                raise StatsMismatchError(
                    f"{name}: {rank_label(group, odd[0])} has {explain[col](theirs)}, {rank_label(group, 0)} "
                    f"{name if col == 4 else explain[col](first)}; build the same model on every rank"
                )
        if bool((rows[:, 8] < 0).any()):
            bad = (rows[:, 8] < 0).nonzero().flatten().tolist()
            raise StatsMismatchError(
                f"{name}: statistics of more than {_META_DIMS} dimensions on {rank_label(group, bad[0])} cannot be "
                "combined"
            )
        states = rows[:, 1]
        changed = (states == _CHANGED).nonzero().flatten().tolist()
        if changed or (bool((states == _COMBINED).any()) and bool((states == _LOCAL).any())):
            combined = [rank_label(group, r) for r in (states != _LOCAL).nonzero().flatten().tolist()]
            raise StatsMismatchError(
                f"{name}: {', '.join(combined)} already hold statistics combined over the group"
                + (f" and {', '.join(rank_label(group, r) for r in changed)} collected more data since" if changed
                   else ", the other ranks do not")
                + "; combining again would count the earlier data once per rank: reset() every rank's calibrator "
                "before collecting again"
            )
        shape = None
        for r in (rows[:, 0] > 0).nonzero().flatten().tolist():
            ndim = int(rows[r, 8])
            this = tuple(int(d) for d in rows[r, _META_FIXED:_META_FIXED + ndim])
            if shape is None:
                shape, first = this, r
            elif this != shape:
                raise StatsMismatchError(
                    f"{name}: {rank_label(group, r)} collected statistics of shape {this}, "
                    f"{rank_label(group, first)} of shape {shape}; the ranks must quantize tensors of the same "
                    "per-channel shape"
                )
        return shape if shape is not None else ()

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


def all_reduce_calibrators(
    calibrators: Sequence[_Calibrator],
    group: dist.ProcessGroup | None = None,
    names: Sequence[str] | None = None,
) -> list[int]:
    """Combines the statistics of many calibrators over the ranks of ``group`` in three collectives; a collective.

    Every rank passes its calibrators in the same order (the same model, visited in the same order); afterwards
    each calibrator holds, on every rank, the statistics of all ranks (see :meth:`_Calibrator.all_reduce`). The
    collectives are one all-gather of the metadata, one MAX all-reduce and one SUM all-reduce, each carrying the
    concatenated payloads of all calibrators, so the cost in latency does not grow with their number. Calibrators
    already combined, or without data on every rank, only take part in the metadata exchange.

    Args:
        calibrators: this rank's calibrators, in the order every rank uses.
        group: the process group (``None``: the default group).
        names: how errors name the calibrators (e.g. their quantizers' names).

    Returns:
        The bytes this rank contributed for each calibrator (metadata included); zeros without torch.distributed.

    Raises:
        StatsMismatchError: on every rank alike, naming the calibrator and the ranks (see
            :meth:`_Calibrator.all_reduce`).
    """
    calibrators = list(calibrators)
    if not distributed_ready() or not calibrators:
        return [0] * len(calibrators)
    label = (lambda i: f"{names[i]}: ") if names is not None else (lambda i: "")
    device = collective_device(group)
    world, me = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.stack([c._meta() for c in calibrators])  # [calibrators, fields]
    table = [torch.empty_like(mine, device=device) for _ in range(world)]
    dist.all_gather(table, mine.to(device), group=group)
    rows = torch.stack(table).cpu()  # [ranks, calibrators, fields]
    sent = [mine.shape[1] * mine.element_size()] * len(calibrators)

    plans = []  # (index, shape, has_data) of the calibrators that take part in the reductions
    for i, cal in enumerate(calibrators):
        try:
            shape = cal._check_meta(rows[:, i], group)
        except StatsMismatchError as err:
            raise StatsMismatchError(f"{label(i)}{err}") from None
        states, have = rows[:, i, 1], rows[:, i, 0] > 0
        if bool((states == _COMBINED).all()) or not bool(have.any()):
            continue  # already the group's statistics on every rank, or nothing anywhere: nothing to combine
        plans.append((i, shape, bool(have[me])))
    if not plans:
        return sent

    maxed = [calibrators[i]._max_payload(shape, has, device).to(device, torch.float32).reshape(-1)
             for i, shape, has in plans]
    flat = torch.cat(maxed)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    maxed = list(flat.split([m.numel() for m in maxed]))
    sums = [calibrators[i]._sum_payload(m, shape, has, device) for (i, shape, has), m in zip(plans, maxed)]
    summing = [s.to(device, torch.int64).reshape(-1) for s in sums if s is not None]
    if summing:
        flat_sum = torch.cat(summing)
        dist.all_reduce(flat_sum, op=dist.ReduceOp.SUM, group=group)
        reduced = iter(flat_sum.split([s.numel() for s in summing]))
    summed = [next(reduced) if s is not None else None for s in sums]
    for (i, shape, has), m, s in zip(plans, maxed, summed):
        cal = calibrators[i]
        cal._adopt(m, s, shape, has, device)
        cal.num_batches = int(rows[:, i, 2].sum())
        cal.num_nonfinite = int(rows[:, i, 3].sum())
        cal._combined_at = cal.num_batches
        sent[i] += m.numel() * 4 + (s.numel() * 8 if s is not None else 0)
    logger.debug("combined %d of %d calibrators over %d ranks", len(plans), len(calibrators), world)
    return sent
