"""Per-layer quantization configs: one JSON file that says, layer by layer, which descriptors each layer gets.

This is how mixed precision is written down: some layers 8-bit, some with 4-bit weights, some left in float, each
with its own calibration. The file *is* the descriptors: every tensor section is a
:class:`~qdq.math.descriptor.QuantDescriptor` in its dict form (``QuantDescriptor.dict()`` / ``from_dict``), in the
words of the API (``calib_method``, ``calib_args``, ``axis``, ``num_batches``). Three steps take a float model to a
calibrated, mixed-precision model, and :func:`qdq.export_onnx` turns that into a QDQ ONNX file::

    create_quant_config("quant_config.json", model, skip_layers=["fc"], num_batches=8,
                        input=QuantDescriptor(calib_method="entropy"))
    # ... the user edits quant_config.json ...
    report = apply_quant_config(model, "quant_config.json")    # replace layers, each with its descriptors
    calibrate_from_config(model, loader, "quant_config.json")   # each quantizer's own calib_method
    qdq.export_onnx(model, example_input, "model_qdq.onnx")

:func:`create_quant_config` lists every layer the module map would quantize (:mod:`qdq.transform.replace`).
:func:`apply_quant_config` checks the whole file against the model first and reports every problem at once, then
converts the model in place with one call of :func:`~qdq.transform.replace.replace_to_quantization_module` (layers set
to float are its ignore policy; every other layer builds its quantizers once, from its descriptors).
:func:`calibrate_from_config` feeds ``num_batches`` batches and computes each quantizer's amax with the
``calib_method`` of its own entry. :func:`load_quant_config` and :func:`save_quant_config` read and write a config
(checked) for editing in Python; a dict works wherever a file path does. (``quantize_model`` is the old name of
:func:`apply_quant_config`; it still works, with a ``DeprecationWarning``.)

Where things are: :mod:`qdq.config.schema` (the keys, the checks, reading and writing), :mod:`qdq.config.v1`
(version-1 files), :mod:`qdq.config.create`, :mod:`qdq.config.apply`, :mod:`qdq.config.calibrate`.

The file (version 2)
====================

::

    {
      "format": "qdq-quant-config",
      "version": 2,
      "qdq_version": "0.2.0",
      "model": "Net",
      "global": {
        "num_batches": 8,
        "skip_layers": ["fc"],
        "input": {"num_bits": 8, "calib_method": "entropy", "calib_args": {"num_bins": 2048, "start_bin": 128,
                  "stride": 1}, "axis": null, "unsigned": false, "symmetric": true, "narrow_range": false},
        "weight": {"num_bits": 8, "calib_method": "max", "calib_args": {}, "axis": 0, "unsigned": false,
                   "symmetric": true, "narrow_range": false}
      },
      "layers": {
        "features.0": {
          "type": "Conv2d",
          "enabled": true,
          "input": {"num_bits": 8, "calib_method": "percentile", "calib_args": {"percentile": 99.9}, ...},
          "weight": {"num_bits": 4, "calib_method": "max", "calib_args": {}, "axis": 0, ...}
        },
        "pool": {"type": "AdaptiveAvgPool2d", "enabled": false, "input": {...}},
        "fc": {"type": "Linear", "enabled": false, "input": {...}, "weight": {...}}
      }
    }

Top level
    ``version`` (required: ``2``; ``1`` is read too, see below); ``format`` (``"qdq-quant-config"`` when given);
    ``qdq_version`` and ``model`` (the model's class name) are written for the reader; a ``model`` that differs from
    the model's class is logged as a warning.

``global``
    ``num_batches``: batches :func:`calibrate_from_config` feeds (an int >= 1, or ``null`` for all of the data).
    ``skip_layers``: layers left in float - names or regular expressions, matched as by
    :func:`qdq.transform.ignore_policy.compile_ignore_policy` (``"layer4"`` covers ``"layer4.0.conv1"``); each must match at
    least one layer. ``input`` and ``weight``: the descriptors of every layer that does not say otherwise (default:
    ``QuantDescriptor()`` and ``QuantDescriptor(axis=0)``).

``layers``
    One entry per layer, by its dotted path in ``model.named_modules()`` (the empty string is the model itself).
    ``type``: the layer's class name, checked against the model so that a config written for another model fails
    loudly. ``enabled``: ``false`` keeps the layer in float (no quantizers, no Q/DQ in the export). ``input``, and
    ``weight`` for layers that have weights (convolutions, transposed convolutions, linear layers, LSTMs; pools have
    only ``input``).

Tensor sections (``input``, ``weight``)
    The fields of :class:`~qdq.math.descriptor.QuantDescriptor` but ``name`` (qdq names each quantizer by its path),
    with the descriptor's meaning and checks: ``num_bits`` (2..16, or ``[4, 3]`` for FP8 E4M3), ``calib_method``
    (``"max"``, ``"histogram"``, or a histogram search by name: ``"entropy"``, ``"mse"``, ``"percentile"``,
    ``"kld"`` and any search registered with :func:`qdq.calib.register_search`), ``calib_args`` (``num_bins`` of the
    histogram and the search's parameters: ``percentile``; ``start_bin``, ``stride``), ``axis`` (``null`` per
    tensor, ``0`` per output channel of a weight - per input channel for transposed convolutions, as TensorRT
    wants), ``unsigned``, ``symmetric`` (``false``: a zero point; ONNX Runtime runs it, TensorRT does not),
    ``narrow_range``, ``block_size`` (INT4 weights in blocks of 32, 64 or 128 input features), ``fake_quant``,
    ``amax``, ``learn_amax``, ``scale_amax``. And one switch that is not a descriptor field: ``"enabled": false``
    turns that quantizer off (``"input": {"enabled": false}`` with a blocked 4-bit weight is INT4 weight-only).
    The file writes ``num_bits`` to ``narrow_range`` in every section, the other fields only where they differ
    from the descriptor's default.

Keys a layer's section leaves out come from ``global``; ``calib_args`` are inherited only while the
``calib_method`` is the global one (a section that names another search starts from that search's defaults,
``percentile`` 99.99, ``start_bin`` 128, ``stride`` 1, ``num_bins`` 2048).

Checks
    Unknown keys at any level (with the closest valid key), version-1 keys in a version-2 file (with the key that
    replaces them), duplicate keys, wrong types, everything :class:`~qdq.math.descriptor.QuantDescriptor` refuses
    (each key checked alone, so that each problem names its key, then the section as a whole), layer names the
    model has no quantizable layer for, ``weight`` on a layer without weights, a ``type`` that differs from the
    model's, ``"enabled": true`` on a layer ``skip_layers`` matches, and ``skip_layers`` patterns that match nothing
    are all errors: one :class:`QuantConfigError` lists every problem with its JSON path, e.g.
    ``layers["features.3"].weight.num_bits: num_bits must be in [2, 16], got 32``. Nothing is changed in the model
    when the config has a problem.

    Layers the model has and ``layers`` omits get the global settings (logged at INFO, and listed in
    :attr:`QuantizeReport.defaulted`); with ``apply_quant_config(..., strict=True)`` they are an error. A file
    written by :func:`create_quant_config` lists every layer.

Version-1 files
    are read as version 2 (``batch_num`` -> ``num_batches``, ``method`` -> ``calib_method``, ``percentile`` /
    ``start_bin`` / ``stride`` / ``num_bins`` -> ``calib_args``, ``per_channel`` -> ``axis``), with a warning;
    :func:`save_quant_config` always writes version 2, so ``save_quant_config(load_quant_config(p), p)`` migrates a
    file. The table is in :mod:`qdq.config.v1`.

Mixed precision and export
    :func:`qdq.export_onnx` writes Q/DQ for the 8-bit and FP8 layers and int4 DequantizeLinear for INT4 weight-only
    Linear layers; layers whose entry is disabled have no quantizers and stay float in the ONNX graph. Layers with
    other bit widths (4-bit activations, 16-bit inputs) are for accuracy studies and QAT: the export refuses them with
    an :class:`~qdq.onnx.export.ExportError` naming their quantizers. :attr:`QuantizeReport.not_exportable` lists
    them (and :func:`apply_quant_config` logs a warning).

What the config does not cover
    Quantizers that are not part of a mapped layer - :class:`~qdq.nn.QuantAdd` / :class:`~qdq.nn.QuantConcat` from
    forward patches, for example - keep their own descriptors; :func:`calibrate_from_config` calibrates them with
    their own calibrator (histograms without a named search with the global ``input`` search). Run
    :func:`apply_quant_config` on the float model, before patches and scale-sharing rules.

Example:
    >>> import json, os, tempfile
    >>> import torch
    >>> import qdq
    >>> from qdq.config import apply_quant_config, calibrate_from_config, create_quant_config
    >>> from qdq.tensor_quant import QuantDescriptor
    >>> torch.manual_seed(0) is not None
    True
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
    ...                             torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    ...                             torch.nn.Linear(8, 10))
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "quant_config.json")
    >>> config = create_quant_config(path, model, skip_layers=["6"], num_batches=2,
    ...                              input=QuantDescriptor(calib_method="entropy"))
    >>> {name: entry["enabled"] for name, entry in config["layers"].items()}
    {'0': True, '2': True, '4': True, '6': False}
    >>> with open(path) as f:                       # the user edits the file
    ...     edited = json.load(f)
    >>> edited["layers"]["4"]["enabled"] = False    # the pool stays float
    >>> edited["layers"]["0"]["input"] = {"calib_method": "percentile", "calib_args": {"percentile": 99.9}}
    >>> with open(path, "w") as f:
    ...     json.dump(edited, f, indent=2)
    >>> report = apply_quant_config(model, path)
    >>> report.quantized, report.float_layers
    (['0', '2'], ['4', '6'])
    >>> model[0].input_quantizer.quant_desc.calib_args
    {'num_bins': 2048, 'percentile': 99.9}
    >>> data = [torch.randn(4, 3, 16, 16) for _ in range(5)]
    >>> calibration = calibrate_from_config(model, data, path, progress=False)
    >>> calibration.batches, calibration.calibrated
    (2, 4)
    >>> info = qdq.export_onnx(model, torch.randn(1, 3, 16, 16), os.path.join(tmp.name, "model.onnx"))
    >>> info.num_qdq_pairs                          # two convs, input and weight each; pool and fc are float
    4
    >>> tmp.cleanup()
"""

from qdq.config.apply import QuantizeReport, apply_quant_config, quantize_model
from qdq.config.calibrate import calibrate_from_config
from qdq.config.create import create_quant_config
from qdq.config.schema import CONFIG_FORMAT, CONFIG_VERSION, QuantConfigError, load_quant_config, save_quant_config

__all__ = [
    "CONFIG_FORMAT",
    "CONFIG_VERSION",
    "QuantConfigError",
    "QuantizeReport",
    "create_quant_config",
    "load_quant_config",
    "save_quant_config",
    "apply_quant_config",
    "calibrate_from_config",
    "quantize_model",
]
