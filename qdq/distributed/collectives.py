"""The collectives qdq uses, on the default process group or ``group=``: objects, tensors, rank 0 runs.

In a single process (torch.distributed not initialised) each of them returns at once.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.distributed as dist

from qdq.calib.calibrator import StatsMismatchError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "is_distributed",
    "collective_device",
    "rank_label",
    "gather_objects",
    "broadcast_object",
    "run_on_rank0",
    "NotSynchronizedError",
    "all_reduce_tensors",
    "broadcast_tensors",
]

logger = logging.getLogger(__name__)

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
