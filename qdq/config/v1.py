"""Version-1 quantization configs, read as version 2.

Version 1 (qdq 0.1) spoke its own words; version 2 speaks the descriptor's. A version-1 config is translated when it
is read - by :func:`~qdq.config.load_quant_config`, :func:`~qdq.config.apply_quant_config` and
:func:`~qdq.config.calibrate_from_config` - with a warning that says how to rewrite it;
:func:`~qdq.config.save_quant_config` always writes version 2, so ``save_quant_config(load_quant_config(p), p)``
migrates a file in place. A version-2 file that uses a version-1 key is refused with the new key's name.

=======================================  ==================================================================
version 1                                version 2
=======================================  ==================================================================
``"version": 1``                         ``"version": 2``
``global.batch_num``                     ``global.num_batches``
``method``                               ``calib_method`` (the same names: ``"max"``, ``"entropy"``, ...)
``percentile``, ``start_bin``,           ``calib_args.percentile``, ``calib_args.start_bin``, ...
``stride``, ``num_bins``
``"per_channel": true`` / ``false``      ``"axis": 0`` / ``"axis": null`` (weights; 0 is the per-channel axis of
                                         every quantized layer class of qdq, transposed convolutions included)
=======================================  ==================================================================

The meaning is unchanged: keys a layer leaves out come from ``global``, and a section that names another method
than the global one starts from that method's default parameters.

>>> upgrade({"version": 1, "global": {"batch_num": 4, "weight": {"method": "max", "per_channel": False}},
...          "layers": {"fc": {"input": {"method": "percentile", "percentile": 99.9}}}}, None)
{'version': 2, 'global': {'num_batches': 4, 'weight': {'calib_method': 'max', 'axis': None}}, \
'layers': {'fc': {'input': {'calib_method': 'percentile', 'calib_args': {'percentile': 99.9}}}}}
"""

from __future__ import annotations

from typing import Any, Mapping

from qdq.config.schema import layer_path

__all__ = ["upgrade"]

_PARAMS = ("percentile", "start_bin", "stride", "num_bins")


def _section(spec: Any, role: str, where: str, problems) -> Any:
    if not isinstance(spec, Mapping):
        return spec  # reported by the version-2 checks
    out: dict[str, Any] = {}
    args: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "method":
            out["calib_method"] = value
        elif key in _PARAMS:
            args[key] = value
        elif key == "per_channel" and role == "weight":
            if isinstance(value, bool):
                out["axis"] = 0 if value else None
            elif problems is not None:
                problems.add(f"{where}.per_channel", f"must be true or false, got {value!r}")
        else:
            out[key] = value
    if args:
        out["calib_args"] = args
    return out


def upgrade(config: Mapping[str, Any], problems) -> dict[str, Any]:
    """A version-1 config in the version-2 words (unknown keys are kept, for the version-2 checks to name)."""
    out = {k: v for k, v in config.items()}
    out["version"] = 2
    glob = config.get("global")
    if isinstance(glob, Mapping):
        g = {("num_batches" if k == "batch_num" else k): v for k, v in glob.items()}
        for role in ("input", "weight"):
            if role in g:
                g[role] = _section(g[role], role, f"global.{role}", problems)
        out["global"] = g
    layers = config.get("layers")
    if isinstance(layers, Mapping):
        new_layers = {}
        for name, entry in layers.items():
            if isinstance(entry, Mapping):
                entry = dict(entry)
                for role in ("input", "weight"):
                    if role in entry:
                        entry[role] = _section(entry[role], role, f"{layer_path(name)}.{role}", problems)
            new_layers[name] = entry
        out["layers"] = new_layers
    return out
