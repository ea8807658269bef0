"""Model-wide quantizer switches: enable, disable, save and restore, as calls or as context managers.

Example:
    >>> import torch
    >>> from qdq import nn as quant_nn
    >>> from qdq.transform.switches import disable_quantization, have_quantizer, quantizers
    >>> model = torch.nn.Sequential(quant_nn.QuantLinear(4, 4), torch.nn.ReLU())
    >>> have_quantizer(model[0]), have_quantizer(model[1])
    (True, False)
    >>> with disable_quantization(model):              # restores the previous state on exit
    ...     [q.is_enabled for _, q in quantizers(model)]
    [False, False]
    >>> [q.is_enabled for _, q in quantizers(model)]
    [True, True]
    >>> _ = disable_quantization(model[0]).apply()     # the pytorch_quantization-era call, no restore
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from qdq.nn.modules.tensor_quantizer import TensorQuantizer

__all__ = [
    "quantizers",
    "have_quantizer",
    "disable_quantization",
    "enable_quantization",
    "save_quantizer_states",
    "restore_quantizer_states",
    "preserved_modes",
]


def quantizers(module: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    """``(dotted name, quantizer)`` for every TensorQuantizer in ``module`` (each shared quantizer once)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module (a model or a layer), got {type(module).__name__}")
    for name, m in module.named_modules():
        if isinstance(m, TensorQuantizer):
            yield name, m


def have_quantizer(module: nn.Module) -> bool:
    """Whether ``module`` holds at least one TensorQuantizer (itself included)."""
    return any(True for _ in quantizers(module))


def save_quantizer_states(module: nn.Module) -> dict[TensorQuantizer, dict[str, bool]]:
    """The switches of every quantizer of ``module``."""
    return {q: q.state() for _, q in quantizers(module)}


def restore_quantizer_states(states: dict[TensorQuantizer, dict[str, bool]]) -> None:
    """Puts back switches saved by :func:`save_quantizer_states`."""
    for q, state in states.items():
        q.set_state(state)


@contextlib.contextmanager
def preserved_modes(model: nn.Module, quantizer_states: bool = True) -> Iterator[nn.Module]:
    """Puts back every module's train/eval flag, and every quantizer's switches, when the block ends (also on an
    exception): what each step that evaluates, calibrates or exports a user's model needs around its work.

    >>> import torch
    >>> from qdq import nn as quant_nn
    >>> model = torch.nn.Sequential(quant_nn.QuantLinear(4, 4)).train()
    >>> with preserved_modes(model):
    ...     _ = model.eval()
    ...     model[0].input_quantizer.disable()
    >>> model.training, model[0].training, model[0].input_quantizer.is_enabled
    (True, True, True)
    """
    training = {m: m.training for m in model.modules()}
    states = save_quantizer_states(model) if quantizer_states else {}
    try:
        yield model
    finally:
        restore_quantizer_states(states)
        for m, mode in training.items():
            m.training = mode


class _Switch:
    """Turns every quantizer of a module on or off: ``.apply()`` to do it for good, ``with`` to do it for a block."""

    _enable = True

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise TypeError(f"{type(self).__name__} takes an nn.Module (a model or a layer), got {type(module).__name__}")
        self.module = module
        self._saved: dict | None = None

    def _set(self, on: bool) -> "_Switch":
        for _, q in quantizers(self.module):
            q.enable() if on else q.disable()
        return self

    def __enter__(self) -> "_Switch":
        self._saved = save_quantizer_states(self.module)
        return self._set(self._enable)

    def __exit__(self, *exc) -> bool:
        restore_quantizer_states(self._saved or {})
        self._saved = None
        return False


class disable_quantization(_Switch):
    """Disables every quantizer of ``module`` (``.apply()``, or ``with`` to restore the previous state)."""

    _enable = False

    def apply(self, disabled: bool = True) -> "disable_quantization":
        return self._set(not disabled)


class enable_quantization(_Switch):
    """Enables every quantizer of ``module`` (``.apply()``, or ``with`` to restore the previous state)."""

    _enable = True

    def apply(self, enabled: bool = True) -> "enable_quantization":
        return self._set(enabled)
