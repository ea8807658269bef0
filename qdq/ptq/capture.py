"""What one module sees on calibration data: its inputs and outputs, captured by feeding the model up to it.

The PTQ algorithms (:mod:`qdq.ptq.bias_correction`, :mod:`qdq.ptq.adaround`) work layer by layer in forward order. For each
layer they need what reaches it on calibration data - with the layers before it already quantized (and corrected),
or in float - and nothing beyond it. :func:`run_until` feeds the batches through :func:`qdq.calibrate.feeding.feed` (the
batch conventions of :func:`qdq.calibrate_model`) and stops every batch as soon as the module has run, so the rest of
the model costs nothing and memory holds only what the caller keeps of this one module.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> seen = []
    >>> run_until(model, model[1], [torch.randn(5, 3)] * 2, lambda args, kwargs, out: seen.append(out.shape),
    ...           progress=False)
    2
    >>> seen
    [torch.Size([5, 4]), torch.Size([5, 4])]
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
from torch import nn

from qdq.calibrate.feeding import feed, model_device
from qdq.transform.switches import preserved_modes

__all__ = ["run_until", "call_order", "StopForward"]

logger = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised by the capture hook once the module has run: the rest of the batch's forward is skipped."""


class _Truncated(nn.Module):
    """Runs the model and swallows :class:`StopForward` (so that :func:`feed` goes on with the next batch)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.model(*args, **kwargs)
        except StopForward:
            return None


def run_until(
    model: nn.Module,
    module: nn.Module,
    data: Iterable,
    on_call: Callable[[tuple, dict, Any], None],
    num_batches: int | None = None,
    *,
    device: torch.device | str | None = None,
    preprocess: Callable[[Any], Any] | None = None,
    progress: bool = True,
    desc: str = "Capturing",
    name: str | None = None,
) -> int:
    """Feeds ``data`` through ``model`` in eval mode under ``no_grad``; ``on_call(args, kwargs, output)`` sees each
    call of ``module``, after which the batch stops. Returns the number of batches fed.

    The train/eval state of every module is restored afterwards. A batch in which ``module`` never runs is an error
    naming it (``name``, default its class).
    """
    calls = [0]

    def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        on_call(args, kwargs, output)
        calls[0] += 1
        raise StopForward

    handle = module.register_forward_hook(hook, with_kwargs=True)
    device = torch.device(device) if device is not None else model_device(model)
    batches = [0]

    def before_batch() -> None:
        if batches[0] > calls[0]:
            raise RuntimeError(f"{name or type(module).__name__} did not run in calibration batch {batches[0] - 1}")
        batches[0] += 1

    try:
        with preserved_modes(model, quantizer_states=False), torch.no_grad():
            model.eval()
            fed = feed(_Truncated(model), data, num_batches, device=device, preprocess=preprocess, desc=desc,
                       what="calibration batch", progress=progress, before_batch=before_batch)
        if fed > calls[0]:
            raise RuntimeError(f"{name or type(module).__name__} did not run in calibration batch {fed - 1}")
    finally:
        handle.remove()
    return fed


def call_order(model: nn.Module, modules: Iterable[nn.Module], data: Iterable, *,
               device: torch.device | str | None = None, preprocess: Callable[[Any], Any] | None = None) -> list:
    """``modules`` in the order ``model`` first calls them on the first batch of ``data`` (the ones it never calls
    are left out)."""
    modules = list(modules)
    order: list[nn.Module] = []
    handles = []
    for m in modules:
        handles.append(m.register_forward_pre_hook(lambda mod, args: order.append(mod) if mod not in order else None))
    try:
        with preserved_modes(model, quantizer_states=False), torch.no_grad():
            model.eval()
            feed(model, data, 1, device=torch.device(device) if device is not None else model_device(model),
                 preprocess=preprocess, progress=False)
    finally:
        for h in handles:
            h.remove()
    return order
