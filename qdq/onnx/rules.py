"""ONNX-driven scale matching: make the quantizers that TensorRT needs with one scale share one quantizer.

TensorRT fuses a Concat, a MaxPool, a residual Add or a fan-out only when the Q/DQ pairs around it carry the same
scale; otherwise it inserts requantization (reformat) layers and loses about 15% of the speed. Which quantizers
must agree is a property of the graph, so the rules read it from an export:

1. export the model to a temporary ONNX file (``tempfile``, removed afterwards) with every quantizer given a
   distinct scale, which identifies each QuantizeLinear's quantizer whatever the exporter names nodes and
   initializers (:func:`~qdq.onnx.export.export_with_quantizer_tags`);
2. group the QuantizeLinear nodes that must share a scale (:func:`qdq.onnx.check.quantize_groups`: Concat inputs and
   outputs, nested concats, MaxPool and other ops that commute with quantization, tensors read by several
   quantizers, both inputs of an Add);
3. in each group, the quantizer whose QuantizeLinear comes first in the graph becomes the *major* and every other
   one is replaced by it: the modules hold the same quantizer object, as pytorch_quantization-era code did with
   ``sub._input_quantizer = major._input_quantizer``.

Sharing is done before calibration, and that is the intended order: the shared quantizer then calibrates on every
tensor of its group, so its amax covers them all. Applied after calibration, the shared quantizer takes the largest
amax of its group (nothing is clipped that was not clipped before), and a log line says so.

Under torch.distributed the step is a collective (every rank of ``group`` calls it): only the group's rank 0
exports the model and reads the graph, the pairs are broadcast and every rank applies them to its own model, so
every rank ends with the same sharing. The other ranks wait for the broadcast; an error on rank 0 is raised on every
rank. Only rank 0 writes a file, into its own :func:`tempfile.TemporaryDirectory`.

Manual pairs (``extra_pairs``) name modules: ``(major, sub)`` makes ``sub``'s input quantizer(s) (``_input_quantizer``
or, for a QuantAdd, every ``_input{i}_quantizer``) the major's input quantizer; a path may also name a
TensorQuantizer directly.

Example:
    >>> import torch
    >>> import qdq
    >>> from qdq import nn as quant_nn
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = quant_nn.QuantConv2d(3, 4, 1), quant_nn.QuantConv2d(3, 4, 1)
    ...         self.head = quant_nn.QuantConv2d(8, 2, 1)
    ...     def forward(self, x):
    ...         return self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))
    >>> model = Block()
    >>> pairs = apply_custom_rules_to_quantizer(model, torch.randn(1, 3, 4, 4))
    >>> pairs
    [('a._input_quantizer', 'b._input_quantizer')]
    >>> model.a._input_quantizer is model.b._input_quantizer
    True
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import onnx
import torch
from torch import nn

from qdq.distributed import run_on_rank0
from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.onnx.check import quantize_groups
from qdq.onnx.export import export_with_quantizer_tags
from qdq.transform.replace import name_quantizers

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["find_quantizer_pairs", "apply_custom_rules_to_quantizer", "share_quantizer"]

logger = logging.getLogger(__name__)


def _scope_name(node_name: str) -> str:
    """pytorch_quantization-era guess of a quantizer from a TorchScript node name
    (``/layer1/layer1.0/conv1/_input_quantizer/QuantizeLinear`` -> ``layer1.0.conv1._input_quantizer``)."""
    parts = [p for p in node_name.split("/") if p][:-1]
    return parts[-2] + "." + parts[-1] if len(parts) >= 2 else node_name


def find_quantizer_pairs(
    onnx_model: onnx.ModelProto | str | Path, q_names: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """``(major, sub)`` pairs of quantizers that must share a scale, read from a QDQ ONNX model.

    ``q_names`` maps QuantizeLinear node names to quantizer names (as :func:`export_with_quantizer_tags` returns);
    without it the names are guessed from TorchScript scope names. Nodes of one group that map to one quantizer
    (already shared) give no pair.
    """
    pairs = []
    for group in quantize_groups(onnx_model):
        names = [q_names.get(n) if q_names is not None else _scope_name(n) for n in group]
        unknown = [n for n, name in zip(group, names) if name is None]
        if unknown:
            logger.warning("QuantizeLinear nodes %s map to no quantizer; left out of their group", unknown)
        names = list(dict.fromkeys(n for n in names if n is not None))  # unique, graph order
        pairs += [(names[0], sub) for sub in names[1:]]
    return pairs


def _quantizer_at(model: nn.Module, path: str, role: str) -> list[TensorQuantizer]:
    """The input quantizer(s) a manual pair names (see the module docstring)."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"extra_pairs: the model has no module {path!r}") from None
    if isinstance(module, TensorQuantizer):
        return [module]
    if isinstance(getattr(module, "_input_quantizer", None), TensorQuantizer):
        return [module._input_quantizer]
    numbered = [q for name, q in module.named_children() if name.startswith("_input") and isinstance(q, TensorQuantizer)]
    if not numbered:
        raise ValueError(f"extra_pairs: {role} {path!r} ({type(module).__name__}) has no input quantizer")
    return numbered[:1] if role == "major" else numbered


def share_quantizer(model: nn.Module, major: TensorQuantizer, sub: TensorQuantizer) -> int:
    """Makes every module attribute that holds ``sub`` hold ``major`` instead; returns how many were replaced.

    The descriptors must agree (bits, signedness, per-tensor, symmetry). If either already has an amax, the shared
    quantizer keeps the larger (elementwise) amax.
    """
    if major is sub:
        return 0
    for attr in ("num_bits", "unsigned", "axis", "narrow_range", "symmetric"):
        if getattr(major, attr) != getattr(sub, attr):
            raise ValueError(
                f"cannot share {sub.name or 'a quantizer'} with {major.name or 'a quantizer'}: {attr} differs "
                f"({getattr(sub, attr)} vs {getattr(major, attr)})"
            )
    if sub.amax is not None:
        merged = sub.amax if major.amax is None else torch.maximum(major.amax.detach(), sub.amax.detach())
        if major.amax is None or not torch.equal(merged, major.amax.detach()):
            logger.info("%s takes amax %s from the group it now shares", major.name, merged.max().item())
        major.amax = merged
    replaced = 0
    for parent in model.modules():
        for attr, child in list(parent._modules.items()):
            if child is sub:
                setattr(parent, attr, major)
                replaced += 1
    return replaced


def _graph_pairs(
    model: nn.Module,
    example_inputs: Any,
    export_fn: Callable[[nn.Module, str], Any] | None,
    dynamo: bool,
    export_args: dict[str, Any],
) -> list[tuple[str, str]]:
    """Exports ``model`` with quantizer tags into a temporary file and reads the pairs that must share a scale."""
    with tempfile.TemporaryDirectory(prefix="qdq-rules-") as tmp:
        path = Path(tmp) / "rules.onnx"
        q_names = export_with_quantizer_tags(model, example_inputs, path, dynamo=dynamo, export_fn=export_fn,
                                             **export_args)
        onnx_model = onnx.load(str(path), load_external_data=False)
    return find_quantizer_pairs(onnx_model, q_names)


def apply_custom_rules_to_quantizer(
    model: nn.Module,
    example_inputs: Any = None,
    export_fn: Callable[[nn.Module, str], Any] | None = None,
    extra_pairs: Iterable[Sequence[str]] = (),
    dynamo: bool = False,
    *,
    group: ProcessGroup | None = None,
    placement: bool = True,
    export_args: Mapping[str, Any] | None = None,
) -> list[tuple[str, str]]:
    """Finds the quantizers that must share a scale (from an export of ``model``) and makes them share.

    First, unless ``placement=False``, the automatic placement (:func:`qdq.onnx.placement.place_quantizers`) inserts
    the quantizers TensorRT needs on inline residual adds, concats and poolings.

    Args:
        model: a model with quantizers (calibrated or not; see the module docstring for the order).
        example_inputs: an input for the export (a tensor or a tuple); not needed when ``export_fn`` is given. A
            callable here is taken as ``export_fn`` (pytorch_quantization-era scripts call
            ``apply_custom_rules_to_quantizer(model, export_onnx)``).
        export_fn: ``export_fn(model, path)`` running ``torch.onnx.export`` itself, for models that need special
            export arguments (the quantizers are already in export mode when it is called).
        extra_pairs: manual ``(major, sub)`` module paths, applied after the graph's pairs.
        dynamo: export with the dynamo exporter.
        group: under torch.distributed, the process group (default: the whole world): its rank 0 exports, every rank
            applies the pairs. Ignored in a single process.
        placement: run the automatic Q/DQ placement first (see above).
        export_args: the keywords of your :func:`~qdq.onnx.export.export_onnx` call (``opset``, ``input_names``,
            ``output_names``, ``dynamic_batch``, ``torch.onnx.export``'s own), so the graph analysed is the graph
            you export; default ``export_onnx``'s defaults.

    Returns:
        The ``(major, sub)`` quantizer names that were made to share (the same on every rank).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_custom_rules_to_quantizer takes an nn.Module, got {type(model).__name__}")
    if callable(example_inputs) and export_fn is None:  # the seed scripts' signature: (model, export_onnx)
        example_inputs, export_fn = None, example_inputs
    if example_inputs is None and export_fn is None:
        raise ValueError("apply_custom_rules_to_quantizer needs example_inputs (or an export_fn) to export the model")
    export_args = dict(export_args or {})
    dynamo = bool(export_args.pop("dynamo", dynamo))  # export_onnx's own keyword, as the user's call has it
    if placement:
        from qdq.onnx.placement import place_quantizers

        place_quantizers(model, example_inputs, export_fn, dynamo, group=group, export_args=export_args)
    pairs = run_on_rank0(
        _graph_pairs, model, example_inputs, export_fn, dynamo, export_args,
        group=group, broadcast_result=True, what="apply_custom_rules_to_quantizer (export and graph analysis)",
    )
    named = {name: q for name, q in model.named_modules() if isinstance(q, TensorQuantizer)}
    unknown = sorted({name for pair in pairs for name in pair if name not in named})
    if unknown:
        raise ValueError(
            f"the exported graph names quantizers this model does not have: {', '.join(unknown[:10])} "
            "(under torch.distributed: is the model built the same way on every rank?)"
        )
    applied = []
    for major_name, sub_name in pairs:
        major, sub = named[major_name], named[sub_name]
        try:
            if share_quantizer(model, major, sub):
                applied.append((major_name, sub_name))
                logger.info("Rules: %s match to %s", sub_name, major_name)
        except ValueError as err:
            logger.warning("Rules: %s", err)
    for pair in extra_pairs:
        major_path, sub_path = pair
        major = _quantizer_at(model, major_path, "major")[0]
        for sub in _quantizer_at(model, sub_path, "sub"):
            if share_quantizer(model, major, sub):
                applied.append((major_path, sub_path))
                logger.info("Rules (manual): %s match to %s", sub_path, major_path)
    name_quantizers(model)
    return applied
