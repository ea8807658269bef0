"""Calibration of a whole model: feed data, collect statistics, compute every quantizer's amax.

:func:`calibrate_model` does both halves; :func:`collect_stats` and :func:`compute_amax` are the halves alone (for
example to compare methods on one collection).

Under torch.distributed (an initialised default process group) every rank calls these functions with its own shard
of the data: :func:`collect_stats` checks on every rank that no rank failed (an error on one rank is raised on all,
naming it) and lets a rank without batches contribute empty statistics, and :func:`compute_amax` combines the
statistics of all ranks before computing amax, so every rank ends with the same amax, that of the union of the data
(:mod:`qdq.distributed`). ``group=`` picks the process group. In a single process nothing changes.

Which amax each quantizer gets:

* its own descriptor says it: ``QuantDescriptor(calib_method="entropy")`` collects a histogram and computes amax with
  the entropy search (and its ``calib_args``); ``"max"`` collects a running max. ``calibrate_model(model, data)``
  without ``method`` calibrates each quantizer as its descriptor says.
* ``method="entropy"`` (``"mse"``, ``"percentile"``, ``"kld"``, ...) asks for that search on every quantizer that
  can take it, overriding what the descriptors name. Per-tensor symmetric quantizers that collect a running max
  (the default descriptors) collect a histogram for it instead: their calibrator is replaced by a
  :class:`~qdq.calib.HistogramCalibrator`, and the log (INFO) lists which quantizers got one, which kept their
  max calibrator and why (per-channel weights, asymmetric or blocked quantizers are max-calibrated), so nothing
  changes behind the user's back; :attr:`CalibrationReport.replaced_calibrators` names them too.
  ``method="max"`` gives every quantizer the max of what it saw.

``data`` may be a DataLoader or any iterable of batches - a tensor, a ``(inputs, labels)`` tuple or list (the first
item is the input), or a dict (passed as keyword arguments) - or a callable ``forward_loop(model)`` that runs the model
itself. ``preprocess(batch)`` turns a batch into the model's input when the defaults do not fit: a tensor is passed
as the single argument, a tuple or list as positional arguments, a dict as keyword arguments.

Example:
    >>> import torch
    >>> from qdq import calibrate_model, quant_modules
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                             torch.nn.Linear(8 * 6 * 6, 10))
    >>> _ = quant_modules.replace_to_quantization_module(model)
    >>> data = [(torch.randn(4, 3, 8, 8), torch.zeros(4)) for _ in range(10)]
    >>> report = calibrate_model(model, data, num_batches=5, method="mse", progress=False)
    >>> report.batches, report.calibrated
    (5, 4)
    >>> model[0].input_quantizer.amax.item() > 0
    True
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from qdq.calib import HistogramCalibrator, MaxCalibrator, search_names
from qdq.calib.amax_search import check_search_keywords
from qdq.distributed import SyncReport, gather_objects, is_distributed, rank_label, sync_calibrators
from qdq.calibrate.feeding import feed, model_device, model_inputs
from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.transform.replace import name_quantizers
from qdq.transform.switches import preserved_modes, quantizers

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["calibrate_model", "collect_stats", "compute_amax", "histograms_for", "CalibrationReport", "model_inputs"]

logger = logging.getLogger(__name__)


@dataclass
class CalibrationReport:
    """What a calibration did."""

    batches: int = 0
    calibrated: int = 0
    method: str = "max"
    no_data: list[str] = field(default_factory=list)
    collect_seconds: float = 0.0
    compute_seconds: float = 0.0
    autotune: dict = field(default_factory=dict)  # layer -> qdq.calibrate.autotune.TuneResult, with autotune=True
    autotune_seconds: float = 0.0
    sync: SyncReport | None = None  # under torch.distributed: how the ranks' statistics were combined
    frozen: list[str] = field(default_factory=list)  # enabled quantizers without calibrator: amax kept (adaround)
    #: quantizers whose max calibrator was replaced by a histogram calibrator for the ``method`` asked for
    replaced_calibrators: list[str] = field(default_factory=list)


def _check_method(method: str | None) -> None:
    if method is not None and method not in search_names():
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(search_names())}")


def _listing(names: list[str], limit: int = 20) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def histograms_for(model: nn.Module, method: str | None) -> list[str]:
    """Gives the quantizers that can take ``method`` (a histogram search) a histogram calibrator; their names.

    Enabled per-tensor symmetric quantizers with a max calibrator get a
    :class:`~qdq.calib.HistogramCalibrator` of 2048 bins; per-channel, asymmetric and blocked quantizers keep their
    max calibrator. Both lists are logged at INFO with the reason. ``None`` and ``"max"`` change nothing.
    :func:`collect_stats` calls it.
    """
    _check_method(method)
    if method in (None, "max"):
        return []
    replaced, kept = [], []
    for name, q in _active(model):
        if not isinstance(q.calibrator, MaxCalibrator):
            continue
        if q.axis is None and q.symmetric and not q.block_size:
            q.set_calibrator(HistogramCalibrator(q.num_bits, None, q.unsigned))
            replaced.append(name)
        else:
            why = ("blocked" if q.block_size else "asymmetric" if not q.symmetric else f"per-channel (axis={q.axis})")
            kept.append(f"{name} ({why})")
    if replaced:
        logger.info("method=%r: %d quantizers collect a histogram (HistogramCalibrator) instead of their max "
                    "calibrator, as method=%r asks: %s", method, len(replaced), method, _listing(replaced))
    if kept:
        logger.info("method=%r: %d quantizers keep their MaxCalibrator (max-calibrated by design): %s", method,
                    len(kept), _listing(kept))
    return replaced


def _active(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    return [(n, q) for n, q in quantizers(model) if q.is_enabled and q.calibrator is not None]


def collect_stats(
    model: nn.Module,
    data: Iterable | Callable[[nn.Module], Any],
    device: torch.device | str | None = None,
    num_batches: int | None = None,
    *,
    method: str | None = None,
    preprocess: Callable[[Any], Any] | None = None,
    progress: bool = True,
    group: ProcessGroup | None = None,
) -> int:
    """Feeds ``data`` through ``model`` with every enabled quantizer collecting statistics; returns the batch count.

    Exactly ``num_batches`` batches are fed (all of them when ``None``), in eval mode under ``no_grad``, with
    quantization off. Quantizer switches and the train/eval state of every module are restored afterwards, also on
    an exception. Each quantizer collects with its own calibrator; with a histogram ``method`` (entropy, mse,
    percentile, ...), per-tensor quantizers that have a max calibrator collect a histogram for it instead
    (:func:`histograms_for`, which logs which quantizers and why).

    Under torch.distributed this is a collective: ``num_batches`` counts this rank's batches, the return value too.
    Afterwards the ranks agree on the outcome: an exception on any rank is raised on every rank (naming the rank),
    a rank without batches contributes empty statistics (a warning), and no batch on any rank is the error. The
    statistics stay per rank until :func:`compute_amax` combines them.
    """
    return _collect_stats(model, data, device, num_batches, method, preprocess, progress, group)[0]


def _collect_stats(model, data, device, num_batches, method, preprocess, progress, group) -> tuple[int, list[str]]:
    """:func:`collect_stats`, returning ``(batches fed, quantizers given a histogram calibrator)``."""
    _check_method(method)
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    distributed = is_distributed(group)
    name_quantizers(model)
    active = _active(model)
    if not active:
        raise RuntimeError(
            "the model has no enabled quantizer to calibrate (did you call replace_to_quantization_module?)"
        )
    device = torch.device(device) if device is not None else model_device(model)

    replaced = histograms_for(model, method)

    fed = 0
    error: Exception | None = None
    try:
        with preserved_modes(model):
            for _, q in active:
                q.reset_calib()
                q.disable_quant()
                q.enable_calib()
            model.eval()
            with torch.no_grad():
                fed = feed(model, data, num_batches, device=device, preprocess=preprocess, desc="Calibrating",
                           what="calibration batch", progress=progress)
        if fed == 0 and not distributed:
            raise ValueError("the calibration data yielded no batches")
    except Exception as err:
        if not distributed:
            raise
        error = err  # every rank learns of it below, and raises
    if distributed:
        _agree_on_collection(fed, error, group)
    return fed, replaced


def _agree_on_collection(fed: int, error: Exception | None, group: ProcessGroup | None) -> None:
    """Every rank learns whether every rank fed its data; raises on all ranks alike otherwise."""
    try:
        outcomes = gather_objects((None if error is None else f"{type(error).__name__}: {error}", fed), group)
    except RuntimeError as err:  # a rank died or the network failed: the collective itself broke
        raise RuntimeError(
            f"calibration: lost the other ranks while checking that every rank fed its data (did a rank die? see "
            f"its log): {err}"
        ) from (error or err)
    failed = [(r, message) for r, (message, _) in enumerate(outcomes) if message is not None]
    if failed:
        listed = "; ".join(f"{rank_label(group, r)}: {message}" for r, message in failed)
        raise RuntimeError(
            f"calibration failed on {len(failed)} of {len(outcomes)} ranks - {listed}"
        ) from error
    fed_per_rank = [n for _, n in outcomes]
    if sum(fed_per_rank) == 0:
        raise ValueError(f"the calibration data yielded no batches on any of the {len(outcomes)} ranks")
    empty = [rank_label(group, r) for r, n in enumerate(fed_per_rank) if n == 0]
    if fed == 0:
        logger.warning("%s: its calibration data yielded no batches; it contributes empty statistics",
                       rank_label(group, dist.get_rank(group)))
    logger.info("calibration batches per rank: %s (total %d)%s", fed_per_rank, sum(fed_per_rank),
                f"; without data: {', '.join(empty)}" if empty else "")


def handle_no_data(model: nn.Module, names: list[str], strict: bool) -> None:
    """Quantizers that saw no calibration data: an error naming them (``strict``), else disabled with a warning."""
    if not names:
        return
    listed = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
    msg = f"{len(names)} quantizers saw no calibration data: {listed}"
    if strict:
        raise RuntimeError(msg + " (unused layers? pass strict=False to disable them)")
    logger.warning("%s; they are disabled", msg)
    named = dict(quantizers(model))
    for name in names:
        named[name].disable()


def load_amax(
    model: nn.Module,
    amax_kwargs: Callable[[str, TensorQuantizer], Mapping[str, Any]],
    report: CalibrationReport,
    strict: bool = True,
    group: ProcessGroup | None = None,
) -> CalibrationReport:
    """The end of every calibration (:func:`compute_amax`, :func:`qdq.config.calibrate_from_config`): the ranks'
    statistics combined under torch.distributed (``report.sync``), each enabled quantizer's amax loaded from its
    calibrator with ``amax_kwargs(name, quantizer)`` (the arguments of ``load_calib_amax``), the quantizers that saw
    no data refused or disabled (:func:`handle_no_data`), and the frozen ones (no calibrator, an amax) listed.
    ``report`` is filled in place and returned."""
    name_quantizers(model)
    if is_distributed(group):
        report.sync = sync_calibrators(model, group)
    for name, q in _active(model):
        if q.calibrator.num_batches == 0:
            report.no_data.append(name)
            continue
        q.load_calib_amax(**amax_kwargs(name, q))
        report.calibrated += 1
    handle_no_data(model, report.no_data, strict)
    report.frozen = [n for n, q in quantizers(model) if q.is_enabled and q.calibrator is None and q.amax is not None]
    if report.frozen:
        logger.info("kept the amax of %d quantizers without calibrator (frozen, e.g. by qdq.adaround): %s",
                    len(report.frozen), _listing(report.frozen))
    return report


def compute_amax(
    model: nn.Module,
    method: str | None = None,
    strict: bool = True,
    *,
    group: ProcessGroup | None = None,
    **kwargs: Any,
) -> CalibrationReport:
    """Sets every enabled quantizer's amax from what its calibrator collected.

    Max calibrators give their max. Histogram calibrators run ``method`` (``"max"`` gives their exact max) with
    ``kwargs`` (``percentile=``, ``start_bin=``, ``stride=``); without ``method``, the search their descriptor
    names (``calib_method="entropy"``) with its ``calib_args`` (``kwargs`` win), and the exact max for descriptors
    that name none (``calib_method="histogram"``; a warning lists them). A ``method`` that overrides the search a
    descriptor names is logged at INFO. Quantizers that collected nothing are an error naming them all; with
    ``strict=False`` they are disabled instead, with a warning.

    Under torch.distributed (a collective) the calibrators of all ranks of ``group`` are combined first
    (:func:`qdq.distributed.sync_calibrators`, reported in ``report.sync``), so every rank sets the same amax, that
    of the union of the data; "collected nothing" then means "on no rank". Calling it again (another method on the
    same collection) does not combine twice.
    """
    _check_method(method)
    check_search_keywords(kwargs, what="compute_amax: ")
    report = CalibrationReport(method=method if method is not None else "per-quantizer")
    t0 = time.perf_counter()
    overridden, unnamed = [], []

    def amax_kwargs(name: str, q: TensorQuantizer) -> dict[str, Any]:
        search = q.quant_desc.search
        if isinstance(q.calibrator, MaxCalibrator):
            return {}  # max (or min/max for asymmetric quantizers) whatever the method
        if method is not None:
            if search is not None and search != method:
                overridden.append(f"{name} ({search})")
            return {"method": method, **kwargs}
        if search is not None and isinstance(q.calibrator, HistogramCalibrator):
            return dict(kwargs)  # the descriptor's search and calib_args
        unnamed.append(name)
        return {"method": "max", **kwargs}

    load_amax(model, amax_kwargs, report, strict, group)
    if overridden:
        logger.info("method=%r overrides the search the descriptors of %d quantizers name: %s", method,
                    len(overridden), _listing(overridden))
    if unnamed:
        logger.warning("%d quantizers collected histograms but no search was named (their descriptors name none, "
                       "and no method= was given): their amax is the histogram's max; name the search in the "
                       "descriptor (calib_method='entropy', ...) or pass method=: %s", len(unnamed), _listing(unnamed))
    report.compute_seconds = time.perf_counter() - t0
    return report


def calibrate_model(
    model: nn.Module,
    data: Iterable | Callable[[nn.Module], Any],
    device: torch.device | str | None = None,
    num_batches: int | None = None,
    *,
    method: str | None = None,
    percentile: float | None = None,
    preprocess: Callable[[Any], Any] | None = None,
    strict: bool = True,
    progress: bool = True,
    autotune: bool = False,
    tune_batches: int = 10,
    tune_data: Iterable | Callable[[nn.Module], Any] | None = None,
    group: ProcessGroup | None = None,
    **search_kwargs: Any,
) -> CalibrationReport:
    """Calibrates every enabled quantizer of ``model`` on ``data`` (post-training quantization).

    Args:
        model: a model with quantizers (after :func:`~qdq.transform.replace.replace_to_quantization_module`).
        data: batches or a forward loop (see the module docstring).
        device: where batches go (default: the model's device).
        num_batches: how many batches to feed (all when ``None``).
        method: ``None`` (each quantizer as its descriptor says), or ``"max"``, ``"entropy"``, ``"mse"``,
            ``"percentile"``, ``"kld"`` (and any registered search) for every quantizer that can take it (see the
            module docstring: max calibrators of per-tensor quantizers are replaced by histogram calibrators for it,
            logged and listed in ``report.replaced_calibrators``).
        percentile: for the percentile search (default: the descriptor's, else 99.99).
        preprocess: ``batch -> model input``.
        strict: quantizers that see no data are an error (``False``: disable them, with a warning).
        progress: show a tqdm progress bar.
        autotune: after calibration, refine the input amax of every conv/linear layer by its output distance
            (tpu-mlir's auto-tune, :func:`qdq.calibrate.autotune.autotune`); needs a histogram method (``"kld"`` as tpu-mlir).
        tune_batches: batches the auto-tune feeds.
        tune_data: data for the auto-tune (default: ``data`` again; pass it when ``data`` is a one-shot iterator).
        group: under torch.distributed, the process group whose ranks calibrate together (default: the whole
            world); every rank feeds its own ``data`` and all end with the same amax. Ignored in a single process.
        search_kwargs: ``start_bin``, ``stride``, ... for the histogram searches.

    Returns:
        A :class:`CalibrationReport`.
    """
    if autotune and method in (None, "max"):
        raise ValueError("autotune=True refines histogram thresholds; use a histogram method such as method='kld'")
    check_search_keywords(search_kwargs, "calibrate_model: ")  # before the data is collected, not after
    _check_method(method)
    t0 = time.perf_counter()
    fed, replaced = _collect_stats(model, data, device, num_batches, method, preprocess, progress, group)
    t1 = time.perf_counter()
    if percentile is not None:
        search_kwargs["percentile"] = percentile
    report = compute_amax(model, method=method, strict=strict, group=group, **search_kwargs)
    report.replaced_calibrators = replaced
    report.batches = fed
    report.collect_seconds = t1 - t0
    if autotune:
        from qdq.calibrate.autotune import autotune as run_autotune  # floor-4 sibling, imported where used

        t2 = time.perf_counter()
        report.autotune = run_autotune(
            model, tune_data if tune_data is not None else data, tune_batches, method_init=method,
            progress=progress, preprocess=preprocess, device=device, group=group, **search_kwargs,
        )
        report.autotune_seconds = time.perf_counter() - t2
    logger.info(
        "calibrated %d quantizers with %r on %d batches (collect %.2f s, amax %.2f s)",
        report.calibrated, method, fed, report.collect_seconds, report.compute_seconds,
    )
    return report
