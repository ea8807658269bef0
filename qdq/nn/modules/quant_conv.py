"""Quantized convolutions and transposed convolutions.

Each layer takes exactly the arguments of its torch twin (``padding='same'``, ``padding_mode``, ``groups``,
``dilation``, ``bias=False``, ``device=``, ``dtype=``) plus ``quant_desc_input`` / ``quant_desc_weight``, is a
subclass of that twin, and computes the twin's functional op on the fake-quantized input and weight. With its
quantizers disabled it returns exactly what the float layer returns.

Weights are quantized per output channel for convolutions (axis 0 of ``(out, in / groups, *kernel)``). For
transposed convolutions the weight is ``(in, out / groups, *kernel)`` and the default is axis 0 as well, the *input*
channels: TensorRT's deconvolution kernels take per-channel weight scales along that axis and reject
per-output-channel ones (TensorRT issues #1694 and #2380), so this is the axis whose QDQ export builds there.

Example:
    >>> import torch
    >>> from qdq import nn as quant_nn
    >>> conv = quant_nn.QuantConv2d(3, 8, 3, padding="same", bias=False)
    >>> conv.weight_quantizer.axis, conv(torch.randn(1, 3, 8, 8)).shape
    (0, torch.Size([1, 8, 8, 8]))
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from qdq import tensor_quant
from qdq.nn.modules._utils import QuantMixin, pop_quant_desc_in_kwargs, split_quant_kwargs

__all__ = [
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
]


class _QuantConvNd(QuantMixin):
    """Constructor and forward shared by the quantized convolutions (mixed in before the torch class)."""

    def __init__(self, *args, **kwargs):
        quant, rest = split_quant_kwargs(kwargs, type(self))
        super().__init__(*args, **rest)
        self.init_quantizer(*pop_quant_desc_in_kwargs(type(self), **quant))

    def forward(self, input):
        return self._conv_forward(self._input_quantizer(input), self._weight_quantizer(self.weight), self.bias)


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """:class:`torch.nn.Conv1d` on fake-quantized input and per-output-channel weight."""

    default_quant_desc_weight = tensor_quant.QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """:class:`torch.nn.Conv2d` on fake-quantized input and per-output-channel weight."""

    default_quant_desc_weight = tensor_quant.QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    """:class:`torch.nn.Conv3d` on fake-quantized input and per-output-channel weight."""

    default_quant_desc_weight = tensor_quant.QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL


class _QuantConvTransposeNd(_QuantConvNd):
    _num_spatial_dims = 0
    _functional = None

    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros":
            raise ValueError(f"Only `zeros` padding mode is supported for {type(self).__name__}")
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, self._num_spatial_dims, self.dilation
        )
        return type(self)._functional(
            self._input_quantizer(input),
            self._weight_quantizer(self.weight),
            self.bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )


class QuantConvTranspose1d(_QuantConvTransposeNd, nn.ConvTranspose1d):
    """:class:`torch.nn.ConvTranspose1d` on fake-quantized input and per-input-channel weight."""

    default_quant_desc_weight = tensor_quant.QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL
    _num_spatial_dims = 1
    _functional = staticmethod(F.conv_transpose1d)


class QuantConvTranspose2d(_QuantConvTransposeNd, nn.ConvTranspose2d):
    """:class:`torch.nn.ConvTranspose2d` on fake-quantized input and per-input-channel weight."""

    default_quant_desc_weight = tensor_quant.QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL
    _num_spatial_dims = 2
    _functional = staticmethod(F.conv_transpose2d)


class QuantConvTranspose3d(_QuantConvTransposeNd, nn.ConvTranspose3d):
    """:class:`torch.nn.ConvTranspose3d` on fake-quantized input and per-input-channel weight."""

    default_quant_desc_weight = tensor_quant.QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL
    _num_spatial_dims = 3
    _functional = staticmethod(F.conv_transpose3d)


# pytorch_quantization's short names
Conv1d, Conv2d, Conv3d = QuantConv1d, QuantConv2d, QuantConv3d
ConvTranspose1d, ConvTranspose2d, ConvTranspose3d = QuantConvTranspose1d, QuantConvTranspose2d, QuantConvTranspose3d
