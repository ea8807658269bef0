"""Helpers for training quantized models: pick parameters by name, group them for an optimizer, freeze them,
and quantize weights in place.

Patterns are regular expressions searched in parameter names (``re.search``).

>>> import torch
>>> from torch import nn
>>> from qdq.optim import helper
>>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
>>> groups = helper.group_parameters(model, [["^0\\\\."], ["^1\\\\."]], lrs=[0.1, 0.01])
>>> opt = torch.optim.SGD(groups, lr=1.0)
>>> [g["lr"] for g in opt.param_groups]
[0.1, 0.01]
>>> helper.freeze_parameters(model, ["bias"])
>>> [n for n, p in model.named_parameters() if not p.requires_grad]
['0.bias', '1.bias']
"""

from __future__ import annotations

import logging
import re
from typing import Iterable, Iterator

import torch
from torch import nn

__all__ = ["match_parameters", "group_parameters", "freeze_parameters", "quant_weight_inplace"]

logger = logging.getLogger(__name__)


def match_parameters(model: nn.Module, patterns: Iterable[str]) -> Iterator[nn.Parameter]:
    """Yields the parameters of ``model`` whose name matches any of ``patterns`` (each parameter once)."""
    patterns = [re.compile(p) for p in patterns]
    for name, param in model.named_parameters():
        if any(p.search(name) for p in patterns):
            yield param


def group_parameters(model: nn.Module, patterns_list, lrs=None, momentums=None, weight_decays=None) -> list[dict]:
    """Optimizer parameter groups, one per list of patterns (``[["conv1", "conv2"], ["fc"]]``: two groups), each
    with its ``lr``/``momentum``/``weight_decay`` when those lists are given (one value per group).

    Raises:
        TypeError: ``patterns_list`` is not a list of lists, or an option list has the wrong length.
    """
    groups = []
    for patterns in patterns_list:
        if not isinstance(patterns, list):
            raise TypeError("group_parameters: patterns_list must be list of list of patterns, got an element "
                            f"{patterns!r}")
        groups.append({"params": match_parameters(model, patterns)})
    for key, values in (("lr", lrs), ("momentum", momentums), ("weight_decay", weight_decays)):
        if values is None:
            continue
        if len(values) != len(patterns_list):
            raise TypeError(f"group_parameters: the number of {key} values ({len(values)}) must match the number of "
                            f"groups ({len(patterns_list)})")
        for group, value in zip(groups, values):
            group[key] = value
    return groups


def freeze_parameters(model: nn.Module, patterns: Iterable[str]) -> None:
    """Sets ``requires_grad=False`` on the parameters whose name matches any of ``patterns`` (logged)."""
    patterns = [re.compile(p) for p in patterns]
    for name, param in model.named_parameters():
        if any(p.search(name) for p in patterns):
            logger.warning("Freeze %s.", name)
            param.requires_grad = False


def quant_weight_inplace(model: nn.Module) -> None:
    """Replaces the weight of every quantized layer by its quantized value (``weight_quantizer(weight)``).

    With a ``fake_quant=False`` weight quantizer the weight becomes integers: only for inference (a warning says so).
    """
    for name, module in model.named_modules():
        quantizer = getattr(module, "_weight_quantizer", None)
        if quantizer is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if not quantizer.fake_quant:
            logger.warning("In-place real quantization of %s: its weight becomes integers (inference only)", name)
        logger.warning("In-place quantize weight of %s", name)
        with torch.no_grad():
            module.weight.data.copy_(quantizer(module.weight))
