"""Attention MatMuls quantized in the attention blocks of transformer libraries (model transform, floor 4).

HuggingFace transformers (BERT, ViT, ...), timm (ViT, DeiT, Swin) and torchvision's Swin compute attention inside
their own modules with ``F.scaled_dot_product_attention``, ``torch.matmul`` or ``@``: there is no layer to swap.
:func:`quantize_attention` gives each such block a :class:`~qdq.nn.QuantScaledDotProductAttention` (``attn_quant``,
four quantizers placed for TensorRT's fused attention) and a forward patch that runs the block's own forward with
its attention routed through it:

* a call of ``F.scaled_dot_product_attention`` becomes the quantized attention;
* explicit MatMuls (``torch.matmul``, ``Tensor.matmul``, ``@``, ``torch.bmm``) are taken in pairs: the first of a
  pair is Q @ K^T (BMM1), the second softmax @ V (BMM2), as every supported block writes them;
* ``F.linear`` on the weight of a child Linear (torchvision's Swin: ``self.qkv.weight``, ``self.proj.weight``) runs
  with that child's quantizers, so those Linear layers are quantized where they are used.

The routing is a ``TorchFunctionMode`` entered for the block's forward only: no global function is replaced, the
block's class is untouched and other instances keep their forward. Which classes are attention blocks comes from
:data:`ATTENTION_CLASSES` (by module and class name, looked up only in libraries already imported) and from
HuggingFace's convention (a ``transformers`` class whose forward dispatches through ``ALL_ATTENTION_FUNCTIONS``);
:func:`register_attention_module` adds a class of your own.

``nn.MultiheadAttention`` is a layer of the module map instead (:class:`~qdq.nn.QuantMultiheadAttention`), and
``nn.TransformerEncoderLayer`` gets a patch that keeps it off torch's fused fast path (which would run its float
weights under ``torch.no_grad()`` and bypass every quantizer).

:func:`qdq.transform.replace.replace_to_quantization_module` calls :func:`quantize_attention` (``attention=True``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Attention(nn.Module):                       # a block of someone's own model
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.qkv = nn.Linear(32, 96)
    ...     def forward(self, x):
    ...         q, k, v = self.qkv(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4).unbind(0)
    ...         return nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    >>> register_attention_module(Attention)
    >>> model = nn.Sequential(Attention())
    >>> quantize_attention(model)
    ['0']
    >>> out = model(torch.randn(2, 20, 32))
    >>> model[0].attn_quant.q_bmm_quantizer.amax is None            # dynamic until calibrated
    True
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from qdq.transform.functional_weights import ROUTED_ATTR, functional_weight_names
from qdq.nn.modules.quant_matmul import QuantScaledDotProductAttention
from qdq.transform.patching import ForwardPatch, apply_patch, remove_patch
from qdq.transform.ignore_policy import compile_ignore_policy

__all__ = [
    "quantize_attention",
    "remove_attention_quantization",
    "register_attention_module",
    "attention_modules",
    "ATTENTION_CLASSES",
    "ATTENTION_PATCH",
    "ENCODER_LAYER_PATCH",
]

logger = logging.getLogger(__name__)

#: Attention blocks by ``(module, class name)``, found in the libraries a program has imported.
ATTENTION_CLASSES: list[tuple[str, str]] = [
    ("timm.layers.attention", "Attention"),
    ("timm.models.vision_transformer", "Attention"),
    ("timm.models.swin_transformer", "WindowAttention"),
    ("torchvision.models.swin_transformer", "ShiftedWindowAttention"),
    ("torchvision.models.swin_transformer", "ShiftedWindowAttentionV2"),
]

_registered: list[type] = []
_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm)


def register_attention_module(cls: type) -> None:
    """Makes :func:`quantize_attention` treat instances of ``cls`` (and subclasses) as attention blocks. Their
    forward must compute attention with ``F.scaled_dot_product_attention`` or with two MatMuls per attention (Q @
    K^T, then softmax @ V)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_attention_module takes an nn.Module subclass, got {cls!r}")
    if cls not in _registered:
        _registered.append(cls)


def _known_classes() -> tuple[type, ...]:
    found = list(_registered)
    for module_name, class_name in ATTENTION_CLASSES:
        module = sys.modules.get(module_name)  # only libraries the program imported
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def _is_transformers_attention(module: nn.Module) -> bool:
    return _dispatches_attention(type(module))


@functools.lru_cache(maxsize=None)
def _dispatches_attention(cls: type) -> bool:
    """A HuggingFace class whose forward calls the attention function of its config (ALL_ATTENTION_FUNCTIONS)."""
    if not cls.__module__.startswith("transformers."):
        return False
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _is_attention(path: str, module: nn.Module, known: tuple[type, ...] | None = None) -> bool:
    known = _known_classes() if known is None else known
    return isinstance(module, known) or _is_transformers_attention(module)


class _AttentionRouter(TorchFunctionMode):
    """Routes a block's attention ops through its quantized attention while its forward runs."""

    def __init__(self, attention: QuantScaledDotProductAttention, linears: dict[int, nn.Module]):
        super().__init__()
        self.attention = attention
        self.linears = linears
        self.after_bmm1 = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.attention(*args, **kwargs)
        if func in _MATMULS and len(args) == 2 and not kwargs:
            self.after_bmm1 = not self.after_bmm1
            return self.attention.bmm1(*args) if self.after_bmm1 else self.attention.bmm2(*args)
        if func is F.linear and self.linears:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            layer = self.linears.get(id(weight))
            if layer is not None and hasattr(layer, "_input_quantizer") and hasattr(layer, "_weight_quantizer"):
                x = args[0] if args else kwargs["input"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return F.linear(layer._input_quantizer(x), layer._weight_quantizer(weight), bias)
        return func(*args, **kwargs)


def _routed_forward(self, *args, **kwargs):
    linears = {id(getattr(self, name).weight): getattr(self, name) for name in getattr(self, ROUTED_ATTR)}
    with _AttentionRouter(self.attn_quant, linears):
        return type(self).forward(self, *args, **kwargs)


def _new_attention(module: nn.Module) -> QuantScaledDotProductAttention:
    routed = tuple(name for name in sorted(functional_weight_names(module))
                   if isinstance(module._modules.get(name), nn.Linear))
    object.__setattr__(module, ROUTED_ATTR, routed)
    return QuantScaledDotProductAttention()


#: The forward patch :func:`quantize_attention` gives attention blocks.
ATTENTION_PATCH = ForwardPatch("attention-matmuls", match=_is_attention, forward=_routed_forward,
                               ops={"attn_quant": _new_attention})


def _encoder_layer_forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    """``nn.TransformerEncoderLayer.forward`` without the fused fast path (its quantized layers run)."""
    x = src
    if self.norm_first:
        x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + self._ff_block(self.norm2(x))
    x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return self.norm2(x + self._ff_block(x))


#: Keeps ``nn.TransformerEncoderLayer`` on its module-by-module path.
ENCODER_LAYER_PATCH = ForwardPatch("encoder-layer-no-fastpath", match=nn.TransformerEncoderLayer,
                                   forward=_encoder_layer_forward)


def attention_modules(model: nn.Module) -> list[str]:
    """Paths of the modules :func:`quantize_attention` would patch (attention blocks of known classes)."""
    known = _known_classes()
    return [path for path, m in model.named_modules() if _is_attention(path, m, known)]


def quantize_attention(model: nn.Module, ignore_policy=None) -> list[str]:
    """Gives every attention block of ``model`` quantized MatMuls (see the module docstring); returns the paths
    patched. Blocks whose path the ignore policy (as in :func:`~qdq.transform.replace.replace_to_quantization_module`)
    matches stay in float. Applying it twice patches once; :func:`remove_attention_quantization` undoes it."""
    ignore = compile_ignore_policy(ignore_policy)
    known = _known_classes()

    def match(path: str, module: nn.Module) -> bool:
        return not ignore(path) and _is_attention(path, module, known)

    patch = ForwardPatch(ATTENTION_PATCH.name, match=match, forward=_routed_forward, ops=ATTENTION_PATCH.ops)
    done = apply_patch(model, patch)
    apply_patch(model, ForwardPatch(ENCODER_LAYER_PATCH.name, lambda p, m: not ignore(p) and isinstance(
        m, nn.TransformerEncoderLayer), _encoder_layer_forward))
    if done:
        logger.info("attention MatMuls quantized in %d blocks", len(done))
    return done


def remove_attention_quantization(model: nn.Module) -> list[str]:
    """Undoes :func:`quantize_attention` (the blocks get their own forward back)."""
    done = remove_patch(model, ATTENTION_PATCH)
    for _, module in model.named_modules():
        module.__dict__.pop(ROUTED_ATTR, None)
    remove_patch(model, ENCODER_LAYER_PATCH)
    return done
