"""Feeding data through a model: the batch conventions calibration and auto-tune share.

``data`` is a DataLoader or any iterable of batches - a tensor, an ``(inputs, labels)`` tuple or list (the first item
is the input), or a dict (keyword arguments) - or a callable ``forward_loop(model)`` that runs the model itself.
``preprocess(batch)`` turns a batch into the model's input when the defaults do not fit; a tuple or list it returns
is passed as positional arguments, a dict as keyword arguments.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> feed(model, [(torch.randn(4, 3), torch.zeros(4))] * 5, num_batches=3, progress=False)
    3
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["feed", "model_inputs", "run_model", "to_device", "model_device", "describe"]

logger = logging.getLogger(__name__)


def to_device(obj: Any, device: torch.device | None) -> Any:
    """``obj`` with every tensor inside (lists, tuples, named tuples, dicts) moved to ``device``."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        moved = [to_device(o, device) for o in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def model_inputs(batch: Any, index: int = 0, what: str = "batch") -> Any:
    """The model input of a batch: a tensor as is, the first item of a tuple or list, a dict as is.

    >>> model_inputs((torch.zeros(2), torch.ones(2))).tolist()
    [0.0, 0.0]
    """
    if isinstance(batch, (torch.Tensor, dict)):
        return batch
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    raise TypeError(
        f"{what} {index} is a {type(batch).__name__}; expected a tensor, a (inputs, labels) tuple or list, or a dict "
        "- pass preprocess= to turn it into the model's input"
    )


def describe(obj: Any) -> str:
    """A short description of a batch for error messages (types and shapes, not values)."""
    if isinstance(obj, torch.Tensor):
        return f"Tensor{tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if isinstance(obj, (list, tuple)):
        more = ", ..." if len(obj) > 4 else ""
        return f"{type(obj).__name__}[" + ", ".join(describe(o) for o in obj[:4]) + more + "]"
    if isinstance(obj, dict):
        return "dict{" + ", ".join(f"{k}: {describe(v)}" for k, v in list(obj.items())[:4]) + "}"
    return type(obj).__name__


def run_model(model: nn.Module, inputs: Any, index: int, what: str = "batch") -> Any:
    """Calls ``model`` on ``inputs`` (positional for a tuple or list, keywords for a dict); an error names the batch."""
    try:
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, (list, tuple)):
            return model(*inputs)
        return model(inputs)
    except Exception as err:
        raise RuntimeError(f"{what} {index} ({describe(inputs)}) failed in the model: {err}") from err


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (``None`` without tensors)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def feed(
    model: nn.Module,
    data: Iterable | Callable[[nn.Module], Any],
    num_batches: int | None = None,
    *,
    device: torch.device | None = None,
    preprocess: Callable[[Any], Any] | None = None,
    desc: str = "Feeding",
    what: str = "batch",
    progress: bool = True,
    before_batch: Callable[[], None] | None = None,
) -> int:
    """Runs exactly ``num_batches`` batches of ``data`` through ``model`` (all when ``None``); returns how many.

    No batch beyond ``num_batches`` is taken from the data. A forward loop (a callable that is not iterable) is
    called once and counts as one batch. ``before_batch()`` runs before each batch. ``what`` names the batches in
    messages ("calibration batch 3 ... failed in the model").
    """
    if callable(data) and not hasattr(data, "__iter__"):
        if num_batches is not None:
            logger.info("num_batches=%d is ignored: the forward loop decides how much data it feeds", num_batches)
        if before_batch is not None:
            before_batch()
        data(model)
        return 1
    if not hasattr(data, "__iter__"):
        raise TypeError(f"data must be an iterable of batches (a DataLoader, a list) or a forward loop (a callable "
                        f"taking the model), got {type(data).__name__}")
    total = num_batches
    if hasattr(data, "__len__"):
        total = len(data) if num_batches is None else min(num_batches, len(data))
    fed = 0
    batches = iter(data)
    with tqdm(total=total, desc=desc, unit="batch", disable=not progress, leave=False) as bar:
        for index in itertools.count():
            if num_batches is not None and index >= num_batches:
                break  # before taking one more batch from the data
            try:
                batch = next(batches)
            except StopIteration:
                break
            batch = to_device(batch, device)
            inputs = preprocess(batch) if preprocess is not None else model_inputs(batch, index, what)
            if before_batch is not None:
                before_batch()
            run_model(model, inputs, index, what)
            fed += 1
            bar.update(1)
    if num_batches is not None and 0 < fed < num_batches:
        logger.info("the data had only %d of the %d batches asked for", fed, num_batches)
    return fed
