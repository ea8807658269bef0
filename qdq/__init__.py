"""qdq: fake quantization for PyTorch (PTQ and QAT) whose product is a QDQ ONNX model for TensorRT.

The package is built in floors; a lower floor never imports a higher one (``tests/test_floors.py`` checks it):

1. math - :mod:`qdq.math`: descriptors and pure quantization functions, FP8 E4M3 and blocked INT4
   (:mod:`qdq.tensor_quant` is pytorch_quantization's path to them);
2. statistics - :mod:`qdq.calib`: calibrators and the amax searches;
3. modules - :mod:`qdq.nn`: TensorQuantizer and the quantized layers;
4. model transforms, in four steps, each importing only the ones before it:

   1. :mod:`qdq.transform` - converting the model: the module map and the in-place replacement, ignore policies,
      forward patches, inline op sites, attention MatMuls, BatchNorm folding, switches, formats per layer, QAT;
   2. :mod:`qdq.distributed` - calibration and QAT across torch.distributed ranks;
   3. :mod:`qdq.calibrate` - the model on data: whole-model calibration, feeding, calibration data from files,
      auto-tune, sensitivity, the format search, accuracy measures, calibration tables;
   4. :mod:`qdq.ptq` (bias correction, equalization, AdaRound) and :mod:`qdq.config` (per-layer config files);

5. graph side - :mod:`qdq.onnx`: export, ONNX Runtime parity, the TensorRT rule checker, scale matching, the
   automatic placement for TensorRT and the fusion predictor;
6. faces - :mod:`qdq.cli` (the ``qdq`` command line, its demo, model zoo and plots), :mod:`qdq.rules` (recipes),
   ``examples/``, ``benchmarks/``.

pytorch_quantization's paths stay: :mod:`qdq.tensor_quant` (re-exporting :mod:`qdq.math`),
:mod:`qdq.quant_modules` (re-exporting :mod:`qdq.transform`),
:mod:`qdq.cuda_ext`, :mod:`qdq.quant_logging`, :mod:`qdq.utils`, :mod:`qdq.optim`. ``qdq._files``,
``qdq._json_keys``, ``qdq._union_find`` and ``qdq._version`` are private helpers. Each package's docstring lists
its modules.

Code written for NVIDIA's pytorch_quantization runs with its imports renamed::

    from qdq import nn as quant_nn, calib, quant_modules
    from qdq.tensor_quant import QuantDescriptor

The whole flow::

    quant_modules.replace_to_quantization_module(model, ignore_policy=["head"])
    qdq.calibrate_model(model, loader, num_batches=25, method="mse")
    qdq.export_onnx(model, example_input, "model_qdq.onnx")

The top level is lazy: ``import qdq`` imports neither torch nor any floor; each name below is imported from the
module that defines it on first use (``qdq.calibrate_model`` imports :mod:`qdq.calibrate.model`). The public API is
exactly ``__all__``.

>>> import qdq
>>> qdq.calibrate_model.__module__
'qdq.calibrate.model'
>>> sorted(set(dir(qdq)) - set(qdq.__all__))
[]
"""

import importlib
import logging

# the public name -> the module that defines it (a submodule maps to itself: its last name part is the name)
_EXPORTS = {
    "tensor_quant": "qdq.tensor_quant",
    "calib": "qdq.calib",
    "nn": "qdq.nn",
    "quant_modules": "qdq.quant_modules",
    "QuantDescriptor": "qdq.tensor_quant",
    "ScaledQuantDescriptor": "qdq.tensor_quant",
    "TensorQuantizer": "qdq.nn",
    "replace_to_quantization_module": "qdq.transform.replace",
    "calibrate_model": "qdq.calibrate.model",
    "collect_stats": "qdq.calibrate.model",
    "compute_amax": "qdq.calibrate.model",
    "disable_quantization": "qdq.transform.switches",
    "enable_quantization": "qdq.transform.switches",
    "have_quantizer": "qdq.transform.switches",
    "quantizers": "qdq.transform.switches",
    "build_sensitivity_profile": "qdq.calibrate.sensitivity",
    "auto_skip_sensitive_layers": "qdq.calibrate.sensitivity",
    "ForwardPatch": "qdq.transform.patching",
    "apply_patch": "qdq.transform.patching",
    "remove_patch": "qdq.transform.patching",
    "fold_bn": "qdq.transform.fold_batchnorm",
    "save_calib_table": "qdq.calibrate.calib_table",
    "load_calib_table": "qdq.calibrate.calib_table",
    "write_tensorrt_cache": "qdq.onnx.trt_cache",  # a model or {tensor: amax}
    "create_quant_config": "qdq.config",
    "load_quant_config": "qdq.config",
    "save_quant_config": "qdq.config",
    "apply_quant_config": "qdq.config",
    "quantize_model": "qdq.config",  # the deprecated name of apply_quant_config (warns)
    "calibrate_from_config": "qdq.config",
    "export_onnx": "qdq.onnx",
    "verify": "qdq.onnx",
    "check_tensorrt": "qdq.onnx",
    "apply_custom_rules_to_quantizer": "qdq.onnx",
    "bias_correction": "qdq.ptq",
    "equalize": "qdq.ptq",
    "adaround": "qdq.ptq",
    "formats": "qdq.math.formats",
    "set_layer_format": "qdq.transform.layer_formats",
    "set_model_format": "qdq.transform.layer_formats",
    "search_formats": "qdq.calibrate.format_search",
    "fp8_exclusion": "qdq.transform.layer_formats",
    "quantize_attention": "qdq.transform.attention",
    "initialize": "qdq.transform.module_map",
    "deactivate": "qdq.transform.module_map",
    "enable_onnx_export": "qdq.transform.module_map",
    "place_quantizers": "qdq.onnx",
    "round_scales_to_float16": "qdq.onnx.float16",
}

__all__ = ["__version__", *_EXPORTS]

logging.getLogger(__name__).addHandler(logging.NullHandler())
del logging


def _package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("qdq")
    except metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
        from qdq._version import __version__ as version

        return version


def __getattr__(name: str):
    if name == "__version__":
        value = _package_version()
    elif name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        value = module if module.__name__.rpartition(".")[2] == name else getattr(module, name)
    else:
        raise AttributeError(f"module 'qdq' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return list(__all__)
