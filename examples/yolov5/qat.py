"""YOLOv5 QAT: the YOLOv5-style detector of :mod:`examples.yolov5.model` quantized the way TensorRT fuses it,
calibrated, fine-tuned by distillation from its float self, exported to QDQ ONNX and checked.

The steps of :func:`run` (``python -m examples.yolov5.qat``):

1. the detector (``--size n|s`` or ``--size tiny``) with reproducible random weights, or ``--weights`` (a
   ``state_dict`` of your own training); nothing is downloaded;
2. :func:`qdq.replace_to_quantization_module`: every convolution gets 8-bit quantizers;
3. :func:`qdq.rules.apply_yolov5_rules`: the bottleneck adds get one shared :class:`~qdq.nn.QuantAdd` quantizer,
   the C3/SPPF/neck concatenations one :class:`~qdq.nn.QuantConcat` quantizer;
4. :func:`qdq.onnx.apply_custom_rules_to_quantizer`: the quantizers TensorRT needs with one scale (around the
   concatenations, max pools and fan-outs, found in an ONNX export of the model) become one quantizer;
5. calibration (``mse`` by default) on images resized to ``--imgsz`` (the labels are not used);
6. QAT by distillation (:class:`qdq.transform.qat.Distiller`): the quantized model learns to match the float model's neck
   outputs and head outputs; the distillation loss is printed and should go down;
7. export to QDQ ONNX, the TensorRT rule check (no errors, no scale mismatch expected), parity with ONNX Runtime.

The helpers are importable: :func:`build_detector`, :func:`quantize_detector`, :func:`image_source`,
:func:`distill`, :func:`distillation_loss`.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

import qdq
from examples.common import UsageError, add_run_arguments, finish, positive, resolve_defaults, run_main
from qdq.onnx import apply_custom_rules_to_quantizer, check_tensorrt, export_onnx, verify
from qdq.onnx.check import format_findings
from qdq.transform.qat import Distiller, freeze_bn_stats, make_teacher
from qdq.rules import apply_yolov5_rules

__all__ = [
    "DISTILL_LAYERS",
    "UsageError",
    "build_detector",
    "quantize_detector",
    "image_source",
    "distill",
    "distillation_loss",
    "build_parser",
    "run",
    "main",
]

logger = logging.getLogger(__name__)

#: The modules whose outputs the student matches: the three neck outputs and the head.
DISTILL_LAYERS = ("neck.c3_out3", "neck.c3_out4", "neck.c3_out5", "detect")
SIZES = ("tiny", "n", "s", "m", "l", "x")


def build_detector(size: str = "n", nc: int = 80, weights: str | Path | None = None, seed: int = 0) -> nn.Module:
    """The float detector in eval mode: ``size`` ``"tiny"`` (a test-sized model) or a YOLOv5 size, with
    reproducible random weights (``seed``) or the ``state_dict`` in ``weights``."""
    from examples.yolov5 import model as yolo

    model = yolo.yolov5_tiny(nc=nc, seed=seed) if size == "tiny" else yolo.yolov5(size, nc=nc, seed=seed)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise UsageError(f"--weights {weights} does not fit the {size} model with {nc} classes: "
                             f"{str(err).splitlines()[0]}") from None
    return model.eval()


def quantize_detector(model: nn.Module, imgsz: int, ignore_policy: Any = None) -> dict[str, Any]:
    """Quantizes ``model`` in place: convolutions, the YOLOv5 recipes, then the ONNX-driven scale sharing.

    Returns what was done: the replacement report, the patched blocks per recipe and the shared quantizer pairs.
    """
    report = qdq.replace_to_quantization_module(model, ignore_policy=ignore_policy)
    recipes = apply_yolov5_rules(model)
    pairs = apply_custom_rules_to_quantizer(model, torch.zeros(1, 3, imgsz, imgsz))
    return {"replaced": report, "recipes": recipes, "shared": pairs}


def image_source(images: str, imgsz: int, batch_size: int, limit: int, seed: int = 0) -> qdq.calibrate.data.ImageFolderSource:
    """Batches of ``limit`` images resized to ``imgsz`` x ``imgsz``, RGB in [0, 1] as YOLOv5 takes them.

    ``images``: ``"imagenet"`` (the ImageNet sample of ``../shared/data``), ``"cifar10"`` (its CIFAR-10 training
    images) or a folder of images (searched recursively).
    """
    from torchvision import transforms

    from examples import common

    if images == "imagenet":
        root = common.extract("imagenet-sample-500.tar") / "imagenet-sample-500"
    elif images == "cifar10":
        per_class = max(1, -(-limit // 10))
        root = common.cifar10_root(20 if per_class <= 20 else None) / "train"
    else:
        root = Path(images)
        if not root.is_dir():
            raise UsageError(f"--images {images}: not 'imagenet', 'cifar10' or a folder")
    preprocess = transforms.Compose([transforms.Resize((imgsz, imgsz)), transforms.ToTensor()])
    from qdq.calibrate.data import ImageFolderSource

    return ImageFolderSource(root, preprocess, batch_size=batch_size, limit=limit, seed=seed)


def distillation_loss(student: nn.Module, teacher: nn.Module, data: Iterable[torch.Tensor],
                      layers: Sequence[str] = DISTILL_LAYERS) -> float:
    """The mean distillation loss (MSE summed over ``layers``) of ``student`` against ``teacher`` over ``data``, in
    eval mode without gradients: the measure that QAT by distillation brings down."""
    distiller = Distiller(student, teacher=teacher, layers=layers)
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            values = [float(distiller(batch)[1]) for batch in data]
    finally:
        distiller.remove()
        student.train(was_training)
    return sum(values) / len(values)


def distill(student: nn.Module, data: Iterable[torch.Tensor], steps: int, lr: float = 1e-5,
            layers: Sequence[str] = DISTILL_LAYERS, teacher: nn.Module | None = None) -> list[float]:
    """QAT by distillation, in place: ``steps`` Adam steps (cosine-decayed learning rate) on the MSE between the
    outputs of ``layers`` in the student and in the float teacher (default: a copy of ``student`` with its
    quantizers off, taken now); BatchNorm statistics stay frozen. Cycles through ``data``; returns the loss of every
    step (each on its own batch, so they are noisy: compare :func:`distillation_loss` before and after)."""
    from tqdm.auto import tqdm

    distiller = Distiller(student, teacher=teacher, layers=layers)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    losses = []
    student.train()
    freeze_bn_stats(student)
    try:
        batches = itertools.cycle(list(data))
        bar = tqdm(range(steps), desc="QAT (distillation)", unit="step", leave=False)
        for _ in bar:
            _, loss = distiller(next(batches))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
        bar.close()
    finally:
        distiller.remove()
        student.eval()
    return losses


def _scale_mismatches(findings) -> list:
    return [f for f in findings if f.rule in ("scale-mismatch", "add-scale-mismatch", "fanout-scale")]


def run(args: argparse.Namespace) -> dict:
    """The whole example (see the module docstring); returns the results also written to ``--out``/results.json."""
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model = build_detector(args.size, args.nc, args.weights, args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: YOLOv5-style {args.size}, {params / 1e6:.2f}M parameters, {args.nc} classes, "
          f"input {args.imgsz}x{args.imgsz}, {'weights ' + str(args.weights) if args.weights else 'random weights'}")

    done = quantize_detector(model, args.imgsz)
    print(f"{len(done['replaced'].replaced)} convolutions quantized; recipes: "
          + ", ".join(f"{name.split('.')[-1]} {len(paths)}" for name, paths in done["recipes"].items())
          + f"; {len(done['shared'])} quantizer pairs made to share a scale")

    source = image_source(args.images, args.imgsz, args.batch_size, args.calib_images, args.seed)
    batches = list(source)
    t0 = time.perf_counter()
    report = qdq.calibrate_model(model, batches, method=args.method)
    calib_s = time.perf_counter() - t0
    print(f"calibrated {report.calibrated} quantizers with {args.method} on {sum(len(b) for b in batches)} images "
          f"from {args.images} in {calib_s:.1f} s")

    teacher = make_teacher(model)  # the float model: the quantized one with its quantizers off
    before = distillation_loss(model, teacher, batches)
    t0 = time.perf_counter()
    losses = distill(model, batches, args.qat_steps, args.lr, teacher=teacher)
    qat_s = time.perf_counter() - t0
    after = distillation_loss(model, teacher, batches)
    print(f"distillation QAT: {len(losses)} Adam steps matching {', '.join(DISTILL_LAYERS)} of the float model "
          f"({qat_s:.1f} s)")
    print(f"distillation loss on the {sum(len(b) for b in batches)} images: {before:.4g} before QAT, {after:.4g} "
          f"after ({100 * (after - before) / before:+.1f}%, {'down' if after < before else 'NOT down'})")

    path = out / f"yolov5{args.size}_int8_qdq.onnx"
    example = batches[0][:1]
    info = export_onnx(model, example, path, dynamic_batch=True, output_names=("p3", "p4", "p5"))
    print(f"exported {info.path} ({info.num_qdq_pairs} Q/DQ pairs, opset {info.opset})")
    findings = check_tensorrt(path)
    mismatches = _scale_mismatches(findings)
    print("TensorRT rule check:")
    print(format_findings(findings, show_info=False))
    print(f"scale-mismatch findings: {len(mismatches)}")
    images = batches[0][: args.verify_images]
    parity = verify(model, path, images, output_tolerance_steps=args.tolerance_steps)
    worst = max(parity.outputs, key=lambda o: o.max_error_steps)
    print(f"ONNX Runtime vs PyTorch on {len(images)} images: max {worst.max_error_steps:.2f} output steps "
          f"(tolerance {args.tolerance_steps:g}); QuantizeLinear rounding: {parity.rounding.num_differing} of "
          f"{parity.rounding.num_elements} values one step apart -> {'OK' if parity.ok else 'MISMATCH'}")

    counts = {s: sum(f.severity == s for f in findings) for s in ("error", "warning", "info")}
    results = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "quantized_layers": len(done["replaced"].replaced),
        "recipes": done["recipes"],
        "shared_pairs": done["shared"],
        "calib_seconds": calib_s,
        "distill_loss_before": before,
        "distill_loss_after": after,
        "distill_step_losses": losses,
        "qat_seconds": qat_s,
        "onnx": str(info.path),
        "qdq_pairs": info.num_qdq_pairs,
        "trt": counts,
        "trt_findings": [str(f) for f in findings if f.severity != "info"],
        "scale_mismatches": len(mismatches),
        "verify_ok": parity.ok,
        "max_error_steps": worst.max_error_steps,
        "seconds": time.perf_counter() - t_start,
    }
    return finish(out, results, [
        ("distillation loss", f"{before:.4g} -> {after:.4g}"),
        ("ONNX", str(info.path)),
        ("TensorRT check", f"{counts['error']} errors, {counts['warning']} warnings, "
                           f"{len(mismatches)} scale mismatches"),
        ("ONNX Runtime parity", "OK" if parity.ok else "MISMATCH"),
    ])


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
#: What ``--tiny`` sets: the test-sized model on 64x64 images, a few steps.
TINY = {"size": "tiny", "nc": 3, "imgsz": 64, "calib_images": 8, "batch_size": 4, "qat_steps": 6,
        "verify_images": 2}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``examples/yolov5/qat.py``."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.yolov5.qat",
        description="Quantize the YOLOv5-style detector for TensorRT: QuantAdd/QuantConcat recipes, ONNX-driven "
                    "scale sharing, calibration, distillation QAT against the float model, QDQ ONNX export, "
                    "TensorRT rule check and ONNX Runtime parity.",
        epilog="Examples: `python -m examples.yolov5.qat` (yolov5n at 320x320, ~1 min on 2 CPU cores), "
               "`python -m examples.yolov5.qat --size s --imgsz 640`, `python -m examples.yolov5.qat --tiny`.",
    )
    parser.add_argument("--size", choices=SIZES, default=None, help="model size (default n; tiny: a test model)")
    parser.add_argument("--nc", type=positive(int), default=None, help="number of classes (default 80)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="state_dict of your own trained model (default: reproducible random weights)")
    parser.add_argument("--imgsz", type=positive(int), default=None,
                        help="square input size, a multiple of 32 (default 320)")
    parser.add_argument("--images", default="imagenet",
                        help="calibration/QAT images: imagenet (the ImageNet sample of ../shared/data), cifar10, "
                             "or a folder of images (labels are not used)")
    parser.add_argument("--calib-images", type=positive(int), default=None, help="images used (default 64)")
    parser.add_argument("--batch-size", type=positive(int), default=None, help="batch size (default 8)")
    parser.add_argument("--method", default="mse", choices=["max", "entropy", "mse", "percentile", "kld"],
                        help="calibration method (mse)")
    parser.add_argument("--qat-steps", type=positive(int), default=None, help="distillation steps (default 40)")
    parser.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate of the distillation (1e-5)")
    parser.add_argument("--verify-images", type=positive(int), default=None,
                        help="images ONNX Runtime runs for the parity check (default 4)")
    parser.add_argument("--tolerance-steps", type=float, default=16.0,
                        help="ONNX Runtime parity: accepted output difference in output quantization steps "
                             "(16: random weights amplify the one-step rounding flips of the two runtimes, see "
                             "README.md)")
    add_run_arguments(parser, "yolov5", "ONNX file and results.json",
                      "the tiny model at 64x64, 8 images, 6 distillation steps",
                      seed="random seed of the weights and the image choice (0)")
    return parser


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    defaults = {"size": "n", "nc": 80, "imgsz": 320, "calib_images": 64, "batch_size": 8, "qat_steps": 40,
                "verify_images": 4}
    args = resolve_defaults(args, "yolov5", defaults, TINY, files=["weights"])
    if args.imgsz % 32:
        raise UsageError(f"--imgsz must be a multiple of 32 (the largest stride), got {args.imgsz}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.images not in ("imagenet", "cifar10") and not Path(args.images).is_dir():
        raise UsageError(f"--images {args.images}: not 'imagenet', 'cifar10' or a folder")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for a usage or data error, with a one-line message)."""
    from qdq.calibrate.data import DataSourceError

    return run_main(build_parser(), run, _resolve, argv, errors=(DataSourceError,))


if __name__ == "__main__":
    import sys

    if __package__ in (None, ""):  # run as a file: import from the checkout
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
