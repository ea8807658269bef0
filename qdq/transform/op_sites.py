"""Quantizers on the tensor ops a forward writes inline (``x + y``, ``torch.cat``, functional average pooling).

Quantized layers cover modules; a residual add or a concatenation written in a block's ``forward`` has no module to
replace. :class:`~qdq.transform.patching.ForwardPatch` rewrites such a forward by hand; this module does it without touching
the code: an *op site* is one call of an add, concat or average-pooling function in one module's forward, identified
by the module (the nearest ``self`` that is an ``nn.Module`` up the Python stack) and the exact call instruction
(code object and bytecode offset of every frame up to that module's forward, so ``a + b + c`` is two sites and a
helper function called from two places is two sites). While a module with sites runs, a
:class:`torch.overrides.TorchFunctionMode` passes the chosen inputs of its sites through
:class:`~qdq.nn.TensorQuantizer` submodules of that module: the quantizers are ordinary submodules (calibrated,
exported, saved in ``state_dict`` and shared like any other), so training, calibration and export all see the same
quantization.

Which sites get quantizers is decided by the graph-side placement pass (:func:`qdq.onnx.placement.place_quantizers`);
:func:`set_site_quantizer` and :func:`remove_site_quantizers` are the low-level means it uses.

Each execution of a call instruction within one call of its module's forward is a site of its own (the instruction
and how many times it ran before in that call), so an add inside a loop (HRNet's fusion of its branches, ``for
block in blocks: x = x + block(x)``) gets its quantizers per iteration, each with its own scale; a module called
twice runs its sites twice, as it runs its other quantizers. The mode is entered by forward hooks of the modules
that own sites, so calling such a module on its own works too. Code compiled
with ``torch.compile`` is not supported (the site lookup reads Python frames).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from qdq.nn import TensorQuantizer
    >>> class Block(nn.Module):
    ...     def forward(self, x, y):
    ...         return x + y
    >>> block = Block()
    >>> sites = record_sites(block, (torch.ones(2), torch.ones(2)))
    >>> [(s.kind, s.num_inputs) for s in sites]
    [('add', 2)]
    >>> q = TensorQuantizer()
    >>> q.amax = 1.0
    >>> set_site_quantizer(block, sites[0].key, "add", 1, "_add0_input1_quantizer", q)
    >>> block(torch.zeros(1), torch.tensor([0.3]))     # input 1 fake-quantized with amax 1: 38/127
    tensor([0.2992])
    >>> remove_site_quantizers(block)
    1
    >>> block(torch.zeros(1), torch.tensor([0.3]))
    tensor([0.3000])
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.transform.switches import preserved_modes

__all__ = ["OpSite", "record_sites", "set_site_quantizer", "remove_site_quantizers", "site_quantizers", "SITE_KINDS"]

logger = logging.getLogger(__name__)

_T = torch.Tensor
_KINDS: dict[Any, str] = {}
for _f in (torch.add, _T.add, _T.__add__, _T.__radd__):
    _KINDS[_f] = "add"
for _f in (_T.add_, _T.__iadd__):
    _KINDS[_f] = "add_"
for _f in (torch.cat, torch.concat, torch.concatenate):
    _KINDS[_f] = "cat"
for _f in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
           F.adaptive_avg_pool3d, torch.mean, _T.mean):
    _KINDS[_f] = "pool"

#: The op kinds a site can be: ``add`` (two tensors summed; in-place adds too), ``cat`` (a concatenation of a
#: sequence), ``pool`` (functional average pooling and ``mean``; input 0 only).
SITE_KINDS = ("add", "cat", "pool")

_SITES_ATTR = "_qdq_sites"  # {key: (kind, {slot: attribute})} on the owning module
_MAX_DEPTH = 12  # frames walked from the op up to its module's forward
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_TORCH_NN_DIR = os.path.join(_TORCH_DIR, "nn") + os.sep
_MODULE_FILE = nn.Module.__call__.__code__.co_filename if hasattr(nn.Module.__call__, "__code__") else ""


@dataclass(frozen=True)
class OpSite:
    """One op call found by :func:`record_sites`.

    Attributes:
        owner: dotted path of the module whose forward makes the call (``""`` for the root).
        key: identifies the call instruction within that module and the execution of it in one call of the
            module's forward (plain, picklable data).
        kind: one of :data:`SITE_KINDS`.
        index: the site's position among its owner's sites of the same kind, in first-call order.
        num_inputs: number of tensor inputs at the first call.
    """

    owner: str
    key: tuple
    kind: str
    index: int
    num_inputs: int


def _call_site(frame) -> tuple[nn.Module | None, tuple | None]:
    chain = []
    for _ in range(4 * _MAX_DEPTH):
        if frame is None or len(chain) >= _MAX_DEPTH:
            break
        code = frame.f_code
        # torch's dispatch plumbing (overrides, export/fx/dynamo handlers) differs between eager runs and exports:
        # it is not part of a call site (torch.nn's functional and module code is)
        entry = (code.co_filename, code.co_firstlineno, code.co_name, frame.f_lasti)
        # ... and a functional re-entered once per active torch-function mode (exports stack them) is one frame
        if not (code.co_filename.startswith(_TORCH_DIR) and not code.co_filename.startswith(_TORCH_NN_DIR)) and (
                not chain or chain[-1] != entry):
            chain.append(entry)
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module):
            # a helper method of the same module, called from its forward: the caller's frames tell the calls apart
            frame = frame.f_back
            # (a wrapper that runs nested in itself - transformers' checkpointing wrapper of a layer's forward, under
            # torch.export - is one frame, as a functional re-entered above is)
            while (frame is not None and len(chain) < _MAX_DEPTH and frame.f_code.co_filename != _MODULE_FILE
                   and frame.f_locals.get("self") is owner):
                entry = (frame.f_code.co_filename, frame.f_code.co_firstlineno, frame.f_code.co_name, frame.f_lasti)
                if not chain or chain[-1] != entry:
                    chain.append(entry)
                frame = frame.f_back
            return owner, tuple(chain)
        frame = frame.f_back
    return None, None


def _tensor_inputs(kind: str, args: tuple, kwargs: dict) -> list:
    if kind == "cat":
        seq = args[0] if args else kwargs.get("tensors", ())
        return list(seq)
    if kind in ("add", "add_"):
        return [a for a in args[:2] if isinstance(a, torch.Tensor)] if len(args) >= 2 else []
    return [args[0]] if args and isinstance(args[0], torch.Tensor) else []


def _call(func, kind: str, args: tuple, kwargs: dict, quantizers: dict[int, Callable]) -> Any:
    if kind == "cat":
        seq = list(args[0] if args else kwargs.pop("tensors"))
        seq = [quantizers[i](t) if i in quantizers else t for i, t in enumerate(seq)]
        return func(seq, *args[1:], **kwargs)
    if kind in ("add", "add_"):
        if len(args) < 2 or not all(isinstance(a, torch.Tensor) for a in args[:2]):
            return func(*args, **kwargs)
        a, b = (quantizers[i](t) if i in quantizers else t for i, t in enumerate(args[:2]))
        if kind == "add_" and 0 in quantizers:
            return torch.add(a, b, *args[2:], **kwargs)  # the quantized copy cannot be added to in place
        return func(a, b, *args[2:], **kwargs)
    if 0 in quantizers and args and isinstance(args[0], torch.Tensor):
        args = (quantizers[0](args[0]),) + tuple(args[1:])
    return func(*args, **kwargs)


def _occurrence(owner: nn.Module, chain: tuple) -> int:
    """How many times the call instruction ``chain`` ran before in the current call of ``owner``'s forward (the
    counts start afresh in each call: :func:`_new_call`)."""
    calls = _local("calls", dict).setdefault(id(owner), {})
    n = calls.get(chain, 0)
    calls[chain] = n + 1
    return n


def _new_call(module: nn.Module) -> None:
    _local("calls", dict)[id(module)] = {}


_warned_extra: set[tuple] = set()


def _site_of(owner: nn.Module, sites: dict, key: tuple):
    site = sites.get(key)
    if site is not None:
        return site
    chain, n = key
    site = sites.get(chain)  # sites set before executions were counted: one site for every execution
    if site is None and n > 0 and (chain, 0) in sites and (id(owner), chain) not in _warned_extra:
        _warned_extra.add((id(owner), chain))
        logger.warning("%s: an op with site quantizers ran %d or more times in one forward, more often than when its "
                       "sites were placed; the further calls run unquantized (place the sites again: "
                       "qdq.onnx.placement.place_quantizers)", type(owner).__name__, n + 1)
    return site


class _SiteMode(TorchFunctionMode):
    """Applies the site quantizers of whichever module issues an op; records sites while :func:`record_sites`
    runs (one mode per thread at a time: see :func:`_enter`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        try:
            kind = _KINDS.get(func)
        except TypeError:  # an unhashable callable
            kind = None
        if kind is None:
            return func(*args, **kwargs)
        owner, chain = _call_site(sys._getframe(1))
        if owner is None:
            return func(*args, **kwargs)
        record = getattr(_state, "record", None)
        sites = owner.__dict__.get(_SITES_ATTR)
        if record is None and not sites:
            return func(*args, **kwargs)
        key = (chain, _occurrence(owner, chain))
        if record is not None:
            inputs = _tensor_inputs(kind, args, kwargs)
            # data only: under jit tracing, shape arithmetic (``H + pad``) runs on 0-dim integer tensors too
            if inputs and all(t.is_floating_point() and t.dim() > 0 for t in inputs):
                record(owner, key, "add" if kind == "add_" else kind, len(inputs), inputs[0].device)
            sites = owner.__dict__.get(_SITES_ATTR)  # the recording may have placed quantizers on this very call
        site = _site_of(owner, sites, key) if sites else None
        if site is None:
            return func(*args, **kwargs)
        quantizers = {slot: getattr(owner, attr) for slot, attr in site[1].items()}
        return _call(func, kind, args, kwargs, quantizers)


_state = threading.local()


def _local(name: str, factory: Callable[[], Any] = list) -> Any:
    """This thread's ``name`` (a stack of entries, or the execution counts), made by ``factory`` on first use."""
    found = getattr(_state, name, None)
    if found is None:
        found = factory()
        setattr(_state, name, found)
    return found


def _depth() -> int:
    return len(_local("entered"))


def _enter(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a module with sites: a new call (its ops' executions counted afresh); the mode is entered
    unless it is active already."""
    _new_call(module)
    pushed = None
    if getattr(_state, "mode", None) is None:
        pushed = _state.mode = _SiteMode()
        pushed.__enter__()
    _local("entered").append((module, pushed))


def _pop_entry(name: str, module: nn.Module):
    """The entry ``module``'s pre-hook pushed, or None when it pushed none (a hook added during its forward)."""
    stack = _local(name)
    if stack and stack[-1][0] is module:
        return stack.pop()[1]
    return None


def _exit(module: nn.Module, args: Any, output: Any) -> None:
    pushed = _pop_entry("entered", module)
    if pushed is not None:
        _state.mode = None
        pushed.__exit__(None, None, None)


_current_mode = getattr(torch.overrides, "_get_current_function_mode", None)
_LIBRARY_PREFIXES = ("torch.nn.", "qdq.")
_library_classes: dict[type, bool] = {}


def _library_subtree(module: nn.Module) -> bool:
    """Whether every module under ``module`` runs a forward of torch.nn or qdq (its class's, not patched on the
    instance): code that never calls a method of the module with the sites, so none of its ops is a site."""
    for m in module.modules():
        cls = type(m)
        known = _library_classes.get(cls)
        if known is None:
            known = _library_classes[cls] = getattr(cls.forward, "__module__", "").startswith(_LIBRARY_PREFIXES)
        if not known or "forward" in m.__dict__:
            return False
    return True


def _pause(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of the children of a module with sites: while a child whose ops cannot be sites runs
    (:func:`_library_subtree`), the mode steps aside, so that its many ops do not each pay a Python call. A module
    with sites further down enters a mode of its own (:func:`_enter`). Not while recording sites."""
    mode = getattr(_state, "mode", None)
    paused = None
    if (mode is not None and _current_mode is not None and getattr(_state, "record", None) is None
            and _current_mode() is mode and _library_subtree(module)):
        _state.mode = None
        mode.__exit__(None, None, None)
        paused = mode
    _local("paused").append((module, paused))


def _resume(module: nn.Module, args: Any, output: Any) -> None:
    paused = _pop_entry("paused", module)
    if paused is not None:
        paused.__enter__()
        _state.mode = paused


def _has_hooks(module: nn.Module) -> bool:
    return any(h is _enter for h in module._forward_pre_hooks.values())


def _add_hooks(module: nn.Module) -> None:
    if not _has_hooks(module):
        module.register_forward_pre_hook(_enter)
        module.register_forward_hook(_exit, always_call=True)
    for child in module.children():
        if not isinstance(child, TensorQuantizer) and not any(h is _pause for h in child._forward_pre_hooks.values()):
            child.register_forward_pre_hook(_pause)
            child.register_forward_hook(_resume, always_call=True)


def _remove_hooks(module: nn.Module) -> None:
    pairs = [(module, ((module._forward_pre_hooks, _enter), (module._forward_hooks, _exit)))]
    pairs += [(child, ((child._forward_pre_hooks, _pause), (child._forward_hooks, _resume)))
              for child in module.children()]
    for owner, kinds in pairs:
        for hooks, fn in kinds:
            for key in [k for k, h in hooks.items() if h is fn]:
                del hooks[key]
                getattr(owner, "_forward_hooks_always_called", {}).pop(key, None)


def record_sites(model: nn.Module, args: Any = None, kwargs: dict | None = None,
                 run: Callable[[], Any] | None = None,
                 on_site: Callable[[OpSite, nn.Module, torch.device], None] | None = None) -> list[OpSite]:
    """Runs ``model(*args)`` once (eval mode, no grad, every quantizer disabled; all restored), or ``run()`` when
    given (an export, say, left to set modes itself), and returns the op sites of ``model``'s modules it called, in
    first-call order.

    ``on_site(site, owner, device)`` is called when a site is first met, before the op runs: quantizers it places
    on the site (:func:`set_site_quantizer`) apply to that very call.
    """
    paths = {id(m): p for p, m in model.named_modules()}
    found: dict[tuple[int, tuple], OpSite] = {}
    counts: dict[tuple[int, str], int] = {}

    def record(owner: nn.Module, key: tuple, kind: str, num_inputs: int, device: torch.device) -> None:
        if id(owner) not in paths or (id(owner), key) in found:
            return
        index = counts.get((id(owner), kind), 0)
        counts[(id(owner), kind)] = index + 1
        site = found[(id(owner), key)] = OpSite(paths[id(owner)], key, kind, index, num_inputs)
        if on_site is not None:
            on_site(site, owner, device)

    if isinstance(args, torch.Tensor):
        args = (args,)
    qs = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    if getattr(_state, "record", None) is not None:
        raise RuntimeError("record_sites: already recording in this thread")
    with preserved_modes(model):
        _state.record = record
        token = object()  # the recording's own entry, apart from the model's hooks
        _enter(token, None)
        # every module call starts its ops' execution counts afresh, as the hooks of modules with sites do later
        calls_hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: _new_call(module))
        try:
            if run is not None:
                run()
            else:
                model.eval()
                for q in qs:
                    q.disable()
                with torch.no_grad():
                    model(*args, **(kwargs or {}))
        finally:
            calls_hook.remove()
            _local("calls", dict).clear()  # (keyed by module id: nothing kept for modules that may be gone)
            _exit(token, None, None)
            _state.record = None
    return list(found.values())


def set_site_quantizer(owner: nn.Module, key: tuple, kind: str, slot: int, attr: str,
                       quantizer: TensorQuantizer) -> None:
    """Makes input ``slot`` of the site ``key`` of ``owner`` go through ``quantizer``, held as ``owner.<attr>``."""
    if kind not in SITE_KINDS:
        raise ValueError(f"site kind must be one of {SITE_KINDS}, got {kind!r}")
    existing = owner._modules.get(attr)
    if attr in owner.__dict__ or (hasattr(owner, attr) and existing is None):
        raise ValueError(f"{type(owner).__name__} already has an attribute {attr!r}; cannot place a quantizer there")
    owner.add_module(attr, quantizer)
    sites = owner.__dict__.setdefault(_SITES_ATTR, {})
    sites.setdefault(key, (kind, {}))[1][slot] = attr
    _add_hooks(owner)


def site_quantizers(model: nn.Module) -> Iterator[tuple[str, str, int, str]]:
    """``(owner path, kind, slot, attribute)`` of every site quantizer of ``model``."""
    for path, module in model.named_modules():
        for key, (kind, slots) in module.__dict__.get(_SITES_ATTR, {}).items():
            for slot, attr in sorted(slots.items()):
                yield path, kind, slot, attr


def remove_site_quantizers(model: nn.Module, attrs: set[str] | None = None) -> int:
    """Removes site quantizers (all, or those held under the attribute names ``attrs``); returns how many."""
    removed = 0
    for module in model.modules():
        sites = module.__dict__.get(_SITES_ATTR)
        if not sites:
            continue
        for key in list(sites):
            kind, slots = sites[key]
            for slot, attr in list(slots.items()):
                if attrs is None or attr in attrs:
                    del slots[slot]
                    if attr in module._modules:
                        del module._modules[attr]
                    removed += 1
            if not slots:
                del sites[key]
        if not sites:
            del module.__dict__[_SITES_ATTR]
            _remove_hooks(module)
    return removed
