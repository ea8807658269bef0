"""pytorch_quantization's ``tensor_quant``, kept at its path: the descriptors and quantization functions of
:mod:`qdq.math`.

Code written for pytorch_quantization (``from pytorch_quantization.tensor_quant import QuantDescriptor``) runs with
``qdq`` in place of the package name; every public name of floor 1 is here. The code lives in :mod:`qdq.math`
(its docstring has the arithmetic); new code may import from either.

>>> from qdq.tensor_quant import QuantDescriptor, fake_tensor_quant
>>> from qdq.math.descriptor import QuantDescriptor as Descriptor
>>> QuantDescriptor is Descriptor
True
"""

from qdq.math.descriptor import (
    CALIB_METHODS,
    calib_methods,
    QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW,
    QUANT_DESC_8BIT_PER_TENSOR,
    QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR,
    QuantDescriptor,
    register_calib_method,
    ScaledQuantDescriptor,
)
from qdq.math.ranges import (
    AMAX_EPS,
    amax_problem,
    amax_to_scale,
    check_amax,
    maxbound,
    quant_range,
    reduce_amax,
    reduce_range,
)
from qdq.math.quantize import affine_qparams, dequantize, fake_affine_quant, fake_quantize, quantize
from qdq.math.fake_quant import (
    data_checks,
    data_checks_enabled,
    fake_quant_params,
    fake_quantize_by_amax,
    fake_quantize_with_params,
    FakeQuantParams,
    FakeTensorQuantFunction,
    quantize_by_amax,
    TensorQuantFunction,
)
from qdq.math.pytorch_quantization import (
    fake_affine_tensor_quant,
    fake_tensor_quant,
    legacy_fake_tensor_quant,
    scaled_e4m3,
    tensor_quant,
)
__all__ = [
    "AMAX_EPS",
    "CALIB_METHODS",
    "calib_methods",
    "register_calib_method",
    "QuantDescriptor",
    "ScaledQuantDescriptor",
    "QUANT_DESC_8BIT_PER_TENSOR",
    "QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR",
    "QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW",
    "maxbound",
    "quant_range",
    "amax_to_scale",
    "quantize",
    "dequantize",
    "fake_quantize",
    "tensor_quant",
    "fake_tensor_quant",
    "TensorQuantFunction",
    "FakeTensorQuantFunction",
    "amax_problem",
    "check_amax",
    "reduce_amax",
    "reduce_range",
    "affine_qparams",
    "fake_affine_quant",
    "data_checks",
    "data_checks_enabled",
    "quantize_by_amax",
    "fake_quantize_by_amax",
    "FakeQuantParams",
    "fake_quant_params",
    "fake_quantize_with_params",
    "legacy_fake_tensor_quant",
    "fake_affine_tensor_quant",
    "scaled_e4m3",
]
