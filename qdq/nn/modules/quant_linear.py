"""Quantized linear layer.

>>> import torch
>>> from qdq import nn as quant_nn
>>> fc = quant_nn.QuantLinear(16, 4, bias=False)
>>> fc.weight_quantizer.axis, fc(torch.randn(2, 16)).shape
(0, torch.Size([2, 4]))
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from qdq import tensor_quant
from qdq.nn.modules._utils import QuantMixin, pop_quant_desc_in_kwargs, split_quant_kwargs

__all__ = ["QuantLinear", "Linear"]


class QuantLinear(QuantMixin, nn.Linear):
    """:class:`torch.nn.Linear` on a fake-quantized input and a per-row (per output feature) weight.

    Takes the arguments of ``nn.Linear`` plus ``quant_desc_input`` / ``quant_desc_weight``.
    """

    default_quant_desc_weight = tensor_quant.QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW

    def __init__(self, *args, **kwargs):
        quant, rest = split_quant_kwargs(kwargs, type(self))
        super().__init__(*args, **rest)
        self.init_quantizer(*pop_quant_desc_in_kwargs(type(self), **quant))

    def forward(self, input):
        return F.linear(self._input_quantizer(input), self._weight_quantizer(self.weight), self.bias)


Linear = QuantLinear
