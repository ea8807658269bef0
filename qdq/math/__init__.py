"""Floor 1, the math: quantization descriptors and pure quantization functions (:mod:`qdq.tensor_quant` is
pytorch_quantization's path to all of them).

Nothing here holds state. The quantizer module (:class:`qdq.nn.TensorQuantizer`), the calibrators and the ONNX
export all build on the functions below, so the numbers PyTorch computes during QAT are the numbers the exported
QuantizeLinear/DequantizeLinear pair computes.

The arithmetic, once for all of qdq::

    scale     = max(amax, AMAX_EPS) / maxbound            # the ONNX y_scale (a step size), float32
    q         = clamp(round_half_even(x * (1 / scale)), qmin, qmax)
    x_hat     = q * scale                                 # fake quantization = dequantize(quantize(x))

with ``maxbound = 2 ** (num_bits - 1 + unsigned) - 1`` (127 for signed 8 bit) and ``[qmin, qmax]``:

=====================  ====================  ======================
signedness             ``narrow_range=False``  ``narrow_range=True``
=====================  ====================  ======================
signed                 ``[-128, 127]``       ``[-127, 127]``
unsigned               ``[0, 255]``          ``[0, 255]``
=====================  ====================  ======================

``narrow_range=False`` is the default: it is what ONNX QuantizeLinear and TensorRT's IQuantizeLayer saturate to.

Fake quantization runs PyTorch's fused kernels (``torch.fake_quantize_per_tensor_affine`` and
``torch.fake_quantize_per_channel_affine``) in eager GPU code, under the exporters (both ONNX exporters turn them into
QuantizeLinear/DequantizeLinear) and where autograd records through them. In eager CPU code (QAT's forward included),
where those kernels run a scalar loop, the same arithmetic runs as vectorized tensor ops (3-30x faster there), and so
it does under ``torch.compile``, which fuses those ops and has no lowering of the fused kernels. Both multiply by the float32 reciprocal of the scale and round half to even, so both give identical numbers for finite
inputs. ONNX defines QuantizeLinear with a division,
which can differ from the reciprocal product by one ulp and so, on an exact rounding tie, by one quantization step:
that is why exported models are compared with ONNX Runtime to the step, not bit for bit.

FP8 E4M3 (``num_bits=(4, 3)``) and blocked INT4 (``block_size``) have their arithmetic in :mod:`qdq.math.formats`;
the functions here dispatch to it (``fake_tensor_quant(x, amax, num_bits=(4, 3))``).

Where things are:

- :mod:`~qdq.math.descriptor`: :class:`~qdq.math.descriptor.QuantDescriptor`, the predefined descriptors, the
  ``calib_method`` names;
- :mod:`~qdq.math.ranges`: integer grids, scale from amax, the checks of amax, :func:`~qdq.math.ranges.reduce_amax`;
- :mod:`~qdq.math.quantize`: quantize, dequantize and fake-quantize with an explicit scale, affine quantization;
- :mod:`~qdq.math.fake_quant`: the amax-based functions with straight-through gradients (QAT);
- :mod:`~qdq.math.formats`: FP8 E4M3 and blocked INT4;
- :mod:`~qdq.math.pytorch_quantization`: pytorch_quantization's functions under their names.

Differences from pytorch_quantization, on purpose:

* ``scale`` is the step size ``amax / maxbound`` (ONNX's ``y_scale``), not its reciprocal. :func:`quantize_by_amax`
  returns it, and ``q * scale`` dequantizes.
* ``narrow_range`` defaults to ``False`` everywhere, in qdq's functions as in the descriptor.
* ``amax`` below :data:`AMAX_EPS` is raised to :data:`AMAX_EPS` instead of producing a zero scale, so the exported
  scale stays positive (TensorRT and ONNX Runtime require it) and PyTorch computes what the export computes.
* The functions never read a tensor's value on the host (pytorch_quantization checked amax with
  ``bool(tensor.any())`` on every call, a GPU synchronisation): amax is validated where it is set (the quantizer's
  ``amax`` setter, calibration, ``load_state_dict``, export); a learned amax that goes negative quantizes as
  ``AMAX_EPS``; unsigned quantization clamps negative data to 0. :func:`data_checks` turns per-call checks on for
  debugging. So ``torch.compile(fullgraph=True)`` traces QAT whole, learned amax included.
* Under ``no_grad`` (eval, calibration) fake quantization computes no clipping mask for the gradient.

Example:
    >>> import torch
    >>> from qdq.tensor_quant import fake_quantize_by_amax, quantize_by_amax
    >>> x = torch.tensor([-1.0, -0.004, 0.5, 2.0])
    >>> q, scale = quantize_by_amax(x, torch.tensor(1.0))
    >>> q
    tensor([-127.,   -1.,   64.,  127.])
    >>> torch.equal(fake_quantize_by_amax(x, torch.tensor(1.0)), q * scale)
    True
"""
