"""Floor 5, the graph side: QDQ ONNX export, ONNX Runtime parity, the TensorRT rule checker, scale matching.

>>> from qdq.onnx import export_onnx, verify
"""

from qdq.onnx.export import ExportError, ExportInfo, check_exportable, export_mode, export_onnx, to_deploy_form
from qdq.onnx.verify import OutputParity, VerifyReport, run_onnxruntime, verify

__all__ = [
    "export_onnx",
    "ExportInfo",
    "ExportError",
    "export_mode",
    "check_exportable",
    "to_deploy_form",
    "verify",
    "VerifyReport",
    "OutputParity",
    "run_onnxruntime",
]
