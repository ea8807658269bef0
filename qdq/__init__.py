"""qdq: fake quantization for PyTorch (PTQ and QAT) whose product is a QDQ ONNX model for TensorRT.

The package is built in floors; a lower floor never imports a higher one:

1. :mod:`qdq.tensor_quant` - descriptors and pure quantization math;
2. :mod:`qdq.calib` - calibrators (statistics of tensors);
3. :mod:`qdq.nn` - TensorQuantizer and the quantized layers.

Code written for NVIDIA's pytorch_quantization runs with its imports renamed::

    from qdq import nn as quant_nn, calib
    from qdq.tensor_quant import QuantDescriptor
"""

import logging

from qdq._version import __version__
from qdq import tensor_quant, calib, nn
from qdq.tensor_quant import QuantDescriptor, ScaledQuantDescriptor
from qdq.nn import TensorQuantizer

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__", "tensor_quant", "calib", "nn", "QuantDescriptor", "ScaledQuantDescriptor", "TensorQuantizer"]
