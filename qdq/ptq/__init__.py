"""Floor 4, PTQ algorithms beyond range selection: bias correction, cross-layer equalization and AdaRound.

Each works in place on a model that :func:`~qdq.transform.replace.replace_to_quantization_module` converted (and, but for
:func:`equalize`, that :func:`~qdq.calibrate_model` calibrated), feeds data through the same helpers as
calibration (:mod:`qdq.calibrate.feeding`), writes weights, biases and amax only, and returns a report. They are also at the
top level: ``qdq.equalize``, ``qdq.bias_correction``, ``qdq.adaround``.

- :mod:`qdq.ptq.equalize`: cross-layer equalization of Conv/BN/ReLU(6)/Conv chains, with BN folding and high-bias
  absorption (before calibration);
- :mod:`qdq.ptq.bias_correction`: empirical per-channel bias correction;
- :mod:`qdq.ptq.adaround`: learned rounding of the weights, per layer or per block;
- :mod:`qdq.ptq.capture` and :mod:`qdq.ptq.weight_layers`: what they share (inputs and outputs of one layer at a
  time, the quantized weighted layers in forward order).
"""

from qdq.ptq.adaround import AdaRoundReport, adaround
from qdq.ptq.bias_correction import BiasCorrectionReport, bias_correction
from qdq.ptq.equalize import EqualizeReport, equalize

__all__ = ["equalize", "EqualizeReport", "bias_correction", "BiasCorrectionReport", "adaround", "AdaRoundReport"]
