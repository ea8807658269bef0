"""pytorch_quantization's ``nn.functional``: a clip whose bounds may be tensors (and learned).

:func:`clip` clamps to ``[clip_value_min, clip_value_max]`` with broadcasting bounds. Its gradient is the one of
PACT (https://arxiv.org/abs/1805.06085) and of TensorFlow's ``clip_by_value``: the input gets the incoming gradient
where it lies strictly inside the bounds; a bound that requires grad gets the sum of the gradient over the elements
clipped to it (learned bounds must be scalars).

>>> import torch
>>> from qdq.nn.functional import clip
>>> x = torch.tensor([-2.0, -0.5, 0.5, 2.0], requires_grad=True)
>>> high = torch.tensor(1.0, requires_grad=True)
>>> y = clip(x, torch.tensor(-1.0), high)
>>> y.tolist()
[-1.0, -0.5, 0.5, 1.0]
>>> y.sum().backward()
>>> x.grad.tolist(), high.grad.item()
([0.0, 1.0, 1.0, 0.0], 1.0)
"""

from __future__ import annotations

import torch
from torch.autograd import Function

__all__ = ["ClipFunction", "clip"]


class ClipFunction(Function):
    """``min(max(x, clip_value_min), clip_value_max)`` with tensor bounds; see the module docstring for the gradient."""

    @staticmethod
    def forward(ctx, input, clip_value_min, clip_value_max):
        clip_value_min = torch.as_tensor(clip_value_min, dtype=input.dtype, device=input.device)
        clip_value_max = torch.as_tensor(clip_value_max, dtype=input.dtype, device=input.device)
        output = torch.max(torch.min(input, clip_value_max), clip_value_min)
        ctx.save_for_backward(input, clip_value_min, clip_value_max)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, clip_value_min, clip_value_max = ctx.saved_tensors
        min_mask = (input > clip_value_min).to(grad_output.dtype)
        max_mask = (input < clip_value_max).to(grad_output.dtype)
        grad_input = grad_output * min_mask * max_mask
        learn_min, learn_max = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if (learn_min or learn_max) and (clip_value_min.numel() != 1 or clip_value_max.numel() != 1):
            raise ValueError(f"clip: learnable min/max can only be scalar, got sizes {tuple(clip_value_min.shape)} and "
                             f"{tuple(clip_value_max.shape)}")
        grad_min = (grad_output * (1.0 - min_mask)).sum().to(clip_value_min.dtype) if learn_min else None
        grad_max = (grad_output * (1.0 - max_mask)).sum().to(clip_value_max.dtype) if learn_max else None
        return grad_input, grad_min, grad_max


clip = ClipFunction.apply
