"""PNG plots: a quantizer's histogram with the amax each calibration method picks, and a sensitivity profile.

matplotlib is an optional dependency (``pip install qdq[plot]``); without it these functions raise an ImportError
that says so. They draw off-screen (the Agg backend) and write PNG files.

Example:
    >>> import tempfile, os, torch
    >>> from qdq import nn as quant_nn
    >>> from qdq.tensor_quant import QuantDescriptor
    >>> q = quant_nn.TensorQuantizer(QuantDescriptor(calib_method="histogram"), if_calib=True, if_quant=False)
    >>> _ = q(torch.randn(10000))
    >>> path = os.path.join(tempfile.mkdtemp(), "hist.png")
    >>> amaxes = plot_histogram(q, path)
    >>> sorted(amaxes), os.path.getsize(path) > 0
    (['entropy', 'max', 'mse', 'percentile'], True)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from qdq.calib import HistogramCalibrator
from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.math.quantize import fake_quantize
from qdq.math.ranges import amax_to_scale, quant_range

__all__ = ["plot_histogram", "plot_sensitivity", "method_stats", "MethodStats"]

_COLORS = {"max": "#444444", "entropy": "#1f77b4", "mse": "#d62728", "percentile": "#2ca02c", "kld": "#9467bd"}
_DASHES = ["-", "--", "-.", ":", (0, (5, 1, 1, 1))]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib (or qdq[plot])") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class MethodStats:
    """What one calibration method's amax does to the collected histogram.

    ``clipped`` is the fraction of the collected values above ``amax`` (they saturate); ``mse`` the count-weighted
    mean squared error of fake-quantizing the bin centers with that amax (the error :func:`~qdq.calib.mse_amax`
    minimises); ``sqnr_db`` the signal-to-quantization-noise ratio of the same, in dB.
    """

    method: str
    amax: float
    clipped: float
    mse: float
    sqnr_db: float


def method_stats(calibrator: HistogramCalibrator, amaxes: dict[str, float]) -> list[MethodStats]:
    """Clipped fraction and fake-quantization error of each ``{method: amax}`` on a per-tensor histogram.

    >>> import torch
    >>> from qdq.calib import HistogramCalibrator
    >>> cal = HistogramCalibrator(num_bits=8, axis=None, unsigned=False)
    >>> cal.collect(torch.linspace(-1, 1, 2001))
    >>> [(s.method, round(s.clipped, 2)) for s in method_stats(cal, {"half": 0.5, "all": 1.0})]
    [('half', 0.5), ('all', 0.0)]
    """
    counts, edges = calibrator.histogram()
    counts = counts.double()
    centers = ((edges[1:] + edges[:-1]) / 2).float()
    total = float(counts.sum())
    signal = float((centers.double().square() * counts).sum())
    qmin, qmax = quant_range(calibrator.num_bits, calibrator.unsigned)
    stats = []
    for method, amax in amaxes.items():
        scale = amax_to_scale(torch.tensor(amax, dtype=torch.float32, device=centers.device), calibrator.num_bits,
                              calibrator.unsigned)
        err = (fake_quantize(centers, scale, 0, qmin, qmax) - centers).double().square()
        noise = float((err * counts).sum())
        # values in a bin whose lower edge is at or above amax saturate
        clipped = float(counts[edges[:-1] >= amax].sum()) / total if total else 0.0
        sqnr = 10 * math.log10(signal / noise) if noise > 0 else math.inf
        stats.append(MethodStats(method, float(amax), clipped, noise / total if total else 0.0, sqnr))
    return stats


def plot_histogram(
    quantizer: TensorQuantizer | HistogramCalibrator,
    path: str | os.PathLike,
    methods: Sequence[str] = ("max", "entropy", "mse", "percentile"),
    title: str | None = None,
    **search_kwargs,
) -> dict[str, float]:
    """Draws the histogram a per-tensor histogram calibrator collected, with a vertical line at each method's amax.

    Returns ``{method: amax}``. The counts are drawn on a log scale (activations are mostly near zero); the zero
    bin is drawn in its own colour with its share of the values, so that ReLU zeros are visible. Methods whose amax
    coincide are drawn with different dash patterns and widths, so none hides another, and the legend gives each
    method's amax, the fraction of values it clips and its quantization SQNR (see :func:`method_stats`).
    """
    calibrator = quantizer.calibrator if isinstance(quantizer, TensorQuantizer) else quantizer
    name = quantizer.name if isinstance(quantizer, TensorQuantizer) and quantizer.name else "quantizer"
    if not isinstance(calibrator, HistogramCalibrator):
        raise TypeError(f"{name} has no histogram calibrator (it has {type(calibrator).__name__}); "
                        "calibrate it with calib_method='histogram' or a histogram method")
    if calibrator.axis is not None:
        raise ValueError(f"{name} has per-channel histograms; plot a per-tensor quantizer")
    counts, edges = calibrator.histogram()
    amaxes = {m: float(calibrator.compute_amax(m, **search_kwargs)) for m in methods}
    stats = method_stats(calibrator, amaxes)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    try:
        width = float(edges[1] - edges[0])
        centers = ((edges[1:] + edges[:-1]) / 2).cpu().numpy()
        heights = counts.cpu().numpy()
        total = max(1, int(heights.sum()))
        ax.bar(centers[1:], heights[1:], width=width, color="#bbbbbb", linewidth=0)
        # bin 0 is one bar among thousands: drawn as a stem with a marker so that a spike of zeros shows
        ax.vlines(centers[0], 0.5, max(heights[0], 0.5), color="#ff7f0e", linewidth=2)
        ax.plot([centers[0]], [max(heights[0], 0.5)], marker="o", color="#ff7f0e", linestyle="none",
                label=f"bin 0 [0, {width:.3g}): {heights[0] / total:.1%} of values")
        ax.set_yscale("log")
        for i, st in enumerate(stats):
            ax.axvline(st.amax, color=_COLORS.get(st.method, None), linestyle=_DASHES[i % len(_DASHES)],
                       linewidth=2.6 - 0.4 * (i % 4), alpha=0.9,
                       label=f"{st.method}: amax {st.amax:.4g}, clips {st.clipped:.3%}, SQNR {st.sqnr_db:.1f} dB")
        nonzero = torch.nonzero(counts).flatten()
        top = float(edges[int(nonzero[-1]) + 1]) if len(nonzero) else float(edges[-1])
        ax.set_xlim(-0.01 * top, max(top, max(amaxes.values(), default=0)) * 1.05)
        ax.set_xlabel("|x|" if not calibrator.unsigned else "x")
        ax.set_ylabel("count")
        ax.set_title(title or f"{name}: histogram and amax per method")
        ax.legend(loc="upper right", fontsize=7)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return amaxes


def plot_sensitivity(profile, path: str | os.PathLike, top: int = 30, title: str | None = None) -> list[float]:
    """Bar chart of a :class:`~qdq.calibrate.sensitivity.SensitivityProfile` (the ``top`` most sensitive layers).

    Each bar is the metric measured with that one layer changed, drawn against the two baselines: the fully
    quantized model and the float model (vertical lines). Returns the drawn bar values, in the drawn order.
    """
    rows = profile.rows[:top]
    if not rows:
        raise ValueError("the sensitivity profile has no rows")
    plt = _pyplot()
    height = max(3.0, 0.28 * len(rows) + 1.4)
    fig, ax = plt.subplots(figsize=(8, height), dpi=110)
    values = [r.metric for r in rows]
    try:
        finite = [v for v in values + [profile.quantized_metric, profile.float_metric] if math.isfinite(v)]
        low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
        pad = 0.05 * (high - low) if high > low else max(abs(high), 1.0) * 0.05
        ax.barh(range(len(rows)), [min(max(v, low - pad), high + pad) for v in values], color="#1f77b4")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([r.layer for r in rows], fontsize=7)
        ax.invert_yaxis()
        for baseline, label, style in ((profile.quantized_metric, "fully quantized", ("#d62728", "--")),
                                       (profile.float_metric, "float", ("black", ":"))):
            if math.isfinite(baseline):
                ax.axvline(baseline, color=style[0], linestyle=style[1], linewidth=1.5, label=f"{label}: {baseline:.4g}")
            else:  # e.g. the SQNR against the float model is +inf for the float model itself: a label, no line
                ax.plot([], [], color=style[0], linestyle=style[1], label=f"{label}: {baseline:.4g} (off the axis)")
        ax.set_xlim(low - pad, high + pad)  # the bars start at the axis, so small differences stay visible
        what = "only this layer float" if profile.mode == "disable_one" else "only this layer quantized"
        ax.set_xlabel(f"metric with {what}")
        ax.set_title(title or f"Sensitivity ({profile.mode})", fontsize=9)
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return values
