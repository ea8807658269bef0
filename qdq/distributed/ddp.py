"""QAT under DistributedDataParallel: preparing a calibrated model for DDP, and checking that ranks stay identical."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from qdq.calib.calibrator import StatsMismatchError
from qdq.distributed.collectives import (
    NotSynchronizedError,
    _check_same_list,
    _src,
    collective_device,
    gather_objects,
    is_distributed,
    rank_label,
)
from qdq.transform.replace import name_quantizers
from qdq.transform.switches import quantizers

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["verify_synchronized", "broadcast_buffers", "prepare_for_ddp"]

logger = logging.getLogger(__name__)

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
