"""Where a straight-through gradient passes, for the autograd functions of the math floor.

Eager code and GPUs keep that mask as a bool tensor, a byte per element, saved by the forward. Under torch.compile
on the CPU the bool is the slow part: inductor's vectorized store into a bool buffer runs about 20x slower than a
float32 store of the same elements (``x <= 0`` on 3.2M elements, 2 threads, torch 2.14: 26-29 ms compiled against
1.4-2.0 ms eager, and 0.7-1.4 ms compiled as ``(x <= 0).float()``), and the min-cut partitioner keeps exactly such a
mask between forward and backward, a byte being the cheapest thing to save. On that route the autograd functions
save the input instead and the backward computes the mask with :func:`inside_as_float`: float arithmetic with no
bool in between, so that the partitioner keeps a float tensor (the input, which the ReLU before a quantizer then
also reads its mask from), never a bool. On ResNet-18's QAT step the bool masks cost more than the fake quantization
itself. The gradient is then ``grad * mask``: where the mask is 0, an infinite or NaN incoming gradient gives NaN
(``torch.where`` gives 0).
"""

from __future__ import annotations

import torch


def float_mask_route(x: torch.Tensor) -> bool:
    """True where the straight-through mask is recomputed as float arithmetic in the backward: under torch.compile,
    for tensors on the CPU (a trace-time decision: no value of ``x`` is read)."""
    return x.device.type == "cpu" and torch.compiler.is_compiling()


def inside_as_float(x: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor | None = None) -> torch.Tensor:
    """1 where ``lo <= x <= hi`` (``|x| <= hi`` without ``lo``), 0 elsewhere, in the dtype that comparing ``x``
    with ``hi`` computes in. Where ``x`` is NaN it is 1 (``torch.sign`` of NaN is 0): the gradient passes, as on
    the eager CPU route of :class:`qdq.math.fake_quant.FakeTensorQuantFunction`.

    Exact: the difference of two floats is computed with one rounding, which keeps its sign and makes it 0 only where
    they are equal (subnormal results included), so ``sign(hi - |x|) + 1`` is 2, 1 or 0 where the comparison is
    above, equal or below. (Only with denormals flushed, ``torch.set_flush_denormal(True)``, can two values closer
    than the smallest normal float compare equal.)

    >>> x = torch.tensor([-2.0, -1.0, 0.3, 1.0, 1.0000001])
    >>> inside_as_float(x, torch.tensor(1.0))
    tensor([0., 1., 1., 1., 0.])
    >>> inside_as_float(x, torch.tensor(1.0), lo=torch.tensor(0.0))
    tensor([0., 0., 1., 1., 0.])
    """
    mask = torch.clamp(torch.sign(hi - (x.abs() if lo is None else x)) + 1, max=1)
    if lo is not None:
        mask = mask * torch.clamp(torch.sign(x - lo) + 1, max=1)
    return mask
