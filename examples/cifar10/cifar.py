"""CIFAR-10 with a ResNet-20: float training, PTQ with every calibration method, 4-bit weights PTQ vs QAT, export.

The pieces are importable (``from examples.cifar10 import cifar``) and :func:`run` chains them the way
``examples/cifar10/train.py`` does:

1. train the float ResNet-20 (or load ``--checkpoint``); the trained weights are cached in ``--out`` and reused by
   the next run with the same training settings;
2. 8-bit PTQ (per-channel weights, per-tensor activations, the residual adds quantized as TensorRT fuses them) with
   each calibration method: top-1, top-1 agreement with the float model, SQNR of the logits, calibration time;
3. 4-bit weights (8-bit activations): PTQ, then QAT fine-tuning from the PTQ model;
4. the best 8-bit model exported to QDQ ONNX, compared with ONNX Runtime and checked against TensorRT's rules.

Example:
    >>> import torch
    >>> model = resnet20().eval()
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> sum(p.numel() for p in model.parameters())
    272474
"""

from __future__ import annotations

import argparse
import copy
import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms
from torchvision.models.resnet import BasicBlock
from tqdm.auto import tqdm

import qdq
from examples.common import (UsageError, add_run_arguments, cifar10_root, export_and_check, export_summary, finish,
                             first_per_class, histograms_without_zeros, positive, print_table, resolve_defaults,
                             run_main, trained_float_model)
from qdq import nn as quant_nn
from qdq.calibrate.evaluate import collect_logits, sqnr_db, top1_accuracy, top1_agreement
from qdq.onnx import apply_custom_rules_to_quantizer
from qdq.transform.qat import freeze_bn_stats, qat_learning_rate
from qdq.rules import apply_resnet_rules
from qdq.tensor_quant import QuantDescriptor

__all__ = [
    "METHODS",
    "UsageError",
    "ResNetCifar",
    "resnet20",
    "loaders",
    "train",
    "evaluate",
    "ptq",
    "qat",
    "build_parser",
    "run",
    "main",
]

logger = logging.getLogger(__name__)

#: The calibration methods compared by default.
METHODS = ("max", "entropy", "mse", "percentile", "kld")
#: Per-channel mean and standard deviation of the CIFAR-10 training images.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CHECKPOINT_NAME = "resnet20_fp32.pt"


# ----------------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------------
class ResNetCifar(nn.Module):
    """The CIFAR ResNet of the ResNet paper: a 3x3 stem, three stages of ``blocks`` basic blocks (16, 32 and 64
    channels, strides 1, 2, 2), global average pooling and a linear classifier.

    The blocks are torchvision's ``BasicBlock``, so :func:`qdq.rules.apply_resnet_rules` quantizes their residual
    adds. Where a stage changes the shape, the shortcut is a 1x1 convolution with batch norm (the paper's option B),
    which TensorRT fuses like any convolution.

    Args:
        blocks: basic blocks per stage (3 gives ResNet-20, 5 ResNet-32, 9 ResNet-56).
        num_classes: classifier outputs.
        width: channels of the first stage (the others double it at each stage).
    """

    def __init__(self, blocks: int = 3, num_classes: int = 10, width: int = 16):
        super().__init__()
        if blocks < 1 or num_classes < 1 or width < 1:
            raise ValueError(f"ResNetCifar needs blocks, num_classes, width >= 1; got {blocks}, {num_classes}, {width}")
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        channels = width
        stages = []
        for i in range(3):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            layers = []
            for j in range(blocks):
                s = stride if j == 0 else 1
                downsample = None
                if s != 1 or channels != planes:
                    downsample = nn.Sequential(nn.Conv2d(channels, planes, 1, s, bias=False), nn.BatchNorm2d(planes))
                layers.append(BasicBlock(channels, planes, s, downsample))
                channels = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # each residual branch starts as zero: the block starts as its shortcut
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(num_classes: int = 10) -> ResNetCifar:
    """ResNet-20 for 32x32 images: 3 stages of 3 basic blocks, 16/32/64 channels (0.27M parameters)."""
    return ResNetCifar(3, num_classes)


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
def _transform(augment: bool) -> transforms.Compose:
    steps: list[Any] = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    steps += [transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)]
    return transforms.Compose(steps)


def data_root(root: str | Path | None = None, limit_per_class: int | None = None) -> Path:
    """The ImageFolder root with ``train/`` and ``test/``: ``root``, or the shared CIFAR-10 images extracted to the
    cache (only the first ``limit_per_class`` images per class and split when given).

    Raises:
        UsageError: ``root`` lacks ``train/`` or ``test/``.
        FileNotFoundError: the shared data is not there.
    """
    if root is None:
        return cifar10_root(limit_per_class)
    root = Path(root)
    missing = [split for split in ("train", "test") if not (root / split).is_dir()]
    if missing:
        raise UsageError(f"--data {root}: no {' or '.join(missing)}/ folder (expected an ImageFolder layout "
                         "train/<class>/*.jpg and test/<class>/*.jpg)")
    return root


def loaders(
    root: str | Path | None = None,
    batch_size: int = 128,
    limit_per_class: int | None = None,
    augment: bool = True,
    num_workers: int = 0,
    eval_batch_size: int = 500,
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` over an ImageFolder root with ``train/`` and ``test/`` (default: the shared
    CIFAR-10 images).

    Args:
        root: the ImageFolder root (``None``: CIFAR-10 from ``../shared/data``, extracted to a cache folder).
        batch_size: training batch size (the train loader shuffles and, with ``augment``, drops the last partial
            batch).
        limit_per_class: keep only the first images of each class in both splits (quick runs).
        augment: random crop (32, padding 4) and horizontal flip on the training images; without it the training
            loader gives plain normalised images (as calibration wants).
        num_workers: DataLoader worker processes.
        eval_batch_size: batch size of the test loader.
    """
    shared = root is None
    root = data_root(root, limit_per_class)
    train_set = datasets.ImageFolder(str(root / "train"), _transform(augment))
    test_set = datasets.ImageFolder(str(root / "test"), _transform(False))
    if train_set.classes != test_set.classes:
        raise UsageError(f"{root}: train/ and test/ have different classes")
    if limit_per_class is not None and not shared:
        train_set, test_set = first_per_class(train_set, limit_per_class), first_per_class(test_set, limit_per_class)
    common = {"num_workers": num_workers, "persistent_workers": num_workers > 0}
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=augment and
                              len(train_set) > batch_size, **common)
    test_loader = DataLoader(test_set, batch_size=eval_batch_size, shuffle=False, **common)
    return train_loader, test_loader


def _num_classes(loader: DataLoader) -> int:
    dataset = loader.dataset
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return len(dataset.classes)


# ----------------------------------------------------------------------------------------------------------------
# training and evaluation
# ----------------------------------------------------------------------------------------------------------------
def _cosine(total_steps: int, warmup_steps: int = 0):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(
    model: nn.Module,
    loader: DataLoader,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    warmup_epochs: float = 0.0,
    max_steps: int | None = None,
    freeze_bn: bool = False,
    channels_last: bool = True,
    desc: str = "Train",
) -> list[float]:
    """SGD with Nesterov momentum and a per-step cosine schedule (after an optional linear warm-up) on the
    cross-entropy loss; returns the mean loss of each epoch.

    Args:
        model: trained in place (float or quantized: fake quantization has straight-through gradients).
        loader: ``(images, labels)`` batches.
        epochs: passes over ``loader``.
        lr: initial (peak) learning rate; it decays to zero over the run.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        warmup_epochs: epochs of linear warm-up.
        max_steps: stop after this many steps in all (the schedule spans them).
        freeze_bn: keep BatchNorm running statistics fixed (QAT: TensorRT folds BN with the final statistics).
        channels_last: train in the channels-last memory format (about 25% faster convolutions on CPU); the model
            is returned in the default format.
        desc: progress bar and log label.
    """
    if epochs < 1 or lr <= 0:
        raise ValueError(f"train needs epochs >= 1 and lr > 0, got {epochs}, {lr}")
    total = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=True,
                                weight_decay=weight_decay)
    warmup = int(warmup_epochs * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(total, warmup))
    device = next(model.parameters()).device
    losses, step = [], 0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    model.train()
    if freeze_bn:
        freeze_bn_stats(model)
    for epoch in range(epochs):
        t0, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", unit="batch", leave=False)
        for images, labels in bar:
            if step >= total:
                break
            images, labels = images.to(device, memory_format=memory_format), labels.to(device)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            seen += len(labels)
            loss_sum += loss.item() * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        bar.close()
        if seen:
            losses.append(loss_sum / seen)
            logger.info("%s epoch %d/%d: loss %.4f, train top-1 %.2f%%, %.0f s", desc, epoch + 1, epochs,
                        losses[-1], 100 * correct / seen, time.perf_counter() - t0)
        if step >= total:
            break
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return losses


def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy (a fraction) of ``model`` on ``loader``."""
    logits, labels = collect_logits(model, loader)
    return top1_accuracy(logits, labels)


# ----------------------------------------------------------------------------------------------------------------
# quantization
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _default_weight_bits(bits: int) -> Iterator[None]:
    """Per-channel ``bits``-bit weight descriptors for QuantConv2d and QuantLinear while the block runs."""
    classes = (quant_nn.QuantConv2d, quant_nn.QuantLinear)
    saved = [(cls, vars(cls).get("default_quant_desc_weight")) for cls in classes]
    try:
        for cls in classes:
            cls.set_default_quant_desc_weight(QuantDescriptor(num_bits=bits, axis=0))
        yield
    finally:
        for cls, desc in saved:
            if desc is None:
                delattr(cls, "default_quant_desc_weight")
            else:
                cls.default_quant_desc_weight = desc


def quantize(model: nn.Module, weight_bits: int = 8, keep_8bit: Sequence[str] = (),
             example_input: torch.Tensor | None = None) -> nn.Module:
    """A quantized (not yet calibrated) deep copy of ``model``.

    Every convolution and linear layer gets an 8-bit per-tensor input quantizer and a per-channel weight quantizer
    of ``weight_bits`` bits (the layers named in ``keep_8bit``, e.g. ``("conv1", "fc")``, keep 8-bit weights); the
    residual adds get their skip-input quantizer (:func:`qdq.rules.apply_resnet_rules`) and the
    quantizers TensorRT needs with one scale are shared (:func:`qdq.onnx.apply_custom_rules_to_quantizer`).
    """
    qmodel = copy.deepcopy(model).eval()
    if weight_bits != 8:
        with _default_weight_bits(weight_bits):
            qdq.replace_to_quantization_module(qmodel, ignore_policy=list(keep_8bit) or None)
    qdq.replace_to_quantization_module(qmodel)  # everything else (all of it with 8-bit weights) in 8 bits
    apply_resnet_rules(qmodel)
    if example_input is None:
        example_input = torch.zeros(1, 3, 32, 32)
    # the rules find their groups in an ONNX export, which takes 8-bit quantizers only; the weight quantizers are in
    # no group, so the low-bit ones are left out of that export
    low_bits = [q for _, q in qdq.quantizers(qmodel) if q.is_enabled and q.num_bits != 8]
    for q in low_bits:
        q.disable()
    try:
        apply_custom_rules_to_quantizer(qmodel, example_input)
    finally:
        for q in low_bits:
            q.enable()
    return qmodel


def ptq(
    model: nn.Module,
    calib_loader: DataLoader,
    method: str = "max",
    num_batches: int = 8,
    weight_bits: int = 8,
    template: nn.Module | None = None,
    keep_8bit: Sequence[str] = (),
    **calib_kwargs: Any,
) -> nn.Module:
    """Post-training quantization: a quantized deep copy of ``model`` (see :func:`quantize`), calibrated with
    ``method`` on ``num_batches`` batches of ``calib_loader``.

    With ``method="kld"`` the histograms leave exact zeros out (see :func:`examples.common.histograms_without_zeros`).
    ``template``, an uncalibrated result of :func:`quantize`, is copied instead of quantizing ``model`` again (it
    saves the export the scale-sharing rules run, when several methods are compared; ``weight_bits`` is then
    ignored, as is ``keep_8bit``). ``keep_8bit``: layers whose weights stay 8-bit (see :func:`quantize`).
    ``calib_kwargs`` go to :func:`qdq.calibrate_model` (``autotune=True``, ``percentile=...``). The calibration
    report is attached as ``qmodel.calibration_report``.
    """
    if template is not None:
        qmodel = copy.deepcopy(template)
    else:
        qmodel = quantize(model, weight_bits, keep_8bit, calib_loader.dataset[0][0].unsqueeze(0))
    if method == "kld":
        histograms_without_zeros(qmodel)
    report = qdq.calibrate_model(qmodel, calib_loader, num_batches=num_batches, method=method, **calib_kwargs)
    qmodel.calibration_report = report
    return qmodel


def qat(
    qmodel: nn.Module,
    loader: DataLoader,
    epochs: int = 1,
    lr: float | None = None,
    original_lr: float = 0.1,
    max_steps: int | None = None,
) -> nn.Module:
    """Quantization-aware fine-tuning of a calibrated model, in place; returns it (in eval mode).

    The usual recipe (:mod:`qdq.transform.qat`): a learning rate about 1% of the original one (:func:`qdq.transform.qat.qat_learning_rate`
    of ``original_lr`` unless ``lr`` is given) decayed to zero with a cosine, BatchNorm statistics frozen, the task
    loss with straight-through gradients.
    """
    lr = qat_learning_rate(original_lr) if lr is None else lr
    train(qmodel, loader, epochs, lr, weight_decay=0.0, max_steps=max_steps, freeze_bn=True, desc="QAT")
    return qmodel


def _compare(model: nn.Module, loader: DataLoader, ref_logits: torch.Tensor, labels: torch.Tensor,
             desc: str) -> dict[str, float]:
    logits, _ = collect_logits(model, loader, desc=desc)
    return {
        "top1": 100.0 * top1_accuracy(logits, labels),
        "agreement": 100.0 * top1_agreement(ref_logits, logits),
        "sqnr_db": sqnr_db(ref_logits, logits),
    }


# ----------------------------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------------------------
def _train_config(args: argparse.Namespace, root: Path) -> dict:
    return {"model": "resnet20", "data": str(root), "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr, "limit_per_class": args.limit_per_class, "seed": args.seed}


def _float_model(args: argparse.Namespace, root: Path, train_loader: DataLoader, num_classes: int) -> nn.Module:
    """The trained float model: ``--checkpoint``, the cached checkpoint in ``--out`` or a new training run."""
    return trained_float_model(
        resnet20(num_classes), args, Path(args.out) / CHECKPOINT_NAME, _train_config(args, root),
        lambda m: train(m, train_loader, args.epochs, args.lr, warmup_epochs=min(1.0, args.epochs / 10),
                        desc="Train fp32"),
        len(train_loader.dataset), f"ResNet-20 weights for {num_classes} classes")


def run(args: argparse.Namespace) -> dict:
    """The whole example (see the module docstring); returns the results also written to ``--out``/results.json."""
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    root = data_root(args.data, args.limit_per_class)
    train_loader, test_loader = loaders(args.data, args.batch_size, args.limit_per_class, True, args.workers)
    calib_loader, _ = loaders(args.data, args.calib_batch_size, args.limit_per_class, False, 0)
    num_classes = _num_classes(train_loader)
    print(f"data: {root} ({len(train_loader.dataset)} training, {len(test_loader.dataset)} test images, "
          f"{num_classes} classes)")

    model = _float_model(args, root, train_loader, num_classes)
    ref_logits, labels = collect_logits(model, test_loader, desc="Evaluate fp32")
    fp32_top1 = 100.0 * top1_accuracy(ref_logits, labels)
    print(f"float ResNet-20: top-1 {fp32_top1:.2f}% on {len(labels)} test images")
    results: dict[str, Any] = {"config": vars(args) | {"data": str(root)}, "fp32_top1": fp32_top1, "ptq8": {}}

    # 8-bit PTQ with each method
    rows = [{"method": "fp32", "top1": fp32_top1, "agreement": None, "sqnr_db": None, "calib_s": None}]
    models8 = {}
    example = test_loader.dataset[0][0].unsqueeze(0)
    template8 = quantize(model, 8, example_input=example)
    for method in args.methods:
        t0 = time.perf_counter()
        models8[method] = ptq(model, calib_loader, method, args.calib_batches, template=template8)
        calib_s = time.perf_counter() - t0
        row = {"method": method, **_compare(models8[method], test_loader, ref_logits, labels, f"Evaluate {method}"),
               "calib_s": calib_s}
        rows.append(row)
        results["ptq8"][method] = {k: v for k, v in row.items() if k != "method"}
        logger.info("PTQ int8 %s: top-1 %.2f%%", method, row["top1"])
    print_table(f"PTQ int8 (per-channel weights, per-tensor activations), {len(labels)} test images, "
                 f"{args.calib_batches} x {args.calib_batch_size} calibration images",
                 rows, [("method", "method", ""), ("top1", "top-1 %", ".2f"), ("agreement", "agree %", ".2f"),
                        ("sqnr_db", "SQNR dB", ".1f"), ("calib_s", "calib s", ".1f")])
    best = max(args.methods, key=lambda m: (results["ptq8"][m]["top1"], results["ptq8"][m]["sqnr_db"]))
    results["best_method"] = best

    # 4-bit weights: PTQ, then QAT
    w4 = ptq(model, calib_loader, best, args.calib_batches, weight_bits=4)
    w4_row = {"model": f"PTQ w4a8 ({best})", **_compare(w4, test_loader, ref_logits, labels, "Evaluate w4 PTQ")}
    t0 = time.perf_counter()
    qat(w4, train_loader, args.qat_epochs, args.qat_lr, original_lr=args.lr, max_steps=args.qat_steps)
    qat_s = time.perf_counter() - t0
    schedule = f"{args.qat_steps} steps" if args.qat_steps else f"{args.qat_epochs} ep"
    qat_row = {"model": f"QAT w4a8 ({schedule})",
               **_compare(w4, test_loader, ref_logits, labels, "Evaluate w4 QAT")}
    print_table("4-bit weights (per channel, every layer), 8-bit activations",
                 [{"model": "fp32", "top1": fp32_top1}, w4_row, qat_row],
                 [("model", "model", ""), ("top1", "top-1 %", ".2f"), ("agreement", "agree %", ".2f"),
                  ("sqnr_db", "SQNR dB", ".1f")])
    results["w4a8"] = {"ptq": w4_row, "qat": qat_row, "qat_seconds": qat_s}

    # export the best 8-bit model
    print(f"\nexport of the best 8-bit model (PTQ {best})")
    images = next(iter(test_loader))[0][: args.verify_images]
    results["export"] = export_and_check(models8[best], images, out / "resnet20_int8_qdq.onnx", tolerance_steps=8.0)
    results["seconds"] = time.perf_counter() - t_start

    return finish(out, results, [
        ("fp32 top-1", f"{fp32_top1:.2f}%"),
        (f"best int8 PTQ ({best})", f"{results['ptq8'][best]['top1']:.2f}%"),
        ("w4a8 PTQ / QAT", f"{w4_row['top1']:.2f}% / {qat_row['top1']:.2f}%"),
        *export_summary(results["export"]),
    ])


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
#: What ``--tiny`` sets: a smoke run that finishes in well under a minute on 2 CPU cores.
TINY = {"limit_per_class": 20, "epochs": 1, "qat_epochs": 1, "qat_steps": 3, "batch_size": 32,
        "calib_batches": 1, "calib_batch_size": 32, "workers": 0, "verify_images": 8, "methods": ["max", "mse"]}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``examples/cifar10/train.py``."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.cifar10.train",
        description="Train a ResNet-20 on CIFAR-10 (or any ImageFolder with train/ and test/), compare 8-bit PTQ "
                    "calibration methods, 4-bit weights PTQ against QAT, export the best 8-bit model to QDQ ONNX, "
                    "verify it with ONNX Runtime and check it against TensorRT's rules.",
        epilog="Examples: `python -m examples.cifar10.train` (full run, ~40 min on 2 CPU cores), "
               "`python -m examples.cifar10.train --tiny` (smoke run, ~10 s).",
    )
    parser.add_argument("--data", type=Path, default=None,
                        help="ImageFolder root with train/<class>/ and test/<class>/ (default: the CIFAR-10 images "
                             "of ../shared/data, extracted once to a cache folder)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="float ResNet-20 weights to start from instead of training")
    parser.add_argument("--retrain", action="store_true", help="train again even if --out holds a checkpoint")
    parser.add_argument("--epochs", type=positive(int), default=None, help="float training epochs (default 15)")
    parser.add_argument("--qat-epochs", type=positive(int), default=None, help="QAT epochs (default 1)")
    parser.add_argument("--qat-steps", type=positive(int), default=None,
                        help="stop QAT after this many steps (default: the whole epochs)")
    parser.add_argument("--qat-lr", type=positive(float), default=None,
                        help="QAT learning rate (default: 1%% of --lr)")
    parser.add_argument("--lr", type=positive(float), default=0.2, help="float training peak learning rate (0.2)")
    parser.add_argument("--batch-size", type=positive(int), default=None, help="training batch size (default 256)")
    parser.add_argument("--limit-per-class", type=positive(int), default=None,
                        help="use only the first N images of each class in each split (quick runs)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="calibration methods to compare (default: all; max and mse with --tiny)")
    parser.add_argument("--calib-batches", type=positive(int), default=None, help="calibration batches (default 8)")
    parser.add_argument("--calib-batch-size", type=positive(int), default=None,
                        help="calibration batch size (default 128)")
    parser.add_argument("--verify-images", type=positive(int), default=None,
                        help="test images ONNX Runtime runs for the parity check (default 64)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers for training (default 1)")
    add_run_arguments(parser, "cifar10", "checkpoint, ONNX file, results.json",
                      "20 images per class, 1 epoch, 3 QAT steps, one calibration batch, two methods")
    return parser


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    defaults = {"epochs": 15, "qat_epochs": 1, "qat_steps": None, "batch_size": 256, "calib_batches": 8,
                "calib_batch_size": 128, "workers": 1, "verify_images": 64, "limit_per_class": None,
                "methods": list(METHODS)}
    args = resolve_defaults(args, "cifar10", defaults, TINY, files=["checkpoint"], folders=["data"])
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for a usage or data error, with a one-line message)."""
    return run_main(build_parser(), run, _resolve, argv)
