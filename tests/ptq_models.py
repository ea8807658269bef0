"""What the PTQ tests share: a model replaced with low-bit per-channel weight quantizers, where rounding matters."""

from torch import nn

import qdq
from qdq.tensor_quant import QuantDescriptor


def low_bit_weights(model: nn.Module, bits: int = 3) -> nn.Module:
    """``model`` replaced in place, every weight quantizer ``bits``-bit per output channel; returns it."""
    qdq.replace_to_quantization_module(model)
    for m in model.modules():
        if hasattr(m, "_weight_quantizer"):
            m._weight_quantizer = qdq.TensorQuantizer(QuantDescriptor(num_bits=bits, axis=0))
    return model
