"""ONNX Runtime parity: run the exported file and compare it with the PyTorch fake-quant model.

Two comparisons:

* **rounding**: every activation QuantizeLinear of the file, run by ONNX Runtime, against qdq's quantization of the
  very tensor ONNX Runtime fed it. ONNX defines QuantizeLinear as ``round(x / scale)`` and qdq multiplies by the
  reciprocal (as PyTorch's fused kernels do); the two differ only on an exact rounding tie, by one integer step. So
  every Q must agree within one step.
* **outputs**: the model outputs, in units of the output's quantization step (the scale of the DequantizeLinear that
  produces the output when there is one, else ``max|reference| / 127``, the step of an 8-bit max-calibrated
  quantizer of that output). Shallow models agree within a step. In deep networks the float convolutions of the
  two runtimes differ in their last bits, a value near a rounding boundary rounds differently, and those one-step
  flips compound with depth: ``output_tolerance_steps`` sets how many output steps to accept
  (:data:`DEFAULT_OUTPUT_TOLERANCE_STEPS`, 8, by default: EfficientNet-Lite0 with its trained weights and TensorRT's
  placement measured 4.7 output steps with 4 of 6.9 million QuantizeLinear values one step apart; random-weight
  networks amplify more). The rounding comparison is the exact one.

**Float16 files** (``export_onnx(..., float_dtype=torch.float16)``, :mod:`qdq.onnx.float16`) are compared with
the float32 PyTorch model the same way: every QuantizeLinear against qdq's quantization of the float16 tensor ONNX
Runtime fed it (its scale is the quantizer's own, exactly), within one step; the outputs (float32, after the file's
last Cast) within ``output_tolerance_steps`` output steps plus :data:`FLOAT16_OUTPUT_RTOL` of ``max|reference|``,
for the float16 rounding of the remainder (about ``2**-11`` relative per op, a few one-step flips more). Measured
(8 images): EfficientNet-Lite0 with its trained weights, 3.68 output steps in float16 against 2.61 in float32, 0 of
55 million QuantizeLinear values one step apart; torchvision resnet18 with random weights, 4.75 against 3.24.

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
    >>> report.ok, report.outputs[0].max_error_steps <= 1, report.rounding.max_step_difference <= 1
    (True, True, True)
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

from qdq.transform.switches import preserved_modes

__all__ = ["verify", "VerifyReport", "OutputParity", "RoundingParity", "run_onnxruntime", "DEFAULT_OUTPUT_TOLERANCE_STEPS",
           "FLOAT16_OUTPUT_RTOL"]

#: How many output quantization steps ONNX Runtime's outputs may differ from PyTorch's (see the module docstring).
DEFAULT_OUTPUT_TOLERANCE_STEPS = 8.0
#: The extra output tolerance of a float16 file, relative to the output's largest magnitude (see the module docstring).
FLOAT16_OUTPUT_RTOL = 2.0**-8


@dataclass
class OutputParity:
    name: str
    max_abs_error: float
    step: float
    max_error_steps: float
    num_elements: int
    num_beyond_one_step: int
    allowed_steps: float | None = None  # this output's tolerance in steps when it differs from the report's


@dataclass
class RoundingParity:
    """Every activation QuantizeLinear of the file against qdq's arithmetic on the same input."""

    num_quantizers: int = 0
    num_elements: int = 0
    num_differing: int = 0  # elements one step apart (rounding ties)
    max_step_difference: int = 0


@dataclass
class VerifyReport:
    outputs: list[OutputParity] = field(default_factory=list)
    rounding: RoundingParity = field(default_factory=RoundingParity)
    output_tolerance_steps: float = DEFAULT_OUTPUT_TOLERANCE_STEPS
    float16: bool = False  # the file computes its float remainder in float16

    @property
    def ok(self) -> bool:
        """Every QuantizeLinear within one step of qdq's arithmetic, every output element within the tolerance."""
        return self.rounding.max_step_difference <= 1 and all(
            o.max_error_steps <= (o.allowed_steps if o.allowed_steps is not None else self.output_tolerance_steps)
            * (1 + 1e-6) for o in self.outputs
        )

    def __str__(self) -> str:
        r = self.rounding
        lines = [
            f"{'OK' if self.ok else 'MISMATCH'}: ONNX Runtime against PyTorch, tolerance "
            f"{self.output_tolerance_steps:g} output step(s) and 1 QuantizeLinear step"
            + (f" (float16 file: outputs also {FLOAT16_OUTPUT_RTOL:g} of max |output|)" if self.float16 else ""),
            f"rounding: {r.num_quantizers} QuantizeLinear, {r.num_differing} of {r.num_elements} values one step "
            f"apart (ties), largest difference {r.max_step_difference} step(s)"
        ]
        for o in self.outputs:
            lines.append(
                f"{o.name}: max |onnxruntime - pytorch| = {o.max_abs_error:.3g} = {o.max_error_steps:.3f} steps "
                f"(step {o.step:.3g}); {o.num_beyond_one_step} of {o.num_elements} elements beyond one step"
            )
        return "\n".join(lines)


def _read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """The ONNX file at ``path`` with its external data; a clear error for a missing, empty or non-ONNX file."""
    from qdq.onnx.check import read_onnx

    return read_onnx(path, caller="verify", load_external_data=True)


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


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every constant tensor of the main graph: initializers and the outputs of tensor-valued Constant nodes."""
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return consts


def _output_steps(model: onnx.ModelProto) -> dict[str, float]:
    consts = _constants(model)
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


def _activation_qs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    consts = {i.name for i in model.graph.initializer}
    consts |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in consts]


def _rounding_parity(onnx_model: onnx.ModelProto, args: tuple) -> RoundingParity:
    """Runs the file with every activation Q's input and output exposed and requantizes the inputs with qdq."""
    from qdq.math.quantize import quantize

    qs = _activation_qs(onnx_model)
    parity = RoundingParity(num_quantizers=len(qs))
    if not qs:
        return parity
    probe = onnx.ModelProto()
    probe.CopyFrom(onnx_model)
    del probe.graph.output[:]
    wanted = []
    for node in qs:
        for name in (node.input[0], node.output[0]):
            if name not in wanted:
                wanted.append(name)
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
    values = dict(zip(wanted, run_onnxruntime(probe, args)))
    consts = _constants(onnx_model)  # initializers and Constant nodes: files from other tools use both
    for node in qs:
        x, q_ort = values[node.input[0]], values[node.output[0]]
        missing = [t for t in node.input[1:3] if t and t not in consts]
        if missing:
            raise ValueError(f"QuantizeLinear {node.name or node.output[0]!r}: its scale or zero point {missing} is "
                             "not a constant (initializer or Constant node); verify cannot requantize its input")
        scale = consts[node.input[1]].astype(np.float32)
        zero_point = consts[node.input[2]] if len(node.input) > 2 else np.zeros((), np.uint8)
        if zero_point.dtype.kind not in "iu":  # FP8 E4M3: compare positions on the FP8 grid
            diff = _fp8_step_difference(x, q_ort, scale, node, zero_point)
            parity.num_elements += diff.size
            parity.num_differing += int((diff > 0).sum())
            parity.max_step_difference = max(parity.max_step_difference, int(diff.max()) if diff.size else 0)
            continue
        info = np.iinfo(zero_point.dtype)
        if scale.size > 1:  # per-channel activations are not expected; compare them too
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % x.ndim
            shape = [1] * x.ndim
            shape[axis] = scale.size
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        ref = quantize(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(scale),
                       torch.from_numpy(zero_point.astype(np.float32)), int(info.min), int(info.max)).numpy()
        diff = np.abs(ref.astype(np.int64) - q_ort.astype(np.int64))
        parity.num_elements += diff.size
        parity.num_differing += int((diff > 0).sum())
        parity.max_step_difference = max(parity.max_step_difference, int(diff.max()) if diff.size else 0)
    return parity


def _fp8_ordinal(bits: np.ndarray) -> np.ndarray:
    """Position of float8_e4m3fn bit patterns on the ordered FP8 grid (sign-magnitude to a signed integer)."""
    bits = bits.astype(np.int64)
    magnitude = bits & 0x7F
    return np.where(bits & 0x80, -magnitude, magnitude)


def _fp8_step_difference(x: np.ndarray, q_ort: np.ndarray, scale: np.ndarray, node, zero_point) -> np.ndarray:
    """FP8 grid steps between ONNX Runtime's QuantizeLinear output and :func:`qdq.math.formats.quantize_fp8`."""
    from qdq.math.formats import quantize_fp8

    if str(zero_point.dtype) != "float8_e4m3fn":
        raise ValueError(f"{node.name or 'a QuantizeLinear'}: zero point type {zero_point.dtype} is not compared "
                         "(qdq exports int8, uint8 and float8e4m3fn)")
    if scale.size > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % x.ndim
        shape = [1] * x.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
    ref = quantize_fp8(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(scale)).view(torch.uint8).numpy()
    ort_bits = q_ort.view(np.uint8) if q_ort.dtype != np.uint8 else q_ort
    return np.abs(_fp8_ordinal(ref) - _fp8_ordinal(ort_bits))


def _is_float16(model: onnx.ModelProto) -> bool:
    """Whether the file computes in float16: a float16 Q/DQ scale or initializer."""
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


def verify(
    model: nn.Module,
    path_or_model: str | os.PathLike | onnx.ModelProto,
    inputs: Any,
    optimized: bool = False,
    output_names: Sequence[str] | None = None,
    output_tolerance_steps: float = DEFAULT_OUTPUT_TOLERANCE_STEPS,
) -> VerifyReport:
    """Compares ONNX Runtime's run of the file with the PyTorch model on ``inputs`` (see the module docstring)."""
    if isinstance(output_tolerance_steps, bool) or not isinstance(output_tolerance_steps, (int, float)) or \
            not output_tolerance_steps >= 0:
        raise ValueError(f"verify: output_tolerance_steps must be a number >= 0, got {output_tolerance_steps!r}")
    onnx_model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else _read_model(path_or_model)
    if not onnx_model.HasField("graph"):
        from qdq.onnx.check import ModelReadError

        raise ModelReadError("verify: the onnx.ModelProto has no graph")
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    with preserved_modes(model, quantizer_states=False), torch.no_grad():
        model.eval()
        reference = [t.detach().cpu().float().numpy() for t in _flatten(model(*args))]
    got = run_onnxruntime(onnx_model, args, optimized=optimized)
    if len(got) != len(reference):
        raise ValueError(f"ONNX Runtime gave {len(got)} outputs, PyTorch {len(reference)}")
    steps = _output_steps(onnx_model)
    names = list(output_names) if output_names else [o.name for o in onnx_model.graph.output]
    half = _is_float16(onnx_model)
    report = VerifyReport(rounding=_rounding_parity(onnx_model, args), output_tolerance_steps=output_tolerance_steps,
                          float16=half)
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
            allowed_steps=(output_tolerance_steps + FLOAT16_OUTPUT_RTOL * float(np.abs(ref).max(initial=0.0)) / step)
            if half else None,
        ))
    return report
