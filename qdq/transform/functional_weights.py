"""Layers whose parent uses their weights functionally: converted to quantized layers, they would never run.

``nn.MultiheadAttention`` passes ``self.out_proj.weight`` to ``F.multi_head_attention_forward``; torchvision's
Swin passes ``self.qkv.weight`` and ``self.proj.weight`` to ``F.linear``. The child Linear module is never called,
so a quantizer put into it sees no data and calibration stops. :func:`functional_weight_users` finds such children
by reading the parent's ``forward`` source for ``self.<child>.weight``; the module map then leaves them in float and
says why (:func:`qdq.transform.replace.replace_to_quantization_module` lists them as not quantized), unless a forward
patch quantizes them where they are used (:mod:`qdq.transform.attention` does for attention blocks: a patched module lists
the children it routes in ``_qdq_routed_linears``).

Example:
    >>> from torch import nn
    >>> mha = nn.MultiheadAttention(8, 2)
    >>> functional_weight_users(mha)
    {'out_proj': ('', 'MultiheadAttention')}
"""

from __future__ import annotations

import functools
import inspect
import re

from torch import nn

__all__ = ["functional_weight_users", "functional_weight_names", "functional_user", "ROUTED_ATTR"]

#: Attribute of a patched module naming the children whose functional use the patch quantizes.
ROUTED_ATTR = "_qdq_routed_linears"

#: ``self.<child>.weight`` used as a tensor; reading its metadata (``.dtype``, ``.device``, ...) or testing its type
#: (``isinstance(self.<child>.weight, ...)``: transformers' T5 before it calls the child) is no use of the values.
_WEIGHT_USE = re.compile(r"(?<!isinstance\()self\.(\w+)\.weight\b(?!\s*\.\s*(?:(?:dtype|device|shape|ndim|is_cuda|"
                         r"requires_grad)\b|size\(|dim\(|numel\())")


@functools.lru_cache(maxsize=None)
def _names_in(function) -> frozenset[str]:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):  # built-in, or defined where the source is not available
        return frozenset()
    return frozenset(_WEIGHT_USE.findall(source))


def functional_weight_names(module: nn.Module, cls: type | None = None) -> frozenset[str]:
    """Names of the children whose ``.weight`` the module's own forward (an instance patch, else the forward of
    ``cls``, by default its class) reads, less the children a patch routes."""
    forward = module.__dict__.get("forward") or (cls or type(module)).forward
    return _names_in(getattr(forward, "__func__", forward)) - set(getattr(module, ROUTED_ATTR, ()))


def functional_user(model: nn.Module, path: str, class_of=None) -> tuple[str, str] | None:
    """``(parent path, parent class name)`` when the module at ``path`` is a child whose weight its parent's
    forward uses functionally, else ``None``. ``class_of(parent)`` may name the class the parent is about to get
    (a parent that will be quantized has its quantized class's forward)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if path else None
    if parent is None:
        return None
    cls = class_of(parent) if class_of is not None else None
    if name in functional_weight_names(parent, cls):
        return parent_path, type(parent).__name__
    return None


def functional_weight_users(model: nn.Module) -> dict[str, tuple[str, str]]:
    """``{child path: (parent path, parent class name)}`` for every child module of ``model`` whose weight its
    parent's forward uses without calling the child (children a forward patch routes are left out)."""
    found: dict[str, tuple[str, str]] = {}
    for path, parent in model.named_modules():
        for name in functional_weight_names(parent):
            child = parent._modules.get(name)
            if isinstance(child, nn.Module) and isinstance(getattr(child, "weight", None), nn.Parameter):
                found[f"{path}.{name}" if path else name] = (path, type(parent).__name__)
    return found
