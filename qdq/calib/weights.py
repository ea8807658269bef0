"""pytorch_quantization's ``calib.calibrate_weights``: weight amax straight from the weights, no data needed.

Each layer with a ``weight`` and a ``weight_quantizer`` gets an amax computed from its weight by ``method``
(``"max"``, ``"percentile"``, ``"mse"``, or any histogram search of :mod:`qdq.calib`), per tensor or per channel,
with the same histograms a :class:`~qdq.calib.HistogramCalibrator` collects (one per channel). Works on the modules
by their attributes: this floor does not import the layers.

>>> import torch
>>> from qdq import nn as quant_nn
>>> from qdq import calib
>>> layer = quant_nn.QuantConv2d(3, 4, 3)
>>> calib.calibrate_weights(layer, method="max")
>>> torch.equal(layer.weight_quantizer.amax.flatten(), layer.weight.detach().abs().amax(dim=(1, 2, 3)))
True
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qdq.calib.histogram import HistogramCalibrator

__all__ = ["calibrate_weights"]

logger = logging.getLogger(__name__)


def calibrate_weights(model: nn.Module, method: str = "percentile", perchannel: bool = True,
                      percentile: float = 99.99, num_bins: int = 2048) -> None:
    """Sets the amax of every weight quantizer in ``model`` from its weight.

    Args:
        model: a module (itself included in the search).
        method: ``"max"``, ``"percentile"``, ``"mse"`` or another histogram search; this, not the quantizer's own
            calibrator, decides.
        perchannel: one amax per channel: along the quantizer's own axis when it has one, else output channels
            (dimension 1 of a transposed convolution's weight, 0 otherwise) as pytorch_quantization does.
        percentile: for ``method="percentile"``.
        num_bins: bins of each histogram.
    """
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None) if hasattr(module, "_weight_quantizer") else None
        weight = getattr(module, "weight", None)
        if quantizer is None or not isinstance(weight, torch.Tensor):
            continue
        logger.info("Calibrate weight of %s", name or type(module).__name__)
        w = weight.detach()
        axis = None
        if perchannel:
            axis = quantizer.axis if isinstance(quantizer.axis, int) else (
                1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0)
        if method == "max":
            amax = w.abs().amax() if axis is None else w.abs().amax(
                dim=[d for d in range(w.dim()) if d != axis % w.dim()], keepdim=True)
        else:
            slices = [w] if axis is None else [w.select(axis, i) for i in range(w.shape[axis])]
            values = []
            for part in slices:
                cal = HistogramCalibrator(quantizer.num_bits, None, quantizer.unsigned, num_bins=num_bins)
                cal.collect(part)
                values.append(cal.compute_amax(method, percentile=percentile))
            amax = values[0] if axis is None else torch.stack(values).reshape(
                [w.shape[d] if d == axis % w.dim() else 1 for d in range(w.dim())])
        quantizer.amax = amax.float()
