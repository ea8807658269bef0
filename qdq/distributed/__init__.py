"""Calibration and QAT on torch.distributed: every rank ends with the same amax, computed from all ranks' data.

qdq runs on torch.distributed itself (NCCL on GPUs, gloo on CPUs): whatever launched the processes (``torchrun``,
``torch.multiprocessing``, a cluster scheduler) and initialised the default process group, qdq uses it. In a single
process nothing here does anything and nothing changes.

Where things are: :mod:`qdq.distributed.collectives` (objects and tensors across ranks, rank 0 runs),
:mod:`qdq.distributed.calibrators` (calibrators combined across ranks), :mod:`qdq.distributed.ddp` (QAT under
DistributedDataParallel). Every name below is importable from ``qdq.distributed`` itself.

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

from qdq.calib.calibrator import StatsMismatchError
from qdq.distributed.calibrators import SyncReport, all_reduce_calibrators, sync_calibrators
from qdq.distributed.collectives import (
    NotSynchronizedError,
    all_reduce_tensors,
    broadcast_object,
    broadcast_tensors,
    collective_device,
    distributed_ready,
    gather_objects,
    is_distributed,
    rank_label,
    run_on_rank0,
)
from qdq.distributed.ddp import broadcast_buffers, prepare_for_ddp, verify_synchronized

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
