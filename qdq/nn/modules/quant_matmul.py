"""Quantized matrix products: a MatMul of two activations, and scaled dot-product attention with both MatMuls
quantized as TensorRT's fused attention wants them.

TensorRT fuses an attention block (``softmax(Q @ K^T * scale + mask) @ V``) into one INT8 kernel only when both
MatMuls read all their inputs from DequantizeLinear: Q/DQ on Q, on K^T, on the softmax output and on V, the mask
``Add`` and the softmax in float. :class:`QuantScaledDotProductAttention` computes attention in exactly that form,
with four quantizers (``q_bmm_quantizer``, ``k_bmm_quantizer``, ``softmax_quantizer``, ``v_bmm_quantizer``), so the
exported graph is ``DQ -> MatMul -> Mul -> Add -> Softmax -> Q/DQ -> MatMul <- DQ``.

Placement: TensorRT runs INT8 fused attention only for sequence lengths up to 512 and needs the MatMuls' K and N
dimensions (head size and key length) of at least 16. A block outside those limits stays in float: the first call
that sees such shapes replaces the block's four quantizers by disabled ones (both MatMuls together, never one of
them; new objects, so that no saved switch state brings them back) and logs a warning naming the block and the
reason; :attr:`QuantScaledDotProductAttention.float_reason` keeps it.

Example:
    >>> import torch
    >>> from qdq import nn as quant_nn
    >>> attn = quant_nn.QuantScaledDotProductAttention()
    >>> q, k, v = torch.randn(3, 2, 4, 20, 16).unbind(0)          # (batch, heads, length, head size)
    >>> out = attn(q, k, v)
    >>> out.shape, attn.float_reason
    (torch.Size([2, 4, 20, 16]), '')
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    >>> bool((out - ref).abs().max() < 0.1)                      # 8-bit dynamic fake quantization
    True
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from qdq.nn.modules._utils import _eager
from qdq.nn.modules.tensor_quantizer import TensorQuantizer
from qdq.math.descriptor import QUANT_DESC_8BIT_PER_TENSOR, QuantDescriptor

__all__ = ["QuantMatMul", "QuantScaledDotProductAttention", "MAX_INT8_ATTENTION_LENGTH", "MIN_ATTENTION_DIM"]

logger = logging.getLogger(__name__)

#: Longest sequence TensorRT runs INT8 fused attention for.
MAX_INT8_ATTENTION_LENGTH = 512
#: Smallest K and N of an attention MatMul (head size, key length) TensorRT quantizes.
MIN_ATTENTION_DIM = 16


def _check_desc(value, what: str) -> QuantDescriptor:
    if not isinstance(value, QuantDescriptor):
        raise TypeError(f"{what} must be a QuantDescriptor, got {type(value).__name__}")
    return value


class QuantMatMul(nn.Module):
    """``torch.matmul(a, b)`` on fake-quantized inputs (``input_quantizer`` for ``a``, ``other_quantizer`` for ``b``).

    For MatMuls of two activations that are not attention (attention MatMuls belong to
    :class:`QuantScaledDotProductAttention`, which places them as a pair).

    >>> mm = QuantMatMul()
    >>> mm(torch.ones(2, 3), torch.ones(3, 4)).shape
    torch.Size([2, 4])
    """

    default_quant_desc_input = QUANT_DESC_8BIT_PER_TENSOR

    @classmethod
    def set_default_quant_desc_input(cls, value: QuantDescriptor) -> None:
        cls.default_quant_desc_input = _check_desc(value, f"{cls.__name__} default input descriptor")

    def __init__(self, quant_desc_input: QuantDescriptor | None = None):
        super().__init__()
        desc = _check_desc(quant_desc_input or type(self).default_quant_desc_input, "quant_desc_input")
        self._input_quantizer = TensorQuantizer(desc)
        self._other_quantizer = TensorQuantizer(desc)

    input_quantizer = property(lambda self: self._input_quantizer)
    other_quantizer = property(lambda self: self._other_quantizer)

    def forward(self, input: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self._input_quantizer(input), self._other_quantizer(other))


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype, allowed_when_true: bool = True) -> torch.Tensor | None:
    """An attention mask as the float tensor added to the scores: a boolean mask becomes 0 where attention is
    allowed and -inf elsewhere (``allowed_when_true`` says what ``True`` means: SDPA's convention, or
    ``nn.MultiheadAttention``'s opposite one); a float mask is returned as it is (in ``dtype``).

    >>> additive_mask(torch.tensor([True, False]), torch.float32)
    tensor([0., -inf])
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        blocked = ~mask if allowed_when_true else mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(blocked, float("-inf"))
    return mask.to(dtype)


def _scaled(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """``scores * scale``, in place in eager execution: the scores are the MatMul's own new tensor, which its
    gradient does not need, so no copy of the ``(length, length)`` scores is made."""
    return scores.mul_(scale) if _eager() else scores * scale


def _plus(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``scores + mask`` (the additive mask), in place in eager execution where the sum has the scores' shape."""
    if _eager() and torch.broadcast_shapes(scores.shape, mask.shape) == scores.shape:
        return scores.add_(mask)
    return scores + mask


class QuantScaledDotProductAttention(nn.Module):
    """``F.scaled_dot_product_attention`` with both MatMuls quantized for TensorRT (see the module docstring).

    Args:
        quant_desc_input: descriptor of the four quantizers (default :attr:`default_quant_desc_input`).
        max_length: longest query or key length quantized (TensorRT: 512).
        min_dim: smallest head size and key length quantized (TensorRT: 16).

    ``forward`` takes the arguments of ``F.scaled_dot_product_attention``; :meth:`bmm1` and :meth:`bmm2` are the
    two MatMuls alone, for attention code that computes the softmax itself.
    """

    default_quant_desc_input = QUANT_DESC_8BIT_PER_TENSOR
    set_default_quant_desc_input = QuantMatMul.set_default_quant_desc_input

    def __init__(self, quant_desc_input: QuantDescriptor | None = None, max_length: int = MAX_INT8_ATTENTION_LENGTH,
                 min_dim: int = MIN_ATTENTION_DIM):
        super().__init__()
        desc = _check_desc(quant_desc_input or type(self).default_quant_desc_input, "quant_desc_input")
        self._desc = desc
        self._q_bmm_quantizer = TensorQuantizer(desc)
        self._k_bmm_quantizer = TensorQuantizer(desc)
        self._softmax_quantizer = TensorQuantizer(desc)
        self._v_bmm_quantizer = TensorQuantizer(desc)
        self.max_length = int(max_length)
        self.min_dim = int(min_dim)
        self.float_reason = ""

    q_bmm_quantizer = property(lambda self: self._q_bmm_quantizer)
    k_bmm_quantizer = property(lambda self: self._k_bmm_quantizer)
    softmax_quantizer = property(lambda self: self._softmax_quantizer)
    v_bmm_quantizer = property(lambda self: self._v_bmm_quantizer)

    def quantizers(self) -> tuple[TensorQuantizer, ...]:
        return self._q_bmm_quantizer, self._k_bmm_quantizer, self._softmax_quantizer, self._v_bmm_quantizer

    _NAMES = ("_q_bmm_quantizer", "_k_bmm_quantizer", "_softmax_quantizer", "_v_bmm_quantizer")

    def place(self, q_len: int, kv_len: int, head_dim: int) -> bool:
        """Whether attention of these sizes runs in INT8; the first time it cannot, the four quantizers are
        replaced by disabled ones (a warning says why). Shapes are Python integers: nothing synchronises with the
        device."""
        if self.float_reason:
            return False
        if max(q_len, kv_len) > self.max_length:
            reason = f"sequence length {max(q_len, kv_len)} > {self.max_length}"
        elif min(head_dim, kv_len) < self.min_dim:
            reason = f"MatMul K or N ({'head size' if head_dim < self.min_dim else 'key length'} " \
                     f"{min(head_dim, kv_len)}) < {self.min_dim}"
        else:
            return True
        label = self._label()
        self.float_reason = reason
        for attr in self._NAMES:
            old = getattr(self, attr)
            new = TensorQuantizer(self._desc, disabled=True)  # holds no tensor: passes its input through
            new.name = old.name
            setattr(self, attr, new)
        logger.warning("%s: attention left in float (%s): TensorRT runs INT8 fused attention only for sequence "
                       "length <= %d and head size, key length >= %d", label, reason, self.max_length,
                       self.min_dim)
        return False

    def _label(self) -> str:
        name = self._q_bmm_quantizer.name
        return f"attention {name.rsplit('.', 1)[0]!r}" if name else "attention (unnamed)"

    def bmm1(self, q: torch.Tensor, k_t: torch.Tensor) -> torch.Tensor:
        """``q @ k_t`` (``k_t`` is K transposed: ``(..., head size, key length)``) on quantized inputs."""
        if self.place(q.shape[-2], k_t.shape[-1], q.shape[-1]):
            q, k_t = self._q_bmm_quantizer(q), self._k_bmm_quantizer(k_t)
        return torch.matmul(q, k_t)

    def bmm2(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``probs @ v`` (``probs`` the softmax output) on quantized inputs."""
        if self.place(probs.shape[-2], v.shape[-2], v.shape[-1]):
            probs, v = self._softmax_quantizer(probs), self._v_bmm_quantizer(v)
        return torch.matmul(probs, v)

    def attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, attention probabilities)``; the arguments are those of ``F.scaled_dot_product_attention``."""
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        scores = _scaled(self.bmm1(query, key.transpose(-2, -1)), scale)
        if is_causal:
            causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
            scores = _plus(scores, additive_mask(causal, scores.dtype))
        mask = additive_mask(attn_mask, scores.dtype)
        if mask is not None:
            scores = _plus(scores, mask)
        probs = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p)
        return self.bmm2(probs, value), probs

    def forward(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False) -> torch.Tensor:
        return self.attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)[0]

    def extra_repr(self) -> str:
        where = f", float ({self.float_reason})" if self.float_reason else ""
        return f"max_length={self.max_length}, min_dim={self.min_dim}{where}"
