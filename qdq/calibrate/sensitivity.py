"""Per-layer sensitivity to quantization, and automatic skipping of the most sensitive layers.

A *layer* here is a module that owns quantizers (``conv1`` owns ``conv1._input_quantizer`` and
``conv1._weight_quantizer``). ``eval_fn(model) -> float`` is the user's metric (accuracy, mAP, negative loss...).

* ``mode="disable_one"``: from the quantized model, disable one layer at a time; the layers whose float version
  wins back the most are the most sensitive.
* ``mode="enable_one"``: from the float model, enable one layer at a time (the BEVFusion-style profile); the layers
  that lose the most are the most sensitive.

Example:
    >>> import torch
    >>> from qdq import nn as quant_nn
    >>> from qdq.transform.switches import disable_quantization
    >>> model = torch.nn.Sequential(quant_nn.QuantLinear(4, 4), quant_nn.QuantLinear(4, 2))
    >>> model[0].weight_quantizer.amax = 1e-3       # a fragile layer: its weights are crushed
    >>> x = torch.randn(64, 4)
    >>> with torch.no_grad(), disable_quantization(model):
    ...     ref = model(x)
    >>> def metric(m):
    ...     with torch.no_grad():
    ...         return -float(((m(x) - ref) ** 2).mean())
    >>> profile = build_sensitivity_profile(model, metric, print_table=False, progress=False)
    >>> profile.rows[0].layer
    '0'
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

from torch import nn
from tqdm.auto import tqdm

from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.transform.replace import name_quantizers
from qdq.transform.switches import restore_quantizer_states, save_quantizer_states

__all__ = ["quantized_layers", "build_sensitivity_profile", "auto_skip_sensitive_layers", "SensitivityProfile",
           "SensitivityRow"]

logger = logging.getLogger(__name__)


def quantized_layers(model: nn.Module, enabled_only: bool = True) -> dict[str, list[TensorQuantizer]]:
    """``{layer path: its quantizers}`` for every module owning quantizers (directly or in a ModuleList).

    A quantizer shared by several layers is listed under the first. With ``enabled_only``, disabled quantizers are
    left out (and layers without an enabled one).
    """
    seen: set[int] = set()
    layers: dict[str, list[TensorQuantizer]] = {}
    for path, module in model.named_modules():
        if isinstance(module, (TensorQuantizer, nn.ModuleList)):
            continue
        owned = []
        for child in module.children():
            group = child if isinstance(child, nn.ModuleList) else [child]
            owned += [q for q in group if isinstance(q, TensorQuantizer)]
        owned = [q for q in owned if id(q) not in seen and (q.is_enabled or not enabled_only)]
        seen.update(id(q) for q in owned)
        if owned:
            layers[path] = owned
    return layers


@dataclass
class SensitivityRow:
    layer: str
    metric: float
    delta_vs_float: float
    delta_vs_quantized: float


@dataclass
class SensitivityProfile:
    """Rows sorted from the most to the least sensitive layer."""

    mode: str
    float_metric: float
    quantized_metric: float
    rows: list[SensitivityRow] = field(default_factory=list)

    def table(self) -> str:
        what = "only this layer float" if self.mode == "disable_one" else "only this layer quantized"
        width = max([len("layer")] + [len(r.layer) for r in self.rows])
        lines = [
            f"sensitivity ({self.mode}): float {self.float_metric:.4f}, fully quantized {self.quantized_metric:.4f}",
            f"{'rank':>4}  {'layer':<{width}}  {what:>26}  {'vs float':>9}  {'vs quantized':>12}",
        ]
        for i, r in enumerate(self.rows, 1):
            lines.append(
                f"{i:>4}  {r.layer:<{width}}  {r.metric:>26.4f}  {r.delta_vs_float:>+9.4f}  {r.delta_vs_quantized:>+12.4f}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _evaluate(eval_fn: Callable[[nn.Module], float], model: nn.Module, setting: str) -> float:
    """``eval_fn(model)`` as a float; NaN (which no ranking can order) or a non-number is an error naming the setting.

    Infinities are metrics (the SQNR of the float model against itself is +inf)."""
    value = eval_fn(model)
    try:
        metric = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"eval_fn must return a number; with {setting} it returned {value!r}") from None
    if math.isnan(metric):
        raise ValueError(f"eval_fn returned NaN with {setting}; NaN metrics cannot be ranked "
                         "(check the evaluation data and the model's outputs for NaN/Inf)")
    return metric


def _set(quantizers: list[TensorQuantizer], on: bool) -> None:
    for q in quantizers:
        q.enable() if on else q.disable()


def build_sensitivity_profile(
    model: nn.Module,
    eval_fn: Callable[[nn.Module], float],
    mode: str = "disable_one",
    higher_is_better: bool = True,
    layers: list[str] | None = None,
    print_table: bool = True,
    progress: bool = True,
) -> SensitivityProfile:
    """Evaluates ``model`` with one layer at a time changed; returns (and prints) the sorted profile.

    The quantized model is the model as given (its enabled quantizers). Every quantizer switch is restored afterwards.

    Args:
        model: a quantized, calibrated model.
        eval_fn: ``model -> metric``.
        mode: ``"disable_one"`` or ``"enable_one"`` (see the module docstring).
        higher_is_better: the metric's direction (``False`` for a loss).
        layers: restrict the profile to these layer paths.
    """
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be a callable model -> metric, got {eval_fn!r}")
    if mode not in ("disable_one", "enable_one"):
        raise ValueError(f"mode must be 'disable_one' or 'enable_one', got {mode!r}")
    name_quantizers(model)
    owned = quantized_layers(model)
    if isinstance(layers, str):
        raise TypeError(f"layers must be a list of layer paths, got the string {layers!r} (write [{layers!r}])")
    if layers is not None:
        unknown = sorted(set(layers) - set(owned))
        if unknown:
            raise ValueError(f"no enabled quantizers in layers {unknown}")
        owned = {k: owned[k] for k in layers}
    if not owned:
        raise RuntimeError("the model has no enabled quantizers to profile")
    all_q = [q for qs in owned.values() for q in qs]
    states = save_quantizer_states(model)
    sign = 1.0 if higher_is_better else -1.0
    try:
        _set(all_q, False)
        float_metric = _evaluate(eval_fn, model, "every layer float")
        _set(all_q, True)
        quant_metric = _evaluate(eval_fn, model, "every layer quantized")
        rows = []
        for layer, qs in tqdm(owned.items(), desc=f"Sensitivity ({mode})", unit="layer", disable=not progress):
            if mode == "disable_one":
                _set(qs, False)
                metric = _evaluate(eval_fn, model, f"layer {layer!r} float")
                _set(qs, True)
            else:
                _set(all_q, False)
                _set(qs, True)
                metric = _evaluate(eval_fn, model, f"only layer {layer!r} quantized")
            rows.append(SensitivityRow(layer, metric, metric - float_metric, metric - quant_metric))
    finally:
        restore_quantizer_states(states)
    if mode == "disable_one":  # most sensitive = best metric when it alone is float
        rows.sort(key=lambda r: -sign * r.delta_vs_quantized)
    else:  # most sensitive = worst metric when it alone is quantized
        rows.sort(key=lambda r: sign * r.delta_vs_float)
    profile = SensitivityProfile(mode, float_metric, quant_metric, rows)
    if print_table:
        print(profile.table())
    return profile


def auto_skip_sensitive_layers(
    model: nn.Module,
    eval_fn: Callable[[nn.Module], float],
    tolerance: float,
    higher_is_better: bool = True,
    profile: SensitivityProfile | None = None,
    max_layers: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Disables the most sensitive layers, one by one, until the metric is within ``tolerance`` of float.

    Returns the layers it disabled (they stay disabled). Uses ``profile`` (a ``disable_one`` profile) or builds one.
    Logs a warning if ``max_layers`` (or every layer) was disabled without reaching the tolerance.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0 \
            or math.isinf(tolerance):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if max_layers is not None and (isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 0):
        raise ValueError(f"max_layers must be None or an int >= 0, got {max_layers!r}")
    sign = 1.0 if higher_is_better else -1.0
    if profile is None:
        profile = build_sensitivity_profile(model, eval_fn, "disable_one", higher_is_better, print_table=False,
                                            progress=progress)
    owned = quantized_layers(model)

    def close_enough(metric: float) -> bool:
        return sign * (profile.float_metric - metric) <= tolerance

    metric = profile.quantized_metric
    disabled: list[str] = []
    for row in profile.rows:
        if close_enough(metric) or (max_layers is not None and len(disabled) >= max_layers):
            break
        if row.layer not in owned:
            continue
        _set(owned[row.layer], False)
        disabled.append(row.layer)
        metric = _evaluate(eval_fn, model, f"layer {row.layer!r} disabled")
        logger.info("disabled %s: metric %.4f (float %.4f)", row.layer, metric, profile.float_metric)
    if not close_enough(metric):
        logger.warning("after disabling %d layers the metric is %.4f, still beyond %.4f of float %.4f",
                       len(disabled), metric, tolerance, profile.float_metric)
    return disabled
