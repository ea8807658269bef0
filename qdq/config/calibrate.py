"""Calibrating a model prepared by :func:`~qdq.config.apply_quant_config`, each quantizer as its entry says."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from qdq.calib import HistogramCalibrator, MaxCalibrator
from qdq.calibrate.model import CalibrationReport, collect_stats, load_amax
from qdq.config.apply import quantizer_roles, skip_rules, skipped_by
from qdq.config.schema import Problems, QuantConfigError, checked_config, descriptor_of, layer_path, resolve_section
from qdq.nn.modules._utils import QuantInputMixin, QuantMixin
from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.math.descriptor import QuantDescriptor

__all__ = ["calibrate_from_config"]

logger = logging.getLogger(__name__)


def _amax_kwargs(desc: QuantDescriptor) -> dict[str, Any]:
    """The ``load_calib_amax`` arguments of a descriptor: its search and the search's parameters."""
    if desc.search is None:
        return {} if desc.calib_method == "max" else {"method": "max"}
    return {"method": desc.search, **{k: v for k, v in desc.calib_args.items() if k != "num_bins"}}


def _differences(label: str, want: QuantDescriptor, q: TensorQuantizer) -> list[str]:
    have = q.quant_desc.dict()
    return [f"{label}.{key}: {value!r} in the config, {have[key]!r} in {q.name}"
            for key, value in want.dict().items() if key != "name" and have[key] != value]


def calibrate_from_config(
    model: nn.Module,
    data: Iterable | Callable[[nn.Module], Any],
    config: str | os.PathLike | Mapping[str, Any] | Any,
    *,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    preprocess: Callable[[Any], Any] | None = None,
    strict: bool = True,
    progress: bool = True,
) -> CalibrationReport:
    """Calibrates a model prepared by :func:`~qdq.config.apply_quant_config`, each quantizer as its entry says.

    The model's quantizers are checked against the config first (their descriptors and calibrators; every
    mismatch named). Statistics are collected once for the whole model (:func:`qdq.calibrate.collect_stats`
    without ``method``: each quantizer collects with the calibrator its descriptor gave it, nothing is replaced);
    then each quantizer's amax is computed with its entry's ``calib_method`` and ``calib_args``. Quantizers outside
    the configured layers (e.g. a QuantAdd of a forward patch) use their own calibrator, histogram ones with the
    search of the global ``input`` section when their descriptor names none.

    Args:
        model: the model :func:`~qdq.config.apply_quant_config` converted with this config.
        data: batches or a forward loop, as for :func:`qdq.calibrate_model`.
        config: the same config (path or dict), or the :class:`~qdq.config.QuantizeReport` of
            :func:`~qdq.config.apply_quant_config`.
        num_batches: batches to feed (default: the config's ``global.num_batches``).
        device: where batches go (default: the model's device).
        preprocess: ``batch -> model input``.
        strict: quantizers that see no data are an error (``False``: they are disabled, with a warning).
        progress: show a progress bar.

    Returns:
        A :class:`~qdq.calibrate.CalibrationReport` (``method`` is ``"per-layer"``).

    Raises:
        QuantConfigError: the config has problems, or the model's quantizers do not match it (the model was not
            quantized with this config); each mismatch named.
        RuntimeError: quantizers saw no data (with ``strict``), naming them.
    """
    checked, source = checked_config(config)
    if checked.problems:
        raise checked.error(source)
    glob = checked.global_
    rules = skip_rules(glob["skip_layers"])

    aliases: dict[nn.Module, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(module, []).append(path)

    def is_enabled(path: str, entry: Mapping[str, Any], layer: nn.Module | None = None) -> bool:
        # as apply_quant_config decides: skip_layers keeps a layer in float when a pattern matches every path of it
        return entry.get("enabled", not skipped_by(rules, aliases[layer] if layer is not None else [path]))

    wanted: dict[TensorQuantizer, tuple[str, QuantDescriptor]] = {}
    mismatches: list[str] = []
    layer_paths: set[str] = set()
    for path, layer in model.named_modules():
        if not isinstance(layer, (QuantMixin, QuantInputMixin)):
            continue
        layer_paths.add(path)
        entry = checked.layers.get(path, {})
        where = layer_path(path)
        enabled = is_enabled(path, entry, layer)
        for role, q in quantizer_roles(layer):
            if not enabled:
                if q.is_enabled:
                    mismatches.append(f"{where}: disabled in the config, but {q.name} is enabled")
                continue
            label = f"{where}.{role}"
            section = resolve_section(entry.get(role, {}), glob[role], label, Problems())
            if section is None:
                continue
            desc = descriptor_of(section)
            mismatches += _differences(label, desc, q)
            want = MaxCalibrator if desc.calib_method == "max" else HistogramCalibrator
            if not isinstance(q.calibrator, want):
                mismatches.append(f"{label}.calib_method: {desc.calib_method!r} needs a {want.__name__}, {q.name} "
                                  f"has {'no calibrator' if q.calibrator is None else 'a ' + type(q.calibrator).__name__}")
            if q in wanted:
                if wanted[q][1] != desc:
                    logger.warning("%s is shared by %s and %s with different settings; those of %s are used",
                                   q.name, wanted[q][0], path, wanted[q][0])
                continue
            wanted[q] = (path, desc)
    for path, entry in checked.layers.items():
        if path not in layer_paths and is_enabled(path, entry):
            mismatches.append(f"{layer_path(path)}: enabled in the config, but the model has no quantized layer of "
                              "that name (run apply_quant_config with this config first)")
    if mismatches:
        raise QuantConfigError(source, [m + " - the model does not match the config" for m in mismatches])

    batches = glob["num_batches"] if num_batches is None else num_batches
    start = time.perf_counter()
    fed = collect_stats(model, data, device, batches, preprocess=preprocess, progress=progress)
    report = CalibrationReport(method="per-layer", batches=fed, collect_seconds=time.perf_counter() - start)
    start = time.perf_counter()
    outside = 0
    global_input = descriptor_of(glob["input"])

    def amax_kwargs(name: str, q: TensorQuantizer) -> dict[str, Any]:
        nonlocal outside
        if q in wanted:
            return _amax_kwargs(wanted[q][1])
        outside += 1
        own = q.quant_desc if q.quant_desc.search is not None else global_input
        return {} if isinstance(q.calibrator, MaxCalibrator) else (_amax_kwargs(own) or {"method": "max"})

    # under torch.distributed every rank sets the amax of the union of the data, as calibrate_model does
    load_amax(model, amax_kwargs, report, strict)
    if outside:
        logger.info("%d quantizers outside the configured layers were calibrated with their own descriptors (the "
                    "global input search where theirs names none)", outside)
    report.compute_seconds = time.perf_counter() - start
    logger.info("calibrated %d quantizers per layer on %d batches", report.calibrated, fed)
    return report
