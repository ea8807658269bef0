"""``qdq demo``: the whole journey on data that ships with scikit-learn, in about 20 s on two CPU cores (17 s measured).

1. train a small CNN on scikit-learn's handwritten digits (1,797 8x8 images, bundled with the package: nothing is
   downloaded);
2. post-training quantization to 8 bits with every calibration method: top-1, agreement with the float model, logit
   SQNR and calibration time, as a table;
3. low-bit weights: 4-bit and 2-bit weights after PTQ, and what quantization-aware training (distillation from the
   float model) wins back at 2 bits - the digits are easy enough that 4 bits lose nothing;
4. export the best 8-bit model to a QDQ ONNX file, check it with ONNX Runtime and with the TensorRT rule checker;
5. PNG plots: a quantizer's histogram with each method's amax, and the per-layer sensitivity profile.

Run it with ``qdq demo [--out DIR]``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import qdq
from qdq import nn as quant_nn
from qdq.calibrate.evaluate import sqnr_db, top1_accuracy, top1_agreement
from qdq.transform.qat import Distiller, qat_learning_rate
from qdq.math.descriptor import QuantDescriptor

__all__ = ["run_demo", "DemoResult"]

logger = logging.getLogger(__name__)

METHODS = ("max", "entropy", "mse", "percentile", "kld", "kld+autotune")


@dataclass
class DemoResult:
    fp32_top1: float = 0.0
    ptq: dict[str, dict[str, float]] = field(default_factory=dict)
    w4: dict[str, float] = field(default_factory=dict)  # low-bit weight results
    onnx_path: str = ""
    verify: str = ""
    check: dict[str, int] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _digits(seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the demo needs scikit-learn for its bundled digits: pip install scikit-learn "
                          "(or pip install qdq[demo])") from None
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = 450
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


class DigitsNet(nn.Module):
    """A small CNN for 8x8 digits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x))


def _batches(x, y, size, shuffle=False, seed=0):
    index = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(y))
    return [(x[index[i:i + size]], y[index[i:i + size]]) for i in range(0, len(y), size)]


def _train(model, train, epochs, lr, seed, desc, loss_fn=None):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * len(_batches(*train, 64))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    with tqdm(total=steps, desc=desc, unit="step", leave=False, disable=None) as bar:  # no bar without a terminal
        for epoch in range(epochs):
            for xb, yb in _batches(*train, 64, shuffle=True, seed=seed + epoch):
                loss = loss_fn(xb, yb) if loss_fn else F.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
    model.eval()


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _quantized(model, weight_bits=8):
    qmodel = copy.deepcopy(model)
    qdq.replace_to_quantization_module(qmodel, quant_map={nn.MaxPool2d: quant_nn.QuantMaxPool2d})
    if weight_bits != 8:
        for layer in qmodel.modules():
            if isinstance(layer, quant_nn.QuantMixin):  # conv and linear: new quantizers, narrower weights
                layer.init_quantizer(layer.input_quantizer.quant_desc, QuantDescriptor(num_bits=weight_bits, axis=0))
    return qmodel


def run_demo(out: str | Path = "qdq-demo", seed: int = 0, epochs: int = 20, qat_epochs: int = 6) -> DemoResult:
    """Runs the demo, writes its files into ``out`` and returns the numbers (also printed)."""
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult()
    train, test = _digits(seed)
    calib = [xb for xb, _ in _batches(*train, 64)[:8]]  # 512 training images calibrate

    print(f"1. training a small CNN on scikit-learn's digits ({len(train[1])} train / {len(test[1])} test images)")
    model = DigitsNet()
    _train(model, train, epochs, 3e-3, seed, "fp32 training")
    ref = _logits(model, test[0])
    result.fp32_top1 = top1_accuracy(ref, test[1])
    print(f"   fp32 top-1: {100 * result.fp32_top1:.2f}%")

    print("2. post-training quantization, 8-bit, every calibration method")
    best = None
    for method in METHODS:
        qmodel = _quantized(model)
        t0 = time.perf_counter()
        search, tune = method.split("+")[0], method.endswith("+autotune")
        qdq.calibrate_model(qmodel, calib, method=search, autotune=tune, tune_batches=4, progress=False)
        t_cal = time.perf_counter() - t0
        logits = _logits(qmodel, test[0])
        row = {
            "top1": top1_accuracy(logits, test[1]),
            "agreement": top1_agreement(ref, logits),
            "sqnr_db": sqnr_db(ref, logits),
            "calib_ms": 1e3 * t_cal,
        }
        result.ptq[method] = row
        if best is None or row["sqnr_db"] > result.ptq[best[0]]["sqnr_db"]:
            best = (method, qmodel)
    print(_ptq_table(result))

    print("3. low-bit weights (8-bit activations): PTQ at 4 and 2 bits, then QAT at 2 bits (distillation)")
    for bits in (4, 2):
        low = _quantized(model, weight_bits=bits)
        qdq.calibrate_model(low, calib, method="mse", progress=False)
        result.w4[f"ptq_w{bits}_top1"] = top1_accuracy(_logits(low, test[0]), test[1])
    distiller = Distiller(low)

    def loss_fn(xb, yb):
        out_s, distill = distiller(xb)
        return F.cross_entropy(out_s, yb) + distill

    _train(low, train, qat_epochs, qat_learning_rate(3e-3, 0.1), seed + 100, "QAT (2-bit weights)", loss_fn)
    distiller.remove()
    result.w4["qat_w2_top1"] = top1_accuracy(_logits(low, test[0]), test[1])
    w = result.w4
    print(f"   fp32 {100 * result.fp32_top1:.2f}%  |  PTQ W4A8 {100 * w['ptq_w4_top1']:.2f}%  |  "
          f"PTQ W2A8 {100 * w['ptq_w2_top1']:.2f}%  |  QAT W2A8 {100 * w['qat_w2_top1']:.2f}%")

    method, qmodel = best
    print(f"4. export the best 8-bit model ({method}) to a QDQ ONNX file, check it")
    path = out / "digits_qdq.onnx"
    qdq.export_onnx(qmodel, test[0][:1], path, dynamic_batch=True)
    report = qdq.verify(qmodel, path, test[0][:64])
    result.onnx_path, result.verify = str(path), str(report)
    findings = qdq.check_tensorrt(path)
    result.check = {s: sum(f.severity == s for f in findings) for s in ("error", "warning", "info")}
    print(f"   {path}\n   ONNX Runtime vs PyTorch: " + str(report).replace("\n", "\n   "))
    print(f"   TensorRT rule check: {result.check['error']} errors, {result.check['warning']} warnings, "
          f"{result.check['info']} info")

    print("5. plots")
    result.plots += _plots(qmodel, model, calib, test, ref, out)
    for p in result.plots:
        print(f"   {p}")
    result.seconds = time.perf_counter() - t_start
    (out / "demo.json").write_text(json.dumps(result.__dict__, indent=2, default=float) + "\n")
    _summary(result, method)
    return result


def _ptq_table(result: DemoResult) -> str:
    lines = [f"   {'method':<13} {'top-1':>7} {'agree':>8} {'SQNR dB':>8} {'calib ms':>9}"]
    for method, row in result.ptq.items():
        lines.append(f"   {method:<13} {100 * row['top1']:>6.2f}% {100 * row['agreement']:>7.2f}% "
                     f"{row['sqnr_db']:>8.1f} {row['calib_ms']:>9.0f}")
    return "\n".join(lines)


def _plots(qmodel, model, calib, test, ref, out: Path) -> list[str]:
    try:
        from qdq.cli.plots import plot_histogram, plot_sensitivity
    except ImportError as err:  # matplotlib missing
        logger.warning("no plots: %s", err)
        return []
    from qdq.calibrate.sensitivity import build_sensitivity_profile

    paths = []
    # a histogram of the activations entering the third conv
    hist_model = _quantized(model)
    hist_q = hist_model.features[6].input_quantizer
    hist_q.set_calibrator(qdq.calib.HistogramCalibrator(8, None, False))
    qdq.collect_stats(hist_model, calib, progress=False)
    path = out / "histogram_features.6.png"
    plot_histogram(hist_q, path, methods=("max", "entropy", "mse", "percentile", "kld"))
    paths.append(str(path))

    def logit_sqnr(m):  # continuous, so it ranks layers even where top-1 does not move
        return sqnr_db(ref, _logits(m, test[0]))

    profile = build_sensitivity_profile(qmodel, logit_sqnr, print_table=False, progress=False)
    path = out / "sensitivity.png"
    plot_sensitivity(profile, path, title="Logit SQNR (dB) when only this layer stays float")
    paths.append(str(path))
    return paths


def _summary(result: DemoResult, best: str) -> None:
    b = result.ptq[best]
    print("\nSummary")
    rows = [
        ("fp32 top-1", f"{100 * result.fp32_top1:.2f}%"),
        (f"PTQ int8 (best: {best})", f"{100 * b['top1']:.2f}%  (agreement {100 * b['agreement']:.2f}%, "
                                     f"SQNR {b['sqnr_db']:.1f} dB)"),
        ("W2A8: PTQ -> QAT", f"{100 * result.w4['ptq_w2_top1']:.2f}% -> {100 * result.w4['qat_w2_top1']:.2f}%"),
        ("QDQ ONNX", result.onnx_path),
        ("TensorRT rule check", f"{result.check['error']} errors, {result.check['warning']} warnings"),
    ]
    for label, value in rows:
        print(f"  {label:<26} {value}")
    print(f"  {'took':<26} {result.seconds:.0f} s")
