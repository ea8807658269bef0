"""Floor 2, statistics: calibrators that turn the tensors they see into an amax.

Every calibrator keeps one contract (:mod:`qdq.calib.calibrator`): ``collect(x)``, ``reset()``,
``compute_amax(...)``, its statistics as named tensors (``stats()``, ``{}`` when it saw nothing) and ``merge(other)``
(the empty statistics are the neutral element). No module, no process group: combining ranks is
:func:`qdq.distributed.all_reduce_calibrators`.

>>> import torch
>>> from qdq import calib
>>> cal = calib.HistogramCalibrator(num_bits=8, axis=None, unsigned=False)
>>> cal.collect(torch.linspace(-1, 1, 1001))
>>> round(cal.compute_amax(method="percentile", percentile=100).item(), 3)
1.0
"""

from qdq.calib.amax_search import (
    entropy_amax,
    get_search,
    max_amax,
    mse_amax,
    percentile_amax,
    register_search,
    search_names,
)
from qdq.calib.calibrator import (
    NoDataCollectedError,
    NonFiniteWarning,
    ShapeChangedError,
    StatsMismatchError,
    _Calibrator,
)
from qdq.calib.histogram import HistogramCalibrator, rebin
from qdq.calib.kld import kld_amax, kld_cuts, kld_divergence
from qdq.calib.max import MaxCalibrator
from qdq.calib.weights import calibrate_weights

__all__ = [
    "MaxCalibrator",
    "HistogramCalibrator",
    "NoDataCollectedError",
    "NonFiniteWarning",
    "ShapeChangedError",
    "StatsMismatchError",
    "rebin",
    "entropy_amax",
    "mse_amax",
    "percentile_amax",
    "max_amax",
    "kld_amax",
    "kld_divergence",
    "kld_cuts",
    "register_search",
    "get_search",
    "search_names",
    "calibrate_weights",
]
