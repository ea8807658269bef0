"""Cost of the core pieces, as ratios measured side by side in one process.

* fake-quant forward+backward over a plain copy (forward+backward) of a large activation, per tensor and per channel,
  and the forward alone under ``no_grad`` (eval) over a copy, next to torch's fused kernel on the same tensor;
* histogram collect over the conv that produced the tensor;
* compute_amax time of entropy, mse and percentile on one 2048-bin histogram.

Run: python benchmarks/core_ops.py [--json out/core_ops.json]; the cost section of ``benchmarks/run.py`` calls
:func:`measure`.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from _common import machine, timeit, write_json
from qdq import calib
from qdq.tensor_quant import fake_quantize_by_amax


def measure(batch: int = 32, repeat: int = 7) -> dict:
    """The three measurements on an activation of a ResNet stage, ``batch x 64 x 56 x 56``."""
    torch.manual_seed(0)
    results: dict = {}
    x = torch.randn(batch, 64, 56, 56)
    grad = torch.randn_like(x)
    amax_t = torch.tensor(3.0)
    amax_c = torch.rand(1, 64, 1, 1) + 2.0

    def copy_fb():  # the floor: one pass forward (a copy) and one backward (a copy of the gradient)
        x.clone()
        grad.clone()

    def fq_fb(amax):
        def run():
            xr = x.detach().requires_grad_(True)
            fake_quantize_by_amax(xr, amax).backward(grad)

        return run

    def fq_eval():  # no gradient recorded: no clipping mask is computed
        with torch.no_grad():
            fake_quantize_by_amax(x, amax_t)

    def copy_f():
        x.clone()

    scale_t, zp_t = amax_t / 127, torch.tensor(0, dtype=torch.int32)

    def fused_eval():  # torch's fused kernel, which qdq runs where tracing or a GPU needs it
        with torch.no_grad():
            torch.fake_quantize_per_tensor_affine(x, scale_t, zp_t, -128, 127)

    t_copy = timeit(copy_fb, repeat=repeat)
    t_fq_t = timeit(fq_fb(amax_t), repeat=repeat)
    t_fq_c = timeit(fq_fb(amax_c), repeat=repeat)
    t_copy_f = timeit(copy_f, repeat=repeat)
    t_fq_eval = timeit(fq_eval, repeat=repeat)
    t_fused_eval = timeit(fused_eval, repeat=repeat)
    results["fake_quant"] = {
        "per_tensor_eval_over_copy": t_fq_eval / t_copy_f,
        "fused_kernel_eval_over_copy": t_fused_eval / t_copy_f,
        "tensor_shape": list(x.shape),
        "copy_fwd_bwd_ms": t_copy * 1e3,
        "per_tensor_fwd_bwd_ms": t_fq_t * 1e3,
        "per_channel_fwd_bwd_ms": t_fq_c * 1e3,
        "per_tensor_over_copy": t_fq_t / t_copy,
        "per_channel_over_copy": t_fq_c / t_copy,
    }

    # histogram collect against the conv that produced the tensor
    inp = torch.randn(batch, 64, 56, 56)
    weight = torch.randn(64, 64, 3, 3) * 0.05
    with torch.no_grad():
        out = F.conv2d(inp, weight, padding=1)
        t_conv = timeit(lambda: F.conv2d(inp, weight, padding=1), repeat=5)
        cal = calib.HistogramCalibrator(8, None, False)
        t_hist = timeit(lambda: cal.collect(out), repeat=5)
        mcal = calib.MaxCalibrator(8, None, False)
        t_max = timeit(lambda: mcal.collect(out), repeat=5)
    results["collect"] = {
        "conv_ms": t_conv * 1e3,
        "histogram_collect_ms": t_hist * 1e3,
        "max_collect_ms": t_max * 1e3,
        "histogram_over_conv": t_hist / t_conv,
        "max_over_conv": t_max / t_conv,
    }

    # amax searches on one 2048-bin histogram
    times = {}
    for method in ("entropy", "mse", "percentile"):
        times[method] = timeit(lambda m=method: cal.compute_amax(m), repeat=5) * 1e3
    results["compute_amax_ms"] = {**times, "all_three": sum(times.values())}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    results: dict = {"machine": machine(), **measure(args.batch)}
    x_shape = results["fake_quant"]["tensor_shape"]
    print(f"machine: {results['machine']['cpu']}, {results['machine']['torch_threads']} torch threads")
    fq = results["fake_quant"]
    print(f"fake-quant fwd+bwd over copy fwd+bwd, {tuple(x_shape)}: per-tensor {fq['per_tensor_over_copy']:.2f}x, "
          f"per-channel {fq['per_channel_over_copy']:.2f}x  (copy {fq['copy_fwd_bwd_ms']:.1f} ms); "
          f"forward under no_grad over a copy: {fq['per_tensor_eval_over_copy']:.2f}x (torch's fused kernel "
          f"{fq['fused_kernel_eval_over_copy']:.2f}x)")
    c = results["collect"]
    print(f"collect over the conv that produced the tensor: histogram {c['histogram_over_conv']:.3f}x, "
          f"max {c['max_over_conv']:.3f}x  (conv {c['conv_ms']:.1f} ms)")
    a = results["compute_amax_ms"]
    print(f"compute_amax on 2048 bins: entropy {a['entropy']:.1f} ms, mse {a['mse']:.1f} ms, "
          f"percentile {a['percentile']:.2f} ms, all three {a['all_three']:.1f} ms")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
