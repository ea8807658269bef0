"""ModelOpt's ONNX PTQ on float ONNX files, for the placement side by side (``benchmarks/placement_zoo.py``).

Runs in a separate venv with ModelOpt (see the project's notes on peer tools; install ``nvidia-modelopt`` and the
plain packages its ONNX path imports, not its ``[onnx]`` extra, which swaps onnxruntime for onnxruntime-gpu)::

    /path/to/peers/bin/python benchmarks/modelopt_onnx_ptq.py /tmp/zoo/float /tmp/zoo/modelopt

For each ``<model>.onnx`` of the first folder it writes ``<model>.modelopt.onnx`` into the second:
``modelopt.onnx.quantization.quantize(..., quantize_mode="int8", calibration_method="max",
calibration_eps=["cpu"], high_precision_dtype="fp32")`` with 4 random calibration inputs (the placement, not the
accuracy, is what is compared; ``fp32`` keeps the remainder in the file's float type like qdq's default export).
It imports nothing from qdq.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx


def input_shape(path: Path) -> list[int]:
    model = onnx.load(str(path), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value or 1 for d in dims]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    src, dst = Path(argv[0]), Path(argv[1])
    only = set(argv[2].split(",")) if len(argv) > 2 else None
    dst.mkdir(parents=True, exist_ok=True)
    from modelopt.onnx.quantization import quantize

    times = {}
    for path in sorted(src.glob("*.onnx")):
        name = path.stem
        if only and name not in only:
            continue
        out = dst / f"{name}.modelopt.onnx"
        shape = input_shape(path)
        data = np.random.default_rng(0).standard_normal([4 * shape[0]] + shape[1:]).astype(np.float32)
        start = time.perf_counter()
        try:
            quantize(str(path), quantize_mode="int8", calibration_data=data, calibration_method="max",
                     calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=str(out), log_level="WARNING")
            times[name] = round(time.perf_counter() - start, 1)
        except Exception as exc:  # reported, not hidden
            times[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
        print(name, times[name], flush=True)
    (dst / "modelopt_times.json").write_text(json.dumps(times, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
