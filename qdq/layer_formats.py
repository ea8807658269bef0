"""Formats per layer (INT8, FP8, INT4 weight-only, float) and a search that picks one per layer under an accuracy
budget at the lowest estimated cost.

A layer's format sets both of its quantizers:

===========  ====================================  ===========================================================
format       input quantizer                       weight quantizer
===========  ====================================  ===========================================================
``int8``     8-bit per tensor                      8-bit per channel (the layer class's default axis)
``fp8``      FP8 E4M3 per tensor                   FP8 E4M3 per channel (the same axis)
``int4``     disabled (weight-only)                4-bit, blocks of ``block_size`` input features (Linear only)
``float``    disabled                              disabled
===========  ====================================  ===========================================================

The input quantizer keeps its calibrator kind (max or histogram), so a model converted with histogram inputs is
calibrated with the same method in every format. New quantizers have no amax: calibrate after changing formats.

FP8 for the whole model (:func:`set_model_format` with ``"fp8"``) leaves the layers TensorRT has no FP8 kernel for
in higher precision (``fp8_fallback``, float by default), as ModelOpt's FP8 mode does (its rule, in
:func:`fp8_exclusion`): convolutions with at most :data:`FP8_MIN_CHANNELS` input channels per group or output
channels (every depthwise convolution, a 3-channel stem) or a kernel of more than :data:`FP8_MAX_KERNEL_AREA`
elements, and Linear layers with fewer than 16 input or output features. On EfficientNet-Lite0 this is also what
accuracy asks for. E4M3's 3 mantissa bits give every tensor about 32 dB SQNR (INT8 per channel: 40-51 dB on its
weights), and a depthwise convolution, whose 9 or 25 weights per channel nearly cancel, turns that into 20-40 dB at
its output; with max calibration, on the 400 evaluation images of the ImageNet sample (fp32 88.25%, INT8 88.50%),
FP8 on every layer gives 83.00% and this default 89.25% (``benchmarks/bench_formats.py``).

The search (:func:`search_formats`):

1. calibrates every layer in every candidate format once (the statistics are those of the float activations, so a
   layer's amax does not depend on its neighbours' formats, and switching formats afterwards swaps calibrated
   quantizers without calibrating again);
2. profiles each format with :func:`qdq.sensitivity.build_sensitivity_profile` (``mode="enable_one"``: the metric
   with only that layer quantized in that format);
3. starts every layer in its cheapest format (ties: the least sensitive one) and, while the metric is beyond
   ``tolerance`` of float, moves the one layer whose next format buys the most metric per unit of cost (the
   profiles' difference over the cost difference), evaluating the whole model after each move;
4. reports every layer's format and why, and the steps it took.

FP8 is not offered to the layers TensorRT has no FP8 kernel for (:func:`fp8_exclusion`: depthwise and <=16-channel
convolutions, small Linear layers): they choose among the other formats, with ``fp8_fallback`` (float by default,
or ``"int8"``) offered in FP8's place, and the report names the exclusion in their reason (``fp8_fallback=None``
offers FP8 everywhere, as :func:`set_model_format` does).

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

Example:
    >>> import torch
    >>> import qdq
    >>> from qdq.layer_formats import layer_formats, set_layer_format
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 64))
    >>> _ = qdq.replace_to_quantization_module(model)
    >>> set_layer_format(model, "0", "fp8")
    >>> set_layer_format(model, "2", "int4", block_size=32)
    >>> layer_formats(model)
    {'0': 'fp8', '2': 'int4'}
    >>> _ = qdq.calibrate_model(model, [torch.randn(2, 3, 8, 8)], progress=False)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from qdq.calibrate import calibrate_model
from qdq.formats import BLOCK_SIZES, FORMAT_NAMES, is_fp8
from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.quant_modules import name_quantizers
from qdq.sensitivity import build_sensitivity_profile
from qdq.switches import disable_quantization, preserved_modes
from qdq.tensor_quant import QuantDescriptor

__all__ = [
    "FORMAT_COSTS",
    "FP8_MIN_CHANNELS",
    "FP8_MAX_KERNEL_AREA",
    "fp8_exclusion",
    "format_layers",
    "layer_formats",
    "set_layer_format",
    "set_model_format",
    "layer_flops",
    "search_formats",
    "FormatSearchReport",
    "FormatChoice",
]

logger = logging.getLogger(__name__)

#: Cost per FLOP of each format relative to float16 (see the module docstring for the reasons).
FORMAT_COSTS: dict[str, float] = {"float": 1.0, "int8": 0.5, "fp8": 0.5, "int4": 0.85}


#: Convolutions with at most this many input channels per group or output channels stay out of FP8 (and Linear
#: layers with fewer input or output features): ModelOpt's FP8 rule for TensorRT's FP8 convolution kernels.
FP8_MIN_CHANNELS = 16
#: Convolutions whose kernel has more elements than this stay out of FP8 (ModelOpt's FP8 rule).
FP8_MAX_KERNEL_AREA = 32


def fp8_exclusion(layer: nn.Module) -> str | None:
    """Why TensorRT would not run ``layer`` in FP8, or ``None`` when it would (convolutions and Linear layers).

    >>> fp8_exclusion(torch.nn.Conv2d(32, 32, 3, groups=32))
    '1 input channels per group (FP8 convolutions need more than 16)'
    >>> fp8_exclusion(torch.nn.Conv2d(32, 64, 1)) is None
    True
    """
    if isinstance(layer, nn.modules.conv._ConvNd):
        per_group = layer.in_channels // layer.groups
        if per_group <= FP8_MIN_CHANNELS:
            return f"{per_group} input channels per group (FP8 convolutions need more than {FP8_MIN_CHANNELS})"
        if layer.out_channels <= FP8_MIN_CHANNELS:
            return f"{layer.out_channels} output channels (FP8 convolutions need more than {FP8_MIN_CHANNELS})"
        area = math.prod(layer.kernel_size)
        if area > FP8_MAX_KERNEL_AREA:
            return f"a {area}-element kernel (FP8 convolutions take at most {FP8_MAX_KERNEL_AREA})"
    elif isinstance(layer, nn.Linear) and min(layer.in_features, layer.out_features) < FP8_MIN_CHANNELS:
        return (f"{layer.in_features} input and {layer.out_features} output features (FP8 GEMMs need at least "
                f"{FP8_MIN_CHANNELS})")
    return None


def _quantizer_attrs(layer: nn.Module) -> tuple[str | None, str | None]:
    has = lambda attr: isinstance(getattr(layer, attr, None), TensorQuantizer)  # noqa: E731
    return ("_input_quantizer" if has("_input_quantizer") else None,
            "_weight_quantizer" if has("_weight_quantizer") else None)


def format_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: layer}`` of the layers whose format can be set: those with an input and a weight quantizer."""
    return {path: m for path, m in model.named_modules() if all(_quantizer_attrs(m))}


def _format_of(layer: nn.Module) -> str:
    iq, wq = (getattr(layer, a) for a in _quantizer_attrs(layer))
    if not wq.is_enabled:
        return "float"
    if is_fp8(wq.num_bits):
        return "fp8"
    if wq.num_bits == 4 and not iq.is_enabled:
        return "int4"
    return f"int{wq.num_bits}"


def layer_formats(model: nn.Module) -> dict[str, str]:
    """``{layer path: format}`` for every layer :func:`format_layers` lists."""
    return {path: _format_of(layer) for path, layer in format_layers(model).items()}


def _check_format(fmt: str, path: str, layer: nn.Module, block_size: int) -> None:
    if fmt not in FORMAT_NAMES:
        raise ValueError(f"layer {path!r}: unknown format {fmt!r}; choose one of {', '.join(FORMAT_NAMES)}")
    if fmt != "int4":
        return
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"layer {path!r} ({type(layer).__name__}): INT4 weight-only is for Linear layers "
                         "(TensorRT runs it on MatMul/Gemm, not on convolutions)")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"layer {path!r}: block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    if layer.in_features % block_size:
        raise ValueError(f"layer {path!r}: {layer.in_features} input features are not a multiple of block_size "
                         f"{block_size}")


def _descriptors(fmt: str, iq: TensorQuantizer, wq: TensorQuantizer, block_size: int):
    calib = {"calib_method": iq.quant_desc.calib_method, "calib_args": iq.quant_desc.calib_args}
    if fmt == "int8":
        return QuantDescriptor(8, **calib), QuantDescriptor(8, axis=wq.axis)
    if fmt == "fp8":
        return (QuantDescriptor((4, 3), **calib),
                QuantDescriptor((4, 3), axis=wq.axis))
    if fmt == "int4":
        return None, QuantDescriptor(4, axis=0, block_size=block_size)
    return None, None


def _replace_everywhere(model: nn.Module, old: TensorQuantizer, new: TensorQuantizer) -> None:
    """Puts ``new`` wherever ``old`` sits (a quantizer shared by several modules stays shared)."""
    for module in model.modules():
        for attr, child in list(module.named_children()):
            if child is old:
                setattr(module, attr, new)


def set_layer_format(model: nn.Module, layer: str, fmt: str, block_size: int = 64) -> None:
    """Gives layer ``layer`` (its path in ``model``) new quantizers of format ``fmt`` (see the module docstring).

    A quantizer shared with other modules (a scale-sharing rule) is replaced in all of them. Raises ``ValueError``
    naming the layer for an unknown layer or format, INT4 on a layer that is not Linear, or a block size that does not
    divide its input features.
    """
    layers = format_layers(model)
    if layer not in layers:
        raise ValueError(f"no layer {layer!r} with input and weight quantizers in the model "
                         f"(quantize the model first); layers: {', '.join(list(layers)[:8])}"
                         + (" ..." if len(layers) > 8 else ""))
    module = layers[layer]
    _check_format(fmt, layer, module, block_size)
    iq, wq = module._input_quantizer, module._weight_quantizer
    idesc, wdesc = _descriptors(fmt, iq, wq, block_size)
    device = next(iter(module.parameters()), torch.empty(0)).device
    new_iq = TensorQuantizer(idesc if idesc is not None else iq.quant_desc).to(device)
    new_wq = TensorQuantizer(wdesc if wdesc is not None else wq.quant_desc).to(device)
    if idesc is None:
        new_iq.disable()
    if wdesc is None:
        new_wq.disable()
    _replace_everywhere(model, iq, new_iq)
    _replace_everywhere(model, wq, new_wq)
    name_quantizers(model)


def set_model_format(model: nn.Module, fmt: str, block_size: int = 64,
                     layers: Iterable[str] | None = None, fp8_fallback: str | None = "float") -> dict[str, str]:
    """Sets ``fmt`` on every layer (or on ``layers``); returns :func:`layer_formats`.

    ``fmt="int4"`` sets INT4 weight-only on the Linear layers whose input features ``block_size`` divides and leaves
    the other layers as they are (logged). With ``fmt`` ``"int8"`` or ``"fp8"`` and no ``layers``, quantizers of
    layers without weights (pooling, Add, Concat inputs) take the format too, so that TensorRT sees one type.

    ``fmt="fp8"`` with no ``layers`` gives the layers :func:`fp8_exclusion` names (depthwise and small
    convolutions) the format ``fp8_fallback`` instead (``"float"``, or ``"int8"`` for a mixed model; logged);
    ``fp8_fallback=None`` puts every layer in FP8. Layers listed in ``layers`` get ``fmt`` as asked.

    >>> import qdq
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.Conv2d(32, 32, 3, groups=32),
    ...                             torch.nn.Conv2d(32, 64, 1))
    >>> _ = qdq.replace_to_quantization_module(model)
    >>> set_model_format(model, "fp8")
    {'0': 'float', '1': 'float', '2': 'fp8'}
    >>> set_model_format(model, "fp8", fp8_fallback=None)
    {'0': 'fp8', '1': 'fp8', '2': 'fp8'}
    """
    if fp8_fallback not in (None, "float", "int8"):
        raise ValueError(f"set_model_format: fp8_fallback must be 'float', 'int8' or None, got {fp8_fallback!r}")
    chosen = list(format_layers(model)) if layers is None else list(layers)
    skipped = []
    kept: dict[str, str] = {}
    for path in chosen:
        module = format_layers(model)[path] if path in format_layers(model) else None
        if fmt == "int4" and module is not None and not (
                isinstance(module, nn.Linear) and module.in_features % block_size == 0):
            skipped.append(path)
            continue
        why = fp8_exclusion(module) if fmt == "fp8" and layers is None and fp8_fallback and module is not None \
            else None
        if why is not None:
            kept[path] = why
            set_layer_format(model, path, fp8_fallback, block_size)
            continue
        set_layer_format(model, path, fmt, block_size)
    if kept:
        logger.info("FP8: %d layers TensorRT has no FP8 kernel for stay in %s (fp8_fallback): %s", len(kept),
                    fp8_fallback, "; ".join(f"{p}: {w}" for p, w in list(kept.items())[:8])
                    + (" ..." if len(kept) > 8 else ""))
    if layers is None and fmt in ("int8", "fp8"):  # pooling, Add, Concat inputs: the same format, not mixed
        bits = 8 if fmt == "int8" else (4, 3)
        for path, module in model.named_modules():
            iq, wq = _quantizer_attrs(module)
            q = getattr(module, iq) if iq else None
            if q is not None and wq is None and q.num_bits != bits:
                new = TensorQuantizer(q.quant_desc.replace(num_bits=bits, unsigned=False, narrow_range=False,
                                                           learn_amax=False, amax=None))
                if not q.is_enabled:
                    new.disable()
                _replace_everywhere(model, q, new.to(q.amax.device if q.amax is not None else "cpu"))
        name_quantizers(model)
    if skipped:
        logger.info("INT4 weight-only applies to Linear layers with input features divisible by %d: %d layers keep "
                    "their format (%s)", block_size, len(skipped), ", ".join(skipped[:8]))
    return layer_formats(model)


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
        model: a quantized model (after :func:`~qdq.quant_modules.replace_to_quantization_module`).
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
