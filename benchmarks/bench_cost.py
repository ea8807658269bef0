"""Cost section: what calibration, fake quantization, QAT and export cost, as ratios to the float work they wrap.

Measured in one process, interleaved round by round (see ``_common.py``), torch threads = cores:

* **calibration** of EfficientNet-Lite0 on ``--cost-images`` (200) ImageNet images at 224x224, batches of 25,
  already decoded in memory: ``calibrate_model`` with max calibrators and with histograms (``percentile``, the
  cheapest search, so the time is the collection) over fp32 inference on the same batches; the same for ModelOpt
  (``mtq.quantize`` with max, and the collection of its manual histogram flow);
* **compute_amax** for all quantizers of the model, per histogram method (qdq; ModelOpt's entropy and mse once, they
  take minutes);
* **fake-quant forward** over fp32 forward on the same batches, qdq and ModelOpt, max-calibrated;
* **peak memory** of calibration, each in a child process that only does that: the child loads the model and the
  batches (saved once as a ``.pt`` file), notes its resident memory, resets the kernel's peak mark
  (``5 > /proc/self/clear_refs``), calibrates and reads the peak (``VmHWM``): the difference is what calibration
  adds on top of model and data (fp32 inference measured the same way, for reference). Where the peak mark cannot
  be reset, ``ru_maxrss`` of the child minus that of a child that only loads;
* **QAT step** over fp32 step: torchvision ResNet-18, batch 32 at 224x224, SGD, forward + cross-entropy + backward +
  step, the QAT model quantized with the ResNet recipe and max-calibrated first;
* **export** of the QDQ model (TorchScript exporter) over the export of the same float model: ResNet-50 at 224 and
  the YOLOv5-style model (size s) at 640;
* the micro-measurements of ``benchmarks/core_ops.py`` (fake-quant and histogram collection on one tensor);
* the hot path of ``benchmarks/bench_hot_path.py``: fake-quant eval at batch 32, the QAT step eager and compiled,
  histogram calibration, each over its float twin.

Targets: histogram calibration under 1.3x fp32 inference and under 2 GB peak memory for 200 images at 224x224;
QAT step under 1.25x fp32.

Run alone: ``python benchmarks/bench_cost.py --out DIR [--quick]``; the memory children are
``python benchmarks/bench_cost.py --memory-child MODE --data FILE``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import (Context, Table, bar_chart, efficientnet_fp32, fmt, forward_all, imagenet_batches, interleaved,
                     is_missing, missing, set_threads, write_json)

logger = logging.getLogger("benchmarks.cost")

AMAX_METHODS = ("entropy", "mse", "percentile", "kld")
MEMORY_MODES = ("baseline", "fp32", "max", "histogram")


def sizes(ctx: Context) -> dict:
    quick = ctx.quick
    return {
        "images": ctx.option("cost_images", 8 if quick else 200),
        "batch": 8 if quick else 25,
        "repeat": ctx.option("repeat", 1 if quick else 3),
        "qat_batch": 4 if quick else 32,
        "qat_size": 64 if quick else 224,
    }


# ----------------------------------------------------------------------------------------------------------------
# calibration and fake-quant forward
# ----------------------------------------------------------------------------------------------------------------
def _qdq_model(fp32):
    from bench_accuracy import qdq_model

    return qdq_model(fp32)


def calibration_cost(ctx: Context, fp32, batches, repeat: int) -> dict:
    import qdq

    from _peers import ModelOptHistogram, modelopt_import, modelopt_max, modelopt_register_efficientnet

    q_max, q_hist = _qdq_model(fp32), _qdq_model(fp32)
    fns = {
        "fp32 inference": lambda: forward_all(fp32, batches),
        "qdq calibrate max": lambda: qdq.calibrate_model(q_max, batches, method="max", progress=False),
        "qdq calibrate histogram": lambda: qdq.calibrate_model(q_hist, batches, method="percentile", progress=False),
    }
    mtq, reason = modelopt_import()
    mo_models: dict = {}
    if mtq is not None:
        modelopt_register_efficientnet(mtq)

        def mo_max():
            mo_models["max"] = modelopt_max(mtq, fp32, batches)[0]

        def mo_hist():
            mo_models["hist"] = ModelOptHistogram(mtq, fp32, batches)

        fns["ModelOpt calibrate max (mtq.quantize)"] = mo_max
        fns["ModelOpt histogram collect"] = mo_hist
    # warm-up on two batches (first-call costs), then whole rounds
    for name, fn in fns.items():
        if name.startswith("qdq"):
            model = q_max if "max" in name else q_hist
            qdq.calibrate_model(model, batches[:2], method="max" if "max" in name else "percentile", progress=False)
        elif name == "fp32 inference":
            forward_all(fp32, batches[:2])
    logger.info("calibration cost: %d rounds of %s", repeat, list(fns))
    timing = interleaved(fns, repeat=repeat, warmup=0)
    out = timing.to_dict(baseline="fp32 inference")
    if mtq is None:
        out["modelopt"] = missing(reason)
    else:
        # ModelOpt's histogram collection time without its model conversion
        out["modelopt_histogram_collect_only_seconds"] = mo_models["hist"].collect_seconds
        out["modelopt_histogram_collect_only_ratio"] = mo_models["hist"].collect_seconds / timing.median(
            "fp32 inference")
    ctx.cache["cost_models"] = {"qdq_max": q_max, "qdq_hist": q_hist, **mo_models}
    return out


def amax_cost(ctx: Context, repeat: int) -> dict:
    """compute_amax for every quantizer, per method, on the histograms the calibration cost left behind."""
    import qdq

    models = ctx.cache.get("cost_models", {})
    q_hist = models.get("qdq_hist")
    out: dict = {"qdq": {}, "modelopt": {}}
    if q_hist is not None:
        quantizers = sum(1 for _, q in qdq.quantizers(q_hist) if q.is_enabled and q.calibrator is not None)
        out["qdq_quantizers"] = quantizers
        for method in AMAX_METHODS:
            timing = interleaved({method: lambda m=method: qdq.compute_amax(q_hist, method=m)}, repeat=repeat,
                                 warmup=1)
            out["qdq"][method] = timing.median(method)
    flow = models.get("hist")
    if flow is None:
        from _peers import modelopt_import

        out["modelopt"] = missing(modelopt_import()[1] or "not measured (the calibration measurement failed)")
        return out
    out["modelopt_quantizers"] = len(flow.quantizers)
    methods = ("percentile",) if ctx.quick else ("percentile", "entropy", "mse")
    earlier = ctx.cache.get("modelopt_amax_seconds", {})
    for method in ("entropy", "mse", "percentile"):
        if method not in methods:
            out["modelopt"][method] = missing("not run with --quick (takes minutes)")
            continue
        if method != "percentile" and method in earlier:
            # the search works on fixed-size histograms: its time does not depend on the number of images
            out["modelopt"][method] = earlier[method]
            out.setdefault("modelopt_timed_in_accuracy_section", []).append(method)
            continue
        logger.info("ModelOpt load_calib_amax(%s) for all quantizers", method)
        out["modelopt"][method] = flow.load(method)  # once: its entropy and mse searches take minutes
    return out


def fake_quant_cost(ctx: Context, fp32, batches, repeat: int) -> dict:
    import qdq

    models = ctx.cache.get("cost_models", {})
    q_max = models.get("qdq_max")
    if q_max is None:
        q_max = _qdq_model(fp32)
        qdq.calibrate_model(q_max, batches, method="max", progress=False)
    fns = {"fp32 forward": lambda: forward_all(fp32, batches), "qdq fake-quant forward": lambda: forward_all(
        q_max, batches)}
    if models.get("max") is not None:
        fns["ModelOpt fake-quant forward"] = lambda: forward_all(models["max"], batches)
    for fn in fns.values():
        fn()  # warm-up
    out = interleaved(fns, repeat=repeat, warmup=0).to_dict(baseline="fp32 forward")
    if "ModelOpt fake-quant forward" not in fns:
        from _peers import modelopt_import

        out["modelopt"] = missing(modelopt_import()[1] or "not measured")
    return out


# ----------------------------------------------------------------------------------------------------------------
# peak memory, in child processes
# ----------------------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes, ``None`` where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Resets the kernel's peak-RSS mark (``VmHWM``) to the current RSS (Linux: ``5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(mode: str, data: Path) -> dict:
    """What one child does: load model and batches, then (by ``mode``) nothing, fp32 inference, or calibration.

    Reports the resident memory once everything is loaded, and the peak during the work: the kernel's peak mark
    is reset after loading where Linux allows it, so loading's own peak (imports, the weights file) does not hide
    the work's; elsewhere the peak is ``ru_maxrss`` of the whole process.
    """
    import gc

    set_threads()
    import qdq

    batches = torch.load(data, weights_only=True)
    fp32 = efficientnet_fp32()
    model = _qdq_model(fp32) if mode not in ("fp32", "baseline") else fp32
    if mode != "fp32":
        del fp32
    gc.collect()
    loaded = _status_kb("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    if mode == "fp32":
        forward_all(model, batches)
    elif mode == "max":
        qdq.calibrate_model(model, batches, method="max", progress=False)
    elif mode == "histogram":
        qdq.calibrate_model(model, batches, method="entropy", progress=False)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM") if reset else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "loaded_rss_bytes": loaded, "peak_rss_bytes": peak, "peak_reset_after_loading": reset,
            "above_loaded_bytes": None if loaded is None else peak - loaded, "seconds": seconds,
            "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def memory_cost(ctx: Context, batches) -> dict:
    data = ctx.artifacts / f"cost_batches_{sum(len(x) for x, _ in batches)}.pt"
    torch.save([(x, y) for x, y in batches], data)
    out: dict = {"method": "one child process per row loads the model and the batches (a .pt file), notes its RSS "
                           "(VmRSS), resets the kernel's peak mark (5 > /proc/self/clear_refs), does the work and "
                           "reads the peak (VmHWM); 'above loaded' is peak minus the RSS after loading. Without "
                           "clear_refs: ru_maxrss of the child minus that of the baseline child."}
    for mode in MEMORY_MODES:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", mode, "--data", str(data)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
            out[mode] = missing(f"child failed (exit {proc.returncode}): {tail}")
            continue
        out[mode] = json.loads(lines[-1])
    base = out.get("baseline")
    for mode in MEMORY_MODES[1:]:
        r = out.get(mode)
        if is_missing(r):
            continue
        if r["peak_reset_after_loading"] and r["above_loaded_bytes"] is not None:
            r["above_baseline_gb"] = r["above_loaded_bytes"] / 2**30
        elif not is_missing(base):
            r["above_baseline_gb"] = (r["process_peak_rss_bytes"] - base["process_peak_rss_bytes"]) / 2**30
    return out


# ----------------------------------------------------------------------------------------------------------------
# QAT step and export
# ----------------------------------------------------------------------------------------------------------------
def qat_step_cost(batch: int, size: int, repeat: int) -> dict:
    import torchvision

    import qdq
    from qdq.rules import apply_resnet_rules

    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
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
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

        return step

    timing = interleaved({"fp32 step": stepper(fp32), "QAT step": stepper(qat)}, repeat=max(repeat, 3), warmup=1)
    out = timing.to_dict(baseline="fp32 step")
    out.update(model="resnet18", batch=batch, size=size)
    return out


def _export_model(name: str, quick: bool):
    import torchvision

    from examples.yolov5.model import yolov5, yolov5_tiny

    if name.startswith("resnet"):
        return torchvision.models.get_model(name, weights=None).eval(), 224
    return (yolov5_tiny() if quick else yolov5("s", seed=0)).eval(), (64 if quick else 640)


def export_cost(ctx: Context, repeat: int) -> dict:
    import qdq
    from qdq.onnx import export_onnx
    from qdq.rules import apply_resnet_rules, apply_yolov5_rules

    out = {}
    for name in (("resnet18", "yolov5_tiny") if ctx.quick else ("resnet50", "yolov5s")):
        fp32, size = _export_model(name, ctx.quick)
        x = torch.randn(1, 3, size, size)
        qmodel = copy.deepcopy(fp32)
        qdq.replace_to_quantization_module(qmodel)
        (apply_resnet_rules if name.startswith("resnet") else apply_yolov5_rules)(qmodel)
        qdq.calibrate_model(qmodel, [torch.randn(2, 3, size, size)], method="max", progress=False)
        path_f, path_q = ctx.artifacts / f"export_{name}_fp32.onnx", ctx.artifacts / f"export_{name}_qdq.onnx"
        outputs = ("output",) if name.startswith("resnet") else None
        fns = {
            "fp32 export": lambda: export_onnx(fp32, x, path_f, quantize=False, output_names=outputs),
            "QDQ export": lambda: export_onnx(qmodel, x, path_q, output_names=outputs),
        }
        logger.info("export cost: %s", name)
        timing = interleaved(fns, repeat=repeat, warmup=1)
        row = timing.to_dict(baseline="fp32 export")
        row.update(input=[1, 3, size, size], exporter="torchscript")
        out[name] = row
    return out


# ----------------------------------------------------------------------------------------------------------------
# the section
# ----------------------------------------------------------------------------------------------------------------
def run(ctx: Context) -> dict:
    """Runs the section; returns ``{"data", "tables", "figures", "notes"}``."""
    set_threads()
    size = sizes(ctx)
    repeat = size["repeat"]
    batches, _ = imagenet_batches(ctx, size["images"], 0, size["batch"])
    fp32 = efficientnet_fp32()
    data: dict = {"sizes": size}
    steps = [
        ("calibration", lambda: calibration_cost(ctx, fp32, batches, repeat)),
        ("compute_amax", lambda: amax_cost(ctx, repeat)),
        ("fake_quant_forward", lambda: fake_quant_cost(ctx, fp32, batches, repeat)),
        ("memory", lambda: memory_cost(ctx, batches)),
        ("qat_step", lambda: qat_step_cost(size["qat_batch"], size["qat_size"], repeat)),
        ("export", lambda: export_cost(ctx, repeat)),
        ("core_ops", lambda: _core_ops(ctx)),
        ("hot_path", lambda: _hot_path(ctx)),
    ]
    for name, fn in steps:
        logger.info("cost: %s", name)
        t0 = time.perf_counter()
        try:
            data[name] = fn()
        except Exception as err:  # one failed measurement must not hide the others
            logger.exception("cost: %s failed", name)
            data[name] = missing(f"failed: {type(err).__name__}: {err}")
        logger.info("cost: %s took %.0f s", name, time.perf_counter() - t0)
    ctx.cache.pop("cost_models", None)
    return {"data": data, "tables": tables(data), "figures": figures(ctx, data), "notes": []}


def _core_ops(ctx: Context) -> dict:
    from core_ops import measure

    return measure(batch=4 if ctx.quick else 32, repeat=3 if ctx.quick else 7)


def _hot_path(ctx: Context) -> dict:
    from bench_hot_path import measure

    return measure(rounds=1 if ctx.quick else 5, calib_batches=1 if ctx.quick else 4, compile_=not ctx.quick)


def _ratio(section: dict, name: str, baseline: str):
    if is_missing(section):
        return section
    return section.get(f"ratio_to_{baseline}", {}).get(name, missing("not measured"))


def _seconds(section: dict, name: str):
    if is_missing(section):
        return section
    return section.get("seconds", {}).get(name, missing("not measured"))


def tables(data: dict) -> list[Table]:
    size = data["sizes"]
    cal, fq = data.get("calibration", {}), data.get("fake_quant_forward", {})
    t = Table(f"Cost on EfficientNet-Lite0, {size['images']} ImageNet images at 224x224 (batches of {size['batch']}), "
              f"median of {size['repeat']} interleaved rounds",
              ["what", "seconds", "ratio to fp32", "target"])
    t.rows.append(["fp32 inference", fmt(_seconds(cal, "fp32 inference")), "1.00x", ""])
    t.rows.append(["qdq calibrate_model, max", fmt(_seconds(cal, "qdq calibrate max")),
                   fmt(_ratio(cal, "qdq calibrate max", "fp32 inference"), unit="x"), ""])
    t.rows.append(["qdq calibrate_model, histogram (percentile)", fmt(_seconds(cal, "qdq calibrate histogram")),
                   fmt(_ratio(cal, "qdq calibrate histogram", "fp32 inference"), unit="x"), "< 1.3x"])
    mo = "ModelOpt calibrate max (mtq.quantize)"
    if is_missing(cal.get("modelopt")):
        t.rows.append(["ModelOpt mtq.quantize, max", fmt(cal["modelopt"]), "", ""])
    else:
        t.rows.append(["ModelOpt mtq.quantize, max", fmt(_seconds(cal, mo)),
                       fmt(_ratio(cal, mo, "fp32 inference"), unit="x"), ""])
    mo_h = cal.get("modelopt_histogram_collect_only_seconds", cal.get("modelopt", missing("not measured")))
    t.rows.append(["ModelOpt histogram collection (manual flow)", fmt(mo_h),
                   fmt(cal.get("modelopt_histogram_collect_only_ratio", mo_h), unit="x"), ""])
    t.rows.append(["qdq fake-quant forward (max)", fmt(_seconds(fq, "qdq fake-quant forward")),
                   fmt(_ratio(fq, "qdq fake-quant forward", "fp32 forward"), unit="x"), ""])
    t.rows.append(["ModelOpt fake-quant forward (max)", fmt(_seconds(fq, "ModelOpt fake-quant forward")),
                   fmt(_ratio(fq, "ModelOpt fake-quant forward", "fp32 forward")
                       if "ModelOpt fake-quant forward" in fq.get("seconds", {}) else fq.get("modelopt"), unit="x"),
                   ""])
    tables_ = [t]

    amax = data.get("compute_amax", {})
    if not is_missing(amax):
        a = Table(f"compute_amax for all quantizers (qdq: {amax.get('qdq_quantizers', '?')} quantizers; ModelOpt: "
                  f"{amax.get('modelopt_quantizers', '?')}), seconds", ["method", "qdq", "ModelOpt"])
        for method in ("entropy", "mse", "percentile", "kld"):
            mo_value = amax["modelopt"].get(method, missing("no such method")) if not is_missing(
                amax["modelopt"]) else amax["modelopt"]
            a.rows.append([method, fmt(amax["qdq"].get(method), 3), fmt(mo_value, 3)])
        a.note = "ModelOpt's searches are timed once (they take minutes); qdq's are the median of the rounds."
        if amax.get("modelopt_timed_in_accuracy_section"):
            a.note += (" ModelOpt " + ", ".join(amax["modelopt_timed_in_accuracy_section"]) + " timed in the accuracy "
                       "section on the same model (its searches run on fixed-size histograms, whatever the images).")
        tables_.append(a)

    mem = data.get("memory", {})
    m = Table(f"Peak memory of EfficientNet-Lite0 calibration on {size['images']} images (one child process each)",
              ["child", "RSS after loading GB", "peak during the work GB", "work above loaded GB", "target"])
    if is_missing(mem):
        m.rows.append(["all", fmt(mem), "", "", ""])
    else:
        for mode in MEMORY_MODES:
            r = mem.get(mode, missing("not measured"))
            label = {"baseline": "baseline: model + batches loaded", "fp32": "fp32 inference",
                     "max": "calibrate_model max", "histogram": "calibrate_model histogram (entropy)"}[mode]
            if is_missing(r):
                m.rows.append([label, fmt(r), "", "", ""])
            else:
                loaded = r.get("loaded_rss_bytes")
                m.rows.append([label, fmt(loaded / 2**30 if loaded else None), fmt(r["peak_rss_bytes"] / 2**30),
                               fmt(r.get("above_baseline_gb")), "< 2 GB" if mode == "histogram" else ""])
        m.note = mem.get("method", "")
    tables_.append(m)

    other = Table("Training step and export", ["what", "fp32 s", "quantized s", "ratio", "target"])
    qat = data.get("qat_step", {})
    if is_missing(qat):
        other.rows.append(["QAT step", fmt(qat), "", "", ""])
    else:
        other.rows.append([f"QAT step, {qat['model']} batch {qat['batch']} at {qat['size']}",
                           fmt(_seconds(qat, "fp32 step"), 3), fmt(_seconds(qat, "QAT step"), 3),
                           fmt(_ratio(qat, "QAT step", "fp32 step"), unit="x"), "< 1.25x"])
    exp = data.get("export", {})
    if is_missing(exp):
        other.rows.append(["export", fmt(exp), "", "", ""])
    else:
        for name, r in exp.items():
            other.rows.append([f"export {name} {r['input'][2]}x{r['input'][3]} ({r['exporter']})",
                               fmt(_seconds(r, "fp32 export")), fmt(_seconds(r, "QDQ export")),
                               fmt(_ratio(r, "QDQ export", "fp32 export"), unit="x"), ""])
    tables_.append(other)

    core = data.get("core_ops", {})
    if not is_missing(core) and core:
        c = Table("Core ops (benchmarks/core_ops.py)", ["what", "value"])
        fqo, col, am = core["fake_quant"], core["collect"], core["compute_amax_ms"]
        c.rows += [
            [f"fake-quant fwd+bwd / copy fwd+bwd, per tensor, {tuple(fqo['tensor_shape'])}",
             fmt(fqo["per_tensor_over_copy"], unit="x")],
            ["fake-quant fwd+bwd / copy fwd+bwd, per channel", fmt(fqo["per_channel_over_copy"], unit="x")],
            ["histogram collect / the conv that produced the tensor", fmt(col["histogram_over_conv"], 3, "x")],
            ["max collect / the conv that produced the tensor", fmt(col["max_over_conv"], 3, "x")],
            ["compute_amax on one 2048-bin histogram: entropy / mse / percentile ms",
             f"{am['entropy']:.1f} / {am['mse']:.1f} / {am['percentile']:.2f}"],
        ]
        tables_.append(c)
    hot = data.get("hot_path", {})
    if not is_missing(hot) and hot:
        from bench_hot_path import summary

        h = Table("Hot path (benchmarks/bench_hot_path.py), ratios measured side by side in one run", ["measurement"])
        h.rows += [[line] for line in summary(hot)]
        tables_.append(h)
    return tables_


def figures(ctx: Context, data: dict) -> list[str]:
    labels, values = [], []
    cal, fq = data.get("calibration", {}), data.get("fake_quant_forward", {})
    for section, base in ((cal, "fp32 inference"), (fq, "fp32 forward")):
        if is_missing(section):
            continue
        for name, value in section.get(f"ratio_to_{base}", {}).items():
            labels.append(name)
            values.append(value)
    qat = data.get("qat_step", {})
    if not is_missing(qat) and qat:
        labels.append("QAT step (resnet18)")
        values.append(_ratio(qat, "QAT step", "fp32 step"))
    for name, r in (data.get("export") or {}).items() if not is_missing(data.get("export")) else []:
        labels.append(f"QDQ export {name}")
        values.append(_ratio(r, "QDQ export", "fp32 export"))
    path = bar_chart(ctx.out / "cost_ratios.png", labels, values, "Cost as a ratio to the float work (same run)",
                     "x fp32", reference=1.0, reference_label="fp32")
    return [path.name] if path else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder (cost.json of this section)")
    parser.add_argument("--quick", action="store_true", help="a small configuration, for smoke testing")
    parser.add_argument("--memory-child", choices=MEMORY_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, Path(args.data))))
        return
    if not args.out:
        parser.error("--out is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ctx = Context(Path(args.out), quick=args.quick)
    write_json(ctx.out / "cost.json", run(ctx)["data"])


if __name__ == "__main__":
    main()
