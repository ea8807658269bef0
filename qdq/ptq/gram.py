"""A layer's reconstruction error as a quadratic form in its weights, over all the calibration samples at once.

A convolution or linear layer is linear in its weight: on an input patch ``x`` (a row of the im2col matrix, the
layer's input quantizer applied) output channel ``o`` gives ``W[o] . x + b[o]``. With ``D = W' - W`` the change of
the weights from the float ones and ``e = W x + b - y`` the residual of the float weights against the target ``y``,
the squared error of weights ``W'`` summed over all the patches of the calibration data is::

    sum |D x + e|^2 = tr(D G D^T) + 2 tr(D C) + k,    G = sum x x^T,  C = sum x e^T,  k = sum |e|^2

(per group for grouped and depthwise convolutions). :func:`layer_gram` builds ``G``, ``C`` and ``k`` in one pass
over the captured inputs and targets. It runs the layer's own forward and reads the patches from what reaches its
one ``conv1d`` / ``conv2d`` / ``linear`` call (seen through a :class:`~torch.overrides.TorchFunctionMode`), so
the input quantizer, padding modes and subclasses that pad in their forward (EfficientNet's "same" convolutions)
count as they run. A forward that is not one such call on the given weight, whose result it returns, is refused
(:class:`GramNotApplicable`).

:meth:`LayerGram.loss` then gives the exact mean error over every sample for any weights in ``O(C_out * K^2)``,
where a forward and backward of the layer on a batch costs ``O(batch * H * W * C_out * K)``. Where the data has
fewer rows (samples times output positions) than ``K``, as a classifier's head on a few hundred images, the
patches ``P`` and residuals ``E`` are kept instead and the loss is ``|D P + E|^2``, the cheaper exact form there.
Every term is at the scale of the error (``D`` and ``e`` are small), so float32 steps lose nothing to
cancellation; ``G``, ``C`` and ``k`` are summed in float64.

Example:
    >>> import torch
    >>> layer = torch.nn.Conv2d(4, 6, 3, padding=1)
    >>> x = torch.randn(8, 4, 5, 5)
    >>> y = layer(x).detach() + 0.01 * torch.randn(8, 6, 5, 5)
    >>> gram = layer_gram(layer, x, y)      # the float weight is the reference: gram.loss(layer.weight) is the floor
    >>> w = layer.weight.detach() + 0.01 * torch.randn_like(layer.weight)
    >>> direct = ((torch.nn.functional.conv2d(x, w, layer.bias, padding=1) - y) ** 2).sum() / (8 * 5 * 5)
    >>> bool(torch.isclose(gram.loss(w), direct, rtol=1e-4))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

__all__ = ["LayerGram", "layer_gram", "gram_applies", "GramNotApplicable"]

_CHUNK_ELEMENTS = 1 << 25  # patch elements per pass (128 MB of float32): bounds the im2col copy

#: The calls whose weight a layer's output is linear in, with their parameter names.
_OPS = {
    F.linear: ("input", "weight", "bias"),
    F.conv1d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
}
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


class GramNotApplicable(ValueError):
    """The layer's forward is not one linear or convolution call on the given weight whose result it returns."""


@dataclass
class LayerGram:
    """``G`` (groups, K, K), ``C`` (groups, K, C_out / groups), ``k`` and the number of output rows (samples times
    output positions) of one layer, about its float weight ``weight``: see the module docstring. In the patch form
    (fewer rows than ``K``) ``g`` and ``c`` are ``None`` and ``patches`` (groups, K, rows) and ``residuals``
    (groups, rows, C_out / groups) hold the data."""

    g: torch.Tensor | None
    c: torch.Tensor | None
    k: torch.Tensor
    rows: int
    weight: torch.Tensor
    patches: torch.Tensor | None = None
    residuals: torch.Tensor | None = None

    def loss(self, weight: torch.Tensor) -> torch.Tensor:
        """Squared error summed over the output channels, averaged over the samples and positions (the mean the
        sampled reconstruction loss estimates); differentiable in ``weight``."""
        if self.g is None:
            groups, k, _ = self.patches.shape
            d = (weight.float() - self.weight).reshape(groups, -1, k)
            r = d @ self.patches + self.residuals.transpose(1, 2)
            return r.square().sum() / self.rows
        groups, k, _ = self.g.shape
        d = (weight.float() - self.weight).reshape(groups, -1, k)
        quad = ((d @ self.g) * d).sum()
        lin = (d * self.c.transpose(1, 2)).sum()
        return (quad + 2 * lin + self.k.to(quad.dtype)) / self.rows

    def _to_g_form(self) -> None:
        """The patch form turned into the ``G`` form (in place), the one that adds up over samples."""
        if self.g is None:
            p, e = self.patches.double(), self.residuals.double()
            self.g, self.c = (p @ p.transpose(1, 2)).float(), (p @ e).float()
            self.patches = self.residuals = None

    def reduce(self, reduce_sum: Callable[[list], None]) -> None:
        """Sums ``G``, ``C``, ``k`` and the rows over the ranks with ``reduce_sum(list_of_tensors)`` (in place)."""
        self._to_g_form()
        rows = torch.tensor([float(self.rows)], dtype=torch.float64, device=self.g.device)
        reduce_sum([self.g, self.c, self.k, rows])
        self.rows = int(rows.item())

    def __add__(self, other: "LayerGram") -> "LayerGram":
        """The form of both sets of samples (same layer, same reference weight), with no pass over the data."""
        if self.g is None and other.g is None and self.rows + other.rows < self.patches.shape[1]:
            patches = torch.cat([self.patches, other.patches], 2)
            residuals = torch.cat([self.residuals, other.residuals], 1)
            return LayerGram(None, None, self.k + other.k, self.rows + other.rows, self.weight, patches, residuals)
        self._to_g_form()
        other._to_g_form()
        return LayerGram(self.g + other.g, self.c + other.c, self.k + other.k, self.rows + other.rows, self.weight)


def gram_applies(layer: nn.Module) -> bool:
    """The layer is a Linear, Conv1d or Conv2d (subclasses included; :func:`layer_gram` checks its forward)."""
    return isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d))


class _Record(TorchFunctionMode):
    """Records the linear and convolution calls made inside it, with their bound arguments and results."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[object, dict, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        names = _OPS.get(func)
        if names is not None:
            bound = dict(_DEFAULTS, **dict(zip(names, args)), **kwargs)
            self.calls.append((func, bound, out))
        return out


def _tuple(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _patches(func, call: dict) -> torch.Tensor:
    """``(groups, K, rows)``: the input patches of a recorded call, rows in the order of its output's positions."""
    x = call["input"]
    if func is F.linear:
        return x.reshape(-1, x.shape[-1]).t().unsqueeze(0)
    dims = 1 if func is F.conv1d else 2
    kernel = tuple(call["weight"].shape[2:])
    stride, dilation = _tuple(call["stride"], dims), _tuple(call["dilation"], dims)
    padding = call["padding"]
    if isinstance(padding, str):  # "valid", or "same" (stride 1): torch puts the odd element of the total last
        if padding == "same":
            pads = []
            for k, d in reversed(list(zip(kernel, dilation))):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        padding = (0,) * dims
    padding = _tuple(padding, dims)
    if dims == 1:
        x = x.unsqueeze(-2)
        kernel, stride, padding, dilation = (1,) + kernel, (1,) + stride, (0,) + padding, (1,) + dilation
    n, groups = x.shape[0], call["groups"]
    if kernel == (1, 1) and stride == (1, 1) and padding == (0, 0):  # the patches are the pixels
        cols = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1)  # a view of channels-last inputs
        return cols.reshape(groups, -1, cols.shape[1])
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (n, C_in*kh*kw, L), channels major
    length = cols.shape[2]
    return cols.reshape(n, groups, -1, length).permute(1, 2, 0, 3).reshape(groups, -1, n * length)


def _rows(func, out: torch.Tensor, groups: int) -> torch.Tensor:
    """``(groups, rows, C_out / groups)``: the output channels of each row, in the patches' row order."""
    if func is F.linear:
        flat = out.reshape(-1, out.shape[-1])
    else:
        flat = out.reshape(out.shape[0], out.shape[1], -1).permute(1, 0, 2).reshape(out.shape[1], -1).t()
    return flat.reshape(flat.shape[0], groups, -1).transpose(0, 1)


def _recorded(name: str, run: Callable, weight: torch.Tensor, x: torch.Tensor) -> tuple[object, dict, torch.Tensor]:
    """Runs the layer on ``x`` with ``weight`` and returns its one linear or convolution call."""
    with _Record() as record:
        out = run(weight, x)
    calls = [c for c in record.calls if c[1]["weight"] is weight or torch.equal(c[1]["weight"], weight)]
    if len(calls) != 1 or len(record.calls) != 1:
        raise GramNotApplicable(f"{name}: its forward makes {len(record.calls)} linear/convolution calls, "
                                f"{len(calls)} of them on its weight (one is needed)")
    func, call, result = calls[0]
    if out is not result and not (isinstance(out, torch.Tensor) and out.shape == result.shape
                                  and torch.equal(out, result)):
        raise GramNotApplicable(f"{name}: its forward changes the result of its {func.__name__} call")
    if call["input"].dim() < 2 or (func is not F.linear and call["input"].dim() != (3 if func is F.conv1d else 4)):
        raise GramNotApplicable(f"{name}: unbatched input of shape {tuple(call['input'].shape)}")
    return func, call, result


def layer_gram(layer: nn.Module | Callable, inputs: torch.Tensor, target: torch.Tensor,
               weight: torch.Tensor | None = None, *, name: str = "layer") -> LayerGram:
    """``G``, ``C`` and ``k`` of a layer on ``inputs`` (samples along dim 0) against ``target`` (the outputs
    wanted), about ``weight``.

    Args:
        layer: the module (run with ``weight`` in place of its own through ``functional_call``), or
            ``run(weight, x) -> output``.
        inputs: the layer's inputs.
        target: the outputs wanted for them.
        weight: the reference weight (default: the module's).
        name: the layer's name in errors.

    Raises:
        GramNotApplicable: the forward is not one ``linear``/``conv1d``/``conv2d`` call on the weight whose result
            it returns.
    """
    if isinstance(layer, nn.Module):
        module = layer
        weight = module.weight if weight is None else weight
        run = lambda w, x: functional_call(module, {"weight": w}, (x,))  # noqa: E731
    elif weight is None:
        raise TypeError("layer_gram: a run function needs its reference weight")
    else:
        run = layer
    weight = weight.detach()
    groups, k_dim, c_out = None, weight[0].numel(), weight.shape[0]
    g = c = None
    k = torch.zeros((), dtype=torch.float64, device=weight.device)
    n = inputs.shape[0]
    per_sample = max(1, inputs[0].numel() * (weight[0, 0].numel() if weight.dim() > 2 else 1))
    chunk = max(1, _CHUNK_ELEMENTS // per_sample)
    rows = 0
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # the patches and residuals while they are fewer than K rows
    with torch.no_grad():
        for start in range(0, n, chunk):
            func, call, out = _recorded(name, run, weight, inputs[start:start + chunk])
            if groups is None:
                groups = 1 if func is F.linear else int(call["groups"])
                g = torch.zeros(groups, k_dim, k_dim, dtype=torch.float64, device=weight.device)
                c = torch.zeros(groups, k_dim, c_out // groups, dtype=torch.float64, device=weight.device)
            e = _rows(func, out.float() - target[start:start + chunk].float(), groups)
            p = _patches(func, call).float()
            g += (p @ p.transpose(1, 2)).double()
            c += (p @ e).double()
            k += e.double().square().sum()
            rows += e.shape[1]
            kept = kept + [(p, e)] if rows < k_dim else []
    if g is None:
        raise ValueError(f"layer_gram: {name}: no samples")
    if kept:
        return LayerGram(None, None, k, rows, weight.float(), torch.cat([p for p, _ in kept], 2).contiguous(),
                         torch.cat([e for _, e in kept], 1).contiguous())
    return LayerGram(g.float(), c.float(), k, rows, weight.float())
