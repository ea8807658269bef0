"""AdaRound: each weight rounded up or down as the layer's output on calibration data prefers (Nagel et al. 2020).

Nearest rounding minimises each weight's own error, not the layer's. AdaRound learns, per weight, whether to round
down or up (``floor(w / s) + h`` with ``h`` in {0, 1}) so that the quantized layer reproduces the float layer's
output on calibration data: ``h`` is relaxed to a rectified sigmoid ``h(V)``, ``V`` is trained with Adam on the
reconstruction error plus a regulariser ``reg * sum(1 - |2 h(V) - 1| ** beta)`` that pushes every ``h`` to 0 or 1
(``beta`` decays from 20 to 2 after a warm-up of 20% of the iterations without it), and ``h = V >= 0`` is kept. The
weight scales are those the calibration gave (symmetric, per channel or per tensor): AdaRound moves no scale, so the
model stays what TensorRT builds.

Layer by layer, in forward order: the layer's input is taken from the quantized model with the layers before it
already rounded (so later layers compensate earlier errors), its target output from the float model (quantization
off and the float weights of the layers already rounded, so that the target is the float model's own). With
``blocks=`` (module classes or dotted names, e.g. torchvision's ``BasicBlock``) the unit is the whole block instead:
the roundings of all its layers are learned together against the float block's output, as BRECQ does, which captures
the interaction of the layers inside a residual block.

What survives
-------------
The chosen integers are written into the weights: ``weight = q * s`` exactly, so fake quantization, the ONNX export
and ONNX Runtime's QuantizeLinear all give back ``q`` (round half to even of ``q * s / s`` is ``q``). The weight
quantizers keep their amax and lose their calibrator: :func:`qdq.calibrate_model` then leaves their amax alone (and
lists them in ``report.frozen``), and ``enable_calib`` / ``load_calib_amax`` on them are errors, so a later
calibration cannot move the grid under the chosen integers. QAT may still train the weights: it starts from the
chosen integers on the same grid.

Cost and memory
---------------
The data runs through the model once for all units: each calibration batch's forward runs in its own thread and
pauses at each unit (:class:`~qdq.ptq.capture.PausedForwards`), once in the quantized model (the unit's input) and
once in the float model (its output), and goes on to the next unit after this one is rounded. Memory holds what
those paused forwards keep alive (the unit's inputs and outputs on the calibration data, and tensors held for
later, such as a residual) and one concatenated copy of the unit's inputs and outputs. With ``recompute=True`` the
model is fed from the start for every unit instead (about ``units / 2`` forwards of the data; memory: one unit's
inputs and outputs). Then ``iterations`` steps. A unit that is one convolution or linear layer is linear in
its weights, so its error over all the captured samples is a quadratic form (:mod:`qdq.ptq.gram`): one pass over
the captured tensors builds it, and every step is exact over all the samples at the cost of a few small matrix
products (``objective="gram"``, the default where it applies). Blocks and units reconstructed through their
activation run on batches of ``batch_size`` samples per step instead (``objective="sampled"``); their captured
4-D tensors are kept channels-last, where oneDNN's convolutions on large feature maps are 2-5x faster on CPU.
``report.layers[name]`` gives the time per unit (``seconds``, of which ``capture_seconds`` feeding the data).

The last eighth of each unit's samples (``holdout``) stays out of the optimisation and decides: the learned
rounding is kept only if it reconstructs those samples better than nearest rounding does. Where the data
determines a layer poorly (EfficientNet-Lite0's classifier: 256 images for 1280 inputs per output), the learned
rounding fits the optimised images far better than any others, and nearest rounding is kept. With the exact
objective a rounding that wins is then learned again on all the samples (its steps are cheap), so the held-out
samples cost the result nothing; a sampled unit keeps the rounding learned on the rest.

Under torch.distributed every rank captures its own shard. With the quadratic objective the ranks sum their
``G``, ``C`` and ``k`` once, which gives the form of all the data, and then step alike with no further traffic;
with the sampled one the gradients are averaged over the ranks at every step (every rank starts from the same
``V`` and the same seed). The final integers are broadcast from rank 0, so all ranks end with the same weights.

Example:
    >>> import torch
    >>> import qdq
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    >>> _ = qdq.replace_to_quantization_module(model)
    >>> mix = torch.randn(4, 16)                         # inputs in a 4-D subspace: rounding can use the rest
    >>> data = [torch.randn(64, 4) @ mix for _ in range(4)]
    >>> _ = qdq.calibrate_model(model, data, progress=False)
    >>> report = qdq.adaround(model, data, iterations=200, progress=False)
    >>> result = report.layers["0"]
    >>> result.loss_adaround < result.loss_nearest
    True
    >>> q = model[0].weight_quantizer
    >>> s = q.amax / 127
    >>> ratio = model[0].weight / s
    >>> bool((ratio - torch.round(ratio)).abs().max() < 1e-4)                  # on the grid
    True
    >>> q.calibrator is None                                                   # calibrate_model leaves it alone
    True
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from qdq.ptq.activation import following_activations
from qdq.ptq.capture import PausedForwards, call_order, run_until
from qdq.ptq.gram import GramNotApplicable, LayerGram, gram_applies, layer_gram
from qdq.distributed import all_reduce_tensors, broadcast_tensors, is_distributed
from qdq.transform.replace import name_quantizers
from qdq.transform.switches import disable_quantization, preserved_modes, restore_quantizer_states
from qdq.ptq.weight_layers import check_reiterable, layers_left_out, output_channel_dim, quantized_layers, weight_grid

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["adaround", "AdaRoundReport", "UnitResult"]

logger = logging.getLogger(__name__)

_ZETA, _GAMMA = 1.1, -0.1  # the stretch of the rectified sigmoid (the paper's zeta and gamma)


def _soft(v: torch.Tensor) -> torch.Tensor:
    """The rectified sigmoid ``h(V)`` in [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def _init_v(rest: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) == rest`` (the fractional part of ``w / s``): optimisation starts from the float weight."""
    rest = rest.clamp(1e-4, 1 - 1e-4)
    return -torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1)


@dataclass
class UnitResult:
    """One unit (a layer, or a block with ``blocks=``).

    Attributes:
        layers: the weight layers of the unit.
        samples: calibration samples captured.
        iterations: optimisation steps.
        seconds: wall time of the unit (capture and optimisation).
        capture_seconds: the part of ``seconds`` spent feeding the data to the unit (its inputs and float outputs).
        held_out: the last ``held_out`` of the samples were kept out of the optimisation to decide (``holdout``).
        refit: the learned rounding won on the held-out samples and, the objective being exact (cheap steps), was
            then learned again on all the samples; ``loss_adaround`` is that of the first fit.
        loss_nearest: reconstruction error (squared, summed over channels, mean over the rest) of the unit with
            nearest rounding on the held-out samples (all the samples with ``holdout=0``): every one of them with
            the quadratic objective, up to 256 with the sampled one.
        loss_adaround: the same with the learned rounding.
        flipped: fraction of the unit's weights rounded the other way than nearest.
        kept_nearest: the learned rounding's loss was higher than nearest rounding's (on the held-out samples,
            averaged over the ranks), so nearest rounding was kept.
        activation: the activation the unit was reconstructed through (``activation=True``), or ``""``.
        objective: ``"gram"`` (the exact quadratic form over all samples, :mod:`qdq.ptq.gram`) or ``"sampled"``
            (the unit run on batches of ``batch_size`` samples).
    """

    layers: list[str]
    samples: int = 0
    held_out: int = 0
    refit: bool = False
    iterations: int = 0
    seconds: float = 0.0
    capture_seconds: float = 0.0
    loss_nearest: float = float("nan")
    loss_adaround: float = float("nan")
    flipped: float = 0.0
    kept_nearest: bool = False
    activation: str = ""
    objective: str = ""


@dataclass
class AdaRoundReport:
    """What :func:`adaround` did: ``layers`` maps each unit's name to its :class:`UnitResult`; ``frozen`` lists the
    weight quantizers whose calibrator was removed (their amax is final); ``left_out`` the modules with quantized
    weights that are no weight layer (:func:`~qdq.ptq.weight_layers.layers_left_out`: nearest rounding, a warning);
    ``seconds`` the total wall time."""

    layers: dict[str, UnitResult] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"AdaRound: {len(self.layers)} units in {self.seconds:.1f} s"]
        for name, r in self.layers.items():
            lines.append(f"  {name}: loss {r.loss_nearest:.4g} -> {r.loss_adaround:.4g}, {100 * r.flipped:.1f}% "
                         f"flipped, {r.seconds:.1f} s")
        return "\n".join(lines)


def _units(model: nn.Module, order: list[nn.Module], names: dict[int, str],
           blocks: Sequence[str | type] | None) -> list[tuple[str, nn.Module, list[str]]]:
    """``(unit name, unit module, its layer names)`` in forward order."""
    block_names: list[str] = []
    if blocks:
        modules = dict(model.named_modules())
        for b in blocks:
            if isinstance(b, str):
                if b not in modules:
                    raise ValueError(f"adaround: blocks: the model has no module {b!r}")
                block_names.append(b)
            elif isinstance(b, type):
                block_names += [n for n, m in modules.items() if isinstance(m, b) and n]
            else:
                raise TypeError(f"adaround: blocks takes module classes or dotted names, got {b!r}")
    units: list[tuple[str, nn.Module, list[str]]] = []
    for layer in order:
        name = names[id(layer)]
        owner = next((b for b in sorted(block_names, key=len) if name.startswith(b + ".")), None)
        if owner is None:
            units.append((name, layer, [name]))
        elif units and units[-1][0] == owner:
            units[-1][2].append(name)
        elif any(u[0] == owner for u in units):
            raise RuntimeError(f"adaround: the layers of block {owner!r} do not run one after another")
        else:
            units.append((owner, model.get_submodule(owner), [name]))
    return units


def _gather(calls: list[tuple[tuple, dict, Any]], name: str, keep: str,
            channels_last: bool = False) -> tuple[torch.Tensor, dict]:
    """The unit's first positional input (``keep="input"``) or its output over the captured calls, concatenated
    (4-D ones channels-last with ``channels_last``: see :func:`_convolves_images`)."""
    kept: list[torch.Tensor] = []
    extra: dict = {}
    for args, kwargs, out in calls:
        value = args[0] if args and keep == "input" else out
        if not args or not isinstance(value, torch.Tensor):
            raise TypeError(f"adaround: {name} must take a tensor as first argument and return a tensor")
        if len(args) > 1 or any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            raise TypeError(f"adaround: {name} takes more than one tensor; make units of single-input modules")
        extra.update(kwargs)
        value = value.detach()
        kept.append(value.contiguous(memory_format=torch.channels_last) if channels_last and value.dim() == 4 else value)
    return torch.cat(kept), extra


def _convolves_images(unit: nn.Module) -> bool:
    """The unit holds a 2-D convolution: its captured 4-D tensors are kept channels-last. On CPU, oneDNN runs such
    convolutions 2-5x faster forward and backward on channels-last tensors than on NCHW ones at 30x30 to 112x112
    (depthwise ones most; 1.1x on a 7x7 map). Only the strides change, and ``torch.cat`` and indexing along the
    batch keep them, so the rounding steps run on channels-last inputs and targets throughout."""
    return any(isinstance(m, nn.Conv2d) for m in unit.modules())


@contextlib.contextmanager
def _float_weights(layers: dict[str, nn.Module], originals: dict[str, torch.Tensor]):
    """The float weights of the layers rounded so far put back for a while (the float model's reference)."""
    rounded = {n: layers[n].weight.detach().clone() for n in originals}
    with torch.no_grad():
        for n, w in originals.items():
            layers[n].weight.copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, w in rounded.items():
                layers[n].weight.copy_(w)


def _capture(model: nn.Module, unit: nn.Module, name: str, data: Iterable, num_batches: int | None, device,
             preprocess, quantized: bool, keep: str, channels_last: bool) -> tuple[torch.Tensor, dict]:
    """``_gather`` over a feed of the model from the start that stops at the unit (``recompute=True``)."""
    calls: list = []

    def on_call(args: tuple, kwargs: dict, out: Any) -> None:
        calls.append((args, kwargs, out))

    if quantized:
        run_until(model, unit, data, on_call, num_batches, device=device, preprocess=preprocess, progress=False,
                  name=name)
    else:
        with disable_quantization(model):
            run_until(model, unit, data, on_call, num_batches, device=device, preprocess=preprocess, progress=False,
                      name=name)
    return _gather(calls, name, keep, channels_last)


class _SquaredError(torch.autograd.Function):
    """``((out - target) ** 2).sum()`` with one temporary: the difference, reduced by a dot product over its memory
    order, and turned into the gradient in place. On channels-last tensors, which the unit's outputs are
    (:func:`_convolves_images`), ``mse_loss``'s backward was 30x slower (360 ms against 10 ms on a 32x96x112x112
    output, one of EfficientNet-Lite0's, on 2 CPU threads)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = torch.sub(out, target)
        ctx.save_for_backward(diff)
        flat = _memory_order(diff)
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if getattr(ctx, "spent", False):
            raise RuntimeError("adaround: the reconstruction loss's backward runs once (its buffer became the gradient)")
        ctx.spent = True
        (diff,) = ctx.saved_tensors
        return diff.mul_(2 * grad), None


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor as a 1-D view in the order of its memory (a copy only if it is not dense)."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(order).reshape(-1)


def _recon(out: torch.Tensor, target: torch.Tensor, cdim: int) -> torch.Tensor:
    """Squared error summed over the channels, averaged over the rest."""
    return _SquaredError.apply(out, target) / (out.numel() / out.shape[cdim])


def adaround(
    model: nn.Module,
    data: Iterable,
    num_batches: int | None = None,
    *,
    iterations: int = 500,
    batch_size: int = 32,
    lr: float = 1e-2,
    reg: float = 0.01,
    beta: tuple[float, float] = (20.0, 2.0),
    warmup: float = 0.2,
    blocks: Sequence[str | type] | None = None,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    recompute: bool = False,
    activation: bool = False,
    objective: str = "auto",
    holdout: float = 0.125,
    device: torch.device | str | None = None,
    preprocess: Callable[[Any], Any] | None = None,
    progress: bool = True,
    group: ProcessGroup | None = None,
) -> AdaRoundReport:
    """Learns the rounding of every quantized layer's weights in place (see the module docstring).

    Args:
        model: a replaced and calibrated model (symmetric weight quantizers with amax).
        data: calibration batches that can be iterated more than once (a DataLoader or a list of batches).
        num_batches: batches captured per unit (all when ``None``).
        iterations: optimisation steps per unit.
        batch_size: samples per step of the sampled objective.
        lr: Adam's learning rate on ``V``.
        reg: weight of the rounding regulariser.
        beta: the regulariser's exponent, from ``beta[0]`` down to ``beta[1]``.
        warmup: fraction of the steps without the regulariser.
        blocks: module classes or dotted names whose layers are reconstructed together (BRECQ-style).
        layers: dotted names of the layers to round (default: every layer with an enabled weight quantizer).
        seed: seed of the sampling (the result is reproducible).
        recompute: feed the model from the start for every unit (memory: one unit's inputs and outputs) instead of
            one paused forward of each batch through all the units (memory: what the forwards keep alive).
        activation: reconstruct a layer's output through the activation it goes into alone (ReLU, ReLU6, ...;
            found in the torch.fx graph: :func:`qdq.ptq.activation.following_activations`), as the paper's best
            variant does: errors the activation clips do not count. Layer-wise units only.
        objective: how a step measures the reconstruction error. ``"gram"``: exactly, over every captured sample,
            as a quadratic form in the weights (:mod:`qdq.ptq.gram`; a unit that is one Linear, Conv1d or Conv2d,
            without ``activation``); each step then costs no pass over the data. ``"sampled"``: the unit run on
            ``batch_size`` random samples per step (blocks, activations, other layers). ``"auto"``: ``"gram"``
            where it applies, else ``"sampled"``.
        holdout: the fraction of each unit's captured samples (the last ones) kept out of the optimisation; the
            learned rounding is kept only if its error on them is below nearest rounding's. A layer with fewer
            samples than weights per output (a classifier's head on a few hundred images) can fit the
            optimised samples far better than others. ``0``: optimise on all and decide on the same samples.
        device: where batches go (default: the model's).
        preprocess: ``batch -> model input``.
        progress: tqdm progress bars.
        group: the torch.distributed process group whose ranks round together (default: the world).

    Returns:
        An :class:`AdaRoundReport`.
    """
    check_reiterable(data, "adaround")
    if objective not in ("auto", "gram", "sampled"):
        raise ValueError(f"adaround: objective must be 'auto', 'gram' or 'sampled', got {objective!r}")
    if not 0 <= holdout < 1:
        raise ValueError(f"adaround: holdout must be in [0, 1), got {holdout}")
    if iterations < 1 or batch_size < 1 or not 0 <= warmup < 1:
        raise ValueError(f"adaround: iterations and batch_size must be >= 1 and warmup in [0, 1); got {iterations}, "
                         f"{batch_size}, {warmup}")
    t_start = time.perf_counter()
    name_quantizers(model)
    candidates = quantized_layers(model, layers, "adaround")
    names = {id(m): n for n, m in candidates.items()}
    grids = {n: weight_grid(n, m) for n, m in candidates.items()}  # errors before any work
    order = call_order(model, candidates.values(), data, device=device, preprocess=preprocess)
    missing = [n for n, m in candidates.items() if m not in order]
    if missing:
        raise RuntimeError(f"adaround: {', '.join(missing)} did not run on the first calibration batch")
    units = _units(model, order, names, blocks)
    if objective == "gram":
        if activation:
            raise ValueError("adaround: objective='gram' is the error of a layer's own output; it does not go "
                             "with activation=True (use objective='auto' or 'sampled')")
        block = next((n for n, _, layer_names in units if layer_names != [n]), None)
        if block is not None:
            raise ValueError(f"adaround: objective='gram': unit {block!r} is a block (blocks=); use objective='auto'"
                             " or 'sampled'")
    acts = {}
    if activation:
        acts = following_activations(model, [n for n, _, layer_names in units if layer_names == [n]])
        logger.info("adaround: %d of %d units reconstructed through their activation", len(acts), len(units))
    report = AdaRoundReport(left_out=layers_left_out(model, "adaround") if layers is None else [])
    originals: dict[str, torch.Tensor] = {}  # the float weights of the layers rounded so far
    with contextlib.ExitStack() as stack:
        stack.enter_context(preserved_modes(model, quantizer_states=False))
        model.eval()
        if not recompute:
            unit_names = {id(u): n for n, u, _ in units}
            watch = [u for _, u, _ in units]
            quantized = stack.enter_context(PausedForwards(
                model, watch, data, num_batches, at="input", device=device, preprocess=preprocess, names=unit_names))
            reference = stack.enter_context(PausedForwards(
                model, watch, data, num_batches, at="output", device=device, preprocess=preprocess,
                context=lambda: disable_quantization(model), names=unit_names))
        bar = tqdm(units, desc="AdaRound", unit="unit", disable=not progress)
        for index, (unit_name, unit, layer_names) in enumerate(bar):
            bar.set_postfix_str(unit_name)
            t0 = time.perf_counter()
            image = _convolves_images(unit)
            if recompute:
                inputs, kwargs = _capture(model, unit, unit_name, data, num_batches, device, preprocess, True,
                                          "input", image)
                with _float_weights(candidates, originals):
                    target, _ = _capture(model, unit, unit_name, data, num_batches, device, preprocess, False,
                                         "output", image)
            else:
                inputs, kwargs = _gather(quantized.advance(unit), unit_name, "input", image)
                target, _ = _gather(reference.advance(unit), unit_name, "output", image)
            capture_seconds = time.perf_counter() - t0
            for n in layer_names:
                originals[n] = candidates[n].weight.detach().clone()
            act = acts.get(unit_name)
            if act is not None:
                target = act(target)
            result = _round_unit(unit_name, unit, layer_names, candidates, grids, inputs, kwargs, target,
                                 iterations, batch_size, lr, reg, beta, warmup, seed + index, group, act,
                                 objective, holdout)
            del inputs, target
            result.capture_seconds = capture_seconds
            result.seconds = time.perf_counter() - t0
            logger.info("adaround: %s (%d samples, %s): loss %.4g -> %.4g, %.1f%% flipped, %.1f s (capture %.1f s)",
                        unit_name, result.samples, result.objective, result.loss_nearest, result.loss_adaround,
                        100 * result.flipped, result.seconds, result.capture_seconds)
            report.layers[unit_name] = result
            for n in layer_names:
                q = candidates[n].weight_quantizer
                q.set_calibrator(None)
                report.frozen.append(q.name or f"{n}.weight_quantizer")
    report.seconds = time.perf_counter() - t_start
    logger.info("%s", report)
    return report


def _unit_gram(unit_name: str, unit: nn.Module, inputs: torch.Tensor, target: torch.Tensor, kwargs: dict,
               run: Callable, objective: str, group) -> LayerGram | None:
    """The unit's quadratic objective (:mod:`qdq.ptq.gram`), or ``None`` where the sampled one is used: a forward
    that is not one linear or convolution call on its weight (e.g. a subclass that scales its output) takes the
    sampled objective, with a warning."""
    if objective == "sampled":
        return None
    if kwargs or not gram_applies(unit):
        if objective == "gram":
            raise ValueError(f"adaround: objective='gram': {unit_name} is not one Linear, Conv1d or Conv2d called "
                             "on one tensor (use objective='auto' or 'sampled')")
        return None
    try:
        gram = layer_gram(lambda w, x: run({"weight": w}, x), inputs, target, unit.weight, name=unit_name)
    except GramNotApplicable as err:
        if objective == "gram":
            raise ValueError(f"adaround: {err}; use objective='sampled'") from None
        logger.warning("adaround: %s; its rounding is learned on sampled batches instead", err)
        return None
    if is_distributed(group):
        gram.reduce(lambda tensors: all_reduce_tensors(tensors, "sum", group))
    return gram


def _round_unit(unit_name, unit, layer_names, candidates, grids, inputs, kwargs, target, iterations, batch_size, lr,
                reg, beta, warmup, seed, group, act=None, objective="auto", holdout=0.0) -> UnitResult:
    """Learns the rounding of one unit; ``target`` is already through ``act`` (when given), the unit's output is
    put through it here."""
    result = UnitResult(list(layer_names), iterations=iterations, activation=act.name if act is not None else "")
    run = (lambda w, x: act(functional_call(unit, w, (x,), kwargs))) if act is not None else \
        (lambda w, x: functional_call(unit, w, (x,), kwargs))
    result.samples = n = inputs.shape[0]
    result.held_out = held = min(n - 1, max(1, round(n * holdout))) if holdout > 0 and n > 1 else 0
    n_fit = n - held
    fit_x, fit_y = inputs[:n_fit], target[:n_fit]
    check_x, check_y = (inputs[n_fit:], target[n_fit:]) if held else (fit_x, fit_y)
    cdim = output_channel_dim(candidates[layer_names[-1]])
    prefix = {name: (name[len(unit_name) + 1:] if name != unit_name else "") for name in layer_names}

    floors, vs, grid = {}, {}, {}
    for name in layer_names:
        layer = candidates[name]
        scale, qmin, qmax = grids[name]
        w = layer.weight.detach().float()
        ws = w / scale
        floors[name] = torch.floor(ws)
        vs[name] = _init_v(ws - floors[name]).requires_grad_(True)
        grid[name] = (scale, qmin, qmax)

    def weights(hard: bool | None) -> dict[str, torch.Tensor]:
        out = {}
        for name in layer_names:
            scale, qmin, qmax = grid[name]
            if hard is None:  # nearest
                q = torch.clamp(torch.round(candidates[name].weight.detach().float() / scale), qmin, qmax)
            else:
                h = (vs[name] >= 0).float() if hard else _soft(vs[name])
                q = torch.clamp(floors[name] + h, qmin, qmax)
            key = f"{prefix[name]}.weight" if prefix[name] else "weight"
            out[key] = (q * scale).to(candidates[name].weight.dtype)
        return out

    gram: LayerGram | None = None
    check_gram: LayerGram | None = None

    def loss_on(sample_weights: dict[str, torch.Tensor]) -> float:
        """The error on the samples that decide (the held-out ones)."""
        if check_gram is not None:
            with torch.no_grad():
                return float(check_gram.loss(sample_weights["weight"]))
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, min(len(check_x), 256), batch_size):
                x, y = check_x[start:start + batch_size], check_y[start:start + batch_size]
                total += float(_recon(run(sample_weights, x), y, cdim)) * len(x)
                count += len(x)
        return total / count

    quantizers = [candidates[name].weight_quantizer for name in layer_names]
    states = {q: q.state() for q in quantizers}
    try:
        for q in quantizers:
            q.disable()  # the weights given to functional_call are quantized already
        if act is None and layer_names == [unit_name]:
            gram = _unit_gram(unit_name, unit, fit_x, fit_y, kwargs, run, objective, group)
            check_gram = _unit_gram(unit_name, unit, check_x, check_y, kwargs, run, "gram", group) if (
                gram is not None and held) else gram
        result.objective = "gram" if gram is not None else "sampled"
        result.loss_nearest = loss_on(weights(None))
        start_v = {name: v.detach().clone() for name, v in vs.items()}

        def learn(objective_gram: LayerGram | None) -> None:
            """The optimisation from the float weights: on ``objective_gram``, or sampled batches of the fit part."""
            for name in layer_names:
                vs[name] = start_v[name].clone().requires_grad_(True)
            generator = torch.Generator().manual_seed(seed)
            params = list(vs.values())
            optimizer = torch.optim.Adam(params, lr=lr)
            warm = int(warmup * iterations)
            for step in range(iterations):
                if objective_gram is not None:  # exact over every sample (alike on every rank: no gradient to average)
                    loss = objective_gram.loss(weights(False)["weight"])
                else:
                    idx = torch.randint(n_fit, (min(batch_size, n_fit),), generator=generator).to(inputs.device)
                    out = run(weights(False), fit_x[idx])
                    loss = _recon(out, fit_y[idx], cdim)
                if step >= warm:
                    t = (step - warm) / max(1, iterations - warm)
                    b = beta[1] + (beta[0] - beta[1]) * (1 - t)
                    loss = loss + reg * sum((1 - (2 * _soft(v) - 1).abs().pow(b)).sum() for v in params)
                optimizer.zero_grad(set_to_none=False)
                loss.backward()
                if objective_gram is None:
                    all_reduce_tensors([v.grad for v in params], "mean", group)
                optimizer.step()
            for v in params:
                v.requires_grad_(False)

        learn(gram)
        hard = weights(True)
        broadcast_tensors(list(hard.values()), group)
        nearest = weights(None)
        losses = torch.tensor([result.loss_nearest, loss_on(hard)], dtype=torch.float64, device=inputs.device)
        all_reduce_tensors([losses], "mean", group)  # the ranks decide alike
        result.loss_nearest, result.loss_adaround = float(losses[0]), float(losses[1])
        if result.loss_adaround > result.loss_nearest:  # the learned rounding did not pay off: keep nearest
            logger.info("adaround: %s: learned rounding worse than nearest on the %s (%.4g > %.4g); nearest kept",
                        unit_name, f"{held} held-out samples" if held else "samples", result.loss_adaround,
                        result.loss_nearest)
            hard, result.kept_nearest, result.loss_adaround = nearest, True, result.loss_nearest
        elif held and gram is not None:  # the learned rounding won on unseen samples: learn it again on all of them
            learn(gram + check_gram)
            hard = weights(True)
            broadcast_tensors(list(hard.values()), group)
            result.refit = True
        flipped = sum(int((hard[k] != nearest[k]).sum()) for k in hard)
        result.flipped = flipped / sum(v.numel() for v in hard.values())
        for name in layer_names:
            key = f"{prefix[name]}.weight" if prefix[name] else "weight"
            layer = candidates[name]
            with torch.no_grad():
                layer.weight.copy_(hard[key])
            scale, _, _ = grid[name]
            ratio = layer.weight.detach().float() / scale
            if float((ratio - torch.round(ratio)).abs().max()) > 1e-3:
                raise RuntimeError(f"adaround: {name}: the rounded weight does not quantize back to its integers")
    finally:
        restore_quantizer_states(states)
    return result
