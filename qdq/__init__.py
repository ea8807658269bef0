"""qdq: fake quantization for PyTorch (PTQ and QAT) whose product is a QDQ ONNX model for TensorRT.

The package is built in floors; a lower floor never imports a higher one:

1. math - :mod:`qdq.tensor_quant`: descriptors and pure quantization functions;
2. statistics - :mod:`qdq.calib`: calibrators and the amax searches;
3. modules - :mod:`qdq.nn`: TensorQuantizer and the quantized layers;
4. model transforms - :mod:`qdq.quant_modules` (the module map, in-place conversion), :mod:`qdq.calibrate`,
   :mod:`qdq.switches`, :mod:`qdq.sensitivity`, :mod:`qdq.patching`, :mod:`qdq.fold_batchnorm`, :mod:`qdq.autotune`,
   :mod:`qdq.qat`, :mod:`qdq.calib_table`, :mod:`qdq.data`, :mod:`qdq.config` (per-layer config files),
   :mod:`qdq.distributed` (calibration and QAT across torch.distributed ranks);
5. graph side - :mod:`qdq.onnx`: export, ONNX Runtime parity, the TensorRT rule checker, scale matching;
6. faces - :mod:`qdq.rules` (recipes), the ``qdq`` command line, ``examples/``, ``benchmarks/``.

Code written for NVIDIA's pytorch_quantization runs with its imports renamed::

    from qdq import nn as quant_nn, calib, quant_modules
    from qdq.tensor_quant import QuantDescriptor

The whole flow::

    quant_modules.replace_to_quantization_module(model, ignore_policy=["head"])
    qdq.calibrate_model(model, loader, num_batches=25, method="mse")
    qdq.export_onnx(model, example_input, "model_qdq.onnx")
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
from qdq.sensitivity import auto_skip_sensitive_layers, build_sensitivity_profile
from qdq.patching import ForwardPatch, apply_patch, remove_patch
from qdq.fold_batchnorm import fold_bn
from qdq.calib_table import load_calib_table, save_calib_table, write_tensorrt_cache
from qdq.config import calibrate_from_config, create_quant_config, quantize_model
from qdq.onnx import apply_custom_rules_to_quantizer, check_tensorrt, export_onnx, verify
from qdq.onnx import place_quantizers

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
    "build_sensitivity_profile",
    "auto_skip_sensitive_layers",
    "ForwardPatch",
    "apply_patch",
    "remove_patch",
    "fold_bn",
    "save_calib_table",
    "load_calib_table",
    "write_tensorrt_cache",
    "create_quant_config",
    "quantize_model",
    "calibrate_from_config",
    "export_onnx",
    "verify",
    "check_tensorrt",
    "apply_custom_rules_to_quantizer",
    "place_quantizers",
]
