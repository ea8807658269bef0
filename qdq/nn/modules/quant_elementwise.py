"""QuantAdd and QuantConcat: elementwise ops whose inputs TensorRT wants quantized with one scale.

TensorRT fuses an Add or a Concat with its neighbours only when the Q/DQ pairs around it share their scale; a
mismatch inserts reformat layers. Both modules therefore offer one shared input quantizer as well as one per input
(``_input0_quantizer``, ``_input1_quantizer``, the names pytorch_quantization-era code uses). A shared quantizer is
one :class:`TensorQuantizer` object reachable under every input's name, so it calibrates on all inputs.

Example:
    >>> import torch
    >>> from qdq import nn as quant_nn
    >>> add = quant_nn.QuantAdd(shared=True)
    >>> add._input0_quantizer is add._input1_quantizer
    True
    >>> cat = quant_nn.QuantConcat(dim=1)
    >>> cat(torch.ones(1, 2), torch.zeros(1, 3)).shape
    torch.Size([1, 5])
"""

from __future__ import annotations

import torch
from torch import nn

from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.math.descriptor import QUANT_DESC_8BIT_PER_TENSOR, QuantDescriptor

__all__ = ["QuantAdd", "QuantConcat"]


def _inputs(args: tuple) -> tuple:
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return tuple(args[0])
    return args


class QuantAdd(nn.Module):
    """``x0 + x1 (+ ...)`` on fake-quantized inputs.

    Args:
        quantization: ``False`` makes it a plain add without quantizers (pytorch_quantization-era code passes the
            block's ``add`` flag here).
        shared: one quantizer for every input (equal scales, as TensorRT wants for a fused add).
        num_inputs: number of summands.
        quantize: indices of the inputs that get a quantizer (default: all). ``(1,)`` quantizes only the second
            input, the form TensorRT recommends for a residual add whose other input comes straight from a conv.
        quant_desc_input: descriptor of the quantizers (default: :attr:`default_quant_desc_input`).
    """

    default_quant_desc_input = QUANT_DESC_8BIT_PER_TENSOR

    @classmethod
    def set_default_quant_desc_input(cls, value: QuantDescriptor) -> None:
        if not isinstance(value, QuantDescriptor):
            raise TypeError(f"{cls.__name__} default input descriptor must be a QuantDescriptor")
        cls.default_quant_desc_input = value

    def __init__(
        self,
        quantization: bool = True,
        shared: bool = False,
        num_inputs: int = 2,
        quantize: tuple[int, ...] | None = None,
        quant_desc_input: QuantDescriptor | None = None,
    ):
        super().__init__()
        if num_inputs < 2:
            raise ValueError(f"QuantAdd needs at least 2 inputs, got num_inputs={num_inputs}")
        self.quantization = bool(quantization)
        self.num_inputs = num_inputs
        self.quantized_inputs = tuple(range(num_inputs)) if quantize is None else tuple(sorted(set(quantize)))
        if any(not 0 <= i < num_inputs for i in self.quantized_inputs):
            raise ValueError(f"QuantAdd: quantize={quantize} names inputs outside 0..{num_inputs - 1}")
        if self.quantization:
            desc = quant_desc_input or type(self).default_quant_desc_input
            common = TensorQuantizer(desc) if shared else None
            for i in self.quantized_inputs:
                setattr(self, f"_input{i}_quantizer", common if shared else TensorQuantizer(desc))

    def forward(self, *args):
        xs = _inputs(args)
        if len(xs) != self.num_inputs:
            raise ValueError(f"QuantAdd expects {self.num_inputs} inputs, got {len(xs)}")
        if self.quantization:
            xs = [getattr(self, f"_input{i}_quantizer")(x) if i in self.quantized_inputs else x for i, x in enumerate(xs)]
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out

    def extra_repr(self) -> str:
        return f"num_inputs={self.num_inputs}, quantization={self.quantization}, quantized_inputs={self.quantized_inputs}"


class QuantConcat(nn.Module):
    """``torch.cat`` of fake-quantized inputs along ``dim``.

    Args:
        dim: concatenation dimension.
        quantization: ``False`` makes it a plain concat.
        shared: one quantizer (``_input_quantizer``) for every input - the default, since TensorRT needs equal scales
            to concatenate without requantizing; ``False`` gives ``_input{i}_quantizer`` per input (``num_inputs``
            then required).
        num_inputs: number of inputs (checked when given).
        quant_desc_input: descriptor of the quantizers.
    """

    default_quant_desc_input = QUANT_DESC_8BIT_PER_TENSOR
    set_default_quant_desc_input = QuantAdd.set_default_quant_desc_input

    def __init__(
        self,
        dim: int = 1,
        quantization: bool = True,
        shared: bool = True,
        num_inputs: int | None = None,
        quant_desc_input: QuantDescriptor | None = None,
    ):
        super().__init__()
        if not shared and num_inputs is None:
            raise ValueError("QuantConcat(shared=False) needs num_inputs to create one quantizer per input")
        self.dim = dim
        self.quantization = bool(quantization)
        self.shared = bool(shared)
        self.num_inputs = num_inputs
        if self.quantization:
            desc = quant_desc_input or type(self).default_quant_desc_input
            if shared:
                self._input_quantizer = TensorQuantizer(desc)
            else:
                for i in range(num_inputs):
                    setattr(self, f"_input{i}_quantizer", TensorQuantizer(desc))

    def forward(self, *args):
        xs = _inputs(args)
        if self.num_inputs is not None and len(xs) != self.num_inputs:
            raise ValueError(f"QuantConcat expects {self.num_inputs} inputs, got {len(xs)}")
        if self.quantization:
            if self.shared:
                xs = [self._input_quantizer(x) for x in xs]
            else:
                xs = [getattr(self, f"_input{i}_quantizer")(x) for i, x in enumerate(xs)]
        return torch.cat(xs, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, quantization={self.quantization}, shared={self.shared}"
