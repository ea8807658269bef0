"""Checking a batch against the model's ``forward`` signature before any calibration work is done."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

import torch
from torch import nn

from qdq.calibrate.feeding import model_inputs

__all__ = ["check_inputs", "match_model_inputs"]

# --------------------------------------------------------------------------------------------------------------------
# does the data fit the model?
# --------------------------------------------------------------------------------------------------------------------


def _describe_inputs(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor{tuple(obj.shape)}"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{k!r}: {_describe_inputs(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "(" + ", ".join(_describe_inputs(v) for v in obj) + ")"
    return type(obj).__name__


def check_inputs(
    model: nn.Module | Callable[..., Any] | inspect.Signature,
    batch: Any,
    *,
    preprocess: Callable[[Any], Any] | None = None,
) -> inspect.BoundArguments:
    """Checks that ``batch`` fits ``model``'s ``forward`` signature, as :func:`qdq.calibrate_model` would call it.

    The batch is turned into the model's input as ``calibrate_model`` does (``preprocess``, or the first item of a
    tuple), then bound to the signature: a tensor is one positional argument, a tuple or list several, a dict
    keyword arguments. Nothing runs, so shapes are not checked - only the number and names of the inputs.

    Args:
        model: a module (its ``forward`` is checked), another callable, or an ``inspect.Signature``.
        batch: one batch, as the data yields it.
        preprocess: the ``preprocess`` given to ``calibrate_model``, if any.

    Returns:
        The bound arguments (``.arguments`` maps each parameter name to its input).

    Raises:
        TypeError: the inputs do not fit the signature; the message shows both.

    Example:
        >>> import torch
        >>> class TwoInputs(torch.nn.Module):
        ...     def forward(self, image, mask=None):
        ...         return image
        >>> list(check_inputs(TwoInputs(), {"image": torch.zeros(1, 3), "mask": torch.ones(1, 3)}).arguments)
        ['image', 'mask']
        >>> check_inputs(TwoInputs(), {"img": torch.zeros(1, 3)})
        Traceback (most recent call last):
        ...
        TypeError: the inputs {'img': Tensor(1, 3)} do not fit TwoInputs.forward(image, mask=None): missing ... 'image'
    """
    if isinstance(model, inspect.Signature):
        signature, label = model, "the signature "
    else:
        function = model.forward if isinstance(model, nn.Module) else model
        if not callable(function):
            raise TypeError(f"check_inputs: expected a module, a callable or an inspect.Signature, got {model!r}")
        signature = inspect.signature(function)
        label = f"{type(model).__name__}.forward" if isinstance(model, nn.Module) else getattr(model, "__name__", "")
    inputs = preprocess(batch) if preprocess is not None else model_inputs(batch)
    if isinstance(inputs, dict):
        args, kwargs = (), inputs
    elif isinstance(inputs, (list, tuple)):
        args, kwargs = tuple(inputs), {}
    else:
        args, kwargs = (inputs,), {}
    try:
        return signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"the inputs {_describe_inputs(inputs)} do not fit {label}{signature}: {err}") from None


def match_model_inputs(
    model: nn.Module | Callable[..., Any] | inspect.Signature,
    data: Iterable[Any],
    *,
    preprocess: Callable[[Any], Any] | None = None,
) -> inspect.BoundArguments:
    """Checks the first batch of ``data`` against ``model``'s inputs (see :func:`check_inputs`) before calibrating.

    Only the first batch is read; sources are re-iterable, so ``data`` can then go to ``calibrate_model`` whole.

    Raises:
        TypeError: the first batch does not fit the model's ``forward``.
        ValueError: ``data`` yields no batch.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> _ = match_model_inputs(model, [torch.zeros(2, 4)])
        >>> match_model_inputs(model, [((torch.zeros(2, 4), torch.zeros(2, 4)),)])
        Traceback (most recent call last):
        ...
        TypeError: the inputs (Tensor(2, 4), Tensor(2, 4)) do not fit Linear.forward(...: too many positional arguments
    """
    for batch in data:
        return check_inputs(model, batch, preprocess=preprocess)
    raise ValueError("match_model_inputs: the data yields no batch")
