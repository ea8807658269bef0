"""pytorch_quantization's ``reduce_amax``: abs-max over the dimensions *named* by ``axis``, NumPy style.

Careful: this ``axis`` names the dimensions that are *reduced* (as in NumPy and pytorch_quantization's
``utils.reduce_amax``), while the ``axis`` of a descriptor and of :func:`qdq.math.ranges.reduce_amax` names the
dimensions that are *kept* (one amax per channel).

>>> import torch
>>> x = torch.tensor([[1.0, -3.0], [0.5, 2.0]])
>>> reduce_amax(x).item(), reduce_amax(x, axis=0).tolist(), reduce_amax(x, axis=0, keepdims=False).tolist()
(3.0, [[1.0, 3.0]], [1.0, 3.0])
"""

from __future__ import annotations

import torch

__all__ = ["reduce_amax"]


def reduce_amax(input: torch.Tensor, axis: int | tuple[int, ...] | list[int] | None = None, keepdims: bool = True):
    """Absolute maximum of ``input`` reduced over ``axis`` (``None``: all dimensions, a 0-d tensor).

    Args:
        input: the tensor.
        axis: a dimension or a tuple of dimensions to reduce, in ``[-rank, rank)``.
        keepdims: keep the reduced dimensions with size 1. With a tuple of axes and ``keepdims=False`` (or a
            one-element result) the result is squeezed, as pytorch_quantization does.

    Raises:
        ValueError: more axes than dimensions, or an axis out of range.
    """
    with torch.no_grad():
        output = input.abs()
        if axis is None:
            return torch.max(output)
        if isinstance(axis, int):
            if not -input.dim() <= axis < max(input.dim(), 1):
                raise ValueError(f"reduce_amax: axis {axis} is out of range for a tensor of {input.dim()} dimensions")
            return torch.max(output, dim=axis, keepdim=keepdims)[0]
        axis = tuple(axis)
        if len(axis) > input.dim():
            raise ValueError(f"reduce_amax: cannot reduce {len(axis)} axes of a tensor of {input.dim()} dimensions")
        for i in axis:
            output = torch.max(output, dim=i, keepdim=True)[0]
        if not keepdims or output.numel() == 1:
            output = output.squeeze()
        return output
