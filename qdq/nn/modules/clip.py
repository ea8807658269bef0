"""The :class:`Clip` module: :func:`qdq.nn.functional.clip` with fixed or learned bounds.

>>> import torch
>>> from qdq import nn as quant_nn
>>> c = quant_nn.Clip(-1.0, 1.0, learn_max=True)
>>> c(torch.tensor([-3.0, 0.5, 3.0])).tolist()
[-1.0, 0.5, 1.0]
>>> [name for name, _ in c.named_parameters()]
['clip_value_max']
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qdq.nn import functional as QF

__all__ = ["Clip"]


class Clip(nn.Module):
    """Clamps to ``[clip_value_min, clip_value_max]`` (numbers or broadcasting tensors).

    Args:
        clip_value_min: lower bound.
        clip_value_max: upper bound.
        learn_min: make the lower bound a trainable parameter, initialized from ``clip_value_min``, which must then
            be a number or a one-element numpy array (as in pytorch_quantization, a tensor is refused).
        learn_max: the same for the upper bound.
    """

    def __init__(self, clip_value_min, clip_value_max, learn_min: bool = False, learn_max: bool = False):
        super().__init__()
        self.clip_value_min = self._bound(clip_value_min, learn_min, "clip_value_min")
        self.clip_value_max = self._bound(clip_value_max, learn_max, "clip_value_max")

    @staticmethod
    def _bound(value, learn: bool, what: str):
        if not learn:
            return value
        if isinstance(value, torch.Tensor):  # as pytorch_quantization: a learnable bound starts from a number
            raise ValueError(f"Clip: {what} must be scalar for initializing a learnable range: a number or a "
                             f"one-element numpy array, not a tensor (of shape {tuple(value.shape)}; pass float(t))")
        if isinstance(value, np.ndarray) or isinstance(value, np.generic):
            if value.size != 1:
                raise ValueError(f"Clip: {what} must be scalar for initializing a learnable range, got an array of "
                                 f"shape {value.shape}")
            value = value.reshape(()).item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"Clip: {what} must be scalar for initializing a learnable range, got {value!r}")
        return nn.Parameter(torch.tensor(float(value)))

    def forward(self, inputs):
        return QF.clip(inputs, self.clip_value_min, self.clip_value_max)
