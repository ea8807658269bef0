"""Floor 4.3, the model on data: calibration and everything else that feeds batches through the model.

- :mod:`~qdq.calibrate.model`: calibration of a whole model (``calibrate_model``, ``collect_stats``,
  ``compute_amax``);
- :mod:`~qdq.calibrate.feeding`: the batch conventions every data-driven step shares;
- :mod:`~qdq.calibrate.data` (a package): calibration data from files (image folders, NumPy folders, data lists);
- :mod:`~qdq.calibrate.autotune`: the input amax refined by each layer's output distance;
- :mod:`~qdq.calibrate.sensitivity`: per-layer sensitivity, and skipping the most sensitive layers;
- :mod:`~qdq.calibrate.format_search`: a format per layer (:mod:`qdq.transform.layer_formats`) chosen under an
  accuracy tolerance at the lowest estimated cost;
- :mod:`~qdq.calibrate.evaluate`: accuracy measures of a quantized model against its float original;
- :mod:`~qdq.calibrate.calib_table`: calibration tables (every quantizer's amax) and TensorRT caches.

``from qdq.calibrate import calibrate_model`` works as it did when this was one module: the names of
:mod:`qdq.calibrate.model` are imported from it on first use (importing a submodule such as
:mod:`qdq.calibrate.feeding` does not import the others).
"""

import importlib

# the names of the former module qdq/calibrate.py, now in qdq.calibrate.model
__all__ = ["calibrate_model", "collect_stats", "compute_amax", "histograms_for", "CalibrationReport", "model_inputs"]


def __getattr__(name: str):
    if name in __all__:
        value = getattr(importlib.import_module("qdq.calibrate.model"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qdq.calibrate' has no attribute {name!r}")
