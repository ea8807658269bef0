"""ONNX Runtime parity: run the exported file and compare it with the PyTorch fake-quant model.

The error is reported in units of the output's quantization step: the scale of the DequantizeLinear that produces
the output when there is one, else ``max|reference| / 127`` (the step of an 8-bit max-calibrated quantizer of that
output). ONNX defines QuantizeLinear as ``round(x / scale)`` and PyTorch's fake quantization multiplies by the
reciprocal; the two differ on an exact rounding tie by one step, so the target is "within one step" rather than
bit-for-bit.

By default ONNX Runtime runs with graph optimizations off, i.e. the ONNX semantics of the file as written;
``optimized=True`` lets it fuse Q/DQ into integer kernels, as a deployment would.

Example:
    >>> import tempfile, os, torch
    >>> import qdq
    >>> from qdq.onnx import export_onnx, verify
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> _ = qdq.replace_to_quantization_module(model)
    >>> _ = qdq.calibrate_model(model, [torch.randn(16, 8)], progress=False)
    >>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
    >>> _ = export_onnx(model, torch.randn(1, 8), path, dynamic_batch=True)
    >>> report = verify(model, path, torch.randn(5, 8))
    >>> report.ok, report.outputs[0].max_error_steps <= 1
    (True, True)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

__all__ = ["verify", "VerifyReport", "OutputParity", "run_onnxruntime"]


@dataclass
class OutputParity:
    name: str
    max_abs_error: float
    step: float
    max_error_steps: float
    num_elements: int
    num_beyond_one_step: int


@dataclass
class VerifyReport:
    outputs: list[OutputParity] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every element within one quantization step."""
        return all(o.num_beyond_one_step == 0 for o in self.outputs)

    def __str__(self) -> str:
        lines = []
        for o in self.outputs:
            lines.append(
                f"{o.name}: max |onnxruntime - pytorch| = {o.max_abs_error:.3g} = {o.max_error_steps:.3f} steps "
                f"(step {o.step:.3g}); {o.num_beyond_one_step} of {o.num_elements} elements beyond one step"
            )
        return "\n".join(lines)


def _as_numpy_inputs(inputs: Any) -> list[np.ndarray]:
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        inputs = (inputs,)
    return [i.detach().cpu().numpy() if isinstance(i, torch.Tensor) else np.asarray(i) for i in inputs]


def run_onnxruntime(path_or_model: str | os.PathLike | onnx.ModelProto, inputs: Any,
                    optimized: bool = False) -> list[np.ndarray]:
    """Runs the model on the CPU execution provider; ``inputs`` in graph-input order."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    arrays = _as_numpy_inputs(inputs)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(arrays):
        raise ValueError(f"the ONNX model takes {len(names)} inputs {names}, got {len(arrays)}")
    return session.run(None, dict(zip(names, arrays)))


def _output_steps(model: onnx.ModelProto) -> dict[str, float]:
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    steps = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[1] in consts:
            scale = consts[node.input[1]]
            if scale.size == 1:
                steps[node.output[0]] = float(scale.reshape(()))
    return steps


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    flat = []
    for o in out:
        flat += _flatten(o)
    return flat


def verify(
    model: nn.Module,
    path_or_model: str | os.PathLike | onnx.ModelProto,
    inputs: Any,
    optimized: bool = False,
    output_names: Sequence[str] | None = None,
) -> VerifyReport:
    """Compares ONNX Runtime's outputs with the PyTorch model's on ``inputs`` (see the module docstring)."""
    onnx_model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(Path(path_or_model)))
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            reference = [t.detach().cpu().float().numpy() for t in _flatten(model(*args))]
    finally:
        for m, mode in training.items():
            m.training = mode
    got = run_onnxruntime(onnx_model, args, optimized=optimized)
    if len(got) != len(reference):
        raise ValueError(f"ONNX Runtime gave {len(got)} outputs, PyTorch {len(reference)}")
    steps = _output_steps(onnx_model)
    names = list(output_names) if output_names else [o.name for o in onnx_model.graph.output]
    report = VerifyReport()
    for name, ref, out in zip(names, reference, got):
        if ref.shape != out.shape:
            raise ValueError(f"output {name}: ONNX Runtime shape {out.shape} differs from PyTorch {ref.shape}")
        step = steps.get(name) or (float(np.abs(ref).max()) / 127.0 if ref.size else 1.0) or 1.0
        err = np.abs(out.astype(np.float64) - ref.astype(np.float64))
        max_err = float(err.max()) if err.size else 0.0
        report.outputs.append(OutputParity(
            name=name,
            max_abs_error=max_err,
            step=step,
            max_error_steps=max_err / step,
            num_elements=int(err.size),
            num_beyond_one_step=int((err > step * (1 + 1e-6)).sum()),
        ))
    return report
