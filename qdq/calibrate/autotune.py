"""Auto-tune: refine the input amax of every weighted layer by the Euclidean distance of its output (tpu-mlir).

The KLD threshold (:mod:`qdq.calib.kld`) picks among a few coarse cuts and judges only the shape of a distribution.
Auto-tune starts from it and asks the layer itself: which input amax between the KLD threshold and the largest
magnitude seen makes the layer's output closest to its float output? Detection and keypoint heads, where outliers
carry the answer, tend to get a larger amax than KLD gives.

Usage, right after calibration::

    calibrate_model(model, loader, num_batches=100, method="kld")   # histograms and KLD thresholds
    results = autotune(model, loader, num_batches=10)               # refine the inputs of conv / linear layers
    for layer, r in results.items():
        print(f"{layer}: {r.initial:.4f} -> {r.amax:.4f}")

What is tuned: every module with an ``_input_quantizer`` and a ``_weight_quantizer`` (TensorQuantizers) and a
``weight`` tensor - the quantized convolutions, transposed convolutions and linear layers - whose input quantizer is
enabled, per tensor and symmetric, and holds a histogram calibrator that collected data. Other layers are left alone
and listed in the log.

How, for one layer ``L`` with input quantizer ``q``:

1. The model runs in float with its weights fake-quantized: weight quantizers stay as they are, every other
   quantizer (inputs of all layers, adds, concats, pooling) is disabled, no quantizer collects statistics.
2. The float input ``x`` of ``L`` and its output ``ref = L(x)`` (float input, fake-quantized weight) are taken with a
   forward hook: ``ref`` is tpu-mlir's fp32 reference activation.
3. The candidates are ``candidates`` values evenly spaced from the initial amax (``q.calibrator.compute_amax
   (method_init)``, the KLD threshold by default) to the largest magnitude the calibrator saw
   (``compute_amax("max")``), both ends included.
4. For each candidate ``a``: ``y = L(fake_quantize_by_amax(x, a))`` - only this layer, its input quantizer disabled, its
   weight quantizer on - and the distance ``||y - ref||_2``, summed in square over the tuning batches.
5. The candidate with the smallest distance wins (ties go to the smaller amax, the one nearer the initial value).

The candidates are amax values as stored in the quantizer; when its descriptor sets ``scale_amax`` the trial
quantizes with ``a * scale_amax``, as the quantizer will.

Shared tensors: where one tensor feeds several tuned layers - the same input quantizer object in several layers, or
the same activation read by layers with their own quantizers - each layer is tuned on its own and every quantizer
of the group gets the largest of their thresholds (tpu-mlir's rule: the larger threshold serves all branches), held
within its own ``[initial, absmax]``. Two layers read the same activation when, within one forward pass, the second
is called with a tensor that is still alive and has the first one's memory, layout and version (so an in-place
change in between separates them).

The result never leaves ``[initial, absmax]``. A layer the data never reaches keeps its amax (with a warning).

Memory and time: one pass over the tuning data, one forward pass per batch. Inside it, at one layer at a time,
autotune holds a fake-quantized copy of the layer's input, one trial output and its difference to the reference;
nothing is kept across batches except ``candidates`` float64 sums per layer. Peak memory is that of a no-grad float
forward pass of one batch plus about three tensors of the size of the largest tuned layer's input or output. Time is
one forward pass plus ``candidates`` layer calls per tuned layer and batch.

Every quantizer switch and the train/eval mode of every module are restored afterwards, also on an error.

Under torch.distributed (a collective: every rank calls it with its own shard of the tuning data) the histograms
are combined first (:func:`qdq.distributed.sync_calibrators`; a no-op after :func:`~qdq.calibrate.calibrate_model`),
so every rank has the same candidates; each candidate's squared distance is then summed over the ranks (one SUM
all-reduce of ``[layers, candidates + 1]`` float64 values, the call counts included) and the shared-input groups
observed on any rank are merged, so every rank picks the same amax: the one a single process would pick on all the
tuning data, up to the order of float64 additions. A rank without tuning batches contributes zeros; an exception on
one rank is raised on every rank.

Example:
    >>> import torch
    >>> from qdq import calibrate_model, quant_modules
    >>> from qdq.calibrate.autotune import autotune
    >>> torch.manual_seed(0) is not None
    True
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                             torch.nn.Linear(8 * 6 * 6, 10))
    >>> _ = quant_modules.replace_to_quantization_module(model)
    >>> data = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    >>> _ = calibrate_model(model, data, method="kld", progress=False)
    >>> results = autotune(model, data, num_batches=2, progress=False)
    >>> sorted(results)
    ['0', '3']
    >>> r = results["0"]
    >>> r.initial <= r.amax <= r.absmax, len(r.candidates), r.amax == model[0].input_quantizer.amax.item()
    (True, 10, True)
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from qdq._union_find import UnionFind
from qdq.calib import HistogramCalibrator
from qdq.distributed import (
    all_reduce_tensors,
    collective_device,
    gather_objects,
    is_distributed,
    rank_label,
    sync_calibrators,
)
from qdq.calibrate.feeding import feed, model_device
from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.transform.replace import name_quantizers
from qdq.transform.switches import preserved_modes, quantizers
from qdq.math.fake_quant import fake_quantize_by_amax

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["autotune", "TuneResult", "tunable_layers"]

logger = logging.getLogger(__name__)


@dataclass
class TuneResult:
    """What auto-tune found for one layer.

    Attributes:
        layer: the layer's dotted path.
        quantizer: its input quantizer's dotted path.
        initial: the initial amax (``method_init``'s threshold).
        absmax: the largest magnitude the calibrator saw (the last candidate).
        candidates: the amax values tried, from ``initial`` to ``absmax``.
        distances: ``||L(fake_quant(x, a)) - L(x)||_2`` over the tuning batches, one per candidate.
        best: this layer's own best candidate.
        amax: the amax set in the quantizer: ``best``, or the largest ``best`` of the layers sharing the tensor.
        shared_with: the other layers whose threshold was shared with this one.
        calls: how many times the layer was called on tuning data.
    """

    layer: str
    quantizer: str
    initial: float
    absmax: float
    candidates: list[float]
    distances: list[float]
    best: float
    amax: float
    shared_with: tuple[str, ...] = ()
    calls: int = 0

    @property
    def initial_distance(self) -> float:
        """The distance at the initial amax."""
        return self.distances[0]

    @property
    def best_distance(self) -> float:
        """The smallest distance (at :attr:`best`)."""
        return min(self.distances)


@dataclass
class _Entry:
    """One tuned layer while the data runs."""

    name: str
    module: nn.Module
    quantizer: TensorQuantizer
    initial: torch.Tensor
    absmax: float
    grid: torch.Tensor  # float32 candidates, on the CPU
    sq: torch.Tensor | None = None  # float64 sums of squared distances, on the data's device
    calls: int = 0
    _grid_on: dict = field(default_factory=dict)

    def grid_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._grid_on:
            self._grid_on[device] = self.grid.to(device)
        return self._grid_on[device]


def tunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: layer}`` for every module with an ``_input_quantizer``, a ``_weight_quantizer`` and a ``weight``.

    >>> from qdq import nn as quant_nn
    >>> model = torch.nn.Sequential(quant_nn.QuantLinear(4, 4), torch.nn.ReLU(), quant_nn.QuantAdd())
    >>> list(tunable_layers(model))
    ['0']
    """
    found = {}
    for path, module in model.named_modules():
        if (
            isinstance(getattr(module, "_input_quantizer", None), TensorQuantizer)
            and isinstance(getattr(module, "_weight_quantizer", None), TensorQuantizer)
            and isinstance(getattr(module, "weight", None), torch.Tensor)
        ):
            found[path] = module
    return found


def _weight_quantizer_ids(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        single = getattr(module, "_weight_quantizer", None)
        if isinstance(single, TensorQuantizer):
            ids.add(id(single))
        for q in getattr(module, "_weight_quantizers", None) or ():
            if isinstance(q, TensorQuantizer):
                ids.add(id(q))
    return ids


def _quantizer_path(model: nn.Module, quantizer: TensorQuantizer) -> str:
    return quantizer.name or next((n for n, q in quantizers(model) if q is quantizer), "?")


def _candidate_grid(initial: float, absmax: float, candidates: int) -> torch.Tensor:
    """``candidates`` evenly spaced values from ``initial`` to ``max(absmax, initial)``, both ends exact."""
    high = max(absmax, initial)
    grid = torch.linspace(initial, high, candidates, dtype=torch.float64).float()
    grid[0], grid[-1] = initial, high
    return grid.clamp_(min=initial, max=high)


def _select(model: nn.Module, candidates: int, method_init: str | None, search_kwargs: dict) -> list[_Entry]:
    """The layers to tune, with their initial amax, absmax and candidate grid (one grid per shared quantizer)."""
    layers = tunable_layers(model)
    skipped: dict[str, str] = {}
    entries: list[_Entry] = []
    grids: dict[int, tuple[torch.Tensor, float, torch.Tensor]] = {}
    for path, module in layers.items():
        q = module._input_quantizer
        if not q.is_enabled:
            skipped[path] = "input quantizer disabled"
            continue
        if q.axis is not None:
            skipped[path] = f"per-channel input quantizer (axis={q.axis})"
            continue
        if not getattr(q, "symmetric", True):
            skipped[path] = "asymmetric input quantizer (the candidates are symmetric thresholds)"
            continue
        cal = q.calibrator
        if not isinstance(cal, HistogramCalibrator) or not cal.collected:
            if cal is None:
                skipped[path] = "input quantizer has no calibrator"
            elif isinstance(cal, HistogramCalibrator):
                skipped[path] = "its histogram calibrator collected no data"
            else:
                skipped[path] = f"{type(cal).__name__} instead of a histogram calibrator"
            continue
        if id(q) not in grids:
            label = _quantizer_path(model, q)
            try:
                absmax = float(cal.compute_amax("max"))
                if method_init is None:
                    if q.amax is None:
                        raise ValueError("method_init=None needs an amax to start from; it has none")
                    initial = q.amax.detach().float().cpu()
                else:
                    initial = cal.compute_amax(method_init, **search_kwargs).detach().float().cpu()
            except ValueError as err:
                raise ValueError(f"autotune: layer {path!r}, input quantizer {label!r}: {err}") from None
            if initial.numel() != 1:
                raise ValueError(
                    f"autotune: layer {path!r}, input quantizer {label!r}: expected one amax, got shape "
                    f"{tuple(initial.shape)}"
                )
            if float(initial) > absmax:
                logger.warning(
                    "autotune: %s starts at amax %.6g, above the largest magnitude seen (%.6g); it keeps its amax",
                    label, float(initial), absmax,
                )
            grids[id(q)] = (initial, absmax, _candidate_grid(float(initial), absmax, candidates))
        initial, absmax, grid = grids[id(q)]
        entries.append(_Entry(path, module, q, initial, absmax, grid))
    if skipped:
        logger.info(
            "autotune: %d layers not tuned: %s", len(skipped), ", ".join(f"{k} ({v})" for k, v in skipped.items())
        )
    if not entries:
        detail = f" ({len(skipped)} weighted layers skipped: see the log)" if skipped else ""
        raise RuntimeError(
            "autotune: no layer has an enabled per-tensor input quantizer with a calibrated histogram"
            f"{detail}; run calibrate_model(model, data, method='kld') (or another histogram method such as "
            "'entropy', 'mse' or 'percentile') first"
        )
    return entries


class _Tuner:
    """The forward hooks: measure every candidate at each call of a tuned layer, note shared inputs."""

    def __init__(self, entries: list[_Entry]):
        self.entries = entries
        self.groups = UnionFind()
        self.busy = False  # set while a layer is re-run on candidates (its own hook must not fire again)
        self.seen: dict[tuple, tuple[weakref.ref, str]] = {}

    def new_batch(self) -> None:
        self.seen.clear()

    def _note_input(self, name: str, x: torch.Tensor) -> None:
        key = (x.device, x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, getattr(x, "_version", 0))
        known = self.seen.get(key)
        if known is not None and known[0]() is not None:
            if known[1] != name:
                self.groups.union(known[1], name)
            return
        self.seen[key] = (weakref.ref(x), name)

    def hook(self, entry: _Entry) -> Callable:
        def measure(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.busy:
                return
            if not args or not isinstance(args[0], torch.Tensor):
                raise TypeError(f"autotune: layer {entry.name!r} was not called with a tensor as first argument")
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"autotune: layer {entry.name!r} returned a {type(output).__name__}, not a tensor")
            x = args[0]
            self._note_input(entry.name, x)
            q = entry.quantizer
            scale = q.scale_amax if q.scale_amax is not None else 1.0
            sums = []
            self.busy = True
            try:
                for amax in entry.grid_on(x.device):
                    xq = fake_quantize_by_amax(x, amax * scale, q.num_bits, q.unsigned, q.narrow_range)
                    y = module(xq, *args[1:], **kwargs)
                    del xq
                    diff = y - output
                    del y
                    sums.append(torch.linalg.vector_norm(diff, dtype=torch.float64).square())
                    del diff
            except Exception as err:
                raise RuntimeError(
                    f"autotune: re-running layer {entry.name!r} on a quantized input failed: {err}"
                ) from err
            finally:
                self.busy = False
            step = torch.stack(sums)
            entry.sq = step if entry.sq is None else entry.sq + step.to(entry.sq.device)
            entry.calls += 1

        return measure


def _feed(
    model: nn.Module,
    data: Iterable | Callable[[nn.Module], Any],
    tuner: _Tuner,
    num_batches: int | None,
    preprocess: Callable[[Any], Any] | None,
    device: torch.device | None,
    progress: bool,
) -> int:
    """Runs the tuning data through ``model``; returns the number of batches fed."""
    return feed(model, data, num_batches, device=device, preprocess=preprocess, desc="Auto-tuning",
                what="autotune batch", progress=progress, before_batch=tuner.new_batch)


def autotune(
    model: nn.Module,
    data: Iterable | Callable[[nn.Module], Any],
    num_batches: int | None = 10,
    *,
    candidates: int = 10,
    method_init: str | None = "kld",
    progress: bool = True,
    preprocess: Callable[[Any], Any] | None = None,
    device: torch.device | str | None = None,
    group: ProcessGroup | None = None,
    **search_kwargs: Any,
) -> dict[str, TuneResult]:
    """Tunes the input amax of every weighted quantized layer on ``data`` and sets it (see the module docstring).

    Call it after :func:`~qdq.calibrate.calibrate_model` with a histogram method (``method="kld"`` as tpu-mlir);
    the input quantizers' histograms must still be in their calibrators.

    Args:
        model: a quantized, calibrated model.
        data: batches (a tensor, an ``(inputs, labels)`` tuple or list, a dict of keyword arguments) or a callable
            ``forward_loop(model)``, as for :func:`~qdq.calibrate.calibrate_model`.
        num_batches: how many batches to tune on (all when ``None``); tpu-mlir's ``--tune_num``.
        candidates: how many amax values to try per layer, from the initial amax to the absmax inclusive (>= 2).
        method_init: the histogram search giving the initial amax (``"kld"``, ``"entropy"``, ...), or ``None`` to
            start from each quantizer's current amax.
        progress: show a tqdm progress bar over the batches.
        preprocess: ``batch -> model input`` when the defaults do not fit.
        device: where batches go (default: the model's device).
        group: under torch.distributed, the process group whose ranks tune together (default: the whole world;
            see the module docstring). Ignored in a single process.
        search_kwargs: passed to ``compute_amax(method_init, ...)`` (``percentile=``, ...).

    Returns:
        ``{layer path: TuneResult}`` for every tuned layer, in model order (the same on every rank; ``distances``
        and ``calls`` then count over all ranks).

    Raises:
        RuntimeError: no layer has a calibrated histogram input quantizer, or the data reached none of them.
        ValueError: the data yielded no batch, or a bad argument.
    """
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 2:
        raise ValueError(f"autotune: candidates must be an int >= 2, got {candidates!r}")
    bad_batches = isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    if num_batches is not None and bad_batches:
        raise ValueError(f"autotune: num_batches must be a positive int or None, got {num_batches!r}")
    distributed = is_distributed(group)
    name_quantizers(model)
    if distributed:
        sync_calibrators(model, group)  # the same histograms, hence the same candidates, on every rank
    entries = _select(model, candidates, method_init, search_kwargs)
    device = torch.device(device) if device is not None else model_device(model)
    tuner = _Tuner(entries)
    weights = _weight_quantizer_ids(model)

    handles = []
    fed, error = 0, None
    try:
        with preserved_modes(model):
            try:
                for _, q in quantizers(model):
                    q.disable_calib()
                    if id(q) not in weights:
                        q.disable()
                model.eval()
                for entry in entries:
                    handles.append(entry.module.register_forward_hook(tuner.hook(entry), with_kwargs=True))
                with torch.no_grad():
                    fed = _feed(model, data, tuner, num_batches, preprocess, device, progress)
            finally:
                for handle in handles:
                    handle.remove()
        if fed == 0 and not distributed:
            raise ValueError("autotune: the tuning data yielded no batches")
    except Exception as err:
        if not distributed:
            raise
        error = err  # every rank learns of it in _combine_ranks, and raises
    if distributed:
        _combine_ranks(entries, tuner.groups, fed, error, group)
    return _apply(model, entries, tuner.groups)


def _combine_ranks(
    entries: list[_Entry], groups: UnionFind, fed: int, error: Exception | None, group: ProcessGroup | None
) -> None:
    """Sums distances and calls over the ranks and merges the shared-input groups seen on any rank."""
    pairs = groups.pairs()
    outcomes = gather_objects((None if error is None else f"{type(error).__name__}: {error}", fed, pairs), group)
    failed = [(r, message) for r, (message, _, _) in enumerate(outcomes) if message is not None]
    if failed:
        listed = "; ".join(f"{rank_label(group, r)}: {message}" for r, message in failed)
        raise RuntimeError(f"autotune failed on {len(failed)} of {len(outcomes)} ranks - {listed}") from error
    fed_per_rank = [n for _, n, _ in outcomes]
    if sum(fed_per_rank) == 0:
        raise ValueError(f"autotune: the tuning data yielded no batches on any of the {len(outcomes)} ranks")
    if fed == 0:
        logger.warning("autotune: %s: its tuning data yielded no batches; it contributes zero distances",
                       rank_label(group, dist.get_rank(group)))
    for _, _, rank_pairs in outcomes:
        for a, b in rank_pairs:
            groups.union(a, b)
    device = collective_device(group)
    width = max(e.grid.numel() for e in entries)
    table = torch.zeros(len(entries), width + 1, dtype=torch.float64, device=device)
    for row, e in enumerate(entries):
        if e.sq is not None:
            table[row, : e.grid.numel()] = e.sq.to(device, torch.float64)
        table[row, width] = e.calls
    all_reduce_tensors([table], "sum", group)
    table = table.cpu()
    for row, e in enumerate(entries):
        e.calls = int(table[row, width])
        e.sq = table[row, : e.grid.numel()].clone() if e.calls > 0 else None
    logger.info("autotune: tuning batches per rank %s; distances summed over %d ranks", fed_per_rank, len(outcomes))


def _apply(model: nn.Module, entries: list[_Entry], groups: UnionFind) -> dict[str, TuneResult]:
    """Picks each layer's best candidate, shares the largest within groups, sets the amax; the results."""
    reached = [e for e in entries if e.calls > 0]
    missed = [e.name for e in entries if e.calls == 0]
    if not reached:
        raise RuntimeError(
            f"autotune: the data reached none of the {len(entries)} layers to tune ({', '.join(missed[:10])}"
            f"{' ...' if len(missed) > 10 else ''}); check that it runs the model's forward"
        )
    if missed:
        logger.warning("autotune: %d layers were not called by the data and keep their amax: %s",
                       len(missed), ", ".join(missed))
    by_quantizer: dict[int, list[_Entry]] = {}
    for e in reached:
        by_quantizer.setdefault(id(e.quantizer), []).append(e)
    for shared in by_quantizer.values():
        for e in shared[1:]:
            groups.union(shared[0].name, e.name)

    best: dict[str, float] = {}
    distances: dict[str, list[float]] = {}
    for e in reached:
        d = e.sq.double().cpu().sqrt()
        if not bool(torch.isfinite(d).all()):
            raise RuntimeError(f"autotune: layer {e.name!r} gave a non-finite output distance {d.tolist()}")
        k = int(torch.nonzero(d == d.min())[0])  # the first minimum: the smallest amax
        best[e.name] = float(e.grid[k])
        distances[e.name] = d.tolist()
    members: dict[str, list[_Entry]] = {}
    for e in reached:
        members.setdefault(groups.find(e.name), []).append(e)

    results: dict[str, TuneResult] = {}
    for e in reached:
        group = members[groups.find(e.name)]
        shared_best = max(best[g.name] for g in group)
        initial = float(e.initial)
        value = min(max(shared_best, initial), max(e.absmax, initial))
        q = e.quantizer
        q.amax = torch.full_like(q.amax, value) if q.amax is not None else torch.tensor(value)
        results[e.name] = TuneResult(
            layer=e.name,
            quantizer=_quantizer_path(model, q),
            initial=initial,
            absmax=e.absmax,
            candidates=e.grid.tolist(),
            distances=distances[e.name],
            best=best[e.name],
            amax=value,
            shared_with=tuple(g.name for g in group if g is not e),
            calls=e.calls,
        )
        logger.info(
            "autotune %s: amax %.6g -> %.6g (own best %.6g, distance %.6g -> %.6g%s)",
            e.name, initial, value, best[e.name], distances[e.name][0], min(distances[e.name]),
            f", shared with {', '.join(g.name for g in group if g is not e)}" if len(group) > 1 else "",
        )
    return results
