"""Calibration tables: save every quantizer's amax, load it back, and write TensorRT calibration caches.

Calibration can take a long time; its result is small. :func:`save_calib_table` writes it as JSON, one quantizer
per line, by the quantizer's dotted name in the model (as :func:`qdq.transform.switches.quantizers` gives it)::

    {
      "format": "qdq-calib-table",
      "version": 1,
      "qdq_version": "0.1.0",
      "method": "mse",
      "quantizers": {
        "0._input_quantizer": {"amax": 2.64, "num_bits": 8, "unsigned": false, "axis": null},
        "0._weight_quantizer": {"amax": [[[[0.51]]], [[[0.47]]]], "num_bits": 8, "unsigned": false, "axis": 0},
        "head._input_quantizer": {"amax": null, "num_bits": 8, "unsigned": false, "axis": null}
      }
    }

``amax`` is the quantizer's raw amax (before any ``scale_amax``): a number for a per-tensor quantizer, a nested list
in the amax tensor's own shape for a per-channel one, ``null`` for a quantizer that has none. Numbers are written in
their shortest form that reads back as the same float32, so a save and a load give bit-identical amax. ``method``
records how the table was calibrated when the caller says so (a quantizer does not know it).

:func:`load_calib_table` sets the amax of every quantizer of the model that the table names, after checking the
whole table first (nothing is set when something does not match):

* each entry's ``num_bits``, ``unsigned`` and ``axis`` must equal the quantizer's (FP8 E4M3 quantizers have
  ``"num_bits": [4, 3]``; blocked INT4 quantizers add ``"block_size"``, which must match too);
* a quantizer that already has an amax keeps its shape (the table's amax must have the same shape); one without an
  amax takes the table's shape as it is;
* names the model has and the table lacks (``missing``), and names the table has and the model lacks (``extra``),
  are an error with ``strict=True`` and a warning otherwise;
* entries whose amax is ``null`` leave their quantizer as it is (listed in the report's ``no_amax``).

TensorRT reads per-tensor scales from a *calibration cache* (``trtexec --calib=cache.txt``, or the cache an
``IInt8Calibrator`` returns): :func:`write_tensorrt_cache` writes one from ``{tensor name: amax}`` and
:func:`read_tensorrt_cache` reads one. A QDQ ONNX model carries its scales itself and needs no cache; the cache is
for building engines from the float ONNX model.

Example:
    >>> import os, tempfile
    >>> import torch
    >>> from qdq import calibrate_model, quant_modules
    >>> from qdq.calibrate.calib_table import load_calib_table, save_calib_table
    >>> def build():
    ...     torch.manual_seed(0)
    ...     model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    ...     _ = quant_modules.replace_to_quantization_module(model)
    ...     return model
    >>> model = build()
    >>> _ = calibrate_model(model, [torch.randn(8, 4) for _ in range(4)], progress=False)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "table.json")
    >>> _ = save_calib_table(model, path, method="max")
    >>> fresh = build()
    >>> report = load_calib_table(fresh, path)
    >>> len(report.loaded), report.missing, report.extra, report.method
    (4, [], [], 'max')
    >>> torch.equal(fresh[0].input_quantizer.amax, model[0].input_quantizer.amax)
    True
    >>> tmp.cleanup()
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from qdq._files import write_atomically
from qdq._json_keys import DuplicateKeyError, loads_unique
from qdq._version import __version__
from qdq.transform.switches import quantizers
from qdq.math.ranges import amax_to_scale, check_amax

__all__ = [
    "TABLE_FORMAT",
    "TABLE_VERSION",
    "TENSORRT_HEADER",
    "CalibTableError",
    "CalibTableReport",
    "save_calib_table",
    "load_calib_table",
    "write_tensorrt_cache",
    "read_tensorrt_cache",
]

logger = logging.getLogger(__name__)

#: The ``format`` value of a calibration table.
TABLE_FORMAT = "qdq-calib-table"
#: The table version this module writes and reads.
TABLE_VERSION = 1
#: The header of TensorRT 8.6.1's entropy-calibrator (v2) caches.
TENSORRT_HEADER = "TRT-8601-EntropyCalibration2"
_ENTRY_KEYS = ("amax", "num_bits", "unsigned", "axis")
_LISTED = 20


class CalibTableError(ValueError):
    """A calibration table or cache that cannot be read, or that does not fit the model; the message names the
    file and the key (or line, or quantizer) at fault."""


@dataclass
class CalibTableReport:
    """What :func:`load_calib_table` did.

    Attributes:
        path: the table.
        method: the calibration method the table records (``None`` when it records none).
        loaded: quantizers whose amax was set.
        missing: quantizers of the model that the table does not name (left as they were).
        extra: names in the table that are not quantizers of the model (ignored).
        no_amax: quantizers the table lists with amax ``null`` (left as they were).
    """

    path: Path
    method: str | None = None
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    no_amax: list[str] = field(default_factory=list)


def _listing(names: list[str]) -> str:
    return ", ".join(names[:_LISTED]) + (", ..." if len(names) > _LISTED else "")


# --------------------------------------------------------------------------------------------------------------------
# qdq's JSON table
# --------------------------------------------------------------------------------------------------------------------


def _shortest(value: Any) -> Any:
    """A nested list of Python floats printing as the shortest decimals that read back as the same float32s."""
    if isinstance(value, list):
        return [_shortest(v) for v in value]
    return float(str(np.float32(value)))


def _axis_to_json(axis: int | tuple[int, ...] | None) -> int | list[int] | None:
    return list(axis) if isinstance(axis, tuple) else axis


def save_calib_table(model: nn.Module, path: str | os.PathLike, method: str | None = None) -> dict[str, Any]:
    """Writes the amax of every TensorQuantizer of ``model`` to a JSON calibration table.

    Every quantizer is listed, by its dotted name; those without an amax with ``"amax": null``. The file is
    written to a temporary file and renamed, so an interrupted save leaves any earlier table whole.

    Args:
        model: a model with quantizers.
        path: the JSON file to write (folders are created).
        method: the calibration method used (``"max"``, ``"entropy"``, ``"mse"``, ...), recorded for the reader.

    Returns:
        The table as written (a dict).

    Raises:
        ValueError: the model has no quantizer.
        TypeError: ``method`` is not a string or None.

    Example:
        >>> import json, os, tempfile
        >>> from qdq import nn as quant_nn
        >>> layer = quant_nn.QuantLinear(2, 2)
        >>> layer.input_quantizer.amax = 3.0
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = save_calib_table(layer, os.path.join(folder, "t.json"))
        ...     table = json.load(open(os.path.join(folder, "t.json")))
        >>> table["quantizers"]["_input_quantizer"]
        {'amax': 3.0, 'num_bits': 8, 'unsigned': False, 'axis': None}
        >>> table["quantizers"]["_weight_quantizer"]["amax"] is None
        True
    """
    if method is not None and not isinstance(method, str):
        raise TypeError(f"save_calib_table: method must be a string or None, got {method!r}")
    path = Path(path)
    entries: dict[str, dict[str, Any]] = {}
    for name, q in quantizers(model):
        amax = q.amax
        entries[name] = {
            "amax": None if amax is None else _shortest(amax.detach().float().cpu().tolist()),
            "num_bits": q.num_bits,
            "unsigned": q.unsigned,
            "axis": _axis_to_json(q.axis),
        }
        if q.block_size is not None:  # blocked INT4 (qdq.math.formats); FP8 is num_bits [4, 3]
            entries[name]["block_size"] = q.block_size
    if not entries:
        raise ValueError(
            "save_calib_table: the model has no TensorQuantizer (did you call replace_to_quantization_module?)"
        )
    table = {
        "format": TABLE_FORMAT,
        "version": TABLE_VERSION,
        "qdq_version": __version__,
        "method": method,
        "quantizers": entries,
    }
    head = {k: v for k, v in table.items() if k != "quantizers"}
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()] + ['  "quantizers": {']
    lines += [f"    {json.dumps(name)}: {json.dumps(entry, allow_nan=False)}," for name, entry in entries.items()]
    lines[-1] = lines[-1][:-1]
    lines += ["  }", "}", ""]
    write_atomically(path, "\n".join(lines))
    without = sum(e["amax"] is None for e in entries.values())
    if without == len(entries):  # a table of nulls: almost surely saved before calibration
        logger.warning("save_calib_table: none of the %d quantizers has an amax (calibrate the model first); the "
                       "table %s lists them all with amax null", len(entries), path)
    logger.info("saved %d quantizers (%d without amax) to %s", len(entries), without, path)
    return table


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CalibTableError(f"cannot read {what} {path}: {err}") from err
    try:
        return loads_unique(text)
    except json.JSONDecodeError as err:
        raise CalibTableError(f"{what} {path} is not JSON: {err}") from err
    except DuplicateKeyError as err:
        raise CalibTableError(f"{what} {path}: {err}; each key must appear once") from None


def _check_numbers(value: Any) -> bool:
    """Whether ``value`` is a number or a nested list of numbers (bools are not numbers here)."""
    if isinstance(value, list):
        return all(_check_numbers(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_entry(path: Path, name: str, entry: Any) -> tuple[torch.Tensor | None, int, bool, int | tuple | None]:
    where = f"{path}: quantizers[{name!r}]"
    if not isinstance(entry, dict):
        raise CalibTableError(f"{where} must be an object, got {type(entry).__name__}")
    for key in _ENTRY_KEYS:
        if key not in entry:
            raise CalibTableError(f"{where} has no {key!r} key")
    num_bits, unsigned, axis, amax = entry["num_bits"], entry["unsigned"], entry["axis"], entry["amax"]
    if isinstance(num_bits, list) and num_bits == [4, 3]:  # FP8 E4M3
        num_bits = (4, 3)
    elif isinstance(num_bits, bool) or not isinstance(num_bits, int):
        raise CalibTableError(f"{where}['num_bits'] must be an int or [4, 3] (FP8 E4M3), got {num_bits!r}")
    if not isinstance(unsigned, bool):
        raise CalibTableError(f"{where}['unsigned'] must be true or false, got {unsigned!r}")
    if isinstance(axis, list) and axis and all(isinstance(a, int) and not isinstance(a, bool) for a in axis):
        axis = axis[0] if len(axis) == 1 else tuple(axis)
    elif axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
        raise CalibTableError(f"{where}['axis'] must be null, an int or a list of ints, got {axis!r}")
    if amax is None:
        return None, num_bits, unsigned, axis
    if not _check_numbers(amax):
        raise CalibTableError(f"{where}['amax'] must be null, a number or a nested list of numbers")
    try:
        tensor = torch.tensor(amax, dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise CalibTableError(f"{where}['amax'] is not a rectangular nested list: {err}") from err
    if tensor.numel() == 0:
        raise CalibTableError(f"{where}['amax'] is empty; use null for a quantizer without amax")
    check_amax(tensor, f"{where}['amax']", error=CalibTableError)
    return tensor, num_bits, unsigned, axis


def load_calib_table(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> CalibTableReport:
    """Sets the amax of ``model``'s quantizers from a table written by :func:`save_calib_table`.

    The whole table is checked before any amax is set (see the module docstring for the rules). amax goes to the
    device each quantizer is on; a learned amax (a ``Parameter``) is updated in place.

    Args:
        model: a model with quantizers, built as the one the table was saved from.
        path: the JSON table.
        strict: names in only one of the model and the table are an error (``False``: a warning, and the matching
            quantizers are loaded).

    Returns:
        A :class:`CalibTableReport`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CalibTableError: the file is not JSON, is not a calibration table, has another version, or lacks a key
            (naming the file and the key); entries whose ``num_bits``, ``unsigned``, ``axis`` or amax shape differ
            from their quantizer's (naming each); with ``strict``, names in only one of the two.
    """
    path = Path(path)
    table = _read_json(path, "calibration table")
    if not isinstance(table, dict):
        raise CalibTableError(f"calibration table {path} must hold a JSON object, got {type(table).__name__}")
    for key in ("format", "version", "quantizers"):
        if key not in table:
            raise CalibTableError(f"calibration table {path} has no {key!r} key")
    if table["format"] != TABLE_FORMAT:
        raise CalibTableError(f"{path}: 'format' is {table['format']!r}, not {TABLE_FORMAT!r}")
    version = table["version"]
    if version != TABLE_VERSION or isinstance(version, bool):
        newer = isinstance(version, int) and not isinstance(version, bool) and version > TABLE_VERSION
        raise CalibTableError(
            f"{path}: 'version' is {version!r}; this qdq reads version {TABLE_VERSION}"
            + (" (the table was written by a newer qdq)" if newer else "")
        )
    method = table.get("method")
    if method is not None and not isinstance(method, str):
        raise CalibTableError(f"{path}: 'method' must be a string or null, got {method!r}")
    if not isinstance(table["quantizers"], dict):
        raise CalibTableError(f"{path}: 'quantizers' must be an object (name -> entry)")
    entries = {name: _parse_entry(path, name, entry) for name, entry in table["quantizers"].items()}

    named = dict(quantizers(model))
    report = CalibTableReport(path=path, method=method)
    report.missing = [n for n in named if n not in entries]
    report.extra = [n for n in entries if n not in named]

    mismatches = []
    for name, (amax, num_bits, unsigned, axis) in entries.items():
        q = named.get(name)
        if q is None:
            continue
        block_size = table["quantizers"][name].get("block_size")
        for key, theirs, ours in (("num_bits", num_bits, q.num_bits), ("unsigned", unsigned, q.unsigned),
                                  ("axis", axis, q.axis), ("block_size", block_size, q.block_size)):
            if theirs != ours:
                mismatches.append(f"{name}: {key} is {theirs!r} in the table, {ours!r} in the model")
        if amax is not None and q.amax is not None and tuple(amax.shape) != tuple(q.amax.shape):
            mismatches.append(
                f"{name}: amax has shape {tuple(amax.shape)} in the table, {tuple(q.amax.shape)} in the model"
            )
    if mismatches:
        raise CalibTableError(
            f"calibration table {path} does not fit the model in {len(mismatches)} places: "
            + "; ".join(mismatches[:_LISTED]) + ("; ..." if len(mismatches) > _LISTED else "")
        )
    if report.missing or report.extra:
        parts = []
        if report.missing:
            parts.append(f"{len(report.missing)} quantizers of the model are not in it: {_listing(report.missing)}")
        if report.extra:
            parts.append(f"{len(report.extra)} names in it are not quantizers of the model: {_listing(report.extra)}")
        msg = f"calibration table {path} does not match the model: " + "; ".join(parts)
        if strict:
            raise CalibTableError(msg + " (pass strict=False to load the quantizers that match)")
        logger.warning("%s; loading the %d that match", msg, len(entries) - len(report.extra))

    for name, (amax, *_) in entries.items():
        if name not in named:
            continue
        if amax is None:
            report.no_amax.append(name)
            continue
        named[name].amax = amax
        report.loaded.append(name)
    if report.no_amax:
        logger.info("%s lists %d quantizers without amax; left as they were: %s", path, len(report.no_amax),
                    _listing(report.no_amax))
    logger.info("loaded the amax of %d quantizers from %s", len(report.loaded), path)
    return report


# --------------------------------------------------------------------------------------------------------------------
# TensorRT calibration cache
# --------------------------------------------------------------------------------------------------------------------

_HEX = re.compile(r"[0-9a-fA-F]{1,8}")


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        count = value.numel() if isinstance(value, torch.Tensor) else value.size
        if count != 1:
            raise CalibTableError(
                f"tensor {name!r}: a TensorRT cache holds one scale per tensor; got an amax of shape "
                f"{tuple(value.shape)} (per-channel amax lives in the QDQ model, not in the cache)"
            )
        value = value.item()
    check_amax(value, f"tensor {name!r}: amax", error=CalibTableError)
    return float(value)


def write_tensorrt_cache(
    amax: Mapping[str, Any], path: str | os.PathLike, header: str = TENSORRT_HEADER
) -> None:
    """Writes a TensorRT calibration cache from ``{tensor name: amax}``.

    The format: the header on the first line, then ``name: hex`` per tensor in the mapping's order, where ``hex``
    is the big-endian IEEE-754 float32 bit pattern of the scale ``amax / 127`` as 8 lowercase hex digits. The scale
    is computed as the QDQ export computes it (:func:`qdq.math.ranges.amax_to_scale`, in float32), so an amax of 0
    is written as the smallest positive scale, with a warning. Which ONNX tensor a quantizer feeds is the export's
    business; this takes the finished mapping.

    Args:
        amax: tensor name -> amax (a number, or a one-element tensor or array).
        path: the cache file to write (folders are created).
        header: the first line (TensorRT checks its version and calibrator type).

    Raises:
        CalibTableError: an amax that is negative, not finite, not a number or not a single value, a name that is
            empty or holds a line break (each naming the tensor), or a bad header.

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "calib.cache")
        ...     write_tensorrt_cache({"input": 127.0, "onnx::Conv_7": 1.0}, path)
        ...     print(open(path).read(), end="")
        ...     read_tensorrt_cache(path)
        TRT-8601-EntropyCalibration2
        input: 3f800000
        onnx::Conv_7: 3c010204
        ('TRT-8601-EntropyCalibration2', {'input': 1.0, 'onnx::Conv_7': 0.007874015718698502})
    """
    if not isinstance(header, str) or not header.strip() or "\n" in header or "\r" in header:
        raise CalibTableError(f"write_tensorrt_cache: header must be one non-empty line, got {header!r}")
    if not isinstance(amax, Mapping):
        raise TypeError(f"write_tensorrt_cache: amax must be a mapping tensor name -> amax, got {type(amax).__name__}")
    lines, zero = [header.strip()], []
    for name, value in amax.items():
        if not isinstance(name, str) or not name.strip() or "\n" in name or "\r" in name:
            raise CalibTableError(f"write_tensorrt_cache: tensor name {name!r} must be a non-empty single-line string")
        value = _as_float(value, name)
        if value == 0:
            zero.append(name)
        if value > float(np.finfo(np.float32).max):  # finite in float64, Inf once a float32 (the cache's type)
            raise CalibTableError(f"tensor {name!r}: amax {value!r} overflows float32 (the cache holds float32 scales)")
        scale = amax_to_scale(torch.tensor(value, dtype=torch.float32)).item()
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    if zero:
        logger.warning("amax is 0 for %d tensors, written with the smallest scale: %s", len(zero), _listing(zero))
    path = Path(path)
    write_atomically(path, "\n".join(lines) + "\n")
    logger.info("wrote a TensorRT calibration cache of %d tensors to %s", len(lines) - 1, path)


def read_tensorrt_cache(path: str | os.PathLike) -> tuple[str, dict[str, float]]:
    """Reads a TensorRT calibration cache: ``(header, {tensor name: scale})``.

    Scales are the float32 values of the hex patterns (``amax = scale * 127``). Blank lines are skipped; the tensor
    name is everything before a line's last ``:`` (ONNX names such as ``onnx::Conv_7`` hold colons).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CalibTableError: an empty file, a line that is not ``name: hex``, a name given twice, or a scale that is
            negative or not finite (each naming the file and line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"TensorRT calibration cache {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CalibTableError(f"cannot read TensorRT calibration cache {path}: {err}") from err
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise CalibTableError(f"TensorRT calibration cache {path}: the first line must be the header, found none")
    header, scales = lines[0].strip(), {}
    name, sep, digits = header.rpartition(":")
    if sep and name.strip() and _HEX.fullmatch(digits.strip()):  # an entry where the header should be
        raise CalibTableError(
            f"{path}, line 1: expected the header (such as {TENSORRT_HEADER!r}), got the tensor entry {header!r}"
        )
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, digits = line.rpartition(":")
        name, digits = name.strip(), digits.strip()
        if not sep or not name or not _HEX.fullmatch(digits):
            raise CalibTableError(f"{path}, line {number}: expected 'tensor name: 8 hex digits', got {line!r}")
        if name in scales:
            raise CalibTableError(f"{path}, line {number}: tensor {name!r} is listed twice")
        scale = struct.unpack(">f", bytes.fromhex(digits.rjust(8, "0")))[0]
        if not math.isfinite(scale) or scale < 0:
            raise CalibTableError(
                f"{path}, line {number}: tensor {name!r} has scale {scale!r}; it must be finite and >= 0"
            )
        scales[name] = scale
    return header, scales
