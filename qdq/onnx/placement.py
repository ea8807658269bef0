"""Automatic Q/DQ placement for TensorRT: quantizers on the adds, concats and poolings of any model, no recipe.

``replace_to_quantization_module`` quantizes the inputs and weights of convs, linears and pooling modules. TensorRT
also needs Q/DQ where a forward adds, concatenates or average-pools tensors inline, or it runs those ops in float
and inserts reformat layers around them. :func:`place_quantizers` decides where from the model's own graph, with no
model-specific code, and inserts the quantizers into the PyTorch model (so QAT trains with the quantization the
exported file has):

1. **Find and probe the op sites**, in one export. The model is exported with every quantizer tagged by a
   distinct scale (:func:`~qdq.onnx.export.export_with_quantizer_tags`) while :mod:`qdq.transform.op_sites` watches the
   forward: each inline add, concat and average pooling met (by module, call instruction and its execution in
   that call of the forward: an add in a loop is one site per iteration) gets a temporary
   *probe* quantizer with a tag of its own on every input, so each probe's QuantizeLinear says which site input it
   is, whatever the exporter names things. A tensor that an earlier site's probe read already (DenseNet's concats
   take every earlier feature map again) reuses that probe's output instead of adding one more pair; each site keeps
   at least one probe of its own, so the set of probes feeding a node still says which site it is. Nothing is
   traced symbolically, so models torch.fx cannot trace work the same; what is needed is that the model exports
   to ONNX.
2. **Take the probes out** of the graph again, which leaves the graph the model has without placement, each site
   input labelled.
3. **Decide**, on that graph, TensorRT's fusion rules:

   * **residual Add** (two activations, each computed from the model's inputs: a bias or mask built from
     constants and shapes alone is no activation; the mask or bias added to attention scores, between the first
     attention MatMul and its Softmax, stays float as TensorRT's fused attention takes it): when one input comes
     from a quantized Conv/ConvTranspose/Gemm (through BatchNormalization; a MatMul with its bias Add) read by
     nothing else, the *other* input is quantized - TensorRT fuses the add into that conv's INT8 kernel. When
     both do, the shallower one (the shortcut) is quantized; when neither does, both are (an INT8 elementwise add).
     An input that already comes from a DequantizeLinear (through ops that commute with quantization) is left as
     it is.
   * **Concat**: when some inputs come from a DequantizeLinear and others do not, the others are quantized.
     (A Concat whose output is quantized needs nothing: TensorRT moves that Q before the Concat.)
   * **average pooling** (AveragePool, GlobalAveragePool, ReduceMean from functional calls): its input is quantized
     when its output reaches a QuantizeLinear through ops that commute with quantization, so that TensorRT runs it
     in INT8 between the two.
   * everything else (the Mul of SiLU, squeeze-excitation gating, LayerNorm, Softmax) is left in float, where
     TensorRT runs it anyway.

   A chosen input that some quantizer already reads (a fan-out, the identity of a residual block read by the next
   conv) takes that quantizer itself: one scale per tensor.
4. **Insert** a :class:`~qdq.nn.TensorQuantizer` per chosen input, as a submodule of the module whose forward makes
   the call, named ``_<kind><i>_input<j>_quantizer`` (``_add0_input1_quantizer``: input 1 of the module's first
   add). They calibrate, train, save and export like every other quantizer.

Which quantizers must then share one scale (Concat groups, commuting ops, fan-outs, both inputs of an INT8 add) is
the job of :func:`~qdq.onnx.rules.apply_custom_rules_to_quantizer`, which runs this pass first by default
(``placement=True``). Recipes (``qdq.rules``) and ``QuantAdd``/``QuantConcat`` forward patches applied before take
precedence: their quantizers are in the graph already, and the pass only adds what is still missing.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from qdq import nn as quant_nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv1 = quant_nn.QuantConv2d(4, 4, 3, padding=1)
    ...         self.conv2 = quant_nn.QuantConv2d(4, 4, 3, padding=1)
    ...     def forward(self, x):
    ...         return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)
    >>> model = Block()
    >>> report = place_quantizers(model, torch.randn(1, 4, 8, 8))
    >>> [(p.quantizer, p.reason) for p in report.placed]
    [('_add0_input1_quantizer', 'add: conv2 fuses')]
    >>> model._add0_input1_quantizer is model.conv1._input_quantizer   # x is read by conv1 already: one scale
    True
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import onnx
import torch
from torch import nn

from qdq.distributed import run_on_rank0
from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.onnx.check import _Index
import numpy as np

from qdq.onnx.export import TAG_STEP, _constant_values, export_with_quantizer_tags
from qdq.onnx.fusion import _feeds_q, _fusible
from qdq.transform.op_sites import OpSite, record_sites, remove_site_quantizers, set_site_quantizer, site_quantizers
from qdq.transform.replace import name_quantizers
from qdq.transform.switches import quantizers
from qdq.math.descriptor import QuantDescriptor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["place_quantizers", "remove_placement", "PlacementReport", "Placed", "decide_placement"]

logger = logging.getLogger(__name__)

_PROBE = "_qdq_probe"
_POOLS = ("AveragePool", "GlobalAveragePool", "ReduceMean")


@dataclass(frozen=True)
class Placed:
    """One quantizer the pass inserted.

    Attributes:
        owner: path of the module holding it (``""``: the root).
        quantizer: its attribute name on the owner.
        kind, slot: the site's kind (``add``, ``cat``, ``pool``) and which of its inputs it quantizes.
        reason: why, in a few words.
        shares: the existing quantizer it is (it reads the same tensor), or ``""`` for a new one.
    """

    owner: str
    quantizer: str
    kind: str
    slot: int
    reason: str
    shares: str = ""

    @property
    def path(self) -> str:
        return f"{self.owner}.{self.quantizer}" if self.owner else self.quantizer


@dataclass
class PlacementReport:
    """What :func:`place_quantizers` did: the sites it saw, the quantizers it placed, and how long it took."""

    sites: int = 0
    placed: list[Placed] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        shared = sum(1 for p in self.placed if p.shares)
        return (f"placement: {len(self.placed)} quantizers on {self.sites} op sites ({shared} sharing an existing "
                f"quantizer) in {self.seconds:.2f} s")


# --------------------------------------------------------------------------------------------------------------------
# The graph side: take the probes out and decide
# --------------------------------------------------------------------------------------------------------------------


def _strip_probes(
    model: onnx.ModelProto, probe_of: dict[str, str],
) -> tuple[onnx.ModelProto, dict[tuple[int, int], str]]:
    """The model without the probe Q/DQ pairs, and ``{(node index, input slot): probe}`` of the inputs they fed.

    ``probe_of`` maps QuantizeLinear node names to probe names.
    """
    graph = model.graph
    q_out: dict[str, tuple[str, str]] = {}
    for index, node in enumerate(graph.node):
        name = node.name or f"<QuantizeLinear #{index}>"
        if node.op_type == "QuantizeLinear" and name in probe_of:
            q_out[node.output[0]] = (node.input[0], probe_of[name])
    alias: dict[str, tuple[str, str]] = {}
    drop = set()
    for index, node in enumerate(graph.node):
        if node.op_type == "QuantizeLinear" and node.output[0] in q_out:
            drop.add(index)
        elif node.op_type == "DequantizeLinear" and node.input[0] in q_out:
            alias[node.output[0]] = q_out[node.input[0]]
            drop.add(index)
    clean = onnx.ModelProto()
    clean.CopyFrom(model)
    del clean.graph.node[:]
    edges: dict[tuple[int, int], str] = {}
    for index, node in enumerate(graph.node):
        if index in drop:
            continue
        new = clean.graph.node.add()
        new.CopyFrom(node)
        for slot, name in enumerate(new.input):
            if name in alias:
                source, probe = alias[name]
                while source in alias:
                    source = alias[source][0]
                new.input[slot] = source
                edges[(len(clean.graph.node) - 1, slot)] = probe
    for out in clean.graph.output:
        if out.name in alias:  # a probe DQ as graph output: keep the float tensor's name readable
            out.name = alias[out.name][0]
    return clean, edges


def _depths(ix: _Index) -> dict[str, int]:
    """Longest path (in nodes) from the graph inputs to each tensor."""
    depth: dict[str, int] = {}
    for node in ix.nodes:
        d = 1 + max((depth.get(t, 0) for t in node.inputs if t and t not in ix.constants), default=0)
        for out in node.outputs:
            depth[out] = d
    return depth


def _short(name: str) -> str:
    return name.split("/")[-2] if name.count("/") >= 2 else name


def decide_placement(
    model: onnx.ModelProto, probe_of: dict[str, str], q_names: dict[str, str],
) -> list[tuple[tuple[tuple[int, str], ...], int, str, str]]:
    """The site inputs to quantize, from a probed export: ``[(labels, slot, reason, quantizer to share or "")]``.

    ``labels`` is the node's ``((input slot, probe), ...)``, sorted: the probes that fed it, which say which site it
    is (a probe read by several sites labels each of their nodes); ``slot`` the input to quantize.

    Args:
        model: the ONNX model exported with probes and tags.
        probe_of: QuantizeLinear node name -> probe name, for the probes.
        q_names: QuantizeLinear node name -> quantizer name, for every tagged node.
    """
    clean, edges = _strip_probes(model, probe_of)
    ix = _Index(clean, "")
    depth = _depths(ix)
    slots_of: dict[int, dict[int, str]] = defaultdict(dict)
    for (index, slot), probe in edges.items():
        slots_of[index][slot] = probe
    keep: dict[tuple[int, int], str] = {}
    for index, slots in sorted(slots_of.items()):
        node = ix.nodes[index]
        if (node.op == "Add" and len(node.inputs) == 2 and node.name not in ix.attention_scores
                and all(t in ix.activations for t in node.inputs)):
            quantized = [ix.dq_source(t) is not None for t in node.inputs]
            if all(quantized):
                continue
            fused = [_fusible(ix, t) for t in node.inputs]
            if any(quantized):
                j = quantized.index(False)
                want = {} if fused[j] else {j: "add: other input quantized"}
            elif fused[0] and fused[1]:
                j = 0 if depth.get(node.input(0), 0) < depth.get(node.input(1), 0) else 1
                want = {j: f"add: {_short(fused[1 - j])} fuses"}
            elif fused[0] or fused[1]:
                j = 0 if not fused[0] else 1
                want = {j: f"add: {_short(fused[1 - j])} fuses"}
            else:
                want = {0: "add: int8 elementwise", 1: "add: int8 elementwise"}
        elif node.op == "Concat":
            quantized = [ix.dq_source(t) is not None for t in node.inputs]
            want = ({j: "concat: other inputs quantized" for j, q in enumerate(quantized) if not q}
                    if any(quantized) else {})
        elif node.op in _POOLS:
            want = ({0: f"pool: {node.op} in int8"} if ix.dq_source(node.input(0)) is None
                    and _feeds_q(ix, node.output(0)) else {})
        else:
            want = {}
        for j, reason in want.items():
            if j in slots:
                keep[(index, j)] = reason
    out = []
    for (index, slot), reason in keep.items():
        tensor = ix.nodes[index].input(slot)
        readers = [n for n, _ in ix.consumers.get(tensor, []) if n.is_q and (ix.scale_size(n) or 1) == 1]
        shares = next((q_names[n.name] for n in readers if n.name in q_names), "")
        out.append((tuple(sorted(slots_of[index].items())), slot, reason, shares))
    return out


# --------------------------------------------------------------------------------------------------------------------
# The model side
# --------------------------------------------------------------------------------------------------------------------


class _Probe(nn.Module):
    """A probe on one site input: a tagged Q/DQ pair, or an earlier probe's output for a tensor it already read.

    ``seen`` (shared by the probes of one export) maps ``(id, version)`` of an input tensor to ``(tensor, output,
    label)``; ``fresh`` holds the sites that have a probe of their own in the current call (the probes of a site run
    one after the other, first to last). The last probe of a site whose other inputs all reused quantizes anyway,
    so every site has one. ``label`` is the probe whose Q/DQ pair the input ends up in. The tagged quantizer is
    made only when needed: made inside the export's trace, each costs milliseconds.
    """

    reuse = True  # False: a pair on every input, as without the reuse (the tests compare the two)

    def __init__(self, name: str, scale: float, site: tuple, first: bool, last: bool, seen: dict, fresh: set):
        super().__init__()
        self.name, self.scale, self.site, self.first, self.last = name, scale, site, first, last
        self.seen, self.fresh = seen, fresh
        self.label = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:  # (an exporter may run the forward more than once)
            self.fresh.discard(self.site)
        key = (id(x), getattr(x, "_version", None))
        hit = self.seen.get(key)
        if self.reuse and hit is not None and hit[0] is x and not (self.last and self.site not in self.fresh):
            self.label = hit[2]
            return hit[1]
        quantizer = TensorQuantizer().to(x.device)
        quantizer.set_export_mode(True, scale=self.scale)
        out = quantizer(x)
        self.seen[key] = (x, out, self.name)
        self.fresh.add(self.site)
        self.label = self.name
        return out


def _attr(site: OpSite, slot: int) -> str:
    return f"_{site.kind}{site.index}_input{slot}_quantizer"


def _placed_slots(model: nn.Module) -> set[tuple[str, str]]:
    return {(owner, attr) for owner, _, _, attr in site_quantizers(model)}


def _analyse(
    model: nn.Module, example_inputs: Any, export_fn: Callable | None, dynamo: bool, skip: Sequence[str],
    export_args: dict[str, Any],
) -> tuple[int, list[tuple[str, tuple, str, int, int, str, str]]]:
    """Records the sites, probes them in a tagged export and decides; returns ``(number of sites, decisions)``
    where each decision is ``(owner, key, kind, index, slot, reason, shares)`` (plain data, for a broadcast)."""
    skip = tuple(skip)
    placed = _placed_slots(model)
    probes: dict[str, tuple[OpSite, int]] = {}
    attrs: set[str] = set()
    tag_of: dict[int, str] = {}
    first_tag = 1 + len({id(q) for _, q in quantizers(model) if q.is_enabled})  # after the real quantizers' tags
    seen: dict[tuple, tuple] = {}
    fresh: set[tuple] = set()
    site_probes: dict[tuple, list[_Probe]] = {}

    def probe(site: OpSite, owner: nn.Module, device: torch.device) -> None:
        """Puts a tagged probe on every input of a site met during the export (so one trace finds and probes)."""
        if any(fnmatch(site.owner, pattern) for pattern in skip):
            return
        slots = [slot for slot in range(site.num_inputs if site.kind != "pool" else 1)
                 if (site.owner, _attr(site, slot)) not in placed]
        for slot in slots:
            attr = f"{_PROBE}{len(attrs)}"
            name = f"{site.owner}.{attr}" if site.owner else attr
            tag = first_tag + len(attrs)
            quantizer = _Probe(name, tag * TAG_STEP, (site.owner, site.key), slot == slots[0], slot == slots[-1],
                               seen, fresh)
            site_probes.setdefault((site.owner, site.key), []).append(quantizer)
            set_site_quantizer(owner, site.key, site.kind, slot, attr, quantizer)
            attrs.add(attr)
            probes[name] = (site, slot)
            tag_of[tag] = name

    with tempfile.TemporaryDirectory(prefix="qdq-placement-") as tmp:
        path = Path(tmp) / "placement.onnx"
        box: dict[str, dict[str, str]] = {}

        def export() -> None:
            box["q_names"] = export_with_quantizer_tags(model, example_inputs, path, dynamo=dynamo,
                                                        export_fn=export_fn, **export_args)

        try:
            sites = record_sites(model, run=export, on_site=probe)
            onnx_model = onnx.load(str(path), load_external_data=False)
        finally:
            remove_site_quantizers(model, attrs)
            seen.clear()  # (the tensors of the trace)
    # each site by the probes its node reads: its own and those it reused
    site_by_labels = {}
    for quantizers_of_site in site_probes.values():
        labels = tuple(sorted((probes[q.name][1], q.label) for q in quantizers_of_site))
        site_by_labels[labels] = probes[quantizers_of_site[0].name][0]
    q_names = dict(box["q_names"])
    consts = _constant_values(onnx_model)
    for index, node in enumerate(onnx_model.graph.node):
        if node.op_type == "QuantizeLinear" and node.input[1] in consts:
            scale = float(consts[node.input[1]].reshape(-1)[0])
            tag = int(round(scale / TAG_STEP))
            if tag in tag_of and scale == float(np.float32(tag * TAG_STEP)):
                q_names[node.name or f"<QuantizeLinear #{index}>"] = tag_of[tag]
    sites = [s for s in sites if not any(fnmatch(s.owner, pattern) for pattern in skip)]
    probe_of = {node: name for node, name in q_names.items() if name in probes}
    real = {node: name for node, name in q_names.items() if name not in probes}
    decisions = []
    for labels, slot, reason, shares in decide_placement(onnx_model, probe_of, real):
        site = site_by_labels.get(labels)
        if site is None:  # the exporter merged or split a site's node: its own probe on that input still says
            own = probes[dict(labels)[slot]]
            if own[1] != slot:
                logger.warning("Placement: no site reads the probes %s; input %d left as it is",
                               [label for _, label in labels], slot)
                continue
            site = own[0]
        decisions.append((site.owner, site.key, site.kind, site.index, slot, reason, shares))
    return len(sites), decisions


def place_quantizers(
    model: nn.Module,
    example_inputs: Any = None,
    export_fn: Callable[[nn.Module, str], Any] | None = None,
    dynamo: bool = False,
    *,
    quant_desc: QuantDescriptor | None = None,
    skip: Iterable[str] = (),
    group: ProcessGroup | None = None,
    export_args: Mapping[str, Any] | None = None,
) -> PlacementReport:
    """Inserts the quantizers TensorRT needs on inline adds, concats and poolings (see the module docstring).

    Run it after ``replace_to_quantization_module`` (and any recipe), before calibration; then
    :func:`~qdq.onnx.rules.apply_custom_rules_to_quantizer` for the shared scales (which calls this pass itself
    unless told ``placement=False``). Running it again adds nothing that is already placed.

    Args:
        model: a model with quantizers.
        example_inputs: an input for the forward and the export (a tensor or a tuple).
        export_fn: ``export_fn(model, path)`` running ``torch.onnx.export`` itself (then ``example_inputs`` may be
            ``None``: the sites are found during one more export).
        dynamo: analyse a dynamo export instead of a TorchScript one.
        quant_desc: descriptor of the new quantizers (default: ``QuantConv2d``'s default input descriptor, so a
            calibration method set there applies to them too).
        skip: ``fnmatch`` patterns of module paths whose op sites get nothing.
        group: under torch.distributed, the process group: its rank 0 analyses, every rank inserts.
        export_args: the keywords of your :func:`~qdq.onnx.export.export_onnx` call (``opset``, ``input_names``,
            ``dynamic_batch``, ...), so the graph analysed is the graph you export.

    Returns:
        A :class:`PlacementReport`.
    """
    if example_inputs is None and export_fn is None:
        raise ValueError("place_quantizers needs example_inputs (or an export_fn) to run and export the model")
    if quant_desc is None:
        from qdq.nn import QuantConv2d

        quant_desc = QuantConv2d.default_quant_desc_input
    export_args = dict(export_args or {})
    dynamo = bool(export_args.pop("dynamo", dynamo))  # export_onnx's own keyword, as the user's call has it
    start = time.perf_counter()
    num_sites, decisions = run_on_rank0(
        _analyse, model, example_inputs, export_fn, dynamo, tuple(skip), export_args,
        group=group, broadcast_result=True, what="place_quantizers (export and graph analysis)",
    )
    name_quantizers(model)
    named = {name: q for name, q in model.named_modules() if isinstance(q, TensorQuantizer)}
    report = PlacementReport(sites=num_sites)
    for owner_path, key, kind, index, slot, reason, shares in decisions:
        owner = model.get_submodule(owner_path)
        attr = f"_{kind}{index}_input{slot}_quantizer"
        quantizer = named.get(shares) or TensorQuantizer(quant_desc)
        device = next((t.device for t in owner.parameters()), None) or next(
            (t.device for t in model.parameters()), None)
        if device is not None and not shares:
            quantizer = quantizer.to(device)
        set_site_quantizer(owner, key, kind, slot, attr, quantizer)
        report.placed.append(Placed(owner_path, attr, kind, slot, reason, shares if shares in named else ""))
        logger.info("Placement: %s (%s)%s", f"{owner_path}.{attr}" if owner_path else attr, reason,
                    f", shares {shares}" if shares in named else "")
    name_quantizers(model)
    report.seconds = time.perf_counter() - start
    logger.info("%s", report)
    return report


def remove_placement(model: nn.Module) -> int:
    """Takes out every quantizer :func:`place_quantizers` inserted; returns how many."""
    removed = remove_site_quantizers(model)
    name_quantizers(model)
    return removed
