"""Quantized pooling layers: the torch pooling op on a fake-quantized input.

Max pooling commutes with a monotonic per-tensor quantization, so TensorRT wants the same scale on its input and
output (see the scale-matching rules); average pooling quantizes its input like any other layer.

>>> import torch
>>> from qdq import nn as quant_nn
>>> pool = quant_nn.QuantAdaptiveAvgPool2d(1)
>>> pool(torch.randn(2, 4, 5, 5)).shape
torch.Size([2, 4, 1, 1])
"""

from __future__ import annotations

from torch import nn

from qdq.nn.modules._utils import QuantInputMixin, pop_quant_desc_in_kwargs, split_quant_kwargs

__all__ = [
    "QuantMaxPool1d",
    "QuantMaxPool2d",
    "QuantMaxPool3d",
    "QuantAvgPool1d",
    "QuantAvgPool2d",
    "QuantAvgPool3d",
    "QuantAdaptiveAvgPool1d",
    "QuantAdaptiveAvgPool2d",
    "QuantAdaptiveAvgPool3d",
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
    "AvgPool1d",
    "AvgPool2d",
    "AvgPool3d",
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "AdaptiveAvgPool3d",
]


class _QuantPoolNd(QuantInputMixin):
    """Constructor and forward shared by the quantized pools (mixed in before the torch class)."""

    def __init__(self, *args, **kwargs):
        quant, rest = split_quant_kwargs(kwargs, type(self))
        super().__init__(*args, **rest)
        self.init_quantizer(pop_quant_desc_in_kwargs(type(self), input_only=True, **quant))

    def forward(self, input):
        return super().forward(self._input_quantizer(input))


class QuantMaxPool1d(_QuantPoolNd, nn.MaxPool1d):
    """:class:`torch.nn.MaxPool1d` on a fake-quantized input."""


class QuantMaxPool2d(_QuantPoolNd, nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` on a fake-quantized input."""


class QuantMaxPool3d(_QuantPoolNd, nn.MaxPool3d):
    """:class:`torch.nn.MaxPool3d` on a fake-quantized input."""


class QuantAvgPool1d(_QuantPoolNd, nn.AvgPool1d):
    """:class:`torch.nn.AvgPool1d` on a fake-quantized input."""


class QuantAvgPool2d(_QuantPoolNd, nn.AvgPool2d):
    """:class:`torch.nn.AvgPool2d` on a fake-quantized input."""


class QuantAvgPool3d(_QuantPoolNd, nn.AvgPool3d):
    """:class:`torch.nn.AvgPool3d` on a fake-quantized input."""


class QuantAdaptiveAvgPool1d(_QuantPoolNd, nn.AdaptiveAvgPool1d):
    """:class:`torch.nn.AdaptiveAvgPool1d` on a fake-quantized input."""


class QuantAdaptiveAvgPool2d(_QuantPoolNd, nn.AdaptiveAvgPool2d):
    """:class:`torch.nn.AdaptiveAvgPool2d` on a fake-quantized input."""


class QuantAdaptiveAvgPool3d(_QuantPoolNd, nn.AdaptiveAvgPool3d):
    """:class:`torch.nn.AdaptiveAvgPool3d` on a fake-quantized input."""


MaxPool1d, MaxPool2d, MaxPool3d = QuantMaxPool1d, QuantMaxPool2d, QuantMaxPool3d
AvgPool1d, AvgPool2d, AvgPool3d = QuantAvgPool1d, QuantAvgPool2d, QuantAvgPool3d
AdaptiveAvgPool1d, AdaptiveAvgPool2d, AdaptiveAvgPool3d = (
    QuantAdaptiveAvgPool1d,
    QuantAdaptiveAvgPool2d,
    QuantAdaptiveAvgPool3d,
)
