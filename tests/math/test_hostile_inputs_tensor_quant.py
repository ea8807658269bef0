"""Hostile inputs to the math floor (qdq.tensor_quant): the grid follows num_bits, bad ranges are errors."""

import pytest
import torch

from qdq.tensor_quant import amax_to_scale, dequantize, fake_quantize, quant_range, quantize


@pytest.mark.parametrize("num_bits", [2, 4, 8])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("narrow_range", [False, True])
def test_quantize_saturates_at_the_grid_of_num_bits(num_bits, unsigned, narrow_range):
    """Regression: quantize()/fake_quantize() clamped to [-128, 127] whatever the scale's bit width, so a 4-bit
    scale did not saturate at the 4-bit range."""
    scale = amax_to_scale(torch.tensor(1.0), num_bits, unsigned)
    x = torch.tensor([-1000.0, -3.0, -1.0, -0.3, 0.0, 0.3, 1.0, 3.0, 1000.0])
    qmin, qmax = quant_range(num_bits, unsigned, narrow_range)
    kw = dict(num_bits=num_bits, unsigned=unsigned, narrow_range=narrow_range)
    q = quantize(x, scale, **kw)
    reference = torch.clamp(torch.round(x * torch.reciprocal(scale)), qmin, qmax)
    assert torch.equal(q, reference)
    assert q.max().item() == qmax and q.min().item() == qmin
    assert torch.equal(fake_quantize(x, scale, **kw), dequantize(reference, scale))


def test_quantize_default_is_signed_8_bit_and_explicit_bounds_win():
    scale = torch.tensor(0.01)
    x = torch.tensor([-5.0, 5.0])
    assert quantize(x, scale).tolist() == [-128.0, 127.0]
    assert quantize(x, scale, 0, -7, 7, num_bits=8).tolist() == [-7.0, 7.0]
    assert quantize(x, scale, qmax=3, num_bits=4).tolist() == [-8.0, 3.0]


def test_inverted_range_is_an_error():
    with pytest.raises(ValueError, match="qmin 5 is above qmax -5"):
        quantize(torch.ones(2), torch.tensor(1.0), 0, 5, -5)
    with pytest.raises(ValueError, match="qmin 5 is above qmax -5"):
        fake_quantize(torch.ones(2), torch.tensor(1.0), 0, 5, -5)


def test_num_bits_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="num_bits must be an int in"):
        quantize(torch.ones(2), torch.tensor(1.0), num_bits=1)


@pytest.mark.parametrize("data", [5, "num_bits=8", [("num_bits", 8)]])
def test_descriptor_from_dict_of_a_non_mapping(data):
    from qdq.tensor_quant import QuantDescriptor

    with pytest.raises(TypeError, match=r"QuantDescriptor.from_dict takes a mapping of fields"):
        QuantDescriptor.from_dict(data)
