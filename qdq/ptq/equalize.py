"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"): the float model, rescaled so that the
weight ranges of consecutive layers match, computes the same function and quantizes better.

For two layers with a positively homogeneous activation between them (``ReLU``, ``LeakyReLU``, none), scaling
output channel ``c`` of the first layer by ``1 / s[c]`` and input channel ``c`` of the second by ``s[c]`` leaves
the output unchanged. With ``r1[c]`` the abs-max of the first layer's channel and ``r2[c]`` that of the second's,
``s = sqrt(r1 * r2) / r2`` gives both ranges ``sqrt(r1 * r2)``: no channel has a tiny range next to a huge one, so
per-tensor weight quantization loses far less (and per-channel activations of depthwise convolutions behave).
Chains (``pointwise -> depthwise -> pointwise``) are equalized pair by pair, repeatedly, until the scales settle.

The activation between the layers is scaled by ``1 / s`` too: equalization moves the spread of the weights into
the activations, which per-tensor activation quantizers pay for. ``strength`` applies ``s **
strength`` instead of the settled scales (``1``: equalized, the paper; ``0``: unchanged): with per-tensor weights
*and* per-tensor activations a partial equalization can beat both ends (EfficientNet-Lite0, per-tensor W8A8 on
the ImageNet sample: 84.0% top-1 unequalized, 84.8% equalized, 88.5% at ``strength=0.5``; fp32 88.1%).

:func:`equalize` does, in order:

1. **BatchNorm folding** (:func:`qdq.fold_bn`): the weights that matter are the folded ones. The norms' ``beta``
   and ``gamma`` are kept for step 4.
2. **Finding the pairs** by tracing the model (torch.fx): ``conv/linear -> [Identity|Dropout] -> activation ->
   [Identity|Dropout] -> conv/linear`` where each output feeds only the next node, and the channel counts match.
   Depthwise and grouped convolutions are handled (the second layer's input channels are taken group by group).
3. **Scaling**, in float64.
4. **High-bias absorption** (``absorb_high_bias=True``): where the activation is a ReLU (or a clamped ReLU6) and
   the first layer's pre-activation is ``N(beta, gamma)`` by its folded BatchNorm, ``a = max(0, beta - 3 gamma)`` is
   moved from its bias into the next layer's (``b2 += W2 a``): the activation range shrinks by ``a`` for the
   quantizer. This is the paper's step and is exact only for pre-activations above ``beta - 3 gamma`` (99.87% of a
   Gaussian); it is applied only where the next layer has no padding (at a padded border ``W2 a`` would be wrong).

ReLU6
-----
``relu6(x / s) != relu6(x) / s``: a ReLU6 between two scaled layers needs its bound scaled per channel. With
``relu6="clamp"`` (the default) it is replaced by :class:`ChannelClamp` ``(x.clamp(min=0)).minimum(bound[c])``,
which keeps the model exactly equal (it exports as Relu and Min with a constant). ``relu6="relu"`` replaces it by a
plain ReLU (what the paper and AIMET do for MobileNetV2: the model changes where a pre-activation exceeds 6),
``relu6="skip"`` leaves such pairs alone.

Run it on the float model, or on a replaced model before calibration (a quantizer that already has an amax would be
stale: that is an error naming it). It uses no data.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    >>> with torch.no_grad():
    ...     model[0].weight[:4] *= 20                       # four channels with a 20x larger range
    >>> x = torch.randn(2, 3, 8, 8)
    >>> expected = model(x)
    >>> spread = lambda w: float(w.detach().abs().flatten(1).amax(1).max() / w.detach().abs().flatten(1).amax(1).min())
    >>> before = spread(model[0].weight)
    >>> report = equalize(model, absorb_high_bias=False)
    >>> report.pairs
    [('0', '2', '3')]
    >>> torch.allclose(model(x), expected, rtol=1e-4, atol=1e-5)
    True
    >>> spread(model[0].weight) < before / 3           # the channel ranges of the first layer closer together
    True
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import Conv1d, Conv2d, Conv3d
from torch.nn.modules.linear import Linear

from qdq.transform.fold_batchnorm import _LeafTracer, fold_bn
from qdq.transform.switches import quantizers

__all__ = ["equalize", "EqualizeReport", "ChannelClamp"]

logger = logging.getLogger(__name__)

_LAYERS = (Conv1d, Conv2d, Conv3d, Linear)
_PASS = (nn.Identity, nn.Dropout)
_RELU6_MODES = ("clamp", "relu", "skip")


class ChannelClamp(nn.Module):
    """``min(max(x, 0), bound[c])`` along ``dim``: a ReLU6 whose bound equalization scaled per channel.

    >>> ChannelClamp(torch.tensor([6.0, 1.0]))(torch.tensor([[-1.0, 3.0]])).tolist()
    [[0.0, 1.0]]
    """

    def __init__(self, bound: torch.Tensor, dim: int = 1):
        super().__init__()
        self.dim = dim
        self.register_buffer("bound", torch.as_tensor(bound, dtype=torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channel_clamp(x, self.bound, self.dim)


def _channel_clamp(x: torch.Tensor, bound: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[dim % x.dim()] = -1
    return torch.minimum(torch.relu(x), bound.reshape(shape).to(x.dtype))


fx.wrap("_channel_clamp")  # one call in torch.fx graphs: its shape arithmetic needs the tensor's rank


class _Tracer(_LeafTracer):
    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return isinstance(m, ChannelClamp) or super().is_leaf_module(m, name)


@dataclass
class EqualizeReport:
    """What :func:`equalize` did.

    Attributes:
        pairs: ``(first layer, activation or "", second layer)`` equalized, in forward order.
        scale_range: per first layer, the smallest and largest channel scale applied.
        absorbed: per first layer, the largest bias moved into the next layer.
        not_equalized: ``(layer, reason)`` for the conv/linear layers with a follower that were left alone.
        folded: the ``(layer, norm)`` pairs folded first.
        rounds: the equalization rounds run.
    """

    pairs: list[tuple[str, str, str]] = field(default_factory=list)
    scale_range: dict[str, tuple[float, float]] = field(default_factory=dict)
    absorbed: dict[str, float] = field(default_factory=dict)
    not_equalized: list[tuple[str, str]] = field(default_factory=list)
    folded: list[tuple[str, str]] = field(default_factory=list)
    rounds: int = 0


def _activation_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, (nn.ReLU, nn.LeakyReLU)):
            return "relu" if isinstance(m, nn.ReLU) else "leaky"
        if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and m.min_val == 0.0 and m.max_val == 6.0):
            return "relu6"
        if isinstance(m, ChannelClamp):
            return "clamp"
    if node.op == "call_function" and node.target in (torch.relu, torch.nn.functional.relu):
        return "relu"
    return None


def _in_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, Linear) else layer.in_channels


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, Linear) else layer.out_channels


def _find_pairs(model: nn.Module, graph: fx.Graph,
                relu6: str = "clamp") -> tuple[list[tuple[str, str, str, str]], list[tuple[str, str]]]:
    """``(layer1, activation path or "", activation kind, layer2)`` and ``(layer, reason)`` for those left."""
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs, left = [], []

    def skip_pass(node: fx.Node) -> fx.Node | None:
        while node.op == "call_module" and isinstance(modules[node.target], _PASS) and len(node.users) == 1:
            node = next(iter(node.users))
        return node

    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _LAYERS):
            continue
        first = node.target
        if len(node.users) != 1:
            continue
        nxt = skip_pass(next(iter(node.users)))
        act_path, kind = "", "none"
        found = _activation_kind(nxt, modules)
        if found is not None:
            if len(nxt.users) != 1:
                continue
            act_path, kind = (nxt.target if nxt.op == "call_module" else ""), found
            nxt = skip_pass(next(iter(nxt.users)))
        if nxt.op != "call_module" or not isinstance(modules[nxt.target], _LAYERS):
            continue
        second = nxt.target
        l1, l2 = modules[first], modules[second]
        why = None
        if calls[first] > 1 or calls[second] > 1:
            why = "a layer is called more than once in forward"
        elif act_path and calls[act_path] > 1 and (kind == "clamp" or (kind == "relu6" and relu6 != "relu")):
            # a stateless ReLU may be reused, and so may a ReLU6 that becomes one (relu6="relu")
            why = (f"the {kind} activation {act_path!r} is called more than once in forward (its bound is per call; "
                   "relu6='relu' equalizes it as a ReLU)")
        elif _out_channels(l1) != _in_channels(l2):
            why = f"{_out_channels(l1)} output channels feed {_in_channels(l2)} input channels"
        elif len(nxt.all_input_nodes) != 1:
            why = "the second layer takes more than one input"
        elif isinstance(l2, Linear) != isinstance(l1, Linear):
            why = "a convolution feeds a linear layer directly (through a reshape)"
        if why is not None:
            left.append((first, why))
            continue
        pairs.append((first, act_path, kind, second))
    return pairs, left


def _check_not_calibrated(model: nn.Module) -> None:
    stale = [n for n, q in quantizers(model) if q.is_enabled and q.amax is not None]
    if stale:
        raise ValueError(
            f"equalize: {len(stale)} quantizers already have an amax ({', '.join(stale[:6])}"
            f"{' ...' if len(stale) > 6 else ''}) that equalization would make stale; equalize before calibrate_model"
        )


def _pads(layer: nn.Module) -> bool:
    """Whether a layer may see padded zeros (where a constant input shift would not be a constant output shift)."""
    if isinstance(layer, Linear):
        return False
    static = getattr(layer, "static_padding", None)  # EfficientNet's Conv2dStaticSamePadding pads in its forward
    if static is not None and not isinstance(static, nn.Identity):
        return True
    if isinstance(layer.padding, str):
        return layer.padding == "same" and any(k > 1 for k in layer.kernel_size)
    return any(p != 0 for p in layer.padding)


def _r2(w2: torch.Tensor, groups: int, channels: int) -> torch.Tensor:
    """Abs-max of each input channel of a (possibly grouped) layer's weight ``(out, in / groups, *kernel)``."""
    g = w2.reshape(groups, w2.shape[0] // groups, w2.shape[1], -1)
    return g.abs().amax(dim=(1, 3)).reshape(channels)


def _scale_in(w2: torch.Tensor, groups: int, s: torch.Tensor) -> torch.Tensor:
    shape = w2.shape
    g = w2.reshape(groups, shape[0] // groups, shape[1], -1)
    return (g * s.reshape(groups, 1, shape[1], 1)).reshape(shape)


def _partial(chosen, modules, weights, biases, bounds, total, strength):
    """Scales the layers' original weights (still in the modules) by ``total ** strength`` instead of ``total``."""
    for p in weights:
        weights[p] = modules[p].weight.detach().double().clone()
        b = modules[p].bias
        biases[p] = b.detach().double().clone() if b is not None else None
    for a in bounds:
        bounds[a] = modules[a].bound.double().clone()
    for first, act, _, second in chosen:
        s = total[first] ** strength
        l2 = modules[second]
        groups = 1 if isinstance(l2, Linear) else l2.groups
        weights[first] = weights[first] / s.reshape((-1,) + (1,) * (weights[first].dim() - 1))
        if biases[first] is not None:
            biases[first] = biases[first] / s
        if act in bounds:
            bounds[act] = bounds[act] / s
        weights[second] = _scale_in(weights[second], groups, s)
        total[first] = s


def equalize(
    model: nn.Module,
    *,
    fold_batchnorm: bool = True,
    absorb_high_bias: bool = True,
    relu6: str = "clamp",
    max_rounds: int = 20,
    tolerance: float = 1e-3,
    strength: float = 1.0,
) -> EqualizeReport:
    """Equalizes the weight ranges of consecutive layers of ``model`` in place (see the module docstring).

    Args:
        model: a float model (eval mode), or a replaced model before calibration.
        fold_batchnorm: fold BatchNorms first (:func:`qdq.fold_bn`); their statistics drive high-bias absorption.
        absorb_high_bias: move ``max(0, beta - 3 gamma)`` of ReLU layers into the next layer's bias.
        relu6: ``"clamp"`` (exact, :class:`ChannelClamp`), ``"relu"`` (replace by ReLU) or ``"skip"``.
        max_rounds: equalization rounds at most (chains need several).
        tolerance: stop when no channel scale of a round differs from 1 by more than this.
        strength: in ``[0, 1]``; each channel is scaled by ``s ** strength``, ``s`` the settled equalization scale.

    Returns:
        An :class:`EqualizeReport`.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"equalize: strength must be in [0, 1], got {strength!r}")
    if relu6 not in _RELU6_MODES:
        raise ValueError(f"equalize: relu6 must be one of {', '.join(_RELU6_MODES)}, got {relu6!r}")
    _check_not_calibrated(model)
    report = EqualizeReport()
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if fold_batchnorm:
        norms = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
        folded = fold_bn(model).folded
        report.folded = folded
        chains: dict[str, list[str]] = {}
        for layer, norm in folded:
            chains.setdefault(layer, []).append(norm)
        for layer, norm_list in chains.items():
            if len(norm_list) == 1 and norm_list[0] in norms:
                bn = norms[norm_list[0]]
                beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(bn.num_features)
                gamma = bn.weight.detach().double().abs() if bn.weight is not None else torch.ones(bn.num_features)
                stats[layer] = (beta, gamma)
    graph = _Tracer().trace(model)
    pairs, left = _find_pairs(model, graph, relu6)
    report.not_equalized = left
    modules = dict(model.named_modules())

    chosen = []
    for first, act_path, kind, second in pairs:
        if kind == "relu6":
            if relu6 == "skip":
                report.not_equalized.append((first, "ReLU6 between the layers (relu6='skip')"))
                continue
            if relu6 == "relu" and isinstance(modules[act_path], nn.ReLU):
                chosen.append((first, act_path, "relu", second))  # a reused ReLU6, replaced for an earlier pair
                continue
            parent, _, attr = act_path.rpartition(".")
            dim = -1 if isinstance(modules[first], Linear) else 1
            new = ChannelClamp(torch.full((_out_channels(modules[first]),), 6.0), dim) if relu6 == "clamp" \
                else nn.ReLU()
            if relu6 == "relu":
                logger.warning("equalize: %s (ReLU6) replaced by ReLU: the model changes where its input exceeds 6",
                               act_path)
            setattr(model.get_submodule(parent) if parent else model, attr, new)
            modules[act_path] = new
            kind = "clamp" if relu6 == "clamp" else "relu"
        chosen.append((first, act_path, kind, second))
    for layer, why in report.not_equalized:
        logger.info("equalize: %s not equalized: %s", layer, why)

    # float64 working copies; written back once
    weights = {}
    biases = {}
    for first, _, _, second in chosen:
        for p in (first, second):
            if p not in weights:
                weights[p] = modules[p].weight.detach().double().clone()
                b = modules[p].bias
                biases[p] = b.detach().double().clone() if b is not None else None
    bounds = {a: modules[a].bound.double().clone() for _, a, k, _ in chosen if k == "clamp"}
    total = {first: torch.ones(_out_channels(modules[first]), dtype=torch.float64) for first, _, _, _ in chosen}

    for rounds in range(1, max_rounds + 1):
        change = 0.0
        for first, act, kind, second in chosen:
            w1, w2 = weights[first], weights[second]
            l2 = modules[second]
            groups = 1 if isinstance(l2, Linear) else l2.groups
            r1 = w1.reshape(w1.shape[0], -1).abs().amax(dim=1)
            r2 = _r2(w2, groups, w1.shape[0])
            s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 * r2) / r2.clamp_min(1e-300), torch.ones_like(r1))
            weights[first] = w1 / s.reshape((-1,) + (1,) * (w1.dim() - 1))
            if biases[first] is not None:
                biases[first] = biases[first] / s
            if act in bounds:
                bounds[act] = bounds[act] / s
            weights[second] = _scale_in(w2, groups, s)
            total[first] = total[first] * s
            change = max(change, float((s - 1).abs().max()))
        report.rounds = rounds
        if change <= tolerance:
            break
    if strength != 1.0:
        _partial(chosen, modules, weights, biases, bounds, total, strength)

    if absorb_high_bias:
        for first, act, kind, second in chosen:
            l2 = modules[second]
            if kind not in ("relu", "clamp") or first not in stats or _pads(l2) or biases[first] is None:
                continue
            beta, gamma = stats[first]
            a = torch.clamp(beta.to(total[first]) / total[first] - 3 * gamma.to(total[first]) / total[first], min=0)
            if not bool((a > 0).any()):
                continue
            biases[first] = biases[first] - a
            if act in bounds:
                bounds[act] = bounds[act] - a
            groups = 1 if isinstance(l2, Linear) else l2.groups
            w2 = weights[second]
            g = w2.reshape(groups, w2.shape[0] // groups, w2.shape[1], -1).sum(dim=3)  # (G, out/G, in/G)
            shift = torch.einsum("goi,gi->go", g, a.reshape(groups, w2.shape[1])).reshape(-1)
            biases[second] = shift if biases[second] is None else biases[second] + shift
            report.absorbed[first] = float(a.max())

    with torch.no_grad():
        for p, w in weights.items():
            layer = modules[p]
            layer.weight.copy_(w.to(layer.weight.dtype))
            if biases[p] is not None:
                if layer.bias is None:
                    layer.bias = nn.Parameter(biases[p].to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
                else:
                    layer.bias.copy_(biases[p].to(layer.bias.dtype))
        for a, bound in bounds.items():
            modules[a].bound.copy_(bound.to(modules[a].bound.dtype))
    for first, act, _, second in chosen:
        report.pairs.append((first, act, second))
        report.scale_range[first] = (float(total[first].min()), float(total[first].max()))
    logger.info("equalize: %d pairs in %d rounds, %d folded norms, high bias absorbed in %d layers, %d left",
                len(report.pairs), report.rounds, len(report.folded), len(report.absorbed), len(report.not_equalized))
    return report
