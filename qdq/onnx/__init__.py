"""Floor 5, the graph side: QDQ ONNX export, ONNX Runtime parity, the TensorRT rule checker, scale matching.

>>> from qdq.onnx import export_onnx, verify, check_tensorrt, apply_custom_rules_to_quantizer
"""

from qdq.onnx.export import (
    ExportError,
    ExportInfo,
    check_exportable,
    export_mode,
    export_onnx,
    export_onnx_distributed,
    export_with_quantizer_tags,
    to_deploy_form,
)
from qdq.onnx.parity import OutputParity, RoundingParity, VerifyReport, run_onnxruntime, verify

__all__ = [
    "export_onnx",
    "export_onnx_distributed",
    "ExportInfo",
    "ExportError",
    "export_mode",
    "check_exportable",
    "to_deploy_form",
    "export_with_quantizer_tags",
    "verify",
    "VerifyReport",
    "OutputParity",
    "RoundingParity",
    "run_onnxruntime",
    "check_tensorrt",
    "format_findings",
    "Finding",
    "quantize_groups",
    "apply_custom_rules_to_quantizer",
    "find_quantizer_pairs",
    "share_quantizer",
    "place_quantizers",
    "remove_placement",
    "predict_fusion",
    "format_fusion",
    "write_model_tensorrt_cache",
    "qdq_to_float_and_cache",
    "write_tensorrt_cache",
]

_LAZY = {
    "check_tensorrt": "qdq.onnx.check",
    "format_findings": "qdq.onnx.check",
    "Finding": "qdq.onnx.check",
    "quantize_groups": "qdq.onnx.check",
    "apply_custom_rules_to_quantizer": "qdq.onnx.rules",
    "find_quantizer_pairs": "qdq.onnx.rules",
    "share_quantizer": "qdq.onnx.rules",
    "place_quantizers": "qdq.onnx.placement",
    "remove_placement": "qdq.onnx.placement",
    "predict_fusion": "qdq.onnx.fusion",
    "format_fusion": "qdq.onnx.fusion",
    "write_model_tensorrt_cache": "qdq.onnx.trt_cache",
    "qdq_to_float_and_cache": "qdq.onnx.trt_cache",
    "write_tensorrt_cache": "qdq.onnx.trt_cache",
}


def __getattr__(name: str):
    # imported on first use, so that `python -m qdq.onnx.check` does not find its module imported already
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qdq.onnx' has no attribute {name!r}")
