"""Calibration and QAT on torch.distributed: every rank ends with the same amax, computed from all ranks' data.

qdq runs on torch.distributed itself (NCCL on GPUs, gloo on CPUs): whatever launched the processes (``torchrun``,
``torch.multiprocessing``, a cluster scheduler) and initialised the default process group, qdq uses it. In a single
process nothing here does anything and nothing changes.

Post-training calibration
-------------------------

Give each rank its shard of the calibration data (a ``DistributedSampler``) and call
:func:`~qdq.calibrate.calibrate_model` on every rank, as in one process::

    dist.init_process_group("nccl")                        # or "gloo" on CPUs
    torch.cuda.set_device(local_rank)                      # NCCL: qdq's collectives use the current device
    sampler = DistributedSampler(calib_set, shuffle=False)
    loader = DataLoader(calib_set, batch_size=32, sampler=sampler)
    qdq.calibrate_model(model, loader, num_batches=25, method="entropy")   # num_batches per rank

When torch.distributed is initialised, :func:`~qdq.calibrate.compute_amax` (and so ``calibrate_model``) first
combines the statistics of every enabled quantizer over the group (:func:`sync_calibrators`), then computes amax
from the union on every rank:

* each calibrator's named statistics (:meth:`~qdq.calib.calibrator._Calibrator.stats`) combine as its
  :meth:`~qdq.calib.calibrator._Calibrator.merge` would combine them in one process
  (:func:`all_reduce_calibrators`): max calibrators take the MAX of the abs max and of the signed max and the MIN of
  the signed min; histogram calibrators agree on the widest power-of-two grid, merge their counts onto it and sum
  them. Both are exact: every rank gets bit for bit the amax of one process calibrated on all the data, and
  entropy, mse, percentile and kld search one histogram, the same on every rank;
* :func:`~qdq.calibrate.autotune.autotune` sums each candidate's output distance over the ranks before choosing.

A rank whose data yields no batch takes part with empty statistics. A quantizer no rank saw is the usual error
(naming it), raised on every rank. An exception on one rank while feeding data is reported to every rank, which
all raise an error naming the failed rank, instead of leaving the others waiting in a collective; a rank that dies
without an exception is caught by the process group's timeout (``init_process_group(..., timeout=...)``), so set
one that fits your calibration time.

Every rank must call these functions, in the same order, on models built by the same code: they are collectives.
Quantizers are visited in the order of their dotted names and the list is checked to be the same on every rank
first, so models that differ give an error naming the quantizers that differ, not a hang. ``group=`` picks a
process group (default: the whole world).

The graph side runs once: :func:`~qdq.onnx.rules.apply_custom_rules_to_quantizer` exports and reads the graph on
rank 0 only, broadcasts the quantizer pairs and every rank applies them (the others wait for the broadcast);
:func:`~qdq.onnx.export.export_onnx_distributed` writes the ONNX file on rank 0 while the others wait. Temporary
files always go through :mod:`tempfile`, unique per process.

QAT under DistributedDataParallel
---------------------------------

Calibrate first (on every rank, as above), then wrap::

    prepare_for_ddp(model)                 # checks and freezes what DDP cannot handle; a collective
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank])

What keeps the ranks identical:

* ``amax`` (and ``amin``) are buffers: DDP broadcasts rank 0's at wrapping and before each forward
  (``broadcast_buffers=True``, the default). After a distributed calibration they are equal on every rank anyway.
* A learned amax (``QuantDescriptor(learn_amax=True)`` or :meth:`~qdq.nn.TensorQuantizer.init_learn_amax`) is a
  ``Parameter``: DDP all-reduces its gradient like any weight's, so it stays identical. It must exist before
  wrapping: a Parameter created later (calibrating a learned-amax quantizer after wrapping) is unknown to DDP and
  would drift per rank; :func:`prepare_for_ddp` refuses that case.
* A learned amax of a disabled (or not quantizing) quantizer gets no gradient, which DDP reports as an unused
  parameter in the second iteration. :func:`prepare_for_ddp` freezes those (``requires_grad=False``, listed in the
  log and returned); the alternative is ``DistributedDataParallel(..., find_unused_parameters=True)``, slower.
* The switches (``disable()``, ``enable_calib()``, ...) are plain Python attributes, not buffers: nothing
  broadcasts them. They stay identical because every rank runs the same code; :func:`verify_synchronized` checks
  them with the parameters and buffers (``prepare_for_ddp`` checks them with the tensors' shapes).
* BatchNorm running statistics, in training mode, carry each rank's last batch until DDP's next broadcast:
  freeze them for QAT (:func:`qdq.transform.qat.freeze_bn_stats`) or :func:`broadcast_buffers` before comparing ranks.

Checkpoints: save ``model.state_dict()`` (of the unwrapped model) on rank 0, wait at a barrier, load on every
rank with ``map_location`` set to that rank's device; amax loads onto whatever device the quantizer is on.

Example (one process: nothing to combine, the calls return at once):
    >>> import torch
    >>> import qdq
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> _ = qdq.replace_to_quantization_module(model)
    >>> _ = qdq.calibrate_model(model, [torch.randn(8, 4)], progress=False)
    >>> is_distributed()
    False
    >>> sync_calibrators(model).bytes_sent
    0
    >>> prepare_for_ddp(model)
    []
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import nn

from qdq.calib.calibrator import Stats, StatsMismatchError, _Calibrator
from qdq.transform.replace import name_quantizers
from qdq.transform.switches import quantizers

__all__ = [
    "is_distributed",
    "collective_device",
    "rank_label",
    "all_reduce_calibrators",
    "gather_objects",
    "broadcast_object",
    "run_on_rank0",
    "SyncReport",
    "sync_calibrators",
    "verify_synchronized",
    "broadcast_buffers",
    "prepare_for_ddp",
    "NotSynchronizedError",
    "StatsMismatchError",
    "all_reduce_tensors",
    "broadcast_tensors",
]

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class NotSynchronizedError(RuntimeError):
    """The model differs across ranks (tensors, their shapes, or quantizer switches); the message lists where."""


def distributed_ready() -> bool:
    """Whether torch.distributed is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def collective_device(group: ProcessGroup | None = None) -> torch.device:
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


def rank_label(group: ProcessGroup | None, group_rank: int) -> str:
    """``"rank 3"``: the global rank of ``group_rank`` in ``group``, for error messages.

    >>> rank_label(None, 3)
    'rank 3'
    """
    if group is None or group is dist.group.WORLD:
        return f"rank {group_rank}"
    try:
        return f"rank {dist.get_global_rank(group, group_rank)}"
    except (RuntimeError, ValueError):
        return f"group rank {group_rank}"


def is_distributed(group: ProcessGroup | None = None) -> bool:
    """Whether torch.distributed is initialised (and this process belongs to ``group``).

    >>> is_distributed()
    False
    """
    if not distributed_ready():
        return False
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError(f"this process (rank {dist.get_rank()}) is not a member of the process group given")
    return True


def _me(group: ProcessGroup | None) -> int:
    return dist.get_rank(group)


def _src(group: ProcessGroup | None) -> int:
    """Global rank of the group's rank 0 (what torch's object collectives take as ``src``)."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def gather_objects(obj: Any, group: ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in group-rank order, on every rank; ``[obj]`` in a single process.

    Unlike ``torch.distributed.all_gather_object`` the bytes travel on :func:`collective_device`, chosen from the
    backend, so every rank uses the same device whatever it holds.

    >>> gather_objects({"batches": 3})
    [{'batches': 3}]
    """
    if not is_distributed(group):
        return [obj]
    device = collective_device(group)
    data = pickle.dumps(obj)
    world = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s) for s in sizes]
    buf = torch.zeros(max(lengths), dtype=torch.uint8)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(device)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf, group=group)
    return [pickle.loads(b[:n].cpu().numpy().tobytes()) for b, n in zip(bufs, lengths)]


def broadcast_object(obj: Any, group: ProcessGroup | None = None) -> Any:
    """The group's rank 0's ``obj`` on every rank (the others' ``obj`` is ignored); ``obj`` in a single process.

    >>> broadcast_object([("a", "b")])
    [('a', 'b')]
    """
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=_src(group), group=group, device=collective_device(group))
    return box[0]


def _describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def run_on_rank0(
    fn: Callable[..., Any],
    *args: Any,
    group: ProcessGroup | None = None,
    broadcast_result: bool = False,
    what: str | None = None,
    **kwargs: Any,
) -> Any:
    """Runs ``fn(*args, **kwargs)`` on the group's rank 0 while the other ranks wait for it; a collective.

    Args:
        fn: the work (an export, a file write, ...).
        group: the process group (default: the whole world).
        broadcast_result: send rank 0's result (picklable) to every rank; otherwise the others get ``None``.
        what: how errors name the step (default: ``fn``'s name).

    Returns:
        ``fn``'s result on rank 0 (and on every rank with ``broadcast_result``), ``None`` on the others. In a
        single process ``fn`` just runs.

    Raises:
        RuntimeError: on every rank, when ``fn`` raised on rank 0 (chaining the original exception there).

    >>> run_on_rank0(sum, [1, 2, 3])
    6
    """
    if not is_distributed(group):
        return fn(*args, **kwargs)
    what = what or getattr(fn, "__qualname__", repr(fn))
    result, error = None, None
    if _me(group) == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # reported to every rank below, then raised here too
            error = err
    else:
        logger.debug("%s: waiting for rank %d", what, _src(group))
    message, value = broadcast_object(
        (None if error is None else _describe_error(error), result if broadcast_result else None), group
    )
    if message is not None:
        raise RuntimeError(f"{what} failed on {rank_label(group, 0)}: {message}") from error
    if _me(group) == 0:
        return result
    return value if broadcast_result else None


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


def _digest(obj: Any) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()


def _check_same_list(entries: Sequence[tuple], what: str, group: ProcessGroup | None) -> None:
    """Raises on every rank when ``entries`` (a small picklable list) differs across ranks, naming what differs.

    Only digests travel when the lists agree; the full lists are gathered to explain a difference.
    """
    digests = gather_objects((_digest(list(entries)), len(entries)), group)
    if all(d == digests[0] for d in digests):
        return
    tables = gather_objects(list(entries), group)
    first = tables[0]
    for r, table in enumerate(tables[1:], start=1):
        if table == first:
            continue
        extra = [e for e in table if e not in first]
        missing = [e for e in first if e not in table]
        if extra or missing:
            detail = "; ".join(
                part for part in (
                    f"only on {rank_label(group, r)}: {_listing(extra)}" if extra else "",
                    f"only on {rank_label(group, 0)}: {_listing(missing)}" if missing else "",
                ) if part
            )
        else:
            detail = f"the same items in another order on {rank_label(group, r)}"
        raise StatsMismatchError(
            f"{what} differ across ranks - {detail}; build, convert and switch the model with the same code on "
            "every rank"
        )


def _listing(items: Sequence, limit: int = 6) -> str:
    return ", ".join(repr(e) for e in items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")


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


# ------------------------------------------------------------------------------------------------------------------
# DDP
# ------------------------------------------------------------------------------------------------------------------
def _flags(model: nn.Module) -> list[tuple[str, tuple]]:
    name_quantizers(model)
    out = []
    for name, q in quantizers(model):
        state = q.state()
        out.append((name, (state["disabled"], state["if_quant"], state["if_calib"], state["if_clip"], q.learn_amax,
                           q.export_mode)))
    return out


def verify_synchronized(
    model: nn.Module,
    group: ProcessGroup | None = None,
    *,
    parameters: bool = True,
    buffers: bool = True,
    flags: bool = True,
    values: bool = True,
) -> int:
    """Checks that ``model`` is identical on every rank of ``group``: tensors bit for bit, quantizer switches; a
    collective.

    First the names, shapes and dtypes of the tensors and the quantizer switches are compared (digests only, unless
    they differ); then, with ``values``, rank 0's tensors are broadcast (one collective per dtype) and every rank
    compares its own (NaN equals NaN).

    In training mode each rank updates its BatchNorm running statistics with its own batch after DDP's broadcast,
    so they differ between forwards: freeze them (:func:`qdq.transform.qat.freeze_bn_stats`, the QAT recipe), use
    ``SyncBatchNorm``, or :func:`broadcast_buffers` before comparing.

    Args:
        model: the (unwrapped) model.
        group: the process group (default: the whole world).
        parameters, buffers: compare parameters, buffers (amax, amin, BatchNorm statistics, ...).
        flags: compare each quantizer's switches (``disabled``, ``if_quant``, ``if_calib``, ``if_clip``), whether its
            amax is learned, and its export mode.
        values: compare the tensors' values (otherwise only their names, shapes and dtypes).

    Returns:
        The number of tensors compared (0 in a single process).

    Raises:
        NotSynchronizedError: on every rank, listing what differs and on which ranks.
    """
    if not is_distributed(group):
        return 0
    tensors = _tensors(model, parameters, buffers)
    layout = [(n, tuple(t.shape), str(t.dtype)) for n, t in tensors]
    described = layout + (_flags(model) if flags else [])
    try:
        _check_same_list(described, "the model's tensors (name, shape, dtype) and quantizer switches", group)
    except StatsMismatchError as err:
        raise NotSynchronizedError(str(err)) from None
    if not values:
        return len(tensors)
    device = collective_device(group)
    differ: list[str] = []
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors:
        by_dtype.setdefault(t.dtype, []).append((name, t))
    for dtype in sorted(by_dtype, key=str):
        items = by_dtype[dtype]
        wire = torch.uint8 if dtype == torch.bool else dtype
        mine = torch.cat([t.reshape(-1).to(device, wire) for _, t in items])
        first = mine.clone()
        dist.broadcast(first, src=_src(group), group=group)
        same = mine == first
        if mine.is_floating_point() or mine.is_complex():
            same |= torch.isnan(mine) & torch.isnan(first)
        offset = 0
        for name, t in items:
            if not bool(same[offset:offset + t.numel()].all()):
                differ.append(name)
            offset += t.numel()
    reports = gather_objects(differ, group)
    bad = [(r, names) for r, names in enumerate(reports) if names]
    if bad:
        listed = "; ".join(
            f"{rank_label(group, r)} differs from {rank_label(group, 0)} in {len(names)} tensors: "
            + ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            for r, names in bad
        )
        raise NotSynchronizedError(f"the model is not identical on every rank: {listed}")
    return len(tensors)


def _tensors(model: nn.Module, parameters: bool, buffers: bool) -> list[tuple[str, torch.Tensor]]:
    out: list[tuple[str, torch.Tensor]] = []
    if parameters:
        out += [(f"parameter {n}", p.detach()) for n, p in model.named_parameters()]
    if buffers:
        out += [(f"buffer {n}", b.detach()) for n, b in model.named_buffers()]
    return out


def broadcast_buffers(model: nn.Module, group: ProcessGroup | None = None) -> int:
    """Copies rank 0's buffers (amax, amin, BatchNorm statistics, ...) into every rank's model, in place; a
    collective.

    What DDP does before each forward, done now: after training, each rank's BatchNorm running statistics carry its
    own last batch; call this before comparing or evaluating ranks. The buffers must have the same names and shapes
    on every rank (checked first).

    Returns:
        The number of buffers broadcast (0 in a single process).

    Raises:
        NotSynchronizedError: the ranks' buffers differ in names, shapes or dtypes.
    """
    if not is_distributed(group):
        return 0
    tensors = _tensors(model, parameters=False, buffers=True)
    try:
        _check_same_list([(n, tuple(t.shape), str(t.dtype)) for n, t in tensors], "the model's buffers", group)
    except StatsMismatchError as err:
        raise NotSynchronizedError(str(err)) from None
    device = collective_device(group)
    with torch.no_grad():
        for _, t in tensors:
            wire = t.to(device, torch.uint8 if t.dtype == torch.bool else t.dtype)
            dist.broadcast(wire, src=_src(group), group=group)
            t.copy_(wire.to(t.device, t.dtype))
    return len(tensors)


def prepare_for_ddp(model: nn.Module, group: ProcessGroup | None = None, *, verify: bool = True) -> list[str]:
    """Readies a calibrated quantized model for ``DistributedDataParallel``; call it on every rank before wrapping.

    * A quantizer whose descriptor asks for a learned amax (``learn_amax=True``) but which has no amax Parameter
      yet is an error: the Parameter would be created after wrapping, unknown to DDP, and drift per rank.
    * A learned amax of a quantizer that is disabled or not quantizing gets no gradient, which DDP reports as an
      unused parameter; it is frozen (``requires_grad=False``) and listed. Re-enabling the quantizer later needs
      ``requires_grad_(True)`` and a new wrapping.
    * With ``verify`` (and torch.distributed initialised), :func:`verify_synchronized` checks that the parameters
      and buffers have the same names, shapes and dtypes on every rank and that the quantizer switches agree (DDP
      itself broadcasts rank 0's values when it wraps, but neither buffers of different shapes nor Python switches):
      a collective.

    Args:
        model: the unwrapped model.
        group: the process group for the check (default: the whole world).
        verify: run :func:`verify_synchronized`.

    Returns:
        The names of the quantizers whose learned amax was frozen.

    Raises:
        RuntimeError: a learned-amax quantizer has no amax yet (names them).
        NotSynchronizedError: the model differs across ranks.
    """
    name_quantizers(model)
    missing, frozen = [], []
    for name, q in quantizers(model):
        active = q.is_enabled and q.state()["if_quant"]
        if active and q.quant_desc.learn_amax and not q.learn_amax:
            missing.append(name)
        if q.learn_amax and not active and q.amax.requires_grad:
            q.amax.requires_grad_(False)
            frozen.append(name)
    if missing:
        raise RuntimeError(
            f"{len(missing)} quantizers learn their amax but have none yet: {', '.join(missing[:10])}"
            f"{' ...' if len(missing) > 10 else ''}; calibrate (calibrate_model) before wrapping in "
            "DistributedDataParallel, so that the amax Parameters exist when DDP registers the parameters"
        )
    if frozen:
        logger.info("prepare_for_ddp: froze the learned amax of %d quantizers that are off (no gradient): %s",
                    len(frozen), ", ".join(frozen))
    if verify:
        verify_synchronized(model, group, values=False)
    return frozen


def all_reduce_tensors(tensors: Sequence[torch.Tensor], op: str = "sum", group: ProcessGroup | None = None) -> None:
    """Sums (``op="sum"``) or averages (``op="mean"``) each tensor over the ranks of ``group``, in place; nothing in a
    single process. The tensors travel on :func:`collective_device` and come back to their own device.

    >>> t = torch.ones(2)
    >>> all_reduce_tensors([t], "mean"); t.tolist()
    [1.0, 1.0]
    """
    if op not in ("sum", "mean"):
        raise ValueError(f"all_reduce_tensors: op must be 'sum' or 'mean', got {op!r}")
    if not is_distributed(group):
        return
    device = collective_device(group)
    world = dist.get_world_size(group)
    for t in tensors:
        moved = t.detach().to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
        if op == "mean":
            moved /= world
        with torch.no_grad():
            t.copy_(moved.to(t.device))


def broadcast_tensors(tensors: Sequence[torch.Tensor], group: ProcessGroup | None = None) -> None:
    """Copies the group's rank 0's values into each tensor on every rank, in place; nothing in a single process."""
    if not is_distributed(group):
        return
    device = collective_device(group)
    for t in tensors:
        moved = t.detach().to(device)
        dist.broadcast(moved, src=_src(group), group=group)
        with torch.no_grad():
            t.copy_(moved.to(t.device))
