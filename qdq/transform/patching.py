"""Forward patches: give matching modules quantized ops (``addop = QuantAdd(...)``) and a forward that uses them.

Quantized layers cover convs, linears and pools; the adds and concats that a block writes as ``x + y`` or
``torch.cat`` need the block's forward rewritten to call a :class:`~qdq.nn.QuantAdd` / :class:`~qdq.nn.QuantConcat`
instead. A :class:`ForwardPatch` says which modules to patch, which op modules to add to them and the new forward.

Patches are per instance (the class is untouched, so other models and other instances keep their forward), are
reversible (:func:`remove_patch`), and applying a patch twice patches once: the new forward never calls itself.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from qdq import nn as quant_nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = nn.Conv2d(4, 4, 3, padding=1)
    ...     def forward(self, x):
    ...         return x + self.conv(x)
    >>> def block_forward(self, x):
    ...     return self.addop(x, self.conv(x))
    >>> patch = ForwardPatch("residual-add", match=Block, forward=block_forward,
    ...                      ops={"addop": lambda block: quant_nn.QuantAdd(shared=True)})
    >>> model = nn.Sequential(Block(), Block())
    >>> apply_patch(model, patch)
    ['0', '1']
    >>> apply_patch(model, patch)                   # already patched: nothing happens
    []
    >>> model(torch.randn(1, 4, 5, 5)).shape
    torch.Size([1, 4, 5, 5])
    >>> remove_patch(model, patch), hasattr(model[0], "addop")
    (['0', '1'], False)
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field
from typing import Callable, Union

from torch import nn

from qdq.transform.replace import module_device, name_quantizers

__all__ = ["ForwardPatch", "apply_patch", "remove_patch", "patched_modules"]

logger = logging.getLogger(__name__)

Matcher = Union[type, tuple, Callable[[str, nn.Module], bool]]


@dataclass(frozen=True)
class ForwardPatch:
    """A forward rewrite for the modules a matcher selects.

    Args:
        name: identifies the patch (a module records the names of the patches it carries).
        match: a class (or tuple of classes) matched with ``isinstance``, or ``(path, module) -> bool``.
        forward: the new ``forward(self, *args, **kwargs)``.
        ops: ``{attribute: factory(module) -> nn.Module | None}``; each module gets these submodules (a factory
            returning ``None`` adds nothing, for blocks whose flag says they have no add, say).
    """

    name: str
    match: Matcher
    forward: Callable
    ops: dict[str, Callable[[nn.Module], nn.Module | None]] = field(default_factory=dict)

    def matches(self, path: str, module: nn.Module) -> bool:
        if isinstance(self.match, (type, tuple)):
            return isinstance(module, self.match)
        return bool(self.match(path, module))


_MARK = "_qdq_patches"


def patched_modules(model: nn.Module, patch: ForwardPatch | None = None) -> list[str]:
    """Paths of the modules carrying ``patch`` (any patch when ``None``)."""
    return [
        path
        for path, m in model.named_modules()
        if getattr(m, _MARK, None) and (patch is None or patch.name in getattr(m, _MARK))
    ]


def apply_patch(model: nn.Module, patch: ForwardPatch) -> list[str]:
    """Patches every matching module of ``model`` (the root included) not yet carrying ``patch``.

    Returns the paths patched. A module already carrying another patch that replaced its forward is an error:
    two forward rewrites of one module cannot both hold.
    """
    if not isinstance(model, nn.Module) or not isinstance(patch, ForwardPatch):
        raise TypeError(f"apply_patch takes an nn.Module and a ForwardPatch, got {type(model).__name__} and "
                        f"{type(patch).__name__}")
    done = []
    for path, module in list(model.named_modules()):
        if not patch.matches(path, module):
            continue
        marks = getattr(module, _MARK, {})
        if patch.name in marks:
            continue
        if marks:
            raise ValueError(f"{path or type(module).__name__} already carries the forward patch {sorted(marks)}; "
                             f"cannot apply {patch.name!r} on top")
        added = []
        for attr, factory in patch.ops.items():
            if hasattr(module, attr):
                raise ValueError(f"{path or type(module).__name__} already has an attribute {attr!r}; "
                                 f"patch {patch.name!r} would overwrite it")
            op = factory(module)
            if op is not None:
                device = module_device(module)
                module.add_module(attr, op if device is None else op.to(device))
                added.append(attr)
        module.forward = types.MethodType(patch.forward, module)
        object.__setattr__(module, _MARK, {patch.name: added})
        done.append(path)
    if done:
        name_quantizers(model)
        logger.info("patch %r applied to %d modules", patch.name, len(done))
    return done


def remove_patch(model: nn.Module, patch: ForwardPatch) -> list[str]:
    """Undoes :func:`apply_patch`: the class forward comes back and the added op modules go."""
    undone = []
    for path, module in list(model.named_modules()):
        marks = getattr(module, _MARK, None)
        if not marks or patch.name not in marks:
            continue
        for attr in marks[patch.name]:
            delattr(module, attr)
        module.__dict__.pop("forward", None)
        object.__delattr__(module, _MARK)
        undone.append(path)
    return undone
