"""Quantized ``nn.MultiheadAttention``: input projections, output projection and both attention MatMuls.

``nn.MultiheadAttention`` hands its weights to ``F.multi_head_attention_forward`` (and, under ``torch.no_grad()``
in eval mode, to the fused ``aten::_native_multi_head_attention`` kernel), so quantizing its ``out_proj`` Linear
alone gives a quantizer that never runs. :class:`QuantMultiheadAttention` computes the same attention itself:

* the input projections on the quantized input (one ``input_quantizer`` shared by query, key and value: in
  self-attention they are one tensor) with the per-row quantized ``in_proj_weight`` (``weight_quantizer``; with
  separate ``kdim``/``vdim`` the three projection weights get ``weight_quantizer``, ``k_weight_quantizer`` and
  ``v_weight_quantizer``);
* both attention MatMuls through its ``attention`` child, a
  :class:`~qdq.nn.QuantScaledDotProductAttention` (the mask added in float, TensorRT's placement limits);
* the output projection by calling ``out_proj`` as a module, so a quantized ``out_proj`` (a ``QuantLinear`` after
  :func:`~qdq.transform.replace.replace_to_quantization_module`) runs where it belongs.

Masks, ``batch_first``, unbatched inputs, ``add_bias_kv``, ``add_zero_attn``, dropout, ``need_weights`` and
``average_attn_weights`` behave as in torch's module.

Example:
    >>> import torch
    >>> from qdq import nn as quant_nn
    >>> mha = quant_nn.QuantMultiheadAttention(32, 2, batch_first=True)
    >>> x = torch.randn(2, 20, 32)
    >>> out, weights = mha(x, x, x)
    >>> out.shape, weights.shape
    (torch.Size([2, 20, 32]), torch.Size([2, 20, 20]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qdq import tensor_quant
from qdq.nn.modules._utils import QuantMixin, _check_desc, _eager, pop_quant_desc_in_kwargs, split_quant_kwargs
from qdq.nn.modules.quant_matmul import QuantScaledDotProductAttention, additive_mask
from qdq.nn.modules.tensor_quantizer import TensorQuantizer

__all__ = ["QuantMultiheadAttention"]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of a ``(length, batch, features)`` tensor that is the transposed view of a contiguous
    ``(batch, length, features)`` one (``batch_first``): computed on the contiguous view and transposed back.

    On a non-contiguous 3-D input torch's linear runs a batched matmul with the weight expanded per position, 1.5x
    slower on CPU than the one GEMM it runs on a contiguous input; the values are the same products.
    """
    if x.dim() == 3 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous() and _eager():
        return F.linear(x.transpose(0, 1), weight, bias).transpose(0, 1)
    return F.linear(x, weight, bias)


class QuantMultiheadAttention(QuantMixin, nn.MultiheadAttention):
    """:class:`torch.nn.MultiheadAttention` with quantized projections and attention MatMuls (module docstring).

    Takes the arguments of ``nn.MultiheadAttention`` plus ``quant_desc_input`` / ``quant_desc_weight`` (the
    attention MatMuls use the input descriptor).
    """

    default_quant_desc_weight = tensor_quant.QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW

    def __init__(self, *args, **kwargs):
        quant, rest = split_quant_kwargs(kwargs)
        super().__init__(*args, **rest)
        self.init_quantizer(*pop_quant_desc_in_kwargs(type(self), **quant))

    def init_quantizer(self, quant_desc_input, quant_desc_weight, num_layers=None) -> None:
        _check_desc(quant_desc_input, "quant_desc_input")
        _check_desc(quant_desc_weight, "quant_desc_weight")
        self._input_quantizer = TensorQuantizer(quant_desc_input)
        self._weight_quantizer = TensorQuantizer(quant_desc_weight)
        if not self._qkv_same_embed_dim:
            self._k_weight_quantizer = TensorQuantizer(quant_desc_weight)
            self._v_weight_quantizer = TensorQuantizer(quant_desc_weight)
        self.attention = QuantScaledDotProductAttention(quant_desc_input)

    @property
    def k_weight_quantizer(self) -> TensorQuantizer:
        return self._k_weight_quantizer

    @property
    def v_weight_quantizer(self) -> TensorQuantizer:
        return self._v_weight_quantizer

    def _projections(self, query, key, value):
        """q, k, v projected, each ``(length, batch, embed_dim)``."""
        x_q = self._input_quantizer(query)
        x_k = x_q if key is query else self._input_quantizer(key)
        x_v = x_k if value is key else self._input_quantizer(value)
        e = self.embed_dim
        b_q, b_k, b_v = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.split(e)
        if self._qkv_same_embed_dim:
            weight = self._weight_quantizer(self.in_proj_weight)
            if key is query and value is key:  # self-attention: one packed projection, one MatMul
                return _linear(x_q, weight, self.in_proj_bias).unflatten(-1, (3, e)).unbind(-2)
            w_q, w_k, w_v = weight.split(e)
        else:
            w_q = self._weight_quantizer(self.q_proj_weight)
            w_k = self._k_weight_quantizer(self.k_proj_weight)
            w_v = self._v_weight_quantizer(self.v_proj_weight)
        return _linear(x_q, w_q, b_q), _linear(x_k, w_k, b_k), _linear(x_v, w_v, b_v)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:  # keep identities: self-attention passes one tensor three times
            same_k, same_v = key is query, value is key
            query = query.transpose(0, 1)
            key = query if same_k else key.transpose(0, 1)
            value = key if same_v else value.transpose(0, 1)
        tgt_len, bsz, _ = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = self._projections(query, key, value)
        mask = additive_mask(attn_mask, q.dtype, allowed_when_true=False)
        if mask is None and is_causal:
            mask = additive_mask(torch.ones(tgt_len, k.shape[0], dtype=torch.bool, device=q.device).triu(1),
                                 q.dtype, allowed_when_true=False)
        padding = additive_mask(key_padding_mask, q.dtype, allowed_when_true=False)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, bsz, -1)])
            v = torch.cat([v, self.bias_v.expand(1, bsz, -1)])
            mask = None if mask is None else F.pad(mask, (0, 1))
            padding = None if padding is None else F.pad(padding, (0, 1))
        # (length, batch, embed) -> (batch, heads, length, head_dim)
        q = q.reshape(tgt_len, bsz, heads, head_dim).permute(1, 2, 0, 3)
        k = k.reshape(k.shape[0], bsz, heads, head_dim).permute(1, 2, 0, 3)
        v = v.reshape(v.shape[0], bsz, heads, head_dim).permute(1, 2, 0, 3)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, heads, 1, head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(bsz, heads, 1, head_dim)], dim=2)
            mask = None if mask is None else F.pad(mask, (0, 1))
            padding = None if padding is None else F.pad(padding, (0, 1))
        if mask is not None and mask.dim() == 3:  # (batch * heads, L, S)
            mask = mask.reshape(bsz, heads, tgt_len, -1)
        if padding is not None:
            padding = padding.reshape(bsz, 1, 1, -1)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        out, probs = self.attention.attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        if self.batch_first and batched and _eager():
            # (batch, length, embed) directly: contiguous as torch's fused kernel returns it (the residual add and
            # LayerNorm after it run on a contiguous tensor), one copy fewer than through (length, batch, embed)
            out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim))
        else:
            out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim))
            if self.batch_first and batched:
                out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        weights = probs.mean(dim=1) if average_attn_weights else probs
        return out, (weights if batched else weights.squeeze(0))
