"""qdq: fake quantization for PyTorch (PTQ and QAT) whose product is a QDQ ONNX model for TensorRT.

The package is built in floors; a lower floor never imports a higher one:

1. :mod:`qdq.tensor_quant` - descriptors and pure quantization math;
2. :mod:`qdq.calib` - calibrators (statistics of tensors);
3. :mod:`qdq.nn` - TensorQuantizer and the quantized layers;
4. model transforms - :mod:`qdq.quant_modules` (the module map, in-place conversion), :mod:`qdq.calibrate`,
   :mod:`qdq.switches`, :mod:`qdq.sensitivity`.

Code written for NVIDIA's pytorch_quantization runs with its imports renamed::

    from qdq import nn as quant_nn, calib
    from qdq.tensor_quant import QuantDescriptor
"""

import logging

from qdq._version import __version__
from qdq import tensor_quant, calib, nn
from qdq.tensor_quant import QuantDescriptor, ScaledQuantDescriptor
from qdq.nn import TensorQuantizer
from qdq import quant_modules
from qdq.quant_modules import replace_to_quantization_module
from qdq.calibrate import calibrate_model, collect_stats, compute_amax
from qdq.switches import disable_quantization, enable_quantization, have_quantizer, quantizers

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "tensor_quant",
    "calib",
    "nn",
    "quant_modules",
    "QuantDescriptor",
    "ScaledQuantDescriptor",
    "TensorQuantizer",
    "replace_to_quantization_module",
    "calibrate_model",
    "collect_stats",
    "compute_amax",
    "disable_quantization",
    "enable_quantization",
    "have_quantizer",
    "quantizers",
]
