"""``qdq.math.ranges.flat_view``: the elements of a dense tensor in any dimension order as a 1-D view, and the
reductions that read through it (per-tensor ranges, the max and histogram calibrators, the FP8 dequantization's NaN
check) give on channels-last data exactly what they give on the same values laid out contiguously."""

import pytest
import torch

from qdq.calib.histogram import HistogramCalibrator
from qdq.calib.max import MaxCalibrator
from qdq.math import formats
from qdq.math.ranges import flat_view, reduce_amax, reduce_range


def _dense_layouts():
    torch.manual_seed(0)
    base = torch.randn(2, 3, 5, 7)
    return {
        "contiguous": base,
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "channels_last_3d": torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d),
        "transposed": torch.randn(6, 9).t(),
        "permuted": torch.randn(4, 5, 6).permute(2, 0, 1),
        "size-one dims": torch.randn(1, 8, 1, 3).contiguous(memory_format=torch.channels_last),
    }


@pytest.mark.parametrize("layout", list(_dense_layouts()))
def test_dense_tensors_are_viewed_without_a_copy(layout):
    x = _dense_layouts()[layout]
    flat = flat_view(x)
    assert flat.dim() == 1 and flat.numel() == x.numel()
    assert flat.data_ptr() == x.data_ptr()
    assert torch.equal(flat.sort().values, x.reshape(-1).sort().values)


@pytest.mark.parametrize("make", [lambda t: t[:, ::2], lambda t: t[:1].expand(4, -1), lambda t: t[:, 1:]],
                         ids=["strided slice", "expanded", "column slice"])
def test_other_tensors_are_reshaped_in_logical_order(make):
    x = make(torch.arange(24.0).reshape(4, 6))
    assert torch.equal(flat_view(x), x.reshape(-1))


def test_compiled_code_gets_the_plain_reshape():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(lambda t: flat_view(t) * 1, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), x.reshape(-1))


def _channels_last_pair(scale=3.0):
    torch.manual_seed(1)
    x = torch.randn(4, 16, 9, 9) * scale
    return x, x.contiguous(memory_format=torch.channels_last)


def test_reductions_match_on_channels_last():
    x, cl = _channels_last_pair()
    assert torch.equal(reduce_amax(cl), reduce_amax(x))
    assert all(torch.equal(a, b) for a, b in zip(reduce_range(cl), reduce_range(x)))


def test_max_calibrator_on_channels_last_equals_contiguous():
    x, cl = _channels_last_pair()
    a, b = MaxCalibrator(8), MaxCalibrator(8)
    a.collect(x)
    b.collect(cl)
    assert torch.equal(a.compute_amax(), b.compute_amax())
    assert float(b.compute_amax()) == float(x.abs().max())


def test_histogram_calibrator_on_channels_last_equals_contiguous():
    x, cl = _channels_last_pair()
    a, b = HistogramCalibrator(8, num_bins=512), HistogramCalibrator(8, num_bins=512)
    for t in (x, x * 0.5):
        a.collect(t)
    for t in (cl, cl * 0.5):
        b.collect(t)
    assert torch.equal(a._counts, b._counts) and int(b._counts.sum()) == 2 * x.numel()
    assert torch.equal(a.compute_amax("percentile", percentile=99.9), b.compute_amax("percentile", percentile=99.9))


def test_fp8_fake_quantization_on_channels_last_keeps_the_bits_and_the_nan_check():
    x, cl = _channels_last_pair(100.0)  # 5184 values: above the bit-level dequantization's minimum size
    x = torch.cat([x] * 4)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert cl.numel() >= formats._BITS_MIN_NUMEL
    scale = torch.tensor(0.25)
    ref = formats.fake_quantize_fp8(x, scale)
    got = formats.fake_quantize_fp8(cl, scale)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))
    # a NaN in the last element of memory order (channels-last: the last channel of the last pixel) stays NaN
    cl_nan = cl.clone(memory_format=torch.channels_last)
    cl_nan[-1, -1, -1, -1] = float("nan")
    out = formats.fake_quantize_fp8(cl_nan, scale)
    assert torch.isnan(out[-1, -1, -1, -1]) and int(torch.isnan(out).sum()) == 1
