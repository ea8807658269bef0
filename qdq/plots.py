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

import os
from pathlib import Path
from typing import Sequence

import torch

from qdq.calib import HistogramCalibrator
from qdq.nn.modules.tensor_quantizer import TensorQuantizer

__all__ = ["plot_histogram", "plot_sensitivity"]

_COLORS = {"max": "#444444", "entropy": "#1f77b4", "mse": "#d62728", "percentile": "#2ca02c", "kld": "#9467bd"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib (or qdq[plot])") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_histogram(
    quantizer: TensorQuantizer | HistogramCalibrator,
    path: str | os.PathLike,
    methods: Sequence[str] = ("max", "entropy", "mse", "percentile"),
    title: str | None = None,
    **search_kwargs,
) -> dict[str, float]:
    """Draws the histogram a per-tensor histogram calibrator collected, with a vertical line at each method's amax.

    Returns ``{method: amax}``. The counts are drawn on a log scale (activations are mostly near zero).
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
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    try:
        centers = ((edges[1:] + edges[:-1]) / 2).cpu().numpy()
        ax.bar(centers, counts.cpu().numpy(), width=float(edges[1] - edges[0]), color="#bbbbbb", linewidth=0)
        ax.set_yscale("log")
        for method, amax in amaxes.items():
            ax.axvline(amax, color=_COLORS.get(method, None), linestyle="--", linewidth=1.5,
                       label=f"{method}: {amax:.4g}")
        nonzero = torch.nonzero(counts).flatten()
        top = float(edges[int(nonzero[-1]) + 1]) if len(nonzero) else float(edges[-1])
        ax.set_xlim(0, max(top, max(amaxes.values(), default=0)) * 1.05)
        ax.set_xlabel("|x|" if not calibrator.unsigned else "x")
        ax.set_ylabel("count")
        ax.set_title(title or f"{name}: histogram and amax per method")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return amaxes


def plot_sensitivity(profile, path: str | os.PathLike, top: int = 30, title: str | None = None) -> None:
    """Bar chart of a :class:`~qdq.sensitivity.SensitivityProfile` (the ``top`` most sensitive layers)."""
    rows = profile.rows[:top]
    if not rows:
        raise ValueError("the sensitivity profile has no rows")
    plt = _pyplot()
    height = max(3.0, 0.28 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(8, height), dpi=110)
    try:
        values = [r.delta_vs_quantized if profile.mode == "disable_one" else r.delta_vs_float for r in rows]
        labels = [r.layer for r in rows]
        ax.barh(range(len(rows)), values, color="#1f77b4")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        if profile.mode == "disable_one":
            ax.set_xlabel("metric gain when only this layer stays float (vs fully quantized)")
        else:
            ax.set_xlabel("metric change when only this layer is quantized (vs float)")
        ax.set_title(title or f"Sensitivity ({profile.mode}): float {profile.float_metric:.4f}, "
                              f"quantized {profile.quantized_metric:.4f}", fontsize=9)
        ax.axvline(0, color="black", linewidth=0.8)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
