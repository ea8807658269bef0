"""Floor 3, modules: the TensorQuantizer and the quantized layers.

Importable as pytorch_quantization's ``nn``: ``from qdq import nn as quant_nn``.
"""

from qdq.nn.modules.tensor_quantizer import TensorQuantizer

__all__ = ["TensorQuantizer"]
