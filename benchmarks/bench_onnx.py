"""Deployable-file section: ONNX Runtime latency and accuracy of the EfficientNet-Lite0 files each tool writes.

Files (all with a dynamic batch dimension, run by ONNX Runtime's CPU provider with every graph optimization on and
``intra_op_num_threads`` = cores):

* fp32: the float model exported by ``qdq.export_onnx(..., quantize=False)``;
* qdq: the QDQ export of the max-calibrated model (BatchNorm folded first, as the documented flow does), in the
  fake-quant form (float weights behind Q/DQ) and the deploy form (int8 weight initializers);
* qdq without ``fold_bn``: the same flow without folding, to show what unfolded BatchNorms cost in a QDQ file;
* ONNX Runtime's own ``quantize_static`` model (MinMax, QDQ, per channel, symmetric);
* ModelOpt's model (registered conv, max) through torch's TorchScript exporter.

Latency: median over interleaved rounds (each round runs every file once), after warm-up runs, for batch 1 and
batch 32 on the same input; ratios are to the fp32 file in the same round. Accuracy: top-1, agreement and SQNR
of each file's outputs over the evaluation images, against the fp32 PyTorch logits.

Targets: our QDQ file at least as fast as ORT's own quantized model and 2x faster than ModelOpt's export. On a
2-core CPU an int8 QDQ file may be slower than fp32 in ONNX Runtime (PEERS.md): the numbers say what was measured.

Run alone: ``python benchmarks/bench_onnx.py --out DIR [--quick]``.
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
                     interleaved, is_missing, labels_of, logit_scores, missing, set_threads, write_json)

logger = logging.getLogger("benchmarks.onnx")


def sizes(ctx: Context) -> dict:
    quick = ctx.quick
    return {
        "calib": ctx.option("calib", 8 if quick else 100),
        "eval": ctx.option("eval", 16 if quick else 400),
        "batch": 8 if quick else 25,
        "latency_batches": (1, 8) if quick else (1, 32),
        "rounds": {1: 5 if quick else 30, 8: 2, 32: 5},
    }


def _onnx_ops(path: Path) -> dict:
    import onnx

    ops: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def build_files(ctx: Context, fp32, calib) -> dict[str, dict]:
    """``{label: {"path": ..., ...}}`` or ``{label: missing(...)}`` for every file of the section."""
    import qdq
    from qdq.onnx import export_onnx

    from bench_accuracy import fp32_onnx, ort_quantized, qdq_model
    from _peers import modelopt_export, modelopt_import, modelopt_max, modelopt_register_efficientnet

    files: dict[str, dict] = {}
    example = torch.zeros(1, 3, 224, 224)
    files["fp32"] = {"path": fp32_onnx(ctx, fp32)}
    model = qdq_model(fp32)
    qdq.calibrate_model(model, calib, method="max", progress=False)
    ctx.cache["onnx_qdq_model"] = model
    for label, deploy in (("qdq", False), ("qdq deploy form", True)):
        path = ctx.artifacts / f"efficientnet_lite0_qdq{'_deploy' if deploy else ''}.onnx"
        t0 = time.perf_counter()
        info = export_onnx(model, example, path, dynamic_batch=True, deploy=deploy)
        files[label] = {"path": path, "export_seconds": time.perf_counter() - t0, "qdq_pairs": info.num_qdq_pairs}
    unfolded = copy.deepcopy(fp32).eval()
    qdq.replace_to_quantization_module(unfolded)
    qdq.calibrate_model(unfolded, calib, method="max", progress=False)
    path = ctx.artifacts / "efficientnet_lite0_qdq_bn_unfolded.onnx"
    info = export_onnx(unfolded, example, path, dynamic_batch=True)
    files["qdq without fold_bn"] = {"path": path, "qdq_pairs": info.num_qdq_pairs}
    try:
        import onnxruntime.quantization  # noqa: F401

        report = ort_quantized(ctx, fp32, calib, "MinMax")
        files["ORT quantize_static MinMax"] = report if "missing" in report else {"path": Path(report["path"])}
    except ImportError:
        files["ORT quantize_static MinMax"] = missing("onnxruntime.quantization not available")
    mtq, reason = modelopt_import()
    if mtq is None:
        files["ModelOpt export"] = missing(reason)
    else:
        modelopt_register_efficientnet(mtq)
        mo_model = ctx.cache.get("modelopt_max_model") or modelopt_max(mtq, fp32, calib)[0]
        try:
            info = modelopt_export(mo_model, example, ctx.artifacts / "efficientnet_lite0_modelopt.onnx")
            files["ModelOpt export"] = {"path": Path(info["path"]), "export_seconds": info["seconds"],
                                        "qdq_pairs": info["qdq_pairs"]}
        except Exception as err:
            files["ModelOpt export"] = missing(f"export failed: {type(err).__name__}: {str(err)[:200]}")
    for label, f in files.items():
        if not is_missing(f):
            ops = _onnx_ops(f["path"])
            f.update(batchnorm_nodes=ops.get("BatchNormalization", 0), dq_nodes=ops.get("DequantizeLinear", 0),
                     size_mb=f["path"].stat().st_size / 2**20)
            try:
                run_ops = optimized_ops(f["path"], ctx.artifacts)
                f["ort_runs"] = {k: run_ops.get(k, 0) for k in ("QLinearConv", "QGemm", "Conv", "FusedConv",
                                                                  "DequantizeLinear", "QuantizeLinear")}
            except Exception as err:
                f["ort_runs"] = missing(f"optimized graph not available: {type(err).__name__}: {err}")
    return files


def optimized_ops(path: Path, work: Path) -> dict[str, int]:
    """The op counts of the graph ONNX Runtime actually runs (all optimizations on): shows whether Q/DQ pairs
    became integer kernels (QLinearConv, ...) or stayed float ops between DequantizeLinear nodes."""
    import os

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = os.cpu_count() or 1
    dumped = work / (path.stem + "_ort_optimized.onnx")
    options.optimized_model_filepath = str(dumped)
    options.log_severity_level = 3  # its warning that the dump is hardware specific is expected here
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = _onnx_ops(dumped)
    dumped.unlink(missing_ok=True)
    return ops


def latency(files: dict[str, dict], batch: int, rounds: int) -> dict:
    from bench_accuracy import ort_session

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)
    fns = {}
    for label, f in files.items():
        if is_missing(f):
            continue
        session = ort_session(f["path"])
        name = session.get_inputs()[0].name
        fns[label] = lambda s=session, n=name: s.run(None, {n: x})
    for fn in fns.values():  # warm-up: first runs allocate and pick kernels
        for _ in range(3 if batch == 1 else 1):
            fn()
    return interleaved(fns, repeat=rounds, warmup=0).to_dict(baseline="fp32" if "fp32" in fns else None)


def run(ctx: Context) -> dict:
    """Runs the section; returns ``{"data", "tables", "figures", "notes"}``."""
    set_threads()
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        data = missing("onnxruntime not installed")
        return {"data": data, "tables": [Table("ONNX Runtime", ["what", "value"], [["all", fmt(data)]])],
                "figures": [], "notes": []}
    from bench_accuracy import ort_logits

    size = sizes(ctx)
    calib, evalb = imagenet_batches(ctx, size["calib"], size["eval"], size["batch"])
    labels = labels_of(evalb)
    fp32 = efficientnet_fp32()
    ref = forward_all(fp32, evalb, True, "eval fp32")
    files = build_files(ctx, fp32, calib)
    data: dict = {"sizes": size, "files": {}, "latency": {}}
    torch_q = forward_all(ctx.cache.pop("onnx_qdq_model"), evalb, True, "eval qdq torch")
    data["qdq_pytorch_fake_quant"] = logit_scores(ref, torch_q, labels)
    for label, f in files.items():
        if is_missing(f):
            data["files"][label] = f
            continue
        logits = ort_logits(f["path"], evalb, f"eval {label}")
        entry = {k: (str(v) if isinstance(v, Path) else v) for k, v in f.items()}
        entry.update(logit_scores(ref, logits, labels))
        if label.startswith("qdq"):
            entry["max_abs_diff_to_pytorch_fake_quant"] = float((logits - torch_q).abs().max())
        data["files"][label] = entry
    for batch in size["latency_batches"]:
        logger.info("ONNX Runtime latency, batch %d", batch)
        data["latency"][f"bs{batch}"] = latency(files, batch, size["rounds"][batch])
    data["targets"] = targets(data)
    return {"data": data, "tables": tables(data), "figures": figures(ctx, data), "notes": []}


def targets(data: dict) -> dict:
    out = {}
    for key, lat in data["latency"].items():
        s = lat["seconds"]
        if "qdq" not in s:
            continue
        ort = s.get("ORT quantize_static MinMax")
        mo = s.get("ModelOpt export")
        out[key] = {
            "qdq_over_ort_quantized": s["qdq"] / ort if ort else missing("ORT quantized model not measured"),
            "modelopt_over_qdq": mo / s["qdq"] if mo else missing("ModelOpt export not measured"),
        }
    return out


def tables(data: dict) -> list[Table]:
    labels = list(data["files"])
    bss = list(data["latency"])
    cols = ["file", "BatchNorm nodes", "DequantizeLinear", "MB"]
    for bs in bss:
        cols += [f"{bs} ms", f"{bs} / fp32"]
    cols += ["top-1 %", "agreement %", "SQNR dB"]
    size = data["sizes"]
    t = Table(f"EfficientNet-Lite0 in ONNX Runtime (CPU, all graph optimizations); accuracy on {size['eval']} "
              "images", cols)
    for label in labels:
        f = data["files"][label]
        if is_missing(f):
            t.rows.append([label, fmt(f)] + [""] * (len(cols) - 2))
            continue
        row = [label, fmt(f["batchnorm_nodes"]), fmt(f["dq_nodes"]), fmt(f["size_mb"], 1)]
        for bs in bss:
            lat = data["latency"][bs]
            row.append(fmt(lat["seconds"][label] * 1e3, 1))
            row.append(fmt(lat.get("ratio_to_fp32", {}).get(label, 1.0 if label == "fp32" else None), unit="x"))
        row += [fmt(f["top1"]), fmt(f["agreement"]), fmt(f["sqnr_db"])]
        t.rows.append(row)
    q = data["qdq_pytorch_fake_quant"]
    rounds = ", ".join(f"bs{b}: {size['rounds'][b]}" for b in size["latency_batches"])
    t.note = (f"The same qdq model in PyTorch (fake quantization): top-1 {q['top1']:.2f}%, agreement "
              f"{q['agreement']:.2f}%, SQNR {q['sqnr_db']:.2f} dB. Latency: median of interleaved rounds "
              f"({rounds} rounds) after warm-up.")
    g = Table("What ONNX Runtime runs (op counts of its optimized graph)",
              ["file", "QLinearConv", "QGemm", "Conv / FusedConv (float)", "DequantizeLinear", "QuantizeLinear"])
    for label in labels:
        f = data["files"][label]
        r = f.get("ort_runs") if not is_missing(f) else f
        if r is None or is_missing(r):
            g.rows.append([label, fmt(r if r is not None else missing("not measured")), "", "", "", ""])
            continue
        g.rows.append([label, r["QLinearConv"], r["QGemm"], r["Conv"] + r["FusedConv"], r["DequantizeLinear"],
                       r["QuantizeLinear"]])
    g.note = ("A Conv between DequantizeLinear nodes runs in float (the Q/DQ pairs are extra work); a QLinearConv is "
              "an int8 kernel. ONNX Runtime fuses DQ -> Conv -> Q into QLinearConv only where the conv's output is "
              "quantized too.")
    tg = Table("Latency targets", ["batch", "qdq / ORT quantize_static (target <= 1)", "ModelOpt / qdq (target >= 2)"])
    for bs, r in data["targets"].items():
        tg.rows.append([bs, fmt(r["qdq_over_ort_quantized"], unit="x"), fmt(r["modelopt_over_qdq"], unit="x")])
    return [t, g, tg]


def figures(ctx: Context, data: dict) -> list[str]:
    paths = []
    for bs, lat in data["latency"].items():
        labels = list(lat["seconds"])
        path = bar_chart(ctx.out / f"onnx_latency_{bs}.png", labels, [lat["seconds"][k] * 1e3 for k in labels],
                         f"ONNX Runtime latency, EfficientNet-Lite0, {bs}", "ms",
                         reference=lat["seconds"].get("fp32", None) and lat["seconds"]["fp32"] * 1e3,
                         reference_label="fp32")
        if path:
            paths.append(path.name)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (onnx.json of this section)")
    parser.add_argument("--quick", action="store_true", help="a small configuration, for smoke testing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ctx = Context(Path(args.out), quick=args.quick)
    write_json(ctx.out / "onnx.json", run(ctx)["data"])


if __name__ == "__main__":
    main()
