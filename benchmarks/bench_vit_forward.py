"""The ViT example's fake-quant forward over its fp32 forward, in fresh processes, per thread count and allocator.

Each measurement is :func:`examples.vit.vit.forward_ratio` (``small_vit`` with random weights, max-calibrated on
2 x 32 random images, 32 images, the fp32, composite-fp32 and INT8 models interleaved round by round, best of
``--repeats``) in a process of its own: the spread between processes on one machine is larger than the spread
inside one, so ``--processes`` of them are run and the lowest, median and highest ratios printed. They run with
glibc's default allocator and with ``bench_hot_path.HEAP_ENV``, the two variables the README gives for CPU work:
with the default, every fresh activation-sized block is mapped afresh and its pages faulted in and zeroed by the
kernel, and the fake-quant model allocates one more block per quantizer (46 per forward here).

Measured (2026-12-04, AMD EPYC, 2 cores, load below 1.4; two runs of ``--processes 5 --repeats 40``, nothing
else running), INT8 forward over the fp32 forward, lowest / median / highest over the five processes of each row:

=======  =============  ==================  ==================  ==========================
threads  allocator      over fused fp32,    over fused fp32,    over composite fp32,
                        run 1               run 2               both runs (lowest-highest)
=======  =============  ==================  ==================  ==========================
1        glibc default  1.28 / 1.30 / 1.39  1.32 / 1.33 / 1.51  1.17-1.37
1        HEAP_ENV       1.23 / 1.26 / 1.33  1.24 / 1.27 / 1.30  1.16-1.27
2        glibc default  1.32 / 1.37 / 1.44  1.35 / 1.46 / 1.49  1.20-1.43
2        HEAP_ENV       1.34 / 1.37 / 1.48  1.29 / 1.37 / 1.48  1.12-1.35
=======  =============  ==================  ==================  ==========================

fp32 took 21-45 ms at two threads and 36-53 ms at one. 39 of the 40 processes are within 1.5x the fp32 forward,
every median is; the one above (1.51) ran at one thread with glibc's default allocator. "fused" is torch's
``_native_multi_head_attention`` fast path that ``nn.MultiheadAttention`` takes in eval under ``no_grad`` (the
strict baseline); "composite" the same model with the fast path off, as in training. On the machine of 2026-12-03,
before fake quantization wrote contiguous outputs for permuted inputs and attention scaled its scores in place, one
thread gave 1.62-1.81x over five processes (``examples/vit/README.md``).

Run: ``python benchmarks/bench_vit_forward.py [--processes 5] [--repeats 40] [--threads 1 2] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: The child process: one forward_ratio measurement, printed as JSON on its last line.
_CHILD = """
import json, sys
sys.path[:0] = [sys.argv[1]]
import torch
import qdq
from examples.vit import vit
torch.manual_seed(0)
model = vit.small_vit().eval()
images = torch.randn(32, 3, 32, 32)
qmodel, _ = vit.quantize(model, images[:2])
calib = [(torch.randn(32, 3, 32, 32), torch.zeros(32, dtype=torch.long)) for _ in range(2)]
qdq.calibrate_model(qmodel, calib, num_batches=2, method="max", strict=True, progress=False)
print(json.dumps(vit.forward_ratio(model, qmodel.eval(), images, repeats=int(sys.argv[2]), threads=int(sys.argv[3]))))
"""


def measure_once(threads: int, repeats: int, env: dict[str, str]) -> dict:
    """One :func:`examples.vit.vit.forward_ratio` in a fresh process with ``env`` added to its environment."""
    done = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), str(repeats), str(threads)],
                          env={**os.environ, **env}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the ViT forward timing ({threads} threads, environment {env}) failed with exit "
                           f"{done.returncode}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(threads: list[int], processes: int, repeats: int) -> dict:
    """``{"<threads> threads, <allocator>": {"runs": [...], "ratio": [low, median, high], ...}}``; the processes of
    the two allocators alternate, so that a change of machine load reaches both."""
    sys.path.insert(0, str(HERE))
    from bench_hot_path import HEAP_ENV

    allocators = {"default allocator": {}, "HEAP_ENV": HEAP_ENV}
    rows: dict[str, dict] = {}
    for n in threads:
        runs: dict[str, list[dict]] = {name: [] for name in allocators}
        for _ in range(processes):
            for name, env in allocators.items():
                runs[name].append(measure_once(n, repeats, env))
        for name, got in runs.items():
            row: dict = {"threads": n, "allocator": name, "runs": got}
            for key in ("ratio", "ratio_to_composite", "fp32_ms", "int8_ms"):
                values = sorted(r[key] for r in got)
                row[key] = [values[0], statistics.median(values), values[-1]]
            rows[f"{n} threads, {name}"] = row
    return rows


def _table(rows: dict) -> str:
    lines = ["| threads | allocator | INT8 / fp32 (fused attention) | INT8 / fp32 (composite) | fp32 ms | INT8 ms |",
             "|---|---|---|---|---|---|"]
    for row in rows.values():
        cells = [" / ".join(f"{v:.2f}" for v in row[key])
                 for key in ("ratio", "ratio_to_composite", "fp32_ms", "int8_ms")]
        lines.append(f"| {row['threads']} | {row['allocator']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["(lowest / median / highest over the processes)"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=5, help="fresh processes per setting (default 5)")
    parser.add_argument("--repeats", type=int, default=40, help="interleaved rounds per process, best taken")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts")
    parser.add_argument("--json", type=Path, help="also write every run to this file")
    args = parser.parse_args(argv)
    if args.processes < 1 or args.repeats < 1 or min(args.threads) < 1:
        parser.error("--processes, --repeats and --threads must be at least 1")
    rows = measure(args.threads, args.processes, args.repeats)
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
