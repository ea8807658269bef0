"""Folding BatchNorm (and per-channel scale layers) into the convolution or linear layer before it.

TensorRT folds a BatchNorm into the convolution that feeds it *before* it quantizes the convolution's weights, so
the weights it quantizes are the folded ones. A QDQ model whose weight scales were calibrated on the unfolded
weights therefore describes a different network than the one TensorRT builds. Fold first, then quantize and
calibrate::

    model.eval()
    fold_bn(model)                                          # every foldable BatchNorm becomes nn.Identity
    quant_modules.replace_to_quantization_module(model)
    calibrate_model(model, loader, ...)

What is folded
--------------
A :class:`torch.nn.BatchNorm1d` / ``2d`` / ``3d`` (or ``SyncBatchNorm``), or a :class:`ChannelAffine` (the
analogue of Caffe's Scale layer: ``x * weight[c] + bias[c]``), that directly follows a ``Conv1d/2d/3d``,
``ConvTranspose1d/2d/3d`` or ``Linear`` - float, quantized (:mod:`qdq.nn`), or a subclass of either, such as
EfficientNet's ``Conv2dStaticSamePadding`` and the classes :mod:`qdq.transform.replace` generates from it. A chain
``conv -> BatchNorm -> ChannelAffine`` folds as a whole. The layer keeps its class and its parameter objects
(their values change in place, so optimizers and outside references survive); a layer without bias gets a new
``bias`` parameter. Each folded norm is replaced by :class:`torch.nn.Identity` at its place in the module tree;
nothing else in the model changes.

With eval-mode BatchNorm ``y = gamma * (x - mean) / sqrt(var + eps) + beta = s * x + t``, the layer's output
channel ``o`` is scaled by ``s[o]`` and its bias becomes ``s[o] * b[o] + t[o]``. The output channels are dim 0 of a
convolution's weight ``(out, in / groups, *kernel)`` and of a linear weight ``(out, in)``, and dim 1 of a
transposed convolution's weight ``(in, out / groups, *kernel)``, group by group. The fold is computed in float64
and cast back to each parameter's dtype. ``affine=False`` means ``gamma = 1, beta = 0``.

Finding the pairs
-----------------
By default the model is traced with :mod:`torch.fx` (convolutions, linear layers, norms and qdq's quantized modules
are kept as leaves) and a norm is folded when its only input is the output of a layer *and that output feeds
nothing else*. When tracing fails (data-dependent control flow, for instance), a warning says so and the pairs
are taken from adjacent children of ``nn.Sequential`` containers instead (containers with their own ``forward``
are not trusted). ``pairs=[("features.0", "features.1"), ...]`` (dotted module paths, a ChannelAffine after a
folded BatchNorm paired with the layer too) replaces discovery; they are checked for existence, types and channel
counts and are otherwise trusted.

Not folded, with the reason logged as a warning and kept in :attr:`FoldReport.not_folded`: a norm whose input is
not a layer's output, a layer whose output feeds more than the norm, a layer or norm called more than once in
``forward`` or reachable under several module paths, a layer whose weight or bias is shared with another module,
and channel counts that do not match. With explicit ``pairs`` the same problems are errors (raised before anything
is changed). A BatchNorm without running statistics (``track_running_stats=False``) normalizes with batch
statistics even in eval mode and cannot be folded: pairing it with a layer is an error in either mode.

The fold uses the running statistics. A model in training mode is folded anyway, with a warning: its
training-mode outputs (batch statistics) are not what the folded model computes.

Quantized layers
----------------
Folding changes the weights, so a weight quantizer's amax computed before the fold is stale. For a
per-output-channel max calibration it would just scale by ``|s[o]|``, but how the amax was obtained is not
recorded, and qdq quantizes transposed convolutions per *input* channel (axis 0), which the fold changes
non-uniformly. So every weight quantizer that has an amax (per channel or per tensor) gets the folded weight's
abs-max along its axis (``quantizer.amax = ...``), which is what max calibration of the new weight gives; each
recomputation is logged and listed in :attr:`FoldReport.amax_recomputed`. Recalibrate the weights if they were
calibrated another way. Statistics the weight quantizer's calibrator had collected are discarded (they describe the
old weights). A quantizer without amax quantizes dynamically and needs nothing. Input quantizers are not touched:
the layers' inputs do not change.

Limits: ``Linear -> BatchNorm1d`` is folded per output feature, which is right for ``(batch, features)``
activations; a BatchNorm1d over a ``(batch, tokens, features)`` Linear output normalizes another axis and is only
refused when the channel counts differ. Forward hooks of the folded modules are not consulted.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from qdq.transform.fold_batchnorm import fold_bn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> x = torch.randn(2, 3, 8, 8)
    >>> expected = model(x)
    >>> report = fold_bn(model)
    >>> report.folded, type(model[1]).__name__, model[0].bias is not None
    ([('0', '1')], 'Identity', True)
    >>> torch.allclose(model(x), expected, atol=1e-6)
    True
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import fx, nn
# the classes from their defining modules: quant_modules.initialize() replaces the names in torch.nn itself
from torch.nn.modules.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm
from torch.nn.modules.conv import Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d
from torch.nn.modules.linear import Linear
from torch.nn.parameter import is_lazy

from qdq.nn.modules._utils import QuantInputMixin, QuantMixin
from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.math.ranges import reduce_amax

__all__ = ["fold_bn", "FoldReport", "ChannelAffine"]

logger = logging.getLogger(__name__)

_TRANSPOSED_TYPES = (ConvTranspose1d, ConvTranspose2d, ConvTranspose3d)
_LAYER_TYPES = (Conv1d, Conv2d, Conv3d, *_TRANSPOSED_TYPES, Linear)
_BN_TYPES = (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm)


class ChannelAffine(nn.Module):
    """A per-channel scale and shift, ``y = x * weight[c] + bias[c]`` along dim 1 (Caffe's Scale layer).

    Args:
        num_features: the number of channels ``C`` of a ``(N, C, ...)`` input.
        device, dtype: of the parameters.

    Example:
        >>> import torch
        >>> affine = ChannelAffine(2)
        >>> with torch.no_grad():
        ...     _ = affine.weight.copy_(torch.tensor([2.0, -1.0])), affine.bias.copy_(torch.tensor([0.5, 0.0]))
        >>> affine
        ChannelAffine(2)
        >>> affine(torch.ones(1, 2, 1, 1)).flatten().tolist()
        [2.5, -1.0]
    """

    def __init__(self, num_features: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"ChannelAffine: num_features must be a positive int, got {num_features!r}")
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            n = self.num_features
            raise ValueError(f"ChannelAffine({n}) expects a (N, {n}, ...) input, got {tuple(x.shape)}")
        shape = (-1,) + (1,) * (x.dim() - 2)
        return x * self.weight.reshape(shape) + self.bias.reshape(shape)

    def extra_repr(self) -> str:
        return str(self.num_features)


_NORM_TYPES = (*_BN_TYPES, ChannelAffine)


@dataclass
class FoldReport:
    """What :func:`fold_bn` did.

    Attributes:
        model: the folded model (the argument itself with ``inplace=True``, a folded deep copy otherwise).
        folded: ``(layer path, norm path)`` per folded norm, in the order folded; a chain gives one entry per norm.
        not_folded: ``(norm path, reason)`` for every BatchNorm or ChannelAffine left in the model.
        amax_recomputed: the weight quantizers whose amax was recomputed from the folded weight.
        discovery: how the pairs were found: ``"fx"``, ``"sequential"`` (the fallback) or ``"pairs"`` (given).
    """

    model: nn.Module = field(repr=False)
    folded: list[tuple[str, str]] = field(default_factory=list)
    not_folded: list[tuple[str, str]] = field(default_factory=list)
    amax_recomputed: list[str] = field(default_factory=list)
    discovery: str = "fx"

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} norms, left {len(self.not_folded)} (pairs found by {self.discovery})"]
        lines += [f"  not folded: {path}: {why}" for path, why in self.not_folded]
        if self.amax_recomputed:
            lines.append("  weight amax recomputed: " + ", ".join(self.amax_recomputed))
        return "\n".join(lines)


def fold_bn(
    model: nn.Module,
    pairs: Sequence[tuple[str, str]] | None = None,
    inplace: bool = True,
) -> FoldReport:
    """Folds every BatchNorm / ChannelAffine that follows a conv, transposed conv or linear layer into it.

    See the module docstring for what is folded, how pairs are found and what happens to quantized layers.

    Args:
        model: a float or quantized model, best in eval mode.
        pairs: ``(layer path, norm path)`` dotted module paths to fold instead of discovering them, norms of one
            layer in forward order; every other norm is left alone. ``[]`` folds nothing.
        inplace: fold ``model`` itself; with ``False`` a deep copy is folded and ``model`` is not touched.

    Returns:
        A :class:`FoldReport`; ``report.model`` is the folded model and ``report.folded`` the ``(layer, norm)``
        paths folded. Its summary is also logged.

    Raises:
        TypeError: a path in ``pairs`` names a module of the wrong type, or ``pairs`` is malformed.
        ValueError: a path in ``pairs`` does not exist, the channel counts differ, a module is shared (see the
            module docstring), or a norm to fold has no running statistics or uninitialized (lazy) parameters.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), ChannelAffine(3)).eval()
        >>> report = fold_bn(model, inplace=False)
        >>> report.folded
        [('0', '1'), ('0', '2')]
        >>> type(model[1]).__name__, type(report.model[1]).__name__, type(report.model[2]).__name__
        ('BatchNorm1d', 'Identity', 'Identity')
        >>> fold_bn(model, pairs=[("0", "1")]).folded       # in place; the ChannelAffine stays
        [('0', '1')]
        >>> type(model[2]).__name__
        'ChannelAffine'
        >>> fold_bn(model, pairs=[("2", "0")])
        Traceback (most recent call last):
        ...
        TypeError: fold_bn: pairs[0]: '2' (ChannelAffine) is not a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_bn: model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = FoldReport(model)
    paths = _module_paths(model)
    shared = _shared_parameters(model)
    norm_paths = [path for path, m in model.named_modules() if isinstance(m, _NORM_TYPES)]

    if pairs is not None:
        report.discovery = "pairs"
        chains = _chains_from_pairs(model, pairs, paths, shared)
        listed = {norm for _, norms in chains for norm in norms}
        unlisted = [(path, "not listed in pairs") for path in norm_paths if path not in listed]
        for path, why in unlisted:
            logger.info("fold_bn: %s not folded: %s", path, why)
        report.not_folded.extend(unlisted)
    elif not norm_paths:
        logger.info("fold_bn: %s has no BatchNorm or ChannelAffine; nothing to fold", type(model).__name__)
        return report
    else:
        try:
            graph = _LeafTracer().trace(model)
        except Exception as err:  # any tracing failure: fx raises TraceError, TypeError, RuntimeError, ...
            logger.warning(
                "fold_bn: torch.fx could not trace %s (%s: %s); falling back to adjacent layers in nn.Sequential "
                "containers", type(model).__name__, type(err).__name__, err,
            )
            report.discovery = "sequential"
            chains, reasons = _chains_from_sequentials(model, paths, shared)
        else:
            chains, reasons = _chains_from_graph(model, graph, paths, shared)
        for path in norm_paths:
            if path in reasons:
                logger.warning("fold_bn: %s (%s) not folded: %s", path, type(model.get_submodule(path)).__name__,
                               reasons[path])
                report.not_folded.append((path, reasons[path]))

    for layer_path, norms in chains:  # every check before the first change
        _check_layer(layer_path, model.get_submodule(layer_path))
        for norm_path in norms:
            _check_norm(norm_path, model.get_submodule(norm_path))
    training = [path for _, norms in chains for path in norms
                if isinstance(model.get_submodule(path), _BN_TYPES) and model.get_submodule(path).training]
    if training:
        logger.warning(
            "fold_bn: %s %s in training mode: the fold uses the running statistics, so training-mode outputs "
            "(batch statistics) differ from the folded model's; call model.eval() before folding",
            ", ".join(training), "is" if len(training) == 1 else "are",
        )

    for layer_path, norms in chains:
        recomputed = _fold_chain(model, layer_path, norms)
        report.folded.extend((layer_path, norm) for norm in norms)
        if recomputed is not None:
            report.amax_recomputed.append(recomputed)
    logger.info("fold_bn: %s", report)
    return report


# ----------------------------------------------------------------------------------------------------------------
# discovery
# ----------------------------------------------------------------------------------------------------------------
_Chain = tuple[str, list[str]]  # (layer path, norm paths in forward order)


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps layers, norms and qdq's quantized modules as single ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (*_LAYER_TYPES, *_NORM_TYPES, TensorQuantizer, QuantMixin, QuantInputMixin)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _module_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every dotted path of each module, by ``id``."""
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    return paths


def _shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """The names of each parameter reachable under more than one name, by ``id``."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {key: value for key, value in names.items() if len(value) > 1}


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, Linear) else layer.out_channels


def _pair_problem(layer_path: str, layer: nn.Module, norm_path: str, norm: nn.Module,
                  paths: dict[int, list[str]], shared: dict[int, list[str]]) -> str | None:
    """Why ``norm`` cannot be folded into ``layer`` as far as the module tree tells, or ``None``."""
    if len(paths[id(layer)]) > 1:
        return f"the layer {layer_path!r} is reachable as {paths[id(layer)]}, so its weights serve several uses"
    if len(paths[id(norm)]) > 1:
        return f"it is reachable as {paths[id(norm)]}, so it may also normalize other tensors"
    for name in ("weight", "bias"):
        param = getattr(layer, name, None)
        if param is not None and id(param) in shared:
            return f"the {name} of {layer_path!r} is shared: {shared[id(param)]}"
    if norm.num_features != _out_channels(layer):
        return (f"it has {norm.num_features} channels and {layer_path!r} ({type(layer).__name__}) outputs "
                f"{_out_channels(layer)}")
    return None


def _describe(node: object, modules: dict[str, nn.Module]) -> str:
    """A node as a log message names it."""
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "call_module":
        return f"{node.target!r} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    if node.op == "get_attr":
        return f"the attribute {node.target!r}"
    return "the model output"


def _chains_from_graph(model: nn.Module, graph: fx.Graph, paths: dict[int, list[str]],
                       shared: dict[int, list[str]]) -> tuple[list[_Chain], dict[str, str]]:
    """The layer -> norm (-> norm ...) chains of a traced forward, and why each other norm is not in one."""
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    read_attrs = {node.target for node in graph.nodes if node.op == "get_attr"}

    def is_norm_call(node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(modules[node.target], _NORM_TYPES)

    chains: list[_Chain] = []
    reasons: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _LAYER_TYPES):
            continue
        layer_path, layer = node.target, modules[node.target]
        norms: list[str] = []
        current = node
        while True:
            following = [user for user in current.users if is_norm_call(user)]
            if not following:
                break
            norm_path = following[0].target
            why = None
            if len(current.users) > 1:
                others = [_describe(user, modules) for user in current.users if user is not following[0]]
                why = f"the output of {current.target!r} also feeds {', '.join(others)}"
            elif following[0].args != (current,) or following[0].kwargs:
                why = f"it is called with more arguments than the output of {current.target!r}"
            elif calls[layer_path] > 1:
                why = f"the layer {layer_path!r} is called {calls[layer_path]} times in forward"
            elif calls[norm_path] > 1:
                why = f"it is called {calls[norm_path]} times in forward"
            elif {f"{layer_path}.weight", f"{layer_path}.bias"} & read_attrs:
                why = f"forward also reads the weight or bias of {layer_path!r} directly"
            else:
                why = _pair_problem(layer_path, layer, norm_path, modules[norm_path], paths, shared)
            if why is not None:
                for user in following:
                    reasons.setdefault(user.target, why)
                break
            norms.append(norm_path)
            current = following[0]
        if norms:
            chains.append((layer_path, norms))

    chained = {norm for _, norms in chains for norm in norms}
    for node in graph.nodes:
        if is_norm_call(node) and node.target not in chained and node.target not in reasons:
            if calls[node.target] > 1:
                reasons[node.target] = f"it is called {calls[node.target]} times in forward"
            else:
                source = node.args[0] if node.args else None
                reasons[node.target] = (f"its input is {_describe(source, modules)}, not the output of a conv, "
                                        "transposed conv or linear layer")
    for path, module in modules.items():
        if isinstance(module, _NORM_TYPES) and path not in chained and path not in reasons:
            reasons[path] = "the traced forward does not call it"
    return chains, reasons


def _chains_from_sequentials(model: nn.Module, paths: dict[int, list[str]],
                             shared: dict[int, list[str]]) -> tuple[list[_Chain], dict[str, str]]:
    """The layer -> norm (-> norm ...) runs of adjacent ``nn.Sequential`` children, and why other norms are left."""
    chains: list[_Chain] = []
    reasons: dict[str, str] = {}
    for seq_path, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = [(f"{seq_path}.{name}" if seq_path else name, child) for name, child in seq.named_children()]
        if type(seq).forward is not nn.Sequential.forward or "forward" in vars(seq):
            for path, child in children:
                if isinstance(child, _NORM_TYPES):
                    reasons.setdefault(path, f"its container {seq_path!r} ({type(seq).__name__}) has its own "
                                             "forward, so the order of its children says nothing about data flow")
            continue
        for index, (layer_path, layer) in enumerate(children):
            if not isinstance(layer, _LAYER_TYPES):
                continue
            norms: list[str] = []
            for norm_path, norm in children[index + 1:]:
                if not isinstance(norm, _NORM_TYPES):
                    break
                why = _pair_problem(layer_path, layer, norm_path, norm, paths, shared)
                if why is not None:
                    reasons.setdefault(norm_path, why)
                    break
                norms.append(norm_path)
            if norms:
                chains.append((layer_path, norms))
    chained = {norm for _, norms in chains for norm in norms}
    for path, module in model.named_modules():
        if isinstance(module, _NORM_TYPES) and path not in chained and path not in reasons:
            reasons[path] = ("not directly after a conv, transposed conv or linear layer in an nn.Sequential (the "
                             "model could not be traced, so only Sequential neighbours are paired)")
    return chains, reasons


def _chains_from_pairs(model: nn.Module, pairs: Iterable[tuple[str, str]], paths: dict[int, list[str]],
                       shared: dict[int, list[str]]) -> list[_Chain]:
    """The chains the caller named, checked."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise TypeError(f"fold_bn: pairs must be a list of (layer path, norm path) pairs, got {pairs!r}")
    chains: dict[str, list[str]] = {}
    seen: set[str] = set()
    for index, item in enumerate(pairs):
        if (not isinstance(item, (tuple, list)) or len(item) != 2
                or not all(isinstance(path, str) for path in item)):
            raise TypeError(f"fold_bn: pairs[{index}] must be a (layer path, norm path) pair of strings, got {item!r}")
        layer_path, norm_path = item
        layer, norm = _submodule(model, layer_path, index), _submodule(model, norm_path, index)
        if not isinstance(layer, _LAYER_TYPES):
            raise TypeError(f"fold_bn: pairs[{index}]: {layer_path!r} ({type(layer).__name__}) is not a "
                            "Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear")
        if not isinstance(norm, _NORM_TYPES):
            raise TypeError(f"fold_bn: pairs[{index}]: {norm_path!r} ({type(norm).__name__}) is not a "
                            "BatchNorm1d/2d/3d, SyncBatchNorm or ChannelAffine")
        if norm_path in seen:
            raise ValueError(f"fold_bn: pairs[{index}]: {norm_path!r} is listed twice; a norm folds into one layer")
        seen.add(norm_path)
        why = _pair_problem(layer_path, layer, norm_path, norm, paths, shared)
        if why is not None:
            raise ValueError(f"fold_bn: pairs[{index}] ({layer_path!r}, {norm_path!r}) cannot be folded: "
                             f"{norm_path!r}: {why}")
        chains.setdefault(layer_path, []).append(norm_path)
    return list(chains.items())


def _submodule(model: nn.Module, path: str, index: int) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"fold_bn: pairs[{index}]: {type(model).__name__} has no module {path!r}") from None


def _check_layer(path: str, layer: nn.Module) -> None:
    if is_lazy(layer.weight):
        raise ValueError(f"fold_bn: {path!r} ({type(layer).__name__}) has uninitialized (lazy) parameters; "
                         "run one forward before folding")


def _check_norm(path: str, norm: nn.Module) -> None:
    if isinstance(norm, ChannelAffine):
        return
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError(
            f"fold_bn: {path!r} ({type(norm).__name__}) has no running statistics (track_running_stats=False): it "
            "normalizes with batch statistics even in eval mode and cannot be folded; pass pairs that leave it out"
        )
    if is_lazy(norm.running_mean) or (norm.weight is not None and is_lazy(norm.weight)):
        raise ValueError(f"fold_bn: {path!r} ({type(norm).__name__}) has uninitialized (lazy) parameters; "
                         "run one forward before folding")


# ----------------------------------------------------------------------------------------------------------------
# the fold
# ----------------------------------------------------------------------------------------------------------------
def _norm_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` in float64 with ``norm(x) == s * x + t`` per channel (eval mode)."""
    if isinstance(norm, ChannelAffine):
        return norm.weight.detach().double(), norm.bias.detach().double()
    scale = torch.rsqrt(norm.running_var.detach().double() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach().double()
    shift = -norm.running_mean.detach().double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().double()
    return scale, shift


def _fold_affine(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Makes ``layer(x)`` compute ``scale * layer(x) + shift`` per output channel, in place."""
    weight = layer.weight
    scale, shift = scale.to(weight.device), shift.to(weight.device)
    folded = weight.detach().double()
    if isinstance(layer, _TRANSPOSED_TYPES):  # (in, out / groups, *kernel): output channels per group on dim 1
        groups = layer.groups
        grouped = folded.reshape((groups, folded.shape[0] // groups) + tuple(folded.shape[1:]))
        folded = (grouped * scale.reshape((groups, 1, -1) + (1,) * (folded.dim() - 2))).reshape(weight.shape)
    else:  # (out, ...)
        folded = folded * scale.reshape((-1,) + (1,) * (folded.dim() - 1))
    bias = layer.bias
    old_bias = bias.detach().double() if bias is not None else torch.zeros_like(shift)
    new_bias = old_bias * scale + shift
    with torch.no_grad():
        weight.copy_(folded.to(weight.dtype))
        if bias is None:
            layer.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=weight.requires_grad)
        else:
            bias.copy_(new_bias.to(bias.dtype))


def _refresh_weight_amax(layer_path: str, layer: nn.Module) -> str | None:
    """Recomputes a quantized layer's weight amax from its (folded) weight; the quantizer's name if it did."""
    quantizer = getattr(layer, "weight_quantizer", None) if isinstance(layer, QuantMixin) else None
    if not isinstance(quantizer, TensorQuantizer):
        return None
    name = quantizer.name or f"{layer_path}._weight_quantizer"
    calibrator = quantizer.calibrator
    if calibrator is not None and getattr(calibrator, "num_batches", 0):
        quantizer.reset_calib()
        logger.info("fold_bn: %s: calibration statistics of the unfolded weight discarded", name)
    old = quantizer.amax
    if old is None:
        logger.info("fold_bn: %s has no amax (dynamic quantization); nothing to recompute", name)
        return None
    new = reduce_amax(layer.weight, quantizer.axis, keepdims=True)
    if new.numel() != old.numel():
        raise RuntimeError(f"fold_bn: {name}: its amax has {old.numel()} values but the abs-max of the folded weight "
                           f"along axis {quantizer.axis} has {new.numel()}")
    quantizer.amax = new.reshape(old.shape)
    logger.info("fold_bn: %s: amax recomputed as the folded weight's abs-max %s", name,
                "per tensor" if quantizer.axis is None else f"along axis {quantizer.axis}")
    return name


def _replace_by_identity(model: nn.Module, path: str) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, nn.Identity())


def _fold_chain(model: nn.Module, layer_path: str, norm_paths: list[str]) -> str | None:
    """Folds the norms (in forward order) into the layer, replaces them by Identity; see _refresh_weight_amax."""
    layer = model.get_submodule(layer_path)
    scale = shift = None
    for norm_path in norm_paths:
        s, t = _norm_affine(model.get_submodule(norm_path))
        scale, shift = (s, t) if scale is None else (s * scale, s * shift + t)
    _fold_affine(layer, scale, shift)
    for norm_path in norm_paths:
        logger.info("fold_bn: folded %s (%s) into %s (%s)", norm_path, type(model.get_submodule(norm_path)).__name__,
                    layer_path, type(layer).__name__)
        _replace_by_identity(model, norm_path)
    return _refresh_weight_amax(layer_path, layer)
