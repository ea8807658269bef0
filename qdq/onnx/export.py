"""QDQ ONNX export: every enabled quantizer becomes QuantizeLinear -> DequantizeLinear.

This is the one module of qdq that uses ``torch.onnx``. The export:

* checks every enabled quantizer first and stops with one error naming all that cannot be exported (no amax,
  still calibrating, a bit width TensorRT cannot run);
* puts the quantizers in export mode (their forward becomes the fused fake-quant op, which both of torch's exporters
  translate to QuantizeLinear/DequantizeLinear with int8 zero points, per channel with ``axis`` for weights) and the
  model in eval mode, and undoes both in ``finally``;
* exports with the TorchScript exporter (``dynamo=False``, the default) or the dynamo exporter (``dynamo=True``);
* optionally folds constants without touching Q/DQ (``simplify=True``), and checks the file with ``onnx.checker``.

Two forms of the same model:

* the default *fake-quant* form keeps float weights behind QuantizeLinear -> DequantizeLinear (what TensorRT's
  explicit quantization and ``trtexec --int8`` take);
* the *deploy* form (``deploy=True``) stores weights as int8 initializers feeding DequantizeLinear directly, a
  quarter of the size; both run in ONNX Runtime with the same outputs.

Under torch.distributed, call :func:`export_onnx_distributed` on every rank: the group's rank 0 writes the file while
the others wait, and an export error is raised on every rank. (:func:`export_onnx` itself never talks to other
ranks: calling it on every rank with one path would have them all write the same file.)

Build the engine with ``trtexec --onnx=model.onnx --int8 --fp16`` (TensorRT 8-10); TensorRT 11 builds Q/DQ networks
strongly typed and needs no precision flags.

Example:
    >>> import tempfile, os, torch
    >>> import qdq
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    >>> _ = qdq.replace_to_quantization_module(model)
    >>> _ = qdq.calibrate_model(model, [torch.randn(2, 3, 8, 8)], progress=False)
    >>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
    >>> info = export_onnx(model, torch.randn(1, 3, 8, 8), path)
    >>> [n.op_type for n in info.model.graph.node]
    ['QuantizeLinear', 'DequantizeLinear', 'QuantizeLinear', 'DequantizeLinear', 'Conv', 'Relu']
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx.version_converter
import torch
from onnx import numpy_helper
from torch import nn

from qdq.distributed import run_on_rank0
from qdq.onnx import export_formats
from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.transform.replace import name_quantizers
from qdq.transform.switches import preserved_modes, quantizers
from qdq.math.ranges import amax_problem

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "export_onnx",
    "export_onnx_distributed",
    "ExportInfo",
    "export_mode",
    "check_exportable",
    "ExportError",
    "to_deploy_form",
    "export_with_quantizer_tags",
    "TAG_STEP",
]

#: The scale step of the identifying export: quantizer ``i`` (from 1) exports with scale ``i * TAG_STEP``, exact in
#: float32, so each QuantizeLinear's scale says which quantizer made it whatever the exporter names things.
TAG_STEP = 2.0**-8

logger = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The model cannot be exported as it is; the message names every quantizer at fault."""


@dataclass
class ExportInfo:
    """What :func:`export_onnx` wrote."""

    path: Path
    model: onnx.ModelProto
    exporter: str
    opset: int
    num_qdq_pairs: int = 0
    deploy: bool = False
    notes: list[str] = field(default_factory=list)


def check_exportable(model: nn.Module, allow_bits: Sequence[int] = (8,)) -> None:
    """Raises :class:`ExportError` naming every enabled quantizer that cannot be exported."""
    name_quantizers(model)
    problems = []
    layers = dict(model.named_modules())
    for name, q in quantizers(model):
        if not q.is_enabled:
            continue
        if q.state()["if_calib"]:
            problems.append(f"{name}: still in calibration mode (finish calibration: calibrate_model or disable_calib)")
        if not q.state()["if_quant"]:
            problems.append(f"{name}: enabled but not quantizing (disable_quant); disable() it to export it in float")
        if q.amax is None:
            problems.append(f"{name}: has no amax (calibrate the model, or disable this quantizer)")
        fmt_problem = export_formats.format_problem(name, q, layers.get(name.rpartition(".")[0]))
        if fmt_problem:
            problems.append(fmt_problem)
        elif q.num_bits not in allow_bits and export_formats.format_of(q) not in ("fp8", "int4"):
            problems.append(f"{name}: {q.num_bits}-bit; TensorRT's explicit quantization takes 8-bit Q/DQ only")
        if not q.fake_quant:
            problems.append(f"{name}: fake_quant=False (real quantization) cannot be exported as Q/DQ")
        amax_wrong = amax_problem(q.amax.detach()) if q.amax is not None else None
        if amax_wrong:
            problems.append(f"{name}: amax {amax_wrong} (a learned amax that diverged?)")
    if problems:
        raise ExportError("cannot export:\n  " + "\n  ".join(problems))


@contextlib.contextmanager
def export_mode(model: nn.Module, quantize: bool = True, tags: dict[int, float] | None = None) -> Iterator[nn.Module]:
    """Eval mode and export-mode quantizers for the duration of the block (or every quantizer disabled when
    ``quantize=False``); everything restored in ``finally``. ``tags`` maps ``id(quantizer)`` to the per-tensor scale
    it exports with instead of its own (FP8/INT4 quantizers, rewritten afterwards: :mod:`qdq.onnx.export_formats`)."""
    qs = [q for _, q in quantizers(model)]
    saved = [(q, q.export_mode) for q in qs]
    with preserved_modes(model):
        try:
            model.eval()
            for q in qs:
                if not quantize:
                    q.disable()
                elif not q.is_enabled:
                    continue  # a disabled quantizer passes its input through and exports nothing
                elif tags and id(q) in tags:
                    q.set_export_mode(True, scale=tags[id(q)])
                else:
                    q.export_mode = True
            yield model
        finally:
            for q, mode in saved:
                q.export_mode = mode


@contextlib.contextmanager
def _no_fused_attention() -> Iterator[None]:
    """Keeps ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` off torch's fused fast path, which they
    take under ``torch.no_grad()`` in eval mode and which the TorchScript exporter cannot translate
    (``aten::_native_multi_head_attention``)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _dynamic_axes(names: Sequence[str]) -> dict[str, dict[int, str]]:
    return {name: {0: "batch"} for name in names}


def _torch_export(model, args, path, opset, input_names, output_names, dynamic_batch, dynamo, kwargs) -> None:
    common = dict(opset_version=opset, input_names=list(input_names), do_constant_folding=True)
    if output_names:
        common["output_names"] = list(output_names)
    if dynamic_batch and dynamo:
        batch = torch.export.Dim("batch")
        common["dynamic_shapes"] = tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)
    elif dynamic_batch:
        common["dynamic_axes"] = _dynamic_axes(list(input_names) + list(output_names or []))
    common.update(kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*ONNX exporter.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.onnx")
        # the TorchScript exporter's note on strided Slice (models with "same" padding): nothing for the user to do
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        if dynamo:
            quiet = io.StringIO()
            with contextlib.redirect_stdout(quiet):
                program = torch.onnx.export(model, args, dynamo=True, verbose=False, **common)
            program.save(str(path))
        else:
            torch.onnx.export(model, args, str(path), dynamo=False, **common)


def _keep_qdq(node) -> bool:
    return node.op in ("QuantizeLinear", "DequantizeLinear")


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and dead-node removal that leaves every Q/DQ in place."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.fold_constants(should_exclude_node=_keep_qdq).cleanup().toposort()
    return gs.export_onnx(graph)


def _constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Moves tensor-valued Constant nodes into initializers (the TorchScript exporter writes Q/DQ scales as
    Constant nodes; initializers are what tools and readers expect), and replaces Identity nodes of initializers by
    copies (the TorchScript exporter writes parameters with equal values - the layers of ``nn.TransformerEncoder``
    start as copies of one layer - once and the others as Identity nodes, which hides that they are constant)."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            source = node.attribute[0].t
        elif node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            source = inits[node.input[0]]
        else:
            keep.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(source)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        inits[tensor.name] = tensor
    del graph.node[:]
    graph.node.extend(keep)
    return model


def _constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def weight_integers(weight: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                    axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, scale, zero_point)`` of a constant float weight under ``QuantizeLinear(scale, zero_point, axis)``: q the
    integers qdq's arithmetic gives (``round_half_even(w * (1 / scale)) + zero_point``, saturated to the zero
    point's integer type), in float32, with the scale and zero point shaped to broadcast against the weight."""
    from qdq.math.quantize import quantize

    w = torch.from_numpy(np.asarray(weight, dtype=np.float32))
    s = torch.from_numpy(np.asarray(scale, dtype=np.float32))
    z = torch.from_numpy(np.asarray(zero_point).astype(np.float32))
    shape: list[int] | tuple = ()
    if s.numel() > 1:
        shape = [1] * w.dim()
        shape[axis % w.dim()] = s.numel()
    s, z = s.reshape(shape), z.reshape(shape)
    info = np.iinfo(zero_point.dtype)
    return quantize(w, s, z, int(info.min), int(info.max)), s, z


def to_deploy_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replaces each QuantizeLinear of a constant float weight by an int8 initializer feeding its DequantizeLinear.

    The integers are computed with qdq's arithmetic (``round_half_even(w * (1 / scale))``, saturated), so the deploy
    model dequantizes to exactly the weights PyTorch's fake quantization used (:func:`weight_integers`).
    """
    consts = _constant_values(model)
    graph = model.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    keep, new_inits = [], []
    replaced = 0
    for node in graph.node:
        weight = node.input[0] if node.op_type == "QuantizeLinear" else None
        if weight is None or weight not in consts or node.input[1] not in consts or len(node.input) < 3:
            keep.append(node)
            continue
        zp = consts[node.input[2]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        q = weight_integers(consts[weight], consts[node.input[1]], zp, axis)[0].numpy().astype(zp.dtype)
        name = f"{weight}_quantized"
        new_inits.append(numpy_helper.from_array(q, name))
        for consumer in consumers.get(node.output[0], []):
            for i, inp in enumerate(consumer.input):
                if inp == node.output[0]:
                    consumer.input[i] = name
        replaced += 1
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new_inits)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    alive = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(alive)
    logger.info("deploy form: %d weights stored as integers", replaced)
    return model


def export_onnx(
    model: nn.Module,
    args: Any,
    path: str | os.PathLike,
    opset: int = 17,
    dynamic_batch: bool = False,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] | None = ("output",),
    dynamo: bool = False,
    deploy: bool = False,
    simplify: bool = False,
    quantize: bool = True,
    float_dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> ExportInfo:
    """Exports ``model`` to a QDQ ONNX file (see the module docstring).

    Args:
        model: a calibrated quantized model.
        args: example input (a tensor or a tuple of inputs).
        path: the ``.onnx`` file to write (its folder is created).
        opset: ONNX opset (>= 13 for per-channel Q/DQ).
        dynamic_batch: make dimension 0 of inputs and outputs dynamic.
        input_names, output_names: graph input/output names (``output_names=None`` lets the exporter choose, for
            models whose number of outputs you do not want to spell out).
        dynamo: use torch's dynamo exporter instead of the TorchScript one.
        deploy: store weights as int8 initializers feeding DequantizeLinear.
        simplify: fold constants (keeping every Q/DQ) and drop dead nodes.
        quantize: ``False`` exports the float model (all quantizers off), e.g. as the fp32 baseline.
        float_dtype: ``torch.float16`` writes the unquantized remainder in float16 with float16 Q/DQ scales (opset
            >= 19), for TensorRT 11's strongly typed builds (:mod:`qdq.onnx.float16`: every scale must be an exact
            float16 value, see ``round_scales_to_float16``); ``None`` or ``torch.float32``: float32.
        kwargs: passed to ``torch.onnx.export``.
    """
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int, got {opset!r}")
    if opset < 13:
        raise ValueError(f"opset {opset} cannot express per-channel Q/DQ; use opset >= 13")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"export_onnx: {path} is a folder; give the path of the .onnx file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    half = _float16_requested(float_dtype)
    if quantize:
        check_exportable(model)
        if half:
            from qdq.onnx.float16 import scale_problems

            problems = scale_problems(model)
            if problems:
                raise ExportError("cannot export with float16 scales (call qdq.onnx.float16.round_scales_to_float16("
                                  "model) after calibration, or export in float32):\n  " + "\n  ".join(problems))
    if isinstance(args, torch.Tensor):
        args = (args,)
    exporter = "dynamo" if dynamo else "torchscript"
    tags, specs = _format_tags(model) if quantize else ({}, {})
    opset = _export_opset(opset, (s.format for s in specs.values()), half)
    traced_opset = _traced_opset(opset, dynamo)
    with export_mode(model, quantize=quantize, tags=tags), torch.no_grad(), _no_fused_attention():
        try:
            _torch_export(model, args, path, traced_opset, input_names, output_names, dynamic_batch, dynamo, kwargs)
        except ExportError:
            raise
        except Exception as err:
            raise ExportError(f"the {exporter} exporter failed on {type(model).__name__}: {err}") from err
    onnx_model = _constants_to_initializers(onnx.load(str(path)))
    if traced_opset < opset:
        onnx_model = onnx.version_converter.convert_version(onnx_model, opset)
    if simplify:
        onnx_model = _simplify(onnx_model)
    if specs:
        export_formats.rewrite_formats(onnx_model, specs, deploy=deploy)
    if deploy:
        onnx_model = to_deploy_form(onnx_model)
    if half:
        from qdq.onnx.float16 import convert_to_float16

        try:
            convert_to_float16(onnx_model)
        except ValueError as err:
            raise ExportError(f"float16 conversion of {path}: {err}") from err
    onnx.save(onnx_model, str(path))
    try:
        onnx.checker.check_model(onnx_model)
    except onnx.checker.ValidationError as err:
        hint = (f" The dynamo exporter writes opset 18 and converts it to the opset asked for ({opset}); its "
                "conversion can leave newer attributes behind (Split's num_outputs): export with opset=18 or "
                "later." if dynamo and opset < 18 else "")
        raise ExportError(f"the {exporter} exporter wrote a file that fails the ONNX checker, kept at {path} for "
                          f"inspection: {str(err).splitlines()[0]}.{hint}") from err
    pairs = sum(1 for n in onnx_model.graph.node if n.op_type == "DequantizeLinear")
    opset_used = next((o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")), opset)
    info = ExportInfo(path=path, model=onnx_model, exporter=exporter, opset=opset_used, num_qdq_pairs=pairs,
                      deploy=deploy)
    logger.info("exported %s with the %s exporter: opset %d, %d Q/DQ pairs%s", path, exporter, opset_used, pairs,
                " (deploy form)" if deploy else "")
    return info


def _export_opset(opset: int, formats: Iterable[str], half: bool) -> int:
    """The opset the file is written in: ``opset``, raised (and logged) to what its FP8/INT4 Q/DQ or float16 scales
    need."""
    from qdq.onnx.float16 import FLOAT16_MIN_OPSET

    needs = {f"{f} Q/DQ": export_formats.MIN_OPSETS[f] for f in formats}
    if half:
        needs["float16 scales"] = FLOAT16_MIN_OPSET
    what, needed = max(needs.items(), key=lambda item: item[1], default=("", opset))
    if needed > opset:
        logger.info("%s need opset %d: exporting with opset %d instead of %d", what, needed, needed, opset)
        return needed
    return opset


def _traced_opset(opset: int, dynamo: bool) -> int:
    """The opset torch traces in: the TorchScript exporter writes opset <= 20 (opset 21, int4 Q/DQ, only adds types
    to the ops it changes; the file is converted afterwards)."""
    return opset if dynamo else min(opset, 20)


def _float16_requested(float_dtype: Any) -> bool:
    if float_dtype is None or float_dtype == torch.float32:
        return False
    if float_dtype == torch.float16:
        return True
    raise ValueError(f"export_onnx: float_dtype must be torch.float16, torch.float32 or None, got {float_dtype!r}")


def _format_tags(model: nn.Module) -> tuple[dict[int, float], dict[float, "export_formats.FormatSpec"]]:
    """Tag scales for the FP8/INT4 quantizers (``{id(q): tag}``) and what each tag becomes (``{tag: spec}``).

    A tag is ``(1 + k + i) * TAG_STEP`` in float32, with ``k`` chosen so that no other quantizer exports with one of
    those values as its per-tensor scale (so a tagged QuantizeLinear cannot be mistaken for another's).
    """
    special: dict[int, tuple[str, TensorQuantizer]] = {}
    others: set[float] = set()
    for name, q in quantizers(model):
        if not q.is_enabled:
            continue
        if export_formats.format_of(q) in ("fp8", "int4"):
            special.setdefault(id(q), (name, q))
        elif q.scale is not None and q.scale.numel() == 1:
            others.add(float(q.scale.float().reshape(())))
    if not special:
        return {}, {}
    offset = 0
    while any(float(np.float32((1 + offset + i) * TAG_STEP)) in others for i in range(len(special))):
        offset += len(special)
    tags, specs = {}, {}
    for i, (key, (name, q)) in enumerate(special.items()):
        tag = float(np.float32((1 + offset + i) * TAG_STEP))
        tags[key] = tag
        specs[tag] = export_formats.format_spec(name, q)
    return tags, specs


def export_onnx_distributed(
    model: nn.Module,
    args: Any,
    path: str | os.PathLike,
    *,
    group: ProcessGroup | None = None,
    **kwargs: Any,
) -> ExportInfo | None:
    """:func:`export_onnx` on the group's rank 0 only, the other ranks waiting; call it on every rank.

    The model must be identical on every rank (it is, after a distributed calibration and under DDP); pass the
    unwrapped model (``ddp.module``). Rank 0 writes ``path``; the other ranks write nothing and wait until it is
    written (or failed), so when the call returns the file is complete (on rank 0's file system). An export error
    is raised on every rank, naming rank 0. Set the process group timeout above the export time.

    Args:
        model, args, path, kwargs: as for :func:`export_onnx`.
        group: the process group (default: the whole world).

    Returns:
        The :class:`ExportInfo` on rank 0, ``None`` on the other ranks. In a single process it is :func:`export_onnx`.

    Example (one process):
        >>> import tempfile, os, torch
        >>> import qdq
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> _ = qdq.replace_to_quantization_module(model)
        >>> _ = qdq.calibrate_model(model, [torch.randn(8, 4)], progress=False)
        >>> info = export_onnx_distributed(model, torch.randn(1, 4), os.path.join(tempfile.mkdtemp(), "m.onnx"))
        >>> info.num_qdq_pairs
        2
    """
    work = functools.partial(export_onnx, model, args, path, **kwargs)
    return run_on_rank0(work, group=group, what=f"export_onnx to {path}")


def _tagged_export_args(export_args: dict[str, Any]) -> tuple[int, tuple, tuple | None, bool, dict[str, Any]]:
    """``export_onnx``'s keywords for the tagged export: (opset, input names, output names, dynamic batch, the
    rest for ``torch.onnx.export``), with ``export_onnx``'s defaults (the tagged export names no outputs)."""
    args = dict(export_args)
    for own in ("deploy", "simplify", "quantize"):  # export_onnx's post-processing: no bearing on the traced graph
        args.pop(own, None)
    half = _float16_requested(args.pop("float_dtype", None))
    opset = args.pop("opset", 17)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 13:
        raise ValueError(f"export_with_quantizer_tags: opset must be an int >= 13, got {opset!r}")
    opset = _export_opset(opset, (), half)  # as export_onnx raises it; FP8/INT4 once the quantizers are known
    input_names = tuple(args.pop("input_names", ("input",)))
    output_names = args.pop("output_names", None)
    output_names = tuple(output_names) if output_names else None
    return opset, input_names, output_names, bool(args.pop("dynamic_batch", False)), args


def export_with_quantizer_tags(
    model: nn.Module,
    args: Any,
    path: str | os.PathLike,
    dynamo: bool = False,
    export_fn: Any = None,
    **export_args: Any,
) -> dict[str, str]:
    """Exports ``model`` with a distinct scale per enabled quantizer and maps each QuantizeLinear back to its
    quantizer: returns ``{Q node name: quantizer name}``.

    Works before calibration (no amax needed) and with either exporter, because the mapping reads the scales, not
    node or initializer names (which exporters rename). ``export_args`` are the keywords of your
    :func:`export_onnx` call (``opset``, ``input_names``, ``output_names``, ``dynamic_batch`` and
    ``torch.onnx.export``'s own), so the graph read is the graph you export. ``export_fn(model, path)``, when
    given, replaces the built-in export: it must run ``torch.onnx.export`` on the model as it finds it (quantizers
    already in export mode). Everything is restored afterwards.
    """
    opset, input_names, output_names, dynamic_batch, kwargs = _tagged_export_args(export_args)
    name_quantizers(model)
    unique: dict[int, tuple[str, TensorQuantizer]] = {}
    for name, q in quantizers(model):
        if q.is_enabled:
            unique.setdefault(id(q), (name, q))
    tags = {i + 1: entry for i, entry in enumerate(unique.values())}
    if isinstance(args, torch.Tensor):
        args = (args,)
    with preserved_modes(model, quantizer_states=False):
        try:
            model.eval()
            for tag, (_, q) in tags.items():
                q.set_export_mode(True, scale=tag * TAG_STEP)
            with torch.no_grad(), _no_fused_attention():
                if export_fn is not None:
                    export_fn(model, str(path))
                else:
                    formats = {export_formats.format_of(q) for _, q in tags.values()} & {"fp8", "int4"}
                    traced_opset = _traced_opset(_export_opset(opset, formats, False), dynamo)  # as export_onnx
                    _torch_export(model, args, Path(path), traced_opset, input_names, output_names, dynamic_batch,
                                  dynamo, kwargs)
        finally:
            for _, q in tags.values():
                q.set_export_mode(False)
    onnx_model = onnx.load(str(path), load_external_data=False)
    consts = _constant_values(onnx_model)
    mapping: dict[str, str] = {}
    for index, node in enumerate(onnx_model.graph.node):
        if node.op_type != "QuantizeLinear" or node.input[1] not in consts:
            continue
        scale = consts[node.input[1]].reshape(-1)
        tag = int(round(float(scale[0]) / TAG_STEP))
        if tag in tags and float(scale[0]) == np.float32(tag * TAG_STEP):
            mapping[node.name or f"<QuantizeLinear #{index}>"] = tags[tag][0]
    missing = sorted(name for name, _ in tags.values() if name not in set(mapping.values()))
    if missing:
        logger.info("%d quantizers have no QuantizeLinear in the export (not on the traced path?): %s",
                    len(missing), ", ".join(missing[:10]))
    return mapping
