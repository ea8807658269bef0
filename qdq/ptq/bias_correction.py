"""Empirical bias correction: each quantized layer's per-channel output mean put back where the float model has it.

Quantizing weights and inputs shifts the mean of a layer's output (the rounding errors of a channel's weights do
not average out: their sum times the mean input is a bias). :func:`bias_correction` measures, on calibration data,
the per-output-channel mean of every quantized convolution and linear layer in the float model (quantization off)
and in the quantized model, and adds the difference to the layer's bias (a layer without bias gets one). It works
in forward order, one layer at a time, so each layer is corrected on the inputs the already quantized and corrected
layers before it give - the shift a layer inherits is corrected too. Only biases change; weights and amax do not.

Run it on a replaced and calibrated model (after :func:`qdq.calibrate_model`, and after :func:`qdq.adaround` when
both are used). Cost: one float pass over the data, then one quantized pass: each batch's forward pauses after
each layer (:class:`~qdq.ptq.capture.PausedForwards`), the layer's bias is corrected and the layer is run again on
the same input into the output it had computed, so the layers after it see what the corrected layer gives (each
layer runs twice). Memory: what those paused forwards keep alive. With ``recompute=True`` each layer gets a pass of
its own instead, stopped at that layer (about ``layers / 2`` forwards of the data; memory: the per-channel sums of
one layer).

Under torch.distributed every rank feeds its own shard; the sums and counts are added over the ranks (so every
rank adds the same correction, that of the union of the data).

Example:
    >>> import torch
    >>> import qdq
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, bias=False))
    >>> _ = qdq.replace_to_quantization_module(model)
    >>> data = [torch.randn(8, 3, 10, 10) for _ in range(4)]
    >>> _ = qdq.calibrate_model(model, data, progress=False)
    >>> report = qdq.bias_correction(model, data, progress=False)
    >>> report.layers, model[2].bias is not None
    (['0', '2'], True)
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from qdq.ptq.capture import PausedForwards, call_order, run_until
from qdq.distributed import all_reduce_tensors
from qdq.calibrate.feeding import feed, model_device
from qdq.transform.replace import name_quantizers
from qdq.transform.switches import disable_quantization, preserved_modes
from qdq.ptq.weight_layers import check_reiterable, layers_left_out, output_channel_dim, quantized_layers

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["bias_correction", "BiasCorrectionReport"]

logger = logging.getLogger(__name__)


@dataclass
class BiasCorrectionReport:
    """What :func:`bias_correction` did.

    Attributes:
        layers: the corrected layers, in forward order.
        shift: per layer, the largest absolute correction added to its bias.
        bias_added: layers that had no bias and got one.
        batches: calibration batches per pass.
        seconds: wall time.
        left_out: modules with quantized weights that are no weight layer, left uncorrected (with a warning:
            :func:`~qdq.ptq.weight_layers.layers_left_out`).
    """

    layers: list[str] = field(default_factory=list)
    shift: dict[str, float] = field(default_factory=dict)
    bias_added: list[str] = field(default_factory=list)
    batches: int = 0
    seconds: float = 0.0
    left_out: list[str] = field(default_factory=list)


class _ChannelMean:
    """Running per-channel sum and count of a layer's output."""

    def __init__(self, dim: int):
        self.dim = dim
        self.sum: torch.Tensor | None = None
        self.count = torch.zeros((), dtype=torch.float64)

    def __call__(self, args: tuple, kwargs: dict, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"bias_correction: the layer returned a {type(out).__name__}, not a tensor")
        dim = self.dim % out.dim()
        reduce = [d for d in range(out.dim()) if d != dim]
        s = out.detach().double().sum(dim=reduce)
        self.sum = s if self.sum is None else self.sum + s
        self.count = self.count.to(s.device) + out.numel() / out.shape[dim]


def bias_correction(
    model: nn.Module,
    data: Iterable,
    num_batches: int | None = None,
    *,
    layers: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    preprocess: Callable[[Any], Any] | None = None,
    progress: bool = True,
    group: ProcessGroup | None = None,
    recompute: bool = False,
) -> BiasCorrectionReport:
    """Corrects the bias of every quantized conv / linear layer of ``model`` in place (see the module docstring).

    Args:
        model: a replaced and calibrated model.
        data: calibration batches that can be iterated more than once (a DataLoader or a list; the conventions of
            :func:`qdq.calibrate_model`).
        num_batches: batches per pass (all when ``None``).
        layers: dotted names of the layers to correct (default: every layer with an enabled weight quantizer).
        device: where batches go (default: the model's).
        preprocess: ``batch -> model input``.
        progress: tqdm progress bars.
        group: the torch.distributed process group whose ranks correct together (default: the world).
        recompute: feed the model from the start for every layer (memory: one layer's sums) instead of one paused
            forward of each batch through all the layers (memory: what the forwards keep alive).

    Returns:
        A :class:`BiasCorrectionReport`.
    """
    check_reiterable(data, "bias_correction")
    t0 = time.perf_counter()
    name_quantizers(model)
    candidates = quantized_layers(model, layers, "bias_correction")
    by_module = {id(m): n for n, m in candidates.items()}
    order = call_order(model, candidates.values(), data, device=device, preprocess=preprocess)
    missing = [n for n, m in candidates.items() if m not in order]
    if missing:
        raise RuntimeError(f"bias_correction: {', '.join(missing)} did not run on the first calibration batch")
    report = BiasCorrectionReport(left_out=layers_left_out(model, "bias_correction") if layers is None else [])

    # the float reference: one pass, every layer's per-channel mean
    float_means: dict[str, _ChannelMean] = {}
    handles = []
    for module in order:
        name = by_module[id(module)]
        float_means[name] = _ChannelMean(output_channel_dim(module))
        handles.append(module.register_forward_hook(
            lambda m, args, out, acc=float_means[name]: acc((), {}, out)))
    try:
        with disable_quantization(model):
            report.batches = _feed_all(model, data, num_batches, device, preprocess, progress)
    finally:
        for h in handles:
            h.remove()

    with contextlib.ExitStack() as stack:
        if not recompute:
            stack.enter_context(preserved_modes(model, quantizer_states=False))
            model.eval()
            forwards = stack.enter_context(PausedForwards(
                model, order, data, num_batches, at="output", device=device, preprocess=preprocess,
                names=by_module))
        for module in tqdm(order, desc="Bias correction", unit="layer", disable=not progress, leave=False):
            name = by_module[id(module)]
            quant = _ChannelMean(output_channel_dim(module))
            if recompute:
                run_until(model, module, data, quant, num_batches, device=device, preprocess=preprocess,
                          progress=False, desc=f"Bias correction {name}", name=name)
            else:
                calls = forwards.advance(module)
                for _, _, out in calls:
                    quant((), {}, out)
            ref = float_means[name]
            all_reduce_tensors([ref.sum, ref.count, quant.sum, quant.count], "sum", group)
            delta = ref.sum / ref.count - quant.sum / quant.count
            weight = module.weight
            with torch.no_grad():
                if module.bias is None:
                    module.bias = nn.Parameter(delta.to(weight.dtype), requires_grad=weight.requires_grad)
                    report.bias_added.append(name)
                else:
                    module.bias.add_(delta.to(module.bias.device, module.bias.dtype))
                if not recompute:
                    # the paused forwards go on with what the corrected layer computes, bit for bit (adding delta to
                    # the output instead differs in the last bit, enough to flip roundings downstream)
                    for args, kwargs, out in calls:
                        out.copy_(module(*args, **kwargs))
            report.layers.append(name)
            report.shift[name] = float(delta.abs().max())
            logger.debug("bias_correction: %s: largest shift %.4g", name, report.shift[name])
    report.seconds = time.perf_counter() - t0
    logger.info("bias_correction: corrected %d layers on %d batches in %.1f s (new biases: %s)", len(report.layers),
                report.batches, report.seconds, ", ".join(report.bias_added) or "none")
    return report


def _feed_all(model: nn.Module, data: Iterable, num_batches: int | None, device, preprocess, progress) -> int:
    with preserved_modes(model, quantizer_states=False), torch.no_grad():
        model.eval()
        return feed(model, data, num_batches, device=torch.device(device) if device is not None else
                    model_device(model), preprocess=preprocess, desc="Bias correction: float", progress=progress)
