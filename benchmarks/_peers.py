"""The peer tools, driven the way PEERS.md found they work on this machine.

* NVIDIA ModelOpt (``nvidia-modelopt``, imported as ``modelopt.torch.quantization``): its module registry skips
  EfficientNet's ``Conv2dStaticSamePadding`` (a ``Conv2d`` subclass with its own ``forward``) without a word, so the
  benchmark counts the quantizers it inserts "out of the box" and then registers the class with
  ``mtq.register(original_cls=..., quantized_cls=<ModelOpt's Conv2d quant class>)``. Histogram calibration through
  ``mtq.quantize`` crashes; :func:`modelopt_histogram` uses the manual flow (``algorithm=None``, ``disable_quant`` +
  ``enable_calib``, run the data, ``load_calib_amax(method)``) and :func:`modelopt_histogram_crash` records the crash.
* ONNX Runtime's ``quantize_static`` (QDQ, per-channel, symmetric int8 activations and weights, after
  ``quant_pre_process``), run in a child process (:func:`ort_quantize`) so that its memory use (its histogram
  calibrators keep every intermediate output) is measured and cannot take the benchmark down with it.

A peer that is not installed, or does not import, is reported as such: :func:`modelopt_import` returns the reason.

This file is also the child's entry point: ``python benchmarks/_peers.py ort-quantize --help``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import resource
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from _common import package_version

logger = logging.getLogger("benchmarks.peers")

ORT_METHODS = ("MinMax", "Percentile", "Entropy")
#: Resident memory ORT's histogram calibrators need per calibration image of EfficientNet-Lite0 at 224x224
#: (PEERS.md: 13 GB for 200 images), used to decide whether a histogram method fits in the free memory.
ORT_HISTOGRAM_BYTES_PER_IMAGE = 13 * 2**30 / 200


# ----------------------------------------------------------------------------------------------------------------
# ModelOpt
# ----------------------------------------------------------------------------------------------------------------
def modelopt_import() -> tuple[Any, str | None]:
    """``(mtq module, None)``, or ``(None, reason)`` when ModelOpt is not installed or fails to import."""
    if package_version("nvidia-modelopt") is None:
        return None, "not installed (pip install nvidia-modelopt requests huggingface_hub)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
    except Exception as err:  # an unguarded plugin import fails with whatever its missing dependency raises
        return None, f"installed but does not import: {type(err).__name__}: {err}"
    return mtq, None


def _modelopt_quantizers(model: torch.nn.Module) -> list:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [m for m in model.modules() if isinstance(m, TensorQuantizer)]


def modelopt_counts(model: torch.nn.Module) -> dict:
    """Quantizers ModelOpt inserted and how many of them are enabled."""
    qs = _modelopt_quantizers(model)
    return {"inserted": len(qs), "enabled": sum(1 for q in qs if q.is_enabled)}


def modelopt_register_efficientnet(mtq) -> str:
    """Registers EfficientNet's ``Conv2dStaticSamePadding`` with ModelOpt's quantized Conv2d class; returns what."""
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    quant_cls = QuantModuleRegistry[torch.nn.Conv2d] if torch.nn.Conv2d in QuantModuleRegistry else None
    if quant_cls is None:
        from modelopt.torch.quantization.nn.modules.quant_conv import _QuantConv2d as quant_cls
    try:
        mtq.register(original_cls=Conv2dStaticSamePadding, quantized_cls=quant_cls)
    except (AssertionError, KeyError, ValueError) as err:  # registered already in this process
        logger.debug("ModelOpt register: %s", err)
    return f"mtq.register(original_cls=Conv2dStaticSamePadding, quantized_cls={quant_cls.__name__})"


def _forward_loop(batches) -> Callable[[torch.nn.Module], None]:
    def loop(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for x, _ in batches:
                model(x)

    return loop


def modelopt_max(mtq, model: torch.nn.Module, batches) -> tuple[torch.nn.Module, float]:
    """``mtq.quantize(copy, INT8_DEFAULT_CFG, forward_loop)`` (max calibration); returns the model and the seconds."""
    model = copy.deepcopy(model)
    t0 = time.perf_counter()
    with _quiet():
        model = mtq.quantize(model, mtq.INT8_DEFAULT_CFG, _forward_loop(batches))
    return model.eval(), time.perf_counter() - t0


def _histogram_config(mtq) -> dict:
    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    entry = {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None, "calibrator": "histogram"}}
    if isinstance(cfg["quant_cfg"], list):
        cfg["quant_cfg"].append(entry)
    else:  # older ModelOpt releases: a dict of wildcard -> attributes
        cfg["quant_cfg"]["*input_quantizer"] = entry["cfg"]
    return cfg


def modelopt_histogram_crash(mtq, model: torch.nn.Module, batches) -> str | None:
    """Histogram calibration the documented way (``mtq.quantize`` with a histogram calibrator): ``None`` when it
    works, else the error it raises."""
    model = copy.deepcopy(model)
    try:
        with _quiet():
            mtq.quantize(model, _histogram_config(mtq), _forward_loop(batches[:1]))
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


class ModelOptHistogram:
    """ModelOpt's manual histogram flow: quantize with ``algorithm=None``, collect once, then load each method's amax.

    >>> flow = ModelOptHistogram(mtq, model, batches)     # doctest: +SKIP
    >>> seconds = flow.load("entropy")                     # doctest: +SKIP
    """

    def __init__(self, mtq, model: torch.nn.Module, batches):
        cfg = _histogram_config(mtq)
        cfg["algorithm"] = None
        with _quiet():
            self.model = mtq.quantize(copy.deepcopy(model), cfg, None).eval()
        self.quantizers = [q for q in _modelopt_quantizers(self.model) if q.is_enabled]
        t0 = time.perf_counter()
        for q in self.quantizers:
            q.disable_quant()
            q.enable_calib()
        _forward_loop(batches)(self.model)
        for q in self.quantizers:
            q.disable_calib()
        self.collect_seconds = time.perf_counter() - t0

    def load(self, method: str, percentile: float = 99.99) -> float:
        """Sets every quantizer's amax (histogram ones by ``method``, max ones by their max); returns the seconds."""
        t0 = time.perf_counter()
        for q in self.quantizers:
            name = type(q._calibrator).__name__
            if "Histogram" in name:
                if method == "percentile":
                    q.load_calib_amax(method, percentile=percentile)
                else:
                    q.load_calib_amax(method)
            else:
                q.load_calib_amax()
            q.enable_quant()
        return time.perf_counter() - t0


class _quiet:
    """Silences ModelOpt's prints and warnings for the duration of a call."""

    def __enter__(self):
        import contextlib
        import io

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False


def modelopt_export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> dict:
    """ModelOpt's model through torch's TorchScript exporter (its dynamo export fails, PEERS.md); returns info."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _quiet(), torch.no_grad():
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    import onnx

    proto = onnx.load(str(path))
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"seconds": time.perf_counter() - t0, "path": str(path),
            "qdq_pairs": ops.get("DequantizeLinear", 0), "batchnorm_nodes": ops.get("BatchNormalization", 0)}


# ----------------------------------------------------------------------------------------------------------------
# ONNX Runtime quantize_static, in a child process
# ----------------------------------------------------------------------------------------------------------------
def available_memory_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def ort_quantize(fp32_onnx: Path, out_path: Path, calib_npy: Path, method: str, batch_size: int,
                 timeout: float = 3600.0) -> dict:
    """Runs ``quantize_static`` with ``method`` in a child process; returns its report (seconds, peak memory) or
    the reason it failed. The calibration images are a ``.npy`` array ``[N, 3, H, W]``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "ort-quantize", "--fp32", str(fp32_onnx),
           "--out", str(out_path), "--calib", str(calib_npy), "--method", method, "--batch", str(batch_size)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"missing": f"quantize_static {method} did not finish within {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"missing": f"quantize_static {method} failed (exit {proc.returncode}): {tail}"}
    report = json.loads(lines[-1])
    report["child_wall_seconds"] = wall
    return report


class _NpyReader:
    """ONNX Runtime calibration data reader over equal batches of an in-memory array."""

    def __init__(self, input_name: str, images, batch_size: int):
        self.input_name = input_name
        self.batches = [images[i: i + batch_size] for i in range(0, len(images) - batch_size + 1, batch_size)]
        self.index = 0

    def get_next(self):
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return {self.input_name: self.batches[self.index - 1]}

    def rewind(self) -> None:
        self.index = 0


def _ort_quantize_child(args: argparse.Namespace) -> None:
    import numpy as np
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    images = np.load(args.calib)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pre = out.with_name(out.stem + "_preprocessed.onnx")
    t0 = time.perf_counter()
    quant_pre_process(args.fp32, str(pre))
    t1 = time.perf_counter()
    input_name = onnx.load(str(pre)).graph.input[0].name
    reader = _NpyReader(input_name, images, args.batch)
    quantize_static(
        model_input=str(pre),
        model_output=str(out),
        calibration_data_reader=reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, args.method),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"method": args.method, "images": int(len(reader.batches) * args.batch),
                      "preprocess_seconds": t1 - t0, "quantize_seconds": t2 - t1, "peak_rss_bytes": peak,
                      "path": str(out)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Child processes of the benchmark (peer tools).")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("ort-quantize", help="ONNX Runtime quantize_static (QDQ, per-channel, symmetric int8)")
    q.add_argument("--fp32", required=True, help="the fp32 ONNX model")
    q.add_argument("--out", required=True, help="the quantized ONNX model to write")
    q.add_argument("--calib", required=True, help=".npy array of calibration images [N, 3, H, W]")
    q.add_argument("--method", choices=ORT_METHODS, default="MinMax")
    q.add_argument("--batch", type=int, default=25, help="calibration batch size (equal batches only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        _ort_quantize_child(args)
    except Exception:
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()
