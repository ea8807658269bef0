"""pytorch_quantization's compiled ``cuda_ext``, answered in PyTorch ops: qdq has no compiled extension.

The three fake-quantization kernels pytorch_quantization exposes are here with their signatures, computed by
:func:`qdq.math.pytorch_quantization.fake_tensor_quant` on whatever device the tensors are on (CPU or CUDA), with the same
numbers on both (the CUDA kernel of pytorch_quantization lets unsigned quantization go below 0; qdq clamps to 0 and
refuses negative unsigned data on every device). Any other name raises an ``AttributeError`` that says so.

>>> import torch
>>> from qdq import cuda_ext
>>> x = torch.tensor([0.25, -1.0, 2.0])
>>> [round(v * 127, 4) for v in cuda_ext.fake_tensor_quant(x, torch.tensor(1.0)).tolist()]
[32.0, -127.0, 127.0]
>>> cuda_ext.fake_e4m3fy
Traceback (most recent call last):
...
AttributeError: qdq.cuda_ext has no 'fake_e4m3fy': qdq has no compiled CUDA extension; ...
"""

from __future__ import annotations

import torch

from qdq.math.pytorch_quantization import fake_tensor_quant as _fake_tensor_quant

__all__ = ["fake_tensor_quant", "fake_tensor_quant_", "fake_tensor_quant_with_axis"]


def fake_tensor_quant(inputs: torch.Tensor, amax: torch.Tensor, num_bits: int = 8, unsigned: bool = False,
                      narrow_range: bool = True) -> torch.Tensor:
    """Per-tensor fake quantization (``amax`` a single value)."""
    return _fake_tensor_quant(inputs, amax.reshape(()), num_bits, unsigned, narrow_range)


def fake_tensor_quant_(inputs: torch.Tensor, amax: torch.Tensor, num_bits: int = 8, unsigned: bool = False,
                       narrow_range: bool = True) -> torch.Tensor:
    """In-place :func:`fake_tensor_quant` (returns ``inputs``)."""
    with torch.no_grad():
        return inputs.copy_(fake_tensor_quant(inputs, amax, num_bits, unsigned, narrow_range))


def fake_tensor_quant_with_axis(inputs: torch.Tensor, amax: torch.Tensor, axis: int, num_bits: int = 8,
                                unsigned: bool = False, narrow_range: bool = True) -> torch.Tensor:
    """Per-channel fake quantization: ``amax`` holds one value per index of dimension ``axis``."""
    shape = [1] * inputs.dim()
    shape[axis] = inputs.shape[axis]
    return _fake_tensor_quant(inputs, amax.reshape(shape), num_bits, unsigned, narrow_range)


def __getattr__(name: str):
    raise AttributeError(
        f"qdq.cuda_ext has no {name!r}: qdq has no compiled CUDA extension; its fake quantization runs in PyTorch "
        "ops on any device (qdq.math.pytorch_quantization.fake_tensor_quant, qdq.math.pytorch_quantization.scaled_e4m3)"
    )
