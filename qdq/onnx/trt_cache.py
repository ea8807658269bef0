"""TensorRT 10 / DLA: a float ONNX model plus a calibration cache, from a calibrated model or from a QDQ file.

JetPack and DLA stay on TensorRT 10, where implicit INT8 with a calibration cache still exists (and DLA wants it).
Two ways to get one:

* :func:`write_model_tensorrt_cache` (``model``, ``path``, ``example_inputs``): exports the model twice (QDQ and
  float, both with the TorchScript exporter), reads each activation QuantizeLinear of the QDQ file (the tensor it
  quantizes and its scale) and writes the cache under the tensor names of the float file that
  ``export_onnx(..., quantize=False)`` writes for the same inputs, which it also writes when ``float_path`` is given;
* :func:`write_tensorrt_cache` (``qdq.write_tensorrt_cache``) takes either: a model as first argument
  (``write_tensorrt_cache(model, path, example_inputs)``) goes to :func:`write_model_tensorrt_cache`; a mapping
  ``{tensor name: amax}`` (``write_tensorrt_cache(amax, path)``) goes to :func:`qdq.calibrate.calib_table.write_tensorrt_cache`;
* :func:`qdq_to_float_and_cache` (a QDQ file): removes every Q/DQ pair (weights keep their fake-quantized values, so
  the engine computes with the weights the QDQ model had) and returns the float model and ``{tensor: amax}``, what
  NVIDIA's qdq_translator does for DLA.

A quantizer whose tensor has no name in the float file (an exporter naming things differently) is an error naming
it, not a silently missing cache line.

Example:
    >>> import os, tempfile, torch
    >>> import qdq
    >>> from qdq.calibrate.calib_table import read_tensorrt_cache
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    >>> _ = qdq.replace_to_quantization_module(model)
    >>> _ = qdq.calibrate_model(model, [torch.randn(2, 3, 8, 8)], progress=False)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     cache = write_model_tensorrt_cache(model, os.path.join(tmp, "calib.cache"), torch.randn(1, 3, 8, 8))
    ...     header, scales = read_tensorrt_cache(os.path.join(tmp, "calib.cache"))
    >>> sorted(cache) == sorted(scales) and "input" in cache
    True
    >>> abs(cache["input"] - float(model[0].input_quantizer.amax)) < 1e-6
    True
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from collections.abc import Mapping

from torch import nn

from qdq.calibrate.calib_table import TENSORRT_HEADER
from qdq.calibrate.calib_table import write_tensorrt_cache as write_cache_from_amax
from qdq.onnx.export import _constant_values, export_onnx

__all__ = ["qdq_to_float_and_cache", "write_model_tensorrt_cache", "write_tensorrt_cache"]


def _dequantized_weight(w: np.ndarray, scale: np.ndarray, axis: int, quantized: bool) -> np.ndarray:
    """The weight a fake-quant Q/DQ pair (or a deploy-form DQ) passes on."""
    shape = [1] * w.ndim
    if scale.size > 1:
        shape[axis % w.ndim] = scale.size
    s = scale.astype(np.float32).reshape(shape if scale.size > 1 else ())
    if not quantized:
        return (w.astype(np.float32) * s).astype(np.float32)
    q = np.clip(np.rint(w.astype(np.float32) * (np.float32(1) / s)), -128, 127)
    return (q * s).astype(np.float32)


def qdq_to_float_and_cache(model: onnx.ModelProto | str | os.PathLike) -> tuple[onnx.ModelProto, dict[str, float]]:
    """The model without Q/DQ and ``{activation tensor: amax}`` (``amax = scale * 127``) of its per-tensor
    activation QuantizeLinear nodes. Per-channel weights are replaced by their dequantized values."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    consts = _constant_values(out)
    producer = {o: n for n in graph.node for o in n.output}
    alias: dict[str, str] = {}
    cache: dict[str, float] = {}
    new_inits = []
    drop = set()
    for index, node in enumerate(graph.node):
        if node.op_type != "DequantizeLinear":
            continue
        src = producer.get(node.input[0])
        scale = consts.get(node.input[1])
        if scale is None:
            raise ValueError(f"DequantizeLinear {node.name!r}: scale {node.input[1]!r} is not a constant")
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        drop.add(index)
        if src is not None and src.op_type == "QuantizeLinear":
            data = src.input[0]
            if data in consts:  # a fake-quantized weight
                name = f"{data}_dequantized"
                new_inits.append(numpy_helper.from_array(_dequantized_weight(consts[data], scale, axis, True), name))
                alias[node.output[0]] = name
            else:
                alias[node.output[0]] = data
                if scale.size == 1:
                    value = float(scale.reshape(-1)[0]) * 127.0
                    cache[data] = max(cache.get(data, 0.0), value)
        elif node.input[0] in consts:  # deploy form: int8 weights
            name = f"{node.input[0]}_dequantized"
            new_inits.append(numpy_helper.from_array(_dequantized_weight(consts[node.input[0]], scale, axis, False),
                                                     name))
            alias[node.output[0]] = name
        else:
            raise ValueError(f"DequantizeLinear {node.name!r} reads neither a QuantizeLinear nor a constant")
    for index, node in enumerate(graph.node):
        if node.op_type == "QuantizeLinear":
            drop.add(index)
    keep = [n for i, n in enumerate(graph.node) if i not in drop]
    for node in keep:
        for slot, name in enumerate(node.input):
            while name in alias:
                name = alias[name]
            node.input[slot] = name
    for o in graph.output:
        if o.name in alias:
            raise ValueError(f"graph output {o.name!r} is a DequantizeLinear output; cannot rename a graph output")
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new_inits)
    used = {i for n in graph.node for i in n.input}
    alive = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(alive)
    return out, cache


def write_model_tensorrt_cache(model: Any, path: str | os.PathLike, example_inputs: Any, *,
                               float_path: str | os.PathLike | None = None, header: str = TENSORRT_HEADER,
                               **export_kwargs: Any) -> dict[str, float]:
    """Writes the TensorRT calibration cache of a calibrated model under the tensor names of its float export.

    Args:
        model: a calibrated quantized model.
        path: the cache file.
        example_inputs: the export input (the float file's tensor names depend on it only through the graph).
        float_path: also keep the float ONNX file (the one the cache's names refer to) there.
        header: the cache's first line.
        export_kwargs: passed to both exports (``input_names``, ``output_names``, ``opset``, ...).

    Returns:
        ``{tensor name: amax}`` as written.
    """
    with tempfile.TemporaryDirectory(prefix="qdq-trt-cache-") as tmp:
        qdq_info = export_onnx(model, example_inputs, Path(tmp) / "qdq.onnx", **export_kwargs)
        target = Path(float_path) if float_path is not None else Path(tmp) / "float.onnx"
        float_info = export_onnx(model, example_inputs, target, quantize=False, **export_kwargs)
    _, cache = qdq_to_float_and_cache(qdq_info.model)
    names = {i.name for i in float_info.model.graph.input} | {o for n in float_info.model.graph.node for o in n.output}
    unknown = sorted(set(cache) - names)
    if unknown:
        raise ValueError(f"quantized tensors without a name in the float export: {', '.join(unknown[:10])} "
                         "(write the cache from the QDQ file with qdq_to_float_and_cache instead)")
    write_cache_from_amax(cache, path, header=header)
    return cache


def write_tensorrt_cache(source: Any, path: str | os.PathLike, example_inputs: Any = None, *,
                         header: str = TENSORRT_HEADER, **kwargs: Any) -> dict[str, float] | None:
    """Writes a TensorRT calibration cache from a calibrated model or from ``{tensor name: amax}``.

    * ``write_tensorrt_cache(model, path, example_inputs, float_path=None, **export_kwargs)``: an ``nn.Module``
      goes to :func:`write_model_tensorrt_cache` (the cache under the tensor names of the float ONNX that
      ``export_onnx(model, example_inputs, ..., quantize=False)`` writes); returns ``{tensor name: amax}``.
    * ``write_tensorrt_cache(amax, path)``: a mapping goes to :func:`qdq.calibrate.calib_table.write_tensorrt_cache`
      unchanged; returns ``None``.

    Raises:
        TypeError: ``source`` is neither a module nor a mapping, a model without ``example_inputs``, or a mapping
            with ``example_inputs`` or export options.

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     write_tensorrt_cache({"input": 127.0}, os.path.join(tmp, "c.cache"))
        ...     write_tensorrt_cache("model.onnx", os.path.join(tmp, "c.cache"))
        Traceback (most recent call last):
        ...
        TypeError: write_tensorrt_cache takes a calibrated nn.Module (with example_inputs) or a mapping {tensor name: amax}, got str (for a QDQ file, use qdq.onnx.qdq_to_float_and_cache)
    """
    if isinstance(source, nn.Module):
        if example_inputs is None:
            raise TypeError("write_tensorrt_cache(model, path, example_inputs): a model needs example_inputs, the "
                            "export input whose float ONNX names the cache's tensors")
        return write_model_tensorrt_cache(source, path, example_inputs, header=header, **kwargs)
    if isinstance(source, Mapping):
        if example_inputs is not None or kwargs:
            raise TypeError("write_tensorrt_cache(amax, path): a mapping {tensor name: amax} takes no example_inputs "
                            f"or export options (got {'example_inputs' if example_inputs is not None else ''}"
                            f"{', ' if example_inputs is not None and kwargs else ''}{', '.join(kwargs)})")
        write_cache_from_amax(source, path, header=header)
        return None
    hint = " (for a QDQ file, use qdq.onnx.qdq_to_float_and_cache)" if isinstance(source, (str, os.PathLike)) else ""
    raise TypeError("write_tensorrt_cache takes a calibrated nn.Module (with example_inputs) or a mapping "
                    f"{{tensor name: amax}}, got {type(source).__name__}{hint}")
