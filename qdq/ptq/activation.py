"""The activation that follows a layer, found in the model's graph: what AdaRound reconstructs through.

A layer whose output goes only into a clipping activation (``ReLU``, ``ReLU6``, ``Hardtanh``, ``LeakyReLU``, the
per-channel clamp :func:`qdq.equalize` leaves) needs the activation's output reproduced, not its own: an error in
what the activation clips reaches nothing. :func:`following_activations` traces the model with torch.fx (layers
and quantized modules kept whole), follows each layer's output through ``Identity`` and ``Dropout`` (a folded
BatchNorm becomes an ``Identity``) and returns, per layer, a pure function computing that activation (never in
place: it is applied to captured tensors). A layer whose output has another user as well (a residual, a concat)
gets none: the other user sees the clipped values too.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Identity(), nn.ReLU6(inplace=True), nn.Conv2d(4, 2, 1))
    >>> found = following_activations(model, ["0", "3"])
    >>> sorted(found)
    ['0']
    >>> found["0"].name, found["0"](torch.tensor([-1.0, 3.0, 9.0])).tolist()
    ('2', [0.0, 3.0, 6.0])
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from qdq.ptq.equalize import ChannelClamp, _Tracer

__all__ = ["Activation", "following_activations"]

logger = logging.getLogger(__name__)

_PASS = (nn.Identity, nn.Dropout)


@dataclass(frozen=True)
class Activation:
    """A layer's activation: ``name`` (its module path, or the function's name) and ``fn``, out of place."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _module_fn(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if isinstance(m, nn.ReLU):
        return torch.relu
    if isinstance(m, nn.ReLU6):
        return functools.partial(F.hardtanh, min_val=0.0, max_val=6.0)
    if isinstance(m, nn.Hardtanh):
        return functools.partial(F.hardtanh, min_val=float(m.min_val), max_val=float(m.max_val))
    if isinstance(m, nn.LeakyReLU):
        return functools.partial(F.leaky_relu, negative_slope=float(m.negative_slope))
    if isinstance(m, ChannelClamp):
        return m  # its forward is out of place
    return None


def _function_fn(node: fx.Node) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if len(node.args) != 1 or node.kwargs.get("inplace"):
        return None
    if node.target in (torch.relu, F.relu):
        return torch.relu
    if node.target is F.relu6:
        return functools.partial(F.hardtanh, min_val=0.0, max_val=6.0)
    return None


def following_activations(model: nn.Module, layers: Iterable[str]) -> dict[str, Activation]:
    """``{layer: Activation}`` for the ``layers`` (dotted names) whose output goes only into a clipping activation.

    A model torch.fx cannot trace gives an empty result and a warning (nothing is reconstructed through an
    activation)."""
    layers = set(layers)
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx raises many kinds on untraceable Python
        logger.warning("following_activations: the model does not trace with torch.fx (%s: %s); no layer is "
                       "reconstructed through its activation", type(err).__name__, str(err).splitlines()[0])
        return {}
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    found: dict[str, Activation] = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in layers or calls[node.target] != 1:
            continue
        nxt = node
        while len(nxt.users) == 1:
            nxt = next(iter(nxt.users))
            if not (nxt.op == "call_module" and isinstance(modules[nxt.target], _PASS)):
                break
        else:
            continue  # no single user
        if nxt is node:
            continue
        if nxt.op == "call_module":
            fn, name = _module_fn(modules[nxt.target]), nxt.target
        elif nxt.op == "call_function":
            fn, name = _function_fn(nxt), getattr(nxt.target, "__name__", str(nxt.target))
        else:
            fn = None
        if fn is not None:
            found[node.target] = Activation(name, fn)
    return found
