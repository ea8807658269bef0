"""Combining calibrators across ranks: every rank ends with the statistics of all ranks' data, bit for bit.

:func:`all_reduce_calibrators` combines a list of calibrators as their ``merge`` would in one process;
:func:`sync_calibrators` does it for every enabled quantizer of a model (what ``compute_amax`` calls first).
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import nn

from qdq.calib.calibrator import Stats, StatsMismatchError, _Calibrator
from qdq.distributed.collectives import (
    _check_same_list,
    collective_device,
    distributed_ready,
    gather_objects,
    is_distributed,
    rank_label,
)
from qdq.transform.replace import name_quantizers
from qdq.transform.switches import quantizers

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["all_reduce_calibrators", "SyncReport", "sync_calibrators"]

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------------------
# calibrators: their named statistics combined over the ranks
# ------------------------------------------------------------------------------------------------------------------
_MAX_DIMS = 16  # statistics of up to 16 dimensions (amax keeps the dimensions of the tensor)


_STATES = ("local", "combined", "changed")  # _Calibrator.combine_state


def _crc(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


class _Meta(NamedTuple):
    """What one rank says about one calibrator before any statistics travel: all-gathered as int64 fields.

    ``kind`` and ``settings`` are digests of the class name and of :meth:`~qdq.calib.calibrator._Calibrator.settings`
    (explained by gathering the settings themselves when they differ); ``ndim`` is ``-1`` for statistics of more
    than ``_MAX_DIMS`` dimensions; ``dims`` is the per-channel shape, zero-padded.
    """

    has_data: int
    state: int
    num_batches: int
    num_nonfinite: int
    kind: int
    num_bits: int
    unsigned: int
    settings: int
    ndim: int
    dims: tuple[int, ...]

    @classmethod
    def of(cls, cal: _Calibrator) -> "_Meta":
        shape = cal.stats_shape
        dims = list(shape) if shape is not None else []
        ndim = len(dims) if len(dims) <= _MAX_DIMS else -1
        bits = cal.num_bits if isinstance(cal.num_bits, int) else 100 * cal.num_bits[0] + cal.num_bits[1]
        return cls(has_data=int(shape is not None), state=_STATES.index(cal.combine_state),
                   num_batches=cal.num_batches, num_nonfinite=cal.num_nonfinite, kind=_crc(type(cal).__name__),
                   num_bits=bits, unsigned=int(bool(cal.unsigned)), settings=_crc(repr(sorted(cal.settings().items()))),
                   ndim=ndim, dims=tuple(dims if ndim >= 0 else []))

    def encode(self) -> torch.Tensor:
        dims = list(self.dims) + [0] * (_MAX_DIMS - len(self.dims))
        return torch.tensor(list(self[:-1]) + dims, dtype=torch.int64)

    @classmethod
    def decode(cls, row: torch.Tensor) -> "_Meta":
        values = [int(v) for v in row.tolist()]
        fixed = len(cls._fields) - 1
        ndim = values[cls._fields.index("ndim")]
        return cls(*values[:fixed], dims=tuple(values[fixed:fixed + max(ndim, 0)]))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.dims


def _describe(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "no settings"


def _check_metas(cal: _Calibrator, metas: list[_Meta], group: ProcessGroup | None) -> tuple[int, ...]:
    """Checks the ranks' metadata (identically on every rank); the per-channel shape the ranks agree on."""
    name = type(cal).__name__
    first = metas[0]
    for field in ("kind", "num_bits", "unsigned", "settings"):
        odd = [r for r, m in enumerate(metas) if getattr(m, field) != getattr(first, field)]
        if not odd:
            continue
        theirs = getattr(metas[odd[0]], field)
        if field == "kind":
            detail = f"another calibrator class, {rank_label(group, 0)} {name}"
        elif field == "settings":  # every rank takes this branch: the same table
            every = gather_objects(cal.settings(), group)
            detail = f"{_describe(every[odd[0]])}, {rank_label(group, 0)} {_describe(every[0])}"
        else:
            shown = bool(theirs) if field == "unsigned" else theirs
            mine = bool(getattr(first, field)) if field == "unsigned" else getattr(first, field)
            detail = f"{field}={shown}, {rank_label(group, 0)} {field}={mine}"
        raise StatsMismatchError(
            f"{name}: {rank_label(group, odd[0])} has {detail}; build the same model on every rank"
        )
    deep = [r for r, m in enumerate(metas) if m.ndim < 0]
    if deep:
        raise StatsMismatchError(
            f"{name}: statistics of more than {_MAX_DIMS} dimensions on {rank_label(group, deep[0])} cannot be combined"
        )
    states = [_STATES[m.state] for m in metas]
    changed = [r for r, st in enumerate(states) if st == "changed"]
    if changed or ("combined" in states and "local" in states):
        combined = [rank_label(group, r) for r, st in enumerate(states) if st != "local"]
        raise StatsMismatchError(
            f"{name}: {', '.join(combined)} already hold statistics combined over the group"
            + (f" and {', '.join(rank_label(group, r) for r in changed)} collected more data since" if changed
               else ", the other ranks do not")
            + "; combining again would count the earlier data once per rank: reset() every rank's calibrator "
            "before collecting again"
        )
    shape, holder = None, None
    for r, m in enumerate(metas):
        if not m.has_data:
            continue
        if shape is None:
            shape, holder = m.shape, r
        elif m.shape != shape:
            raise StatsMismatchError(
                f"{name}: {rank_label(group, r)} collected statistics of shape {m.shape}, "
                f"{rank_label(group, holder)} of shape {shape}; the ranks must quantize tensors of the same "
                "per-channel shape"
            )
    return shape if shape is not None else ()


def all_reduce_calibrators(
    calibrators: Sequence[_Calibrator],
    group: ProcessGroup | None = None,
    names: Sequence[str] | None = None,
) -> list[int]:
    """Combines each calibrator's statistics over the ranks of ``group`` (a collective): afterwards every rank holds,
    for each calibrator, what :meth:`~qdq.calib.calibrator._Calibrator.merge` of all ranks' calibrators gives.

    Every rank passes its calibrators in the same order (the same model, visited in the same order), also a rank
    that collected nothing (it contributes :meth:`~qdq.calib.calibrator._Calibrator.empty_stats`, the neutral
    element). Three collectives, whatever the number of calibrators, each carrying all their fields:

    1. an all-gather of each calibrator's metadata (:class:`_Meta`: whether it has data, its counters, class,
       bits, signedness, settings and per-channel shape), from which every rank checks alike that the ranks can be
       combined - a mismatch is raised on every rank, naming the ranks, never left to hang a collective;
    2. a MAX all-reduce of the ``"max"`` fields and of the negated ``"min"`` fields (float32);
    3. a SUM all-reduce of the ``"sum"`` fields, each rank's first aligned onto the combined grid (one per dtype).

    ``num_batches`` and ``num_nonfinite`` become sums over the ranks. Calibrators already combined (and unchanged)
    or without data on every rank only take part in the metadata; combining again after collecting more is an error
    (``reset()`` first). Without an initialised process group nothing happens.

    Args:
        calibrators: this rank's calibrators, in the order every rank uses.
        group: the process group (``None``: the default group).
        names: how errors name the calibrators (e.g. their quantizers' names).

    Returns:
        The bytes this rank contributed for each calibrator (metadata included); zeros without torch.distributed.

    Raises:
        StatsMismatchError: on every rank alike, naming the calibrator and the ranks.

    >>> from qdq.calib import MaxCalibrator
    >>> cal = MaxCalibrator()
    >>> cal.collect(torch.tensor([1.0, -3.0]))
    >>> all_reduce_calibrators([cal])      # one process: nothing to combine, no bytes sent
    [0]
    >>> cal.compute_amax()
    tensor(3.)
    """
    calibrators = list(calibrators)
    if not distributed_ready() or not calibrators:
        return [0] * len(calibrators)
    label = (lambda i: f"{names[i]}: ") if names is not None else (lambda i: "")
    device = collective_device(group)
    world, me = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.stack([_Meta.of(c).encode() for c in calibrators])  # [calibrators, fields]
    table = [torch.empty_like(mine, device=device) for _ in range(world)]
    dist.all_gather(table, mine.to(device), group=group)
    rows = torch.stack(table).cpu()  # [ranks, calibrators, fields]
    sent = [mine.shape[1] * mine.element_size()] * len(calibrators)

    plans = []  # (index, per-channel shape, this rank's statistics or the neutral ones, metas)
    for i, cal in enumerate(calibrators):
        metas = [_Meta.decode(rows[r, i]) for r in range(world)]
        try:
            shape = _check_metas(cal, metas, group)
        except StatsMismatchError as err:
            raise StatsMismatchError(f"{label(i)}{err}") from None
        if all(_STATES[m.state] == "combined" for m in metas) or not any(m.has_data for m in metas):
            continue  # already the group's statistics on every rank, or nothing anywhere: nothing to combine
        stats = cal.stats() if metas[me].has_data else cal.empty_stats(shape, device)
        plans.append((i, shape, stats, metas))
    if not plans:
        return sent

    def extreme(cal: _Calibrator, stats: Stats) -> list[torch.Tensor]:  # the MAX payload of one calibrator
        return [(stats[f] if op == "max" else -stats[f]).to(device, torch.float32).reshape(-1)
                for f, op in cal.STATS.items() if op != "sum"]

    payloads = [torch.cat(extreme(calibrators[i], stats)) for i, _, stats, _ in plans]
    flat = torch.cat(payloads)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    commons = []
    for (i, shape, stats, _), part in zip(plans, flat.split([p.numel() for p in payloads])):
        common, offset = {}, 0
        for f, op in calibrators[i].STATS.items():
            if op == "sum":
                continue
            n = stats[f].numel()
            value = part[offset:offset + n].reshape(stats[f].shape)
            common[f] = (value if op == "max" else -value).to(stats[f].dtype)
            offset += n
        commons.append(common)
        sent[i] += part.numel() * 4

    aligned = [calibrators[i]._align({k: v.to(device) for k, v in stats.items()}, common)
               for (i, _, stats, _), common in zip(plans, commons)]
    summed: list[Stats] = [{} for _ in plans]
    by_dtype: dict[torch.dtype, list[tuple[int, str, torch.Tensor]]] = {}
    for p, ((i, _, _, _), al) in enumerate(zip(plans, aligned)):
        for f, op in calibrators[i].STATS.items():
            if op == "sum":
                by_dtype.setdefault(al[f].dtype, []).append((p, f, al[f]))
    for dtype in sorted(by_dtype, key=str):  # the same dtypes on every rank: the same classes
        items = by_dtype[dtype]
        flat_sum = torch.cat([t.reshape(-1) for _, _, t in items])
        dist.all_reduce(flat_sum, op=dist.ReduceOp.SUM, group=group)
        for (p, f, t), part in zip(items, flat_sum.split([t.numel() for _, _, t in items])):
            summed[p][f] = part.reshape(t.shape)
            sent[plans[p][0]] += part.numel() * part.element_size()

    for (i, _, stats, metas), common, sums in zip(plans, commons, summed):
        cal = calibrators[i]
        home = next(iter(stats.values())).device if metas[me].has_data else device
        merged = {f: (common[f] if f in common else sums[f]).to(home).clone() for f in cal.STATS}
        cal.load_stats(merged, num_batches=sum(m.num_batches for m in metas),
                       num_nonfinite=sum(m.num_nonfinite for m in metas), combined=True)
    logger.debug("combined %d of %d calibrators over %d ranks", len(plans), len(calibrators), world)
    return sent


# ------------------------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class SyncReport:
    """What :func:`sync_calibrators` did on this rank.

    Attributes:
        world_size: ranks in the group (1 without torch.distributed).
        quantizers: calibrators combined (visited; those already combined cost only their metadata).
        bytes_sent: bytes this rank contributed to the collectives, metadata included.
        per_quantizer: ``{quantizer name: bytes}``.
        seconds: wall time of the combination.
    """

    world_size: int = 1
    quantizers: int = 0
    bytes_sent: int = 0
    per_quantizer: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def sync_calibrators(model: nn.Module, group: ProcessGroup | None = None) -> SyncReport:
    """Combines the statistics of every enabled quantizer's calibrator over the ranks of ``group``; a collective.

    Quantizers are visited in dotted-name order after checking that every rank has the same list (names and
    calibrator kinds). :func:`all_reduce_calibrators` then combines all their calibrators in
    three collectives (metadata, MAX, SUM) and leaves identical statistics of the union of the data on every rank.
    Calibrators already combined (and unchanged) cost only their metadata, so calling this twice is harmless.
    :func:`~qdq.calibrate.compute_amax` calls it for you.

    Args:
        model: the model whose quantizers collected statistics (:func:`~qdq.calibrate.collect_stats`).
        group: the process group (default: the whole world).

    Returns:
        A :class:`SyncReport`; empty without torch.distributed.

    Raises:
        StatsMismatchError: on every rank, when the ranks' quantizers or their statistics cannot be combined; the
            message names the quantizer and the ranks.
    """
    report = SyncReport()
    if not is_distributed(group):
        return report
    t0 = time.perf_counter()
    name_quantizers(model)
    active = sorted(
        ((name, q) for name, q in quantizers(model) if q.is_enabled and q.calibrator is not None), key=lambda e: e[0]
    )
    signature = [(name, type(q.calibrator).__name__) for name, q in active]
    _check_same_list(signature, "the enabled quantizers with calibrators", group)
    report.world_size = dist.get_world_size(group)
    unsupported = [f"{name} ({type(q.calibrator).__name__})" for name, q in active
                   if not type(q.calibrator).mergeable()]
    if unsupported:  # the same model on every rank: every rank raises here, before any collective
        raise NotImplementedError(
            f"these quantizers' calibrators cannot combine statistics across ranks: {', '.join(unsupported[:10])}; "
            "give them a MaxCalibrator or a HistogramCalibrator, or implement the _Calibrator statistics contract "
            "(STATS, stats, empty_stats, _load)"
        )
    names = [f"quantizer {name!r}" for name, _ in active]
    sent = all_reduce_calibrators([q.calibrator for _, q in active], group, names=names)
    for (name, _), nbytes in zip(active, sent):
        report.per_quantizer[name] = nbytes
    report.bytes_sent = sum(sent)
    report.quantizers = len(active)
    report.seconds = time.perf_counter() - t0
    logger.info(
        "combined the statistics of %d quantizers over %d ranks in %.3f s: this rank sent %d bytes "
        "(%.0f per quantizer)",
        report.quantizers, report.world_size, report.seconds, report.bytes_sent,
        report.bytes_sent / max(1, report.quantizers),
    )
    return report
