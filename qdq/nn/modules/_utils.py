"""Mixins that give a layer its quantizers, with per-class default descriptors.

A quantized layer class has a default descriptor for its inputs (and weights), which
``set_default_quant_desc_input/weight`` change for every layer of that class created (or swapped in) afterwards;
``quant_desc_input=`` / ``quant_desc_weight=`` keyword arguments override them for one layer.

Example:
    >>> from qdq import nn as quant_nn
    >>> from qdq.tensor_quant import QuantDescriptor
    >>> class HistogramLinear(quant_nn.QuantLinear):      # a class of one's own: the defaults of qdq's stay as they are
    ...     pass
    >>> HistogramLinear.set_default_quant_desc_input(QuantDescriptor(calib_method="histogram"))
    >>> type(HistogramLinear(4, 2).input_quantizer.calibrator).__name__
    'HistogramCalibrator'
    >>> type(quant_nn.QuantLinear(4, 2).input_quantizer.calibrator).__name__
    'MaxCalibrator'
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.math.descriptor import QUANT_DESC_8BIT_PER_TENSOR, QuantDescriptor

__all__ = ["QuantMixin", "QuantInputMixin", "pop_quant_desc_in_kwargs", "QUANT_DESC_KEYS"]

#: The keyword arguments that carry descriptors.
QUANT_DESC_KEYS = ("quant_desc_input", "quant_desc_weight")


def _eager() -> bool:
    """Outside tracing and compiling, where the layout and in-place tricks of the attention modules only change
    speed (the traced graph keeps the plain ops)."""
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling())


def _check_desc(value: Any, what: str) -> QuantDescriptor:
    if not isinstance(value, QuantDescriptor):
        raise TypeError(f"{what} must be a QuantDescriptor, got {type(value).__name__}")
    return value


def _check_fake(cls: type, *descs: QuantDescriptor) -> None:
    if any(not d.fake_quant for d in descs):
        raise ValueError(f"{cls.__name__}: Only fake quantization is supported in quantized layers (a descriptor has "
                         "fake_quant=False); use a TensorQuantizer alone for real quantization")


class QuantInputMixin:
    """Gives a layer one input quantizer, ``_input_quantizer``."""

    default_quant_desc_input = QUANT_DESC_8BIT_PER_TENSOR

    @classmethod
    def set_default_quant_desc_input(cls, value: QuantDescriptor) -> None:
        """Default input descriptor of this class (and of its subclasses that do not set their own)."""
        cls.default_quant_desc_input = _check_desc(value, f"{cls.__name__} default input descriptor")

    def init_quantizer(self, quant_desc_input: QuantDescriptor) -> None:
        """Creates ``_input_quantizer`` (call it in ``__init__``, or on an instance being converted)."""
        _check_desc(quant_desc_input, "quant_desc_input")
        _check_fake(type(self), quant_desc_input)
        self._input_quantizer = TensorQuantizer(quant_desc_input)

    @property
    def input_quantizer(self) -> TensorQuantizer:
        return self._input_quantizer


class QuantMixin:
    """Gives a layer an input and a weight quantizer (``_input_quantizer``, ``_weight_quantizer``), or lists of
    them (``_input_quantizers``, ``_weight_quantizers``) for multi-layer modules such as LSTMs."""

    default_quant_desc_input = QUANT_DESC_8BIT_PER_TENSOR
    default_quant_desc_weight = QUANT_DESC_8BIT_PER_TENSOR

    @classmethod
    def set_default_quant_desc_input(cls, value: QuantDescriptor) -> None:
        """Default input descriptor of this class (and of its subclasses that do not set their own)."""
        cls.default_quant_desc_input = _check_desc(value, f"{cls.__name__} default input descriptor")

    @classmethod
    def set_default_quant_desc_weight(cls, value: QuantDescriptor) -> None:
        """Default weight descriptor of this class (and of its subclasses that do not set their own)."""
        cls.default_quant_desc_weight = _check_desc(value, f"{cls.__name__} default weight descriptor")

    def init_quantizer(
        self,
        quant_desc_input: QuantDescriptor,
        quant_desc_weight: QuantDescriptor,
        num_layers: int | None = None,
    ) -> None:
        """Creates the quantizers: one pair, or ``num_layers`` of each in ``nn.ModuleList``s."""
        _check_desc(quant_desc_input, "quant_desc_input")
        _check_desc(quant_desc_weight, "quant_desc_weight")
        _check_fake(type(self), quant_desc_input, quant_desc_weight)
        if num_layers is None:
            self._input_quantizer = TensorQuantizer(quant_desc_input)
            self._weight_quantizer = TensorQuantizer(quant_desc_weight)
        else:
            self._input_quantizers = nn.ModuleList(TensorQuantizer(quant_desc_input) for _ in range(num_layers))
            self._weight_quantizers = nn.ModuleList(TensorQuantizer(quant_desc_weight) for _ in range(num_layers))

    @property
    def input_quantizer(self) -> TensorQuantizer:
        return self._input_quantizer

    @property
    def weight_quantizer(self) -> TensorQuantizer:
        return self._weight_quantizer


def pop_quant_desc_in_kwargs(quant_cls: type, input_only: bool = False, **kwargs: Any):
    """The descriptors for a layer of ``quant_cls``: from ``quant_desc_input``/``quant_desc_weight`` in ``kwargs``
    or the class defaults.

    Other keyword arguments (``device``, ``dtype`` and whatever torch's layer takes) are left alone; a misspelt
    descriptor keyword (anything else starting with ``quant_desc``) is a ``TypeError``.

    Returns ``quant_desc_input`` when ``input_only``, else ``(quant_desc_input, quant_desc_weight)``.

    >>> from qdq import nn as quant_nn
    >>> d_in, d_w = pop_quant_desc_in_kwargs(quant_nn.QuantConv2d, device="cpu")
    >>> d_w.axis
    0
    """
    unknown = sorted(k for k in kwargs if k.startswith("quant_desc") and k not in QUANT_DESC_KEYS)
    if input_only and "quant_desc_weight" in kwargs:
        unknown.append("quant_desc_weight")
    if unknown:
        raise TypeError(f"{quant_cls.__name__} does not take {unknown}; it takes {list(QUANT_DESC_KEYS[:1 if input_only else 2])}")
    quant_desc_input = _check_desc(kwargs.get("quant_desc_input", quant_cls.default_quant_desc_input), "quant_desc_input")
    if input_only:
        return quant_desc_input
    quant_desc_weight = _check_desc(
        kwargs.get("quant_desc_weight", quant_cls.default_quant_desc_weight), "quant_desc_weight"
    )
    return quant_desc_input, quant_desc_weight


def split_quant_kwargs(kwargs: dict[str, Any], quant_cls: type | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(descriptor kwargs, the rest)``: the layers pass the rest to torch's constructor.

    With ``quant_cls``, a keyword that neither the descriptors nor the torch layer's constructor takes is a
    ``TypeError`` naming it ("Unused keys", as pytorch_quantization says).
    """
    quant = {k: v for k, v in kwargs.items() if k.startswith("quant_desc")}
    rest = {k: v for k, v in kwargs.items() if not k.startswith("quant_desc")}
    if quant_cls is not None and rest:
        torch_cls = next((c for c in quant_cls.__mro__ if c.__module__.startswith("torch.nn")), None)
        if torch_cls is not None:
            params = inspect.signature(torch_cls.__init__).parameters
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                unused = sorted(k for k in rest if k not in params)
                if unused:
                    raise TypeError(f"{quant_cls.__name__}: Unused keys: {unused} (neither {torch_cls.__name__} nor "
                                    f"the quantization descriptors {list(QUANT_DESC_KEYS)} take them)")
    return quant, rest
