import numpy as np
import pytest
import torch

import reference as ref
from qdq.calib import HistogramCalibrator, NoDataCollectedError, NonFiniteWarning


def _reference_histogram(values: np.ndarray, num_bins: int) -> tuple[np.ndarray, float]:
    """NumPy: bins 2**e wide, e the smallest integer with max < num_bins * 2**e; counts of floor(|x| / 2**e)."""
    mags = np.abs(values[np.isfinite(values)]).astype(np.float64)
    top = mags.max()
    e = -126
    while not top < num_bins * 2.0**e:
        e += 1
    idx = np.floor(mags / 2.0**e).astype(np.int64)
    return np.bincount(idx, minlength=num_bins), 2.0**e


@pytest.mark.parametrize("num_bins", [512, 100, 2048, 5000])
def test_single_batch_counts_match_numpy(num_bins):
    x = torch.randn(100_000)
    x[:7] = torch.tensor([0.0, 1.0, 2.0, 4.0, 0.5, -0.25, 3.0])  # values on bin edges
    cal = HistogramCalibrator(8, None, False, num_bins=num_bins)
    cal.collect(x)
    counts, edges = cal.histogram()
    assert counts.dtype == torch.int64 and counts.shape == (num_bins,) and edges.shape == (num_bins + 1,)
    expected, width = _reference_histogram(x.numpy(), num_bins)
    np.testing.assert_array_equal(counts.numpy(), expected)  # exact: no value sits on the wrong side of an edge
    np.testing.assert_array_equal(edges.numpy(), np.arange(num_bins + 1) * width)
    # the data spans more than half of the bins
    assert edges[-1].item() / 2 <= x.abs().max().item() < edges[-1].item()


def test_growth_merges_exactly_and_keeps_bin_count():
    cal = HistogramCalibrator(8, None, False, num_bins=64)
    a = torch.rand(1000)
    a[0] = 1.0
    cal.collect(a)
    before, edges = cal.histogram()
    assert edges[-1].item() == 2.0  # 1.0 < 64 * 2**-5
    cal.collect(torch.tensor([5.0]))  # the range grows from 2 to 8: every 4 bins merge
    counts, edges = cal.histogram()
    assert counts.shape == (64,) and edges[-1].item() == 8.0
    expected = torch.zeros(64, dtype=torch.int64).scatter_add_(0, torch.arange(64) // 4, before)
    expected[int(5.0 / 8.0 * 64)] += 1
    assert torch.equal(counts, expected)
    assert int(counts.sum()) == 1001


def test_bounded_bins_for_wild_ranges():
    cal = HistogramCalibrator(8, None, False, num_bins=128)
    for s in [1e-3, 1.0, 1e3, 1e6]:
        cal.collect(torch.randn(1000) * s)
    counts, edges = cal.histogram()
    assert counts.shape == (128,) and int(counts.sum()) == 4000
    # the data spans more than half of the bins
    assert cal._max.item() >= edges[-1].item() / 2


def _shuffled_collection(values: torch.Tensor, sizes: list[int], seed: int, **kwargs) -> HistogramCalibrator:
    order = torch.randperm(values.shape[0], generator=torch.Generator().manual_seed(seed))
    cal = HistogramCalibrator(8, **kwargs)
    for part in values[order].split(sizes):
        cal.collect(part)
    return cal


@pytest.mark.parametrize("axis", [None, 1])
def test_order_and_batch_size_invariant(axis):
    """The same data in any order and any batch sizes gives bit-identical histograms and amax for every method."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3000, 4, generator=g) * torch.logspace(-2, 2, 3000)[:, None]
    values[17, 2] = float("nan")
    kwargs = dict(axis=axis, unsigned=False, num_bins=256)
    runs = [_shuffled_collection(values, [3000], 0, **kwargs),
            _shuffled_collection(values, [1] * 10 + [2990], 1, **kwargs),
            _shuffled_collection(values, [7, 500, 1000, 1493], 2, **kwargs),
            _shuffled_collection(values.flip(0), [100] * 30, 3, **kwargs)]
    with pytest.warns(NonFiniteWarning):
        first = runs[0].histogram()
    for cal in runs[1:]:
        with pytest.warns(NonFiniteWarning):
            counts, edges = cal.histogram()
        assert torch.equal(counts, first[0]) and torch.equal(edges, first[1])
        for method in ("entropy", "mse", "percentile", "kld", "max"):
            assert torch.equal(cal.compute_amax(method), runs[0].compute_amax(method)), method
        assert cal.num_nonfinite == 1


def test_chunked_collection_is_exact():
    """A tensor larger than a chunk is binned chunk by chunk on each chunk's own grid, merged exactly."""
    from qdq.calib import histogram

    x = torch.randn(histogram._CHUNK * 2 + 5)
    x[-1] = 40.0  # the last chunk holds the maximum: the earlier chunks' bins merge
    cal = HistogramCalibrator(8, None, False, num_bins=2048)
    cal.collect(x)
    expected, _ = _reference_histogram(x.numpy(), 2048)
    np.testing.assert_array_equal(cal.histogram()[0].numpy(), expected)


@pytest.mark.parametrize("finite", [True, False])
def test_cpu_and_device_counters_agree_with_numpy(finite):
    """The CPU's bincount counter and the histc counter used on other devices give the same counts, exactly."""
    from qdq.calib.histogram import _count_bincount, _count_histc, _pow2, bin_exponent

    n = 2048
    x = torch.randn(300_001) * 3
    m = x.abs().max()
    e = bin_exponent(m.reshape(1), n)
    width = 2.0 ** e.item()
    x[:6] = torch.tensor([0.0, -0.0, width, -width, 7 * width, (n - 1) * width])  # values on bin edges
    x[6] = torch.nextafter(torch.tensor(5 * width), torch.tensor(0.0))  # just below an edge
    if not finite:
        x[7:10] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    expected, _ = _reference_histogram(x.numpy(), n)
    a = _count_bincount(x, _pow2(-e), n, finite)
    b = _count_histc(x, _pow2(-e), n)
    np.testing.assert_array_equal(a.numpy(), expected)
    np.testing.assert_array_equal(b.numpy(), expected)


def test_all_zero_first_batch():
    cal = HistogramCalibrator(8, None, False, num_bins=16)
    cal.collect(torch.zeros(100))
    cal.collect(torch.tensor([0.0, 4.0]))
    counts, edges = cal.histogram()
    assert counts[0] == 101 and counts[8] == 1 and edges[-1] == 8.0  # 4 < 16 * 0.5
    assert cal.compute_amax("percentile", percentile=99).item() == pytest.approx(0.5)


def test_only_zeros_gives_zero_amax():
    cal = HistogramCalibrator(8, None, False)
    cal.collect(torch.zeros(10))
    for method in ["entropy", "mse", "percentile", "max"]:
        assert cal.compute_amax(method).item() == 0.0


def test_nonfinite_skipped():
    cal = HistogramCalibrator(8, None, False, num_bins=32)
    x = torch.tensor([1.0, float("nan"), -2.0, float("inf"), float("-inf")])
    cal.collect(x)  # no host sync while collecting: the count is read, and reported, with the histogram
    with pytest.warns(NonFiniteWarning, match="skipped 3"):
        counts, edges = cal.histogram()
    assert int(counts.sum()) == 2 and edges[-1] == 4.0 and cal.num_nonfinite == 3
    for method in ["entropy", "mse", "percentile"]:
        assert torch.isfinite(cal.compute_amax(method))


def test_percentile_against_numpy_over_batches():
    xs = [torch.randn(50_000) * s for s in (1.0, 1.5, 0.7)]
    cal = HistogramCalibrator(8, None, False)
    for x in xs:
        cal.collect(x)
    _, edges = cal.histogram()
    width = (edges[1] - edges[0]).item()
    allx = torch.cat(xs).abs().numpy()
    for p in (99.0, 99.9, 99.99):
        got = cal.compute_amax("percentile", percentile=p).item()
        assert abs(got - np.percentile(allx, p)) <= width + 1e-6


def test_entropy_equals_loop_on_collected_histogram():
    x = torch.relu(torch.randn(200_000)) ** 1.5
    cal = HistogramCalibrator(8, None, True, num_bins=512)
    cal.collect(x)
    counts, edges = cal.histogram()
    expected, div = ref.entropy_loop(counts.numpy(), edges.numpy(), 8, True, 1, 128)
    got = cal.compute_amax("entropy").item()
    assert got == pytest.approx(float(expected), rel=1e-6)


def test_per_channel_histograms():
    torch.manual_seed(1)
    x = torch.randn(3, 10_000) * torch.tensor([[1.0], [5.0], [0.1]])
    cal = HistogramCalibrator(8, 0, False, num_bins=256)
    cal.collect(x[:, :5000])
    cal.collect(x[:, 5000:] * 1.2)
    counts, edges = cal.histogram()
    assert counts.shape == (3, 256) and edges.shape == (3, 257)
    assert counts.sum(1).tolist() == [10_000] * 3
    amax = cal.compute_amax("percentile", percentile=99.0)
    assert amax.shape == (3, 1)
    data = torch.cat([x[:, :5000], x[:, 5000:] * 1.2], 1).abs()
    for c in range(3):
        width = (edges[c, 1] - edges[c, 0]).item()
        assert abs(amax[c, 0].item() - np.percentile(data[c].numpy(), 99.0)) <= width + 1e-6
    # each channel alone gives the same counts
    single = HistogramCalibrator(8, None, False, num_bins=256)
    single.collect(x[1, :5000])
    single.collect(x[1, 5000:] * 1.2)
    assert torch.equal(single.histogram()[0], counts[1])


def test_method_required_and_listed():
    cal = HistogramCalibrator()
    cal.collect(torch.randn(10))
    with pytest.raises(ValueError, match="needs a method.*'entropy'.*'mse'.*'percentile'"):
        cal.compute_amax()
    with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
        cal.compute_amax("kl")


def test_no_data():
    with pytest.raises(NoDataCollectedError):
        HistogramCalibrator().compute_amax("mse")


def test_amax_never_above_max_seen():
    cal = HistogramCalibrator(8, None, False, num_bins=64)
    cal.collect(torch.tensor([1.0] * 100))
    cal.collect(torch.tensor([1.01]))  # doubles the range; the upper half of the bins stays empty
    for method in ["entropy", "mse", "percentile"]:
        assert cal.compute_amax(method, start_bin=8).item() <= 1.01 + 1e-6


def test_torch_hist_attribute_and_compat_names():
    cal = HistogramCalibrator(8, None, False, num_bins=8)
    cal._torch_hist = True  # pytorch_quantization code sets it
    assert cal._calib_hist is None
    cal.collect(torch.arange(8.0))
    assert cal._calib_hist.shape == (8,) and cal._calib_bin_edges.shape == (9,)


@pytest.mark.parametrize("axis", [None, 0])
def test_unsigned_negative(axis):
    """Collection does not read the data on the host; computing amax raises."""
    cal = HistogramCalibrator(8, axis, True)
    cal.collect(torch.tensor([[2.0], [-1.0]]))
    with pytest.raises(ValueError, match=r"negative data \(min -1\)"):
        cal.compute_amax("mse")


def test_skip_zeros():
    cal = HistogramCalibrator(8, None, False, num_bins=4, skip_zeros=True)
    cal.collect(torch.tensor([0.0, 0.0, 1.0, 2.0]))
    assert int(cal.histogram()[0].sum()) == 2


@pytest.mark.parametrize("num_bins", [1, 2.5, True])
def test_bad_num_bins(num_bins):
    with pytest.raises(ValueError, match="num_bins"):
        HistogramCalibrator(num_bins=num_bins)


def test_channel_count_change_is_value_and_runtime_error():
    from qdq.calib import ShapeChangedError

    cal = HistogramCalibrator(8, 0, False)
    cal.collect(torch.rand(4, 10))
    with pytest.raises(RuntimeError, match=r"shape changed: .*\(5, 1\), but \(4, 1\)") as info:
        cal.collect(torch.rand(5, 10))
    assert isinstance(info.value, ShapeChangedError) and isinstance(info.value, ValueError)
