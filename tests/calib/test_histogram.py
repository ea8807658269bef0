import numpy as np
import pytest
import torch

import reference as ref
from qdq.calib import HistogramCalibrator, NoDataCollectedError, NonFiniteWarning


def test_single_batch_counts_match_numpy():
    x = torch.randn(100_000)
    cal = HistogramCalibrator(8, None, False, num_bins=512)
    cal.collect(x)
    counts, edges = cal.histogram()
    assert counts.dtype == torch.int64 and counts.shape == (512,) and edges.shape == (513,)
    np_counts, _ = np.histogram(x.abs().numpy(), bins=512, range=(0, float(x.abs().max())))
    # histc and numpy may place a value that sits on an edge on either side: a handful at most
    assert int(counts.sum()) == x.numel()
    assert np.abs(counts.numpy() - np_counts).sum() <= 10


def test_growth_merges_exactly_and_keeps_bin_count():
    cal = HistogramCalibrator(8, None, False, num_bins=64)
    a = torch.rand(1000) * 1.0
    a[0] = 1.0
    cal.collect(a)
    before, _ = cal.histogram()
    b = torch.tensor([2.5])  # grows the range by a factor 3
    cal.collect(b)
    counts, edges = cal.histogram()
    assert counts.shape == (64,)
    assert edges[-1].item() == pytest.approx(3.0)
    # every 3 old bins became one new bin: exact sums
    expected = torch.zeros(64, dtype=torch.int64).scatter_add_(0, torch.arange(64) // 3, before)
    expected[int(2.5 / 3.0 * 64)] += 1
    assert torch.equal(counts, expected)
    assert int(counts.sum()) == 1001


def test_bounded_bins_for_wild_ranges():
    cal = HistogramCalibrator(8, None, False, num_bins=128)
    for s in [1e-3, 1.0, 1e3, 1e6]:
        cal.collect(torch.randn(1000) * s)
    counts, edges = cal.histogram()
    assert counts.shape == (128,) and int(counts.sum()) == 4000
    # the data spans more than half of the bins
    assert cal._max.item() > edges[-1].item() / 2


def test_all_zero_first_batch():
    cal = HistogramCalibrator(8, None, False, num_bins=16)
    cal.collect(torch.zeros(100))
    cal.collect(torch.tensor([0.0, 4.0]))
    counts, edges = cal.histogram()
    assert counts[0] == 101 and counts[-1] == 1 and edges[-1] == 4.0
    assert cal.compute_amax("percentile", percentile=99).item() == pytest.approx(0.25)


def test_only_zeros_gives_zero_amax():
    cal = HistogramCalibrator(8, None, False)
    cal.collect(torch.zeros(10))
    for method in ["entropy", "mse", "percentile", "max"]:
        assert cal.compute_amax(method).item() == 0.0


def test_nonfinite_skipped():
    cal = HistogramCalibrator(8, None, False, num_bins=32)
    x = torch.tensor([1.0, float("nan"), -2.0, float("inf"), float("-inf")])
    with pytest.warns(NonFiniteWarning, match="skipped 3"):
        cal.collect(x)
    counts, edges = cal.histogram()
    assert int(counts.sum()) == 2 and edges[-1] == 2.0
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


def test_unsigned_negative():
    with pytest.raises(ValueError, match="negative data"):
        HistogramCalibrator(8, None, True).collect(torch.tensor([-1.0]))


def test_skip_zeros():
    cal = HistogramCalibrator(8, None, False, num_bins=4, skip_zeros=True)
    cal.collect(torch.tensor([0.0, 0.0, 1.0, 2.0]))
    assert int(cal.histogram()[0].sum()) == 2


@pytest.mark.parametrize("num_bins", [1, 2.5, True])
def test_bad_num_bins(num_bins):
    with pytest.raises(ValueError, match="num_bins"):
        HistogramCalibrator(num_bins=num_bins)
