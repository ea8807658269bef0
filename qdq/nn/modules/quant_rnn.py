"""Quantized LSTM and LSTM cell.

``QuantLSTMCell`` quantizes its input and hidden state with ``_input_quantizer`` (one scale for both, as
pytorch_quantization does) and ``weight_ih`` / ``weight_hh`` per row with ``_weight_quantizer``, then calls the
same ``lstm_cell`` op as :class:`torch.nn.LSTMCell`.

``QuantLSTM`` runs one fused LSTM op per layer so that each layer's input is quantized: ``_input_quantizers[l]``
quantizes the input of layer ``l`` (both directions read it), ``_weight_quantizers[l * D + d]`` the weights of layer
``l``, direction ``d`` (and ``_proj_weight_quantizers`` the projections when ``proj_size > 0``). The recurrent state
inside a layer stays in floating point: quantizing it would mean unrolling the sequence in Python. When no
quantizer is enabled the float ``nn.LSTM.forward`` runs, so the result is exactly the float one.

Example:
    >>> import torch
    >>> from qdq import nn as quant_nn
    >>> lstm = quant_nn.QuantLSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)
    >>> out, (h, c) = lstm(torch.randn(3, 5, 8))
    >>> out.shape, h.shape, len(lstm._input_quantizers), len(lstm._weight_quantizers)
    (torch.Size([3, 5, 32]), torch.Size([4, 3, 16]), 2, 4)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence

from qdq import tensor_quant
from qdq.nn.modules._utils import QuantMixin, pop_quant_desc_in_kwargs, split_quant_kwargs
from qdq.nn.modules.tensor_quantizer import TensorQuantizer

__all__ = ["QuantLSTM", "QuantLSTMCell", "LSTM", "LSTMCell"]


class QuantLSTMCell(QuantMixin, nn.LSTMCell):
    """:class:`torch.nn.LSTMCell` on fake-quantized input, hidden state and weights."""

    default_quant_desc_weight = tensor_quant.QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW

    def __init__(self, *args, **kwargs):
        quant, rest = split_quant_kwargs(kwargs)
        super().__init__(*args, **rest)
        self.init_quantizer(*pop_quant_desc_in_kwargs(type(self), **quant))

    def forward(self, input, hx=None):
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        q_in, q_w = self._input_quantizer, self._weight_quantizer
        # input and hidden state as one tensor, the two weights as one: one amax for each pair even before
        # calibration (the per-batch amax of the concatenation), as pytorch_quantization's fused cell
        n_in, n_h = input.size(1), hx[0].size(1)
        x, h0 = (t.contiguous() for t in q_in(torch.cat([input, hx[0]], 1)).split([n_in, n_h], 1))
        w_ih, w_hh = (t.contiguous() for t in q_w(torch.cat([self.weight_ih, self.weight_hh], 1)).split([n_in, n_h], 1))
        h, c = _VF.lstm_cell(x, (h0, hx[1]), w_ih, w_hh, self.bias_ih, self.bias_hh)
        if not is_batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c


class QuantLSTM(QuantMixin, nn.LSTM):
    """:class:`torch.nn.LSTM` with each layer's input and weights fake-quantized (see the module docstring)."""

    default_quant_desc_weight = tensor_quant.QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW

    def __init__(self, *args, **kwargs):
        quant, rest = split_quant_kwargs(kwargs)
        super().__init__(*args, **rest)
        self.init_quantizer(*pop_quant_desc_in_kwargs(type(self), **quant))

    def init_quantizer(self, quant_desc_input, quant_desc_weight, num_layers=None):
        """One input quantizer per layer, one weight quantizer per layer and direction (``num_layers`` is
        accepted for pytorch_quantization's signature and ignored: the LSTM's own structure decides)."""
        directions = 2 if self.bidirectional else 1
        self._input_quantizers = nn.ModuleList(TensorQuantizer(quant_desc_input) for _ in range(self.num_layers))
        self._weight_quantizers = nn.ModuleList(
            TensorQuantizer(quant_desc_weight) for _ in range(self.num_layers * directions)
        )
        if self.proj_size > 0:
            self._proj_weight_quantizers = nn.ModuleList(
                TensorQuantizer(quant_desc_weight) for _ in range(self.num_layers * directions)
            )

    def _quantizers(self):
        yield from self._input_quantizers
        yield from self._weight_quantizers
        yield from getattr(self, "_proj_weight_quantizers", ())

    def forward(self, input, hx=None):
        if not any(q.is_enabled for q in self._quantizers()):
            return super().forward(input, hx)
        self._update_flat_weights()
        directions = 2 if self.bidirectional else 1
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batch = int(batch_sizes[0])
            is_batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            data = input if is_batched else input.unsqueeze(batch_dim)
            batch = data.size(batch_dim)
            batch_sizes = sorted_indices = unsorted_indices = None
        if hx is None:
            h0 = torch.zeros(self.num_layers * directions, batch, real_hidden, dtype=data.dtype, device=data.device)
            c0 = torch.zeros(
                self.num_layers * directions, batch, self.hidden_size, dtype=data.dtype, device=data.device
            )
        else:
            h0, c0 = hx
            if not is_batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            if packed:
                h0, c0 = self.permute_hidden((h0, c0), sorted_indices)
            self.check_forward_args(data, (h0, c0), batch_sizes)

        per_dir = len(self._flat_weights) // (self.num_layers * directions)
        hs, cs = [], []
        x = data
        for layer in range(self.num_layers):
            weights = []
            for d in range(directions):
                k = layer * directions + d
                w = self._flat_weights[k * per_dir : (k + 1) * per_dir]
                wq = self._weight_quantizers[k]
                quantized = [wq(w[0]), wq(w[1]), *w[2 : 4 if self.bias else 2]]
                if self.proj_size > 0:
                    quantized.append(self._proj_weight_quantizers[k](w[-1]))
                weights.extend(quantized)
            x = self._input_quantizers[layer](x)
            state = (h0[layer * directions : (layer + 1) * directions], c0[layer * directions : (layer + 1) * directions])
            if packed:
                x, h, c = _VF.lstm(x, batch_sizes, state, weights, self.bias, 1, 0.0, self.training, self.bidirectional)
            else:
                x, h, c = _VF.lstm(
                    x, state, weights, self.bias, 1, 0.0, self.training, self.bidirectional, self.batch_first
                )
            hs.append(h)
            cs.append(c)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        hidden = (torch.cat(hs, 0), torch.cat(cs, 0))
        if packed:
            return PackedSequence(x, batch_sizes, sorted_indices, unsorted_indices), self.permute_hidden(
                hidden, unsorted_indices
            )
        if not is_batched:
            x = x.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return x, hidden


LSTM, LSTMCell = QuantLSTM, QuantLSTMCell
