"""Quantized instance normalization: :class:`torch.nn.InstanceNorm1d/2d/3d` on a fake-quantized input.

The constructor is pytorch_quantization's (torch's arguments, then ``quant_desc_input=``).

>>> import torch
>>> from qdq import nn as quant_nn
>>> norm = quant_nn.QuantInstanceNorm2d(4, affine=True)
>>> norm(torch.randn(2, 4, 5, 5)).shape
torch.Size([2, 4, 5, 5])
>>> norm.input_quantizer.amax is None   # not calibrated yet: each batch uses its own abs-max
True
"""

from __future__ import annotations

from torch import nn

from qdq.nn.modules._utils import QuantInputMixin, pop_quant_desc_in_kwargs, split_quant_kwargs

__all__ = ["QuantInstanceNorm1d", "QuantInstanceNorm2d", "QuantInstanceNorm3d"]


class _QuantInstanceNormNd(QuantInputMixin):
    """Constructor and forward shared by the quantized instance norms (mixed in before the torch class)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = False,
                 track_running_stats: bool = False, **kwargs):
        quant, rest = split_quant_kwargs(kwargs, type(self))
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **rest)
        self.init_quantizer(pop_quant_desc_in_kwargs(type(self), input_only=True, **quant))

    def forward(self, input):
        return super().forward(self._input_quantizer(input))


class QuantInstanceNorm1d(_QuantInstanceNormNd, nn.InstanceNorm1d):
    """:class:`torch.nn.InstanceNorm1d` on a fake-quantized input."""


class QuantInstanceNorm2d(_QuantInstanceNormNd, nn.InstanceNorm2d):
    """:class:`torch.nn.InstanceNorm2d` on a fake-quantized input."""


class QuantInstanceNorm3d(_QuantInstanceNormNd, nn.InstanceNorm3d):
    """:class:`torch.nn.InstanceNorm3d` on a fake-quantized input."""
