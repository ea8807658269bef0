"""Floor 3, modules: the TensorQuantizer and the quantized layers.

Importable as pytorch_quantization's ``nn``: ``from qdq import nn as quant_nn``.
"""

from qdq.nn.modules._utils import QuantInputMixin, QuantMixin
from qdq.nn.modules.quant_conv import *  # noqa: F401,F403
from qdq.nn.modules.quant_conv import __all__ as _conv_all
from qdq.nn.modules.quant_elementwise import QuantAdd, QuantConcat
from qdq.nn.modules.quant_linear import Linear, QuantLinear
from qdq.nn.modules.quant_attention import QuantMultiheadAttention
from qdq.nn.modules.quant_matmul import QuantMatMul, QuantScaledDotProductAttention
from qdq.nn.modules.quant_pooling import *  # noqa: F401,F403
from qdq.nn.modules.quant_pooling import __all__ as _pool_all
from qdq.nn.modules.quant_rnn import LSTM, LSTMCell, QuantLSTM, QuantLSTMCell
from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.nn.modules.clip import Clip
from qdq.nn.modules.quant_instancenorm import QuantInstanceNorm1d, QuantInstanceNorm2d, QuantInstanceNorm3d

__all__ = [
    "TensorQuantizer",
    "QuantMixin",
    "QuantInputMixin",
    *_conv_all,
    "QuantLinear",
    "Linear",
    *_pool_all,
    "QuantLSTM",
    "QuantLSTMCell",
    "LSTM",
    "LSTMCell",
    "QuantAdd",
    "QuantConcat",
    "QuantMultiheadAttention",
    "QuantMatMul",
    "QuantScaledDotProductAttention",
    "Clip",
    "QuantInstanceNorm1d",
    "QuantInstanceNorm2d",
    "QuantInstanceNorm3d",
]
