"""Writing a per-layer config for a model: every layer the module map would quantize, with the descriptors given."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Iterable, Mapping

from torch import nn

from qdq._version import __version__
from qdq.config.apply import plan
from qdq.config.schema import (
    CONFIG_FORMAT,
    CONFIG_VERSION,
    DEFAULT_DESCRIPTORS,
    DEFAULT_NUM_BATCHES,
    QuantConfigError,
    check_config,
    save_quant_config,
    section_of,
)
from qdq.math.descriptor import QuantDescriptor

__all__ = ["create_quant_config"]

logger = logging.getLogger(__name__)

#: The keywords of qdq 0.1's create_quant_config, still taken (with a DeprecationWarning) and what they became.
_OLD_KEYWORDS = {
    "batch_num": "num_batches=",
    "activation_calib": "input=QuantDescriptor(calib_method=...)",
    "weight_calib": "weight=QuantDescriptor(calib_method=...)",
    "num_bits": "input=/weight=QuantDescriptor(num_bits=...)",
    "weight_num_bits": "weight=QuantDescriptor(num_bits=...)",
    "per_channel": "weight=QuantDescriptor(axis=0 or None)",
    "symmetric": "input=/weight=QuantDescriptor(symmetric=...)",
    "narrow_range": "input=/weight=QuantDescriptor(narrow_range=...)",
    "percentile": "QuantDescriptor(calib_args={'percentile': ...})",
    "num_bins": "QuantDescriptor(calib_args={'num_bins': ...})",
}


def _old_descriptors(old: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``input`` and ``weight`` sections the keywords of qdq 0.1 describe."""
    bits = old.get("num_bits", 8)

    def section(method: Any, num_bits: Any, axis: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"num_bits": num_bits, "calib_method": method, "axis": axis,
                               "symmetric": old.get("symmetric", True), "narrow_range": old.get("narrow_range", False)}
        args = {}
        if isinstance(method, str) and method not in ("max",):
            args["num_bins"] = old.get("num_bins", 2048)
            if method == "percentile":
                args["percentile"] = old.get("percentile", 99.99)
        out["calib_args"] = args
        return out

    weight_bits = old.get("weight_num_bits") if old.get("weight_num_bits") is not None else bits
    return (section(old.get("activation_calib", "max"), bits, None),
            section(old.get("weight_calib", "max"), weight_bits, 0 if old.get("per_channel", True) else None))


def _as_section(value: Any, role: str) -> Any:
    if value is None:
        return section_of(DEFAULT_DESCRIPTORS[role])
    if isinstance(value, QuantDescriptor):
        return section_of(value)
    return value  # a dict: checked as a tensor section of the file


def create_quant_config(
    path: str | os.PathLike | None,
    model: nn.Module,
    skip_layers: Iterable[str] = (),
    num_batches: int | None = DEFAULT_NUM_BATCHES,
    *,
    input: QuantDescriptor | Mapping[str, Any] | None = None,  # noqa: A002 - the section's name in the file
    weight: QuantDescriptor | Mapping[str, Any] | None = None,
    quant_map: Any = None,
    **old: Any,
) -> dict[str, Any]:
    """Writes a quantization config listing every layer of ``model`` the module map would quantize.

    Every entry is complete (``type``, ``enabled`` and the descriptor of ``input`` and ``weight``), so the file
    shows what each layer gets and any key can be edited in place. The model is not changed.

    Args:
        path: the JSON file to write (folders are created); ``None`` only returns the config.
        model: the float model (layers that are already quantized are listed too).
        skip_layers: layers to keep in float: names or regular expressions (see
            :func:`qdq.transform.ignore_policy.compile_ignore_policy`); written to ``global.skip_layers`` and as
            ``"enabled": false`` on the layers they match. Each must match a layer.
        num_batches: calibration batches (``global.num_batches``); ``None`` for all of the data.
        input: the descriptor of every layer's input (``global.input``; default: 8-bit per tensor, max), e.g.
            ``QuantDescriptor(calib_method="entropy")``; a dict is read as a tensor section of the file.
        weight: the descriptor of every layer's weight (``global.weight``; default: 8-bit, per channel, max).
        quant_map: extra ``{float class: quantized class}`` pairs, as for
            :func:`~qdq.transform.replace.replace_to_quantization_module` (pass the same to
            :func:`~qdq.config.apply_quant_config`).
        old: the keywords of qdq 0.1 (``batch_num``, ``activation_calib``, ``weight_calib``, ``num_bits``,
            ``weight_num_bits``, ``per_channel``, ``symmetric``, ``narrow_range``, ``percentile``, ``num_bins``):
            still taken, with a ``DeprecationWarning`` naming what replaces each; not together with ``input`` /
            ``weight``.

    Returns:
        The config (version 2), as written.

    Raises:
        QuantConfigError: an argument gives an invalid setting, or a ``skip_layers`` item matches no layer (each
            named with the JSON path it would have in the file).

    Example:
        >>> import torch
        >>> from qdq.tensor_quant import QuantDescriptor
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.AvgPool2d(2))
        >>> config = create_quant_config(None, model, input=QuantDescriptor(calib_method="percentile",
        ...                                                                 calib_args={"percentile": 99.9}))
        >>> config["layers"]["0"]["input"]
        {'num_bits': 8, 'calib_method': 'percentile', 'calib_args': {'num_bins': 2048, 'percentile': 99.9}, \
'axis': None, 'unsigned': False, 'symmetric': True, 'narrow_range': False}
        >>> sorted(config["layers"]["1"])               # a pool has no weight
        ['enabled', 'input', 'type']
    """
    unknown = sorted(set(old) - set(_OLD_KEYWORDS))
    if unknown:
        raise TypeError(f"create_quant_config got unknown keywords {unknown}")
    if isinstance(skip_layers, str):
        skip_layers = [skip_layers]
    if not isinstance(skip_layers, Iterable):
        raise TypeError(f"create_quant_config: skip_layers must be a list of layer names or patterns, got "
                        f"{skip_layers!r}")
    if old:
        if input is not None or weight is not None:
            raise TypeError(f"create_quant_config: give the descriptors (input=, weight=) or the old keywords "
                            f"{sorted(old)}, not both")
        warnings.warn("create_quant_config: " + "; ".join(f"{k}= is now {_OLD_KEYWORDS[k]}" for k in old),
                      DeprecationWarning, stacklevel=2)
        num_batches = old.pop("batch_num", num_batches)
        sections = _old_descriptors(old)
    else:
        sections = (_as_section(input, "input"), _as_section(weight, "weight"))
    config = {
        "format": CONFIG_FORMAT,
        "version": CONFIG_VERSION,
        "qdq_version": __version__,
        "model": type(model).__name__,
        "global": {"num_batches": num_batches, "skip_layers": list(skip_layers), "input": sections[0],
                   "weight": sections[1]},
        "layers": {},
    }
    source = "built by create_quant_config"
    checked = check_config(config)
    if checked.problems:
        raise QuantConfigError(source, checked.problems.items)
    the_plan, problems = plan(model, checked, strict=False, quant_map=quant_map)
    if the_plan is None:
        raise QuantConfigError(source, problems)
    config["global"] = the_plan.config["global"]
    config["layers"] = the_plan.config["layers"]
    for where, why in the_plan.unsupported.items():
        logger.warning("not listed in the config (cannot be quantized): %s: %s", where, why)
    quantized = sum(the_plan.enabled.values())
    logger.info("quantization config of %s: %d layers, %d to quantize, %d kept in float", type(model).__name__,
                len(the_plan.layers), quantized, len(the_plan.layers) - quantized)
    if path is not None:
        save_quant_config(config, path)
    return config
