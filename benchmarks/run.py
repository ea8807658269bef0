"""The benchmark: one entry point for every section, writing results.json, results.md and the PNGs.

Sections (each a module of this folder with ``run(ctx) -> dict``):

* ``accuracy`` (bench_accuracy.py): EfficientNet-Lite0 PTQ on the ImageNet sample with every calibration method,
  next to ModelOpt and ONNX Runtime ``quantize_static``;
* ``onnx`` (bench_onnx.py): ONNX Runtime latency (batch 1 and 32) and accuracy of the fp32, qdq, ORT and ModelOpt
  files;
* ``cost`` (bench_cost.py): calibration time and peak memory, compute_amax, fake-quant forward, QAT step and export
  time, as ratios to the float work, next to ModelOpt;
* ``cifar`` (bench_cifar.py): ResNet-20 on CIFAR-10, fp32 / PTQ int8 / PTQ 4-bit weights / QAT 4-bit weights.

Every ratio compares two things measured in the same run. A peer tool that is not installed is reported as
"not installed" in its rows, never left out. Nothing is written into the repository: the default output folder is
``<system temp>/qdq-bench``.

Examples::

    python benchmarks/run.py --quick                           # every section, small, a few minutes
    python benchmarks/run.py --out /tmp/qdq-bench-full          # the full run
    python benchmarks/run.py --sections accuracy,onnx --out DIR
    python benchmarks/run.py --sections cifar --cifar-checkpoint resnet20_fp32.pt --out DIR
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import (ROOT, Context, Table, fmt, is_missing, load_average, machine, markdown_table,  # noqa: E402
                     missing, set_threads, write_json)

logger = logging.getLogger("benchmarks")

SECTIONS = {
    "accuracy": "bench_accuracy",
    "onnx": "bench_onnx",
    "cost": "bench_cost",
    "cifar": "bench_cifar",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "qdq-bench",
                        help="output folder for results.json, results.md, the PNGs and artifacts "
                             "(default: %(default)s; never inside the repository)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, in this order (default: {','.join(SECTIONS)})")
    parser.add_argument("--quick", action="store_true",
                        help="every section on a small configuration (few images, few batches), for smoke testing")
    parser.add_argument("--calib", type=int, default=None, help="ImageNet calibration images (100; 16 with --quick)")
    parser.add_argument("--eval", type=int, default=None, help="ImageNet evaluation images (400; 32 with --quick)")
    parser.add_argument("--cost-images", type=int, default=None,
                        help="images of the calibration cost measurements (200; 16 with --quick)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timing rounds of the cost section (3; 1 with --quick)")
    parser.add_argument("--cifar-checkpoint", type=Path, default=None,
                        help="trained fp32 ResNet-20 weights (default: train, cached as OUT/resnet20_fp32.pt)")
    parser.add_argument("--cifar-epochs", type=int, default=None, help="fp32 ResNet-20 training epochs (15; 1 quick)")
    parser.add_argument("--cifar-qat-epochs", type=int, default=None, help="4-bit QAT epochs (1)")
    parser.add_argument("--cifar-qat-steps", type=int, default=None,
                        help="stop the 4-bit QAT after this many steps (default: whole epochs; 3 with --quick)")
    parser.add_argument("--cifar-limit-per-class", type=int, default=None,
                        help="CIFAR-10 images per class and split (default: all; 20 with --quick)")
    parser.add_argument("--cifar-batch-size", type=int, default=None,
                        help="CIFAR-10 training batch size (256; 32 with --quick)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    args.sections = names
    out = args.out.resolve()
    if out == ROOT or ROOT in out.parents:
        parser.error(f"--out {out} is inside the repository; results derive from the shared data and stay outside")
    args.out = out
    return args


def run_section(name: str, ctx: Context) -> dict:
    """Runs one section; a section that fails is reported with its error, and the others still run."""
    t0 = time.perf_counter()
    load_before = load_average()
    try:
        module = importlib.import_module(SECTIONS[name])
        result = module.run(ctx)
    except Exception as err:
        logger.error("section %s failed:\n%s", name, traceback.format_exc())
        reason = missing(f"section failed: {type(err).__name__}: {err}")
        result = {"data": reason, "tables": [Table(name, ["what", "value"], [[name, fmt(reason)]])],
                  "figures": [], "notes": []}
    result["seconds"] = time.perf_counter() - t0
    result["load_average_before"], result["load_average_after"] = load_before, load_average()
    logger.info("section %s done in %.0f s", name, result["seconds"])
    return result


# ----------------------------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------------------------
def _get(data, *keys):
    for key in keys:
        if not isinstance(data, dict) or is_missing(data) or key not in data:
            return None
        data = data[key]
    return data


def targets(results: dict) -> list[list[str]]:
    """``[target, measured, met]`` rows for every target the run has numbers for."""
    rows = []
    acc = _get(results, "accuracy", "data")
    if acc and not is_missing(acc):
        fp32 = acc["fp32"]["top1"]
        best = max(acc["qdq"], key=lambda m: (acc["qdq"][m]["top1"], acc["qdq"][m]["sqnr_db"]))
        b = acc["qdq"][best]
        mo = acc.get("modelopt")
        mo_rows = {} if is_missing(mo) or not mo else {
            m: r for m, r in mo.items() if isinstance(r, dict) and "sqnr_db" in r and m != "out_of_the_box"}
        drop = fp32 - b["top1"]
        rows.append([f"EfficientNet-Lite0 PTQ int8 top-1 within 0.3 pt of fp32 (best method: {best})",
                     f"fp32 {fp32:.2f}%, {best} {b['top1']:.2f}% (drop {drop:.2f} pt; agreement {b['agreement']:.2f}%)",
                     fmt(drop <= 0.3)])
        best_sqnr = max(acc["qdq"], key=lambda m: acc["qdq"][m]["sqnr_db"])
        if mo_rows:
            mo_best = max(mo_rows, key=lambda m: mo_rows[m]["sqnr_db"])
            rows.append([f"SQNR at least ModelOpt's (our {best} / our best {best_sqnr} vs ModelOpt's best {mo_best})",
                         f"{b['sqnr_db']:.2f} / {acc['qdq'][best_sqnr]['sqnr_db']:.2f} dB vs "
                         f"{mo_rows[mo_best]['sqnr_db']:.2f} dB",
                         fmt(acc["qdq"][best_sqnr]["sqnr_db"] >= mo_rows[mo_best]["sqnr_db"])])
        else:
            rows.append(["SQNR at least ModelOpt's", fmt(mo if is_missing(mo) else missing("ModelOpt not measured")),
                         "not measured"])
    cifar = _get(results, "cifar", "data")
    if cifar and not is_missing(cifar):
        t = cifar["targets"]
        premise = t["ptq_w4_drop_pt"] > 3.0
        rows.append(["CIFAR-10 4-bit-weight QAT within 1 pt of fp32 where 4-bit PTQ loses > 3 pt",
                     f"PTQ w4 drop {t['ptq_w4_drop_pt']:.2f} pt, QAT w4 drop {t['qat_w4_drop_pt']:.2f} pt",
                     fmt(t["qat_w4_drop_pt"] <= 1.0) if premise else
                     f"not judged: 4-bit PTQ lost only {t['ptq_w4_drop_pt']:.2f} pt (QAT within 1 pt: "
                     f"{fmt(t['qat_w4_drop_pt'] <= 1.0)})"])
    cost = _get(results, "cost", "data")
    if cost and not is_missing(cost):
        cal = cost.get("calibration", {})
        ratio = _get(cal, "ratio_to_fp32 inference", "qdq calibrate histogram")
        images = cost["sizes"]["images"]
        if ratio is not None:
            rows.append([f"histogram calibration under 1.3x fp32 inference ({images} images)", f"{ratio:.2f}x",
                         fmt(ratio < 1.3)])
        mem = _get(cost, "memory", "histogram", "above_baseline_gb")
        peak = _get(cost, "memory", "histogram", "peak_rss_bytes")
        if mem is not None:
            rows.append([f"histogram calibration under 2 GB peak memory ({images} images)",
                         f"{mem:.2f} GB above baseline ({peak / 2**30:.2f} GB peak RSS of the process)",
                         fmt(mem < 2.0)])
        qat = _get(cost, "qat_step", "ratio_to_fp32 step", "QAT step")
        if qat is not None:
            rows.append(["QAT step under 1.25x fp32 (resnet18)", f"{qat:.2f}x", fmt(qat < 1.25)])
    onnx = _get(results, "onnx", "data")
    if onnx and not is_missing(onnx):
        for bs, r in onnx.get("targets", {}).items():
            v = r["qdq_over_ort_quantized"]
            rows.append([f"our QDQ file at least as fast as ORT's quantized model in ORT ({bs})",
                         fmt(v, unit="x") + " of ORT's latency",
                         fmt(v <= 1.0) if not is_missing(v) else "not measured"])
            v = r["modelopt_over_qdq"]
            rows.append([f"our QDQ file 2x faster than ModelOpt's export in ORT ({bs})",
                         fmt(v) if is_missing(v) else "ModelOpt takes " + fmt(v, unit="x") + " our latency",
                         fmt(v >= 2.0) if not is_missing(v) else "not measured"])
    return rows


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------
def markdown(results: dict, info: dict, total_seconds: float, args: argparse.Namespace) -> str:
    lines = ["# qdq benchmark", "",
             f"Date: {info['date']}. Machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch "
             f"threads, {info['memory_gb']} GB. Load average at start: {info['load_average']}.",
             f"Python {info['python']}, qdq {info['qdq']}, torch {info['torch']}, torchvision {info['torchvision']}, "
             f"numpy {info['numpy']}, onnx {info['onnx']}, onnxruntime {info['onnxruntime']}.",
             "Peers: " + ", ".join(f"{k} {v}" for k, v in info["peers"].items()) + ".",
             f"Configuration: {'--quick' if args.quick else 'full'}; sections {', '.join(args.sections)}; "
             f"total {total_seconds / 60:.1f} min.", ""]
    rows = targets(results)
    if rows:
        lines += [markdown_table(Table("Targets", ["target", "measured", "met"], rows)), ""]
    for name, result in results.items():
        lines += [f"## {name} ({result['seconds'] / 60:.1f} min; load average {result['load_average_before']} -> "
                  f"{result['load_average_after']})", ""]
        for table in result["tables"]:
            lines += [markdown_table(table), ""]
        for note in result.get("notes", []):
            lines += [f"- {note}"]
        if result.get("notes"):
            lines.append("")
        for fig in result.get("figures", []):
            lines += [f"![{fig}]({fig})", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("qdq", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not args.verbose else logging.DEBUG)
    threads = set_threads()
    args.out.mkdir(parents=True, exist_ok=True)
    options = {k: v for k, v in vars(args).items() if k not in ("out", "sections", "quick", "verbose")}
    ctx = Context(args.out, quick=args.quick, options=options)
    info = machine()
    logger.info("machine: %s, %d cores, %d threads; peers: %s; output: %s", info["cpu"], info["cores"], threads,
                info["peers"], args.out)
    t0 = time.perf_counter()
    results: dict = {}
    for name in args.sections:
        logger.info("section %s", name)
        results[name] = run_section(name, ctx)
        _write(args, info, results, time.perf_counter() - t0)  # partial results survive a later failure
    total = time.perf_counter() - t0
    _write(args, info, results, total)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'} in {total / 60:.1f} min")
    return 0


def _write(args: argparse.Namespace, info: dict, results: dict, total: float) -> None:
    payload = {
        "machine": info,
        "configuration": {"quick": args.quick, "sections": args.sections,
                          **{k: v for k, v in vars(args).items() if k not in ("sections", "quick")}},
        "total_seconds": total,
        "targets": targets(results),
        "sections": {name: {"seconds": r["seconds"], "load_average_before": r["load_average_before"],
                            "load_average_after": r["load_average_after"], "data": r["data"],
                            "tables": [t.to_dict() for t in r["tables"]], "figures": r["figures"],
                            "notes": r.get("notes", [])} for name, r in results.items()},
    }
    write_json(args.out / "results.json", payload)
    (args.out / "results.md").write_text(markdown(results, info, total, args))


if __name__ == "__main__":
    sys.exit(main())
