"""A search that picks a format per layer (INT8, FP8, INT4 weight-only, float; :mod:`qdq.transform.layer_formats`)
under an accuracy budget at the lowest estimated cost.

The search (:func:`search_formats`):

1. calibrates every layer in every candidate format once (the statistics are those of the float activations, so a
   layer's amax does not depend on its neighbours' formats, and switching formats afterwards swaps calibrated
   quantizers without calibrating again);
2. profiles each format with :func:`qdq.calibrate.sensitivity.build_sensitivity_profile` (``mode="enable_one"``: the
   metric with only that layer quantized in that format);
3. starts every layer in its cheapest format (ties: the least sensitive one) and, while the metric is beyond
   ``tolerance`` of float, moves the one layer whose next format buys the most metric per unit of cost (the
   profiles' difference over the cost difference), evaluating the whole model after each move;
4. reports every layer's format and why, and the steps it took.

FP8 is not offered to the layers TensorRT has no FP8 kernel for (:func:`fp8_exclusion`: depthwise and <=16-channel
convolutions, small Linear layers): they choose among the other formats, with ``fp8_fallback`` (float by default,
or ``"int8"``) offered in FP8's place, and the report names the exclusion in their reason (``fp8_fallback=None``
offers FP8 everywhere, as :func:`~qdq.transform.layer_formats.set_model_format` does).

Search before applying scale-sharing rules: a quantizer shared by two layers takes the format last set on either.

Cost of a layer = its share of the model's FLOPs (multiply-adds of its conv/linear, counted on an example input)
times the cost per FLOP of its format, relative to float16 (:data:`FORMAT_COSTS`):

===========  ======  ======================================================================================
format       cost    why (TensorRT on Hopper/Ada/Blackwell tensor cores, compute-bound layers)
===========  ======  ======================================================================================
``float``    1.00    float16 tensor-core math
``int8``     0.50    twice the float16 math rate
``fp8``      0.50    twice the float16 math rate, like INT8 (FP8 needs those GPUs; INT8 runs on all)
``int4``     0.85    weight-only: the math stays float16, only weight traffic shrinks (4x vs float16), which
                     helps memory-bound GEMMs (small batches); an estimate, not a measurement
===========  ======  ======================================================================================

The table is an estimate to rank choices, not a latency prediction; pass ``costs=`` to use your own measurements.
These are data only: nothing here knows TensorRT's fusions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from qdq.calibrate.model import calibrate_model
from qdq.calibrate.sensitivity import build_sensitivity_profile
from qdq.math.formats import FORMAT_NAMES
from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.transform.layer_formats import (
    _check_format,
    _replace_everywhere,
    format_layers,
    fp8_exclusion,
    set_layer_format,
)
from qdq.transform.replace import name_quantizers
from qdq.transform.switches import disable_quantization, preserved_modes

__all__ = ["FORMAT_COSTS", "layer_flops", "search_formats", "FormatSearchReport", "FormatChoice"]

logger = logging.getLogger(__name__)

#: Cost per FLOP of each format relative to float16 (see the module docstring for the reasons).
FORMAT_COSTS: dict[str, float] = {"float": 1.0, "int8": 0.5, "fp8": 0.5, "int4": 0.85}


def layer_flops(model: nn.Module, example_input: Any) -> dict[str, int]:
    """Multiply-adds of every conv and linear layer of :func:`format_layers` on ``example_input`` (one forward).

    Conv: output elements x (input channels / groups) x kernel elements; Linear: output elements x input features.
    """
    layers = format_layers(model)
    counts: dict[str, int] = {}
    hooks = []

    def hook(path):
        def fn(module, inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(module, nn.modules.conv._ConvNd):
                per = (module.in_channels // module.groups) * math.prod(module.kernel_size)
            elif isinstance(module, nn.Linear):
                per = module.in_features
            else:
                per = 0
            counts[path] = counts.get(path, 0) + int(out.numel()) * per
        return fn

    for path, module in layers.items():
        hooks.append(module.register_forward_hook(hook(path)))
    try:
        # quantizers off: FLOPs do not depend on them, and an uncalibrated one would warn about dynamic amax
        with preserved_modes(model, quantizer_states=False), torch.no_grad(), disable_quantization(model):
            model.eval()
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return {path: counts.get(path, 0) for path in layers}


@dataclass
class FormatChoice:
    """One layer's format and why it was chosen."""

    layer: str
    format: str
    flops_share: float
    cost: float  # flops_share * FORMAT_COSTS[format]
    deltas: dict[str, float]  # format -> metric with only this layer in it, minus the float metric
    reason: str
    fp8_excluded: str | None = None  # why FP8 was not offered (fp8_exclusion), or None


@dataclass
class FormatSearchReport:
    """What :func:`search_formats` chose: per-layer formats and reasons, the metric, the cost, the steps."""

    float_metric: float
    metric: float
    tolerance: float
    cost: float  # relative to the whole model in float16 (1.0)
    met: bool
    choices: list[FormatChoice] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    costs: dict[str, float] = field(default_factory=dict)

    @property
    def formats(self) -> dict[str, str]:
        return {c.layer: c.format for c in self.choices}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.choices:
            out[c.format] = out.get(c.format, 0) + 1
        return out

    def table(self) -> str:
        width = max([len("layer")] + [len(c.layer) for c in self.choices])
        lines = [f"format search: metric {self.metric:.6g} (float {self.float_metric:.6g}, tolerance "
                 f"{self.tolerance:g}: {'met' if self.met else 'NOT met'}), estimated cost {self.cost:.3f} of "
                 f"float16; formats {self.counts()}",
                 f"{'layer':<{width}}  {'format':<6}  {'FLOPs':>6}  reason"]
        for c in self.choices:
            lines.append(f"{c.layer:<{width}}  {c.format:<6}  {c.flops_share:>6.1%}  {c.reason}")
        if self.steps:
            lines.append("steps:")
            lines += [f"  {s}" for s in self.steps]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _candidates(path: str, module: nn.Module, formats: Iterable[str], block_size: int) -> list[str]:
    out = []
    for fmt in formats:
        try:
            _check_format(fmt, path, module, block_size)
        except ValueError:
            continue
        out.append(fmt)
    return out


def search_formats(
    model: nn.Module,
    calib_data: Iterable | Callable[[nn.Module], Any],
    eval_fn: Callable[[nn.Module], float],
    tolerance: float,
    example_input: Any,
    formats: Iterable[str] = ("int8", "fp8", "int4"),
    costs: Mapping[str, float] | None = None,
    higher_is_better: bool = True,
    block_size: int = 64,
    num_batches: int | None = None,
    method: str = "max",
    progress: bool = True,
    fp8_fallback: str | None = "float",
    **calib_kwargs: Any,
) -> FormatSearchReport:
    """Picks a format per layer so that ``eval_fn(model)`` stays within ``tolerance`` of float at the lowest
    estimated cost (see the module docstring); leaves the model in the chosen formats, calibrated.

    Args:
        model: a quantized model (after :func:`~qdq.transform.replace.replace_to_quantization_module`).
        calib_data: calibration batches (as for :func:`~qdq.calibrate.calibrate_model`).
        eval_fn: ``model -> metric`` (accuracy, or a loss with ``higher_is_better=False``).
        tolerance: the largest acceptable distance of the metric from the float model's, in the metric's units.
        example_input: one input, to count each layer's FLOPs.
        formats: the quantized formats to consider (``"float"`` is always possible).
        costs: cost per FLOP of each format relative to float16 (default :data:`FORMAT_COSTS`).
        block_size: INT4 block size.
        fp8_fallback: the format offered instead of FP8 to the layers :func:`fp8_exclusion` names (``"float"``,
            always a candidate, or ``"int8"``, offered to them even when ``formats`` lacks it); ``None`` offers FP8
            to every layer.
        num_batches, method, calib_kwargs: for :func:`~qdq.calibrate.calibrate_model`.

    Returns:
        A :class:`FormatSearchReport` (``print(report)`` shows the table). When even the last move leaves the metric
        beyond the tolerance, ``report.met`` is False and a warning is logged.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if fp8_fallback not in (None, "float", "int8"):
        raise ValueError(f"search_formats: fp8_fallback must be 'float', 'int8' or None, got {fp8_fallback!r}")
    costs = dict(FORMAT_COSTS if costs is None else costs)
    formats = [f for f in dict.fromkeys(formats) if f != "float"]
    fallback = [fp8_fallback] if fp8_fallback is not None and "fp8" in formats else []
    unknown = [f for f in formats + ["float"] + fallback if f not in FORMAT_NAMES or f not in costs]
    if unknown:
        raise ValueError(f"formats {unknown} are unknown or have no cost; formats: {FORMAT_NAMES}, costs: {costs}")
    layers = format_layers(model)
    if not layers:
        raise RuntimeError("the model has no layers with input and weight quantizers; quantize it first")
    sign = 1.0 if higher_is_better else -1.0
    flops = layer_flops(model, example_input)
    total = sum(flops.values()) or 1
    share = {p: flops[p] / total for p in layers}
    cands = {p: _candidates(p, m, formats, block_size) + ["float"] for p, m in layers.items()}
    excluded: dict[str, str] = {}  # layer -> why TensorRT has no FP8 kernel for it
    if "fp8" in formats and fp8_fallback is not None:
        for p, m in layers.items():
            why = fp8_exclusion(m)
            if why is None or "fp8" not in cands[p]:
                continue
            excluded[p] = why
            cands[p].remove("fp8")
            if fp8_fallback not in cands[p]:
                cands[p].insert(0, fp8_fallback)
        if excluded:
            logger.info("format search: FP8 not offered to %d layers TensorRT has no FP8 kernel for (%s offered "
                        "instead): %s", len(excluded), fp8_fallback,
                        "; ".join(f"{p}: {w}" for p, w in list(excluded.items())[:8])
                        + (" ..." if len(excluded) > 8 else ""))
    searched = [f for f in dict.fromkeys(formats + [f for c in cands.values() for f in c]) if f != "float"]

    # 1. every layer calibrated once per format: {format: {layer: (input quantizer, weight quantizer)}}
    calibrated: dict[str, dict[str, tuple[TensorQuantizer, TensorQuantizer]]] = {}
    for fmt in searched + ["float"]:
        members = [p for p in layers if fmt in cands[p]]
        for p in members:
            set_layer_format(model, p, fmt, block_size)
        if fmt != "float":
            calibrate_model(model, calib_data, num_batches=num_batches, method=method, progress=progress,
                            **calib_kwargs)
        calibrated[fmt] = {p: (layers[p]._input_quantizer, layers[p]._weight_quantizer) for p in members}
        logger.info("format search: %d layers calibrated in %s", len(members), fmt)

    def apply(assignment: Mapping[str, str]) -> None:
        for p, fmt in assignment.items():
            iq, wq = calibrated[fmt][p]
            _replace_everywhere(model, layers[p]._input_quantizer, iq)
            _replace_everywhere(model, layers[p]._weight_quantizer, wq)
        name_quantizers(model)

    # 2. per-format sensitivity (only that layer quantized in that format)
    deltas: dict[str, dict[str, float]] = {p: {"float": 0.0} for p in layers}
    for fmt in searched:
        members = [p for p in layers if fmt in cands[p]]
        if not members:
            continue
        apply({p: fmt if p in members else "float" for p in layers})
        profile = build_sensitivity_profile(model, eval_fn, mode="enable_one", higher_is_better=higher_is_better,
                                            layers=members, print_table=False, progress=progress)
        for row in profile.rows:
            deltas[row.layer][fmt] = row.delta_vs_float
    apply({p: "float" for p in layers})
    with disable_quantization(model):  # every quantizer off (pooling and Add inputs too): the float model
        float_metric = float(eval_fn(model))

    # 3. cheapest start, then the best metric-per-cost moves until within tolerance
    def cheapest(p: str) -> str:
        return min(cands[p], key=lambda f: (costs[f], -sign * deltas[p].get(f, -sign * math.inf)))

    assignment = {p: cheapest(p) for p in layers}
    def alone(p: str) -> str:
        return ", ".join(f"{f} {deltas[p][f]:+.4g}" for f in cands[p] if f != "float")

    def no_fp8(p: str) -> str:
        return (f"; FP8 not offered ({fp8_fallback} instead): TensorRT has no FP8 kernel for it, {excluded[p]}"
                if p in excluded else "")

    reasons = {p: f"cheapest ({costs[assignment[p]]:g}/FLOP; ties go to the least sensitive); metric change with "
                  f"only this layer quantized: {alone(p)}{no_fp8(p)}" for p in layers}
    apply(assignment)
    metric = float(eval_fn(model))
    steps = [f"start: every layer in its cheapest format {_counts(assignment)}: metric {metric:.6g}"]

    def within(m: float) -> bool:
        return sign * (float_metric - m) <= tolerance

    while not within(metric):
        best = None
        for p, fmt in assignment.items():
            now = deltas[p].get(fmt, 0.0)
            for other in cands[p]:
                gain = sign * (deltas[p].get(other, 0.0) - now)
                if other == fmt or gain <= 0:
                    continue
                extra = share[p] * (costs[other] - costs[fmt])
                score = gain / max(extra, 1e-9)
                if best is None or score > best[0]:
                    best = (score, p, other, gain, extra)
        if best is None:
            break
        _, p, other, gain, extra = best
        before = assignment[p]
        assignment[p] = other
        apply({p: other})
        metric = float(eval_fn(model))
        reasons[p] = (f"{other} instead of {before} (step {len(steps)}): best metric per cost; with only this layer "
                      f"quantized: {alone(p)}; cost {extra:+.4f}{no_fp8(p)}")
        steps.append(f"{p}: {before} -> {other} (gains {gain:.4g} alone for {extra:+.4f} cost): metric {metric:.6g}")
    met = within(metric)
    if not met:
        logger.warning("format search: metric %.4f is still beyond %g of float %.4f after every move", metric,
                       tolerance, float_metric)
    cost = sum(share[p] * costs[f] for p, f in assignment.items())
    choices = [FormatChoice(p, assignment[p], share[p], share[p] * costs[assignment[p]], dict(deltas[p]), reasons[p],
                            excluded.get(p)) for p in layers]
    return FormatSearchReport(float_metric, metric, tolerance, cost, met, choices, steps, costs)


def _counts(assignment: Mapping[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in assignment.values():
        out[f] = out.get(f, 0) + 1
    return out
