"""The vectorised KLD search against a loop transcription of tpu-mlir's pseudocode."""

import numpy as np
import pytest
import torch

from qdq.calib import amax_search as S
from qdq.calib import kld as K
from qdq.calib.histogram import HistogramCalibrator


def kld_loop(hist, edges, num_bits=8, unsigned=False):
    """tpu-mlir's KLD pseudocode, one cut at a time.

    Returns ``(threshold, chosen i, {i: kl})``. Generalised from 2048 bins as the module documents: cuts
    ``range(step, n, step)`` with ``step = n // 16``, bin ``j`` to level ``j * levels // i``, a level's mass shared by
    its non-empty bins, ``q = 1e-30`` where ``q`` is empty under float mass, the first minimum wins; the zero bin
    first takes bin 1's count.
    """
    bins = np.asarray(hist, dtype=np.float64).copy()
    bins[0] = bins[1]  # the zero bin (ReLU zeros) takes bin 1's count, as the module documents
    n = len(bins)
    step = n // 16
    levels = 2 ** (num_bits - 1 + int(unsigned))
    kld = {}
    for i in range(step, n, step):
        outliers_num = bins[i:].sum()
        fp32_distribution = bins[:i].copy()
        fp32_distribution[i - 1] += outliers_num
        fp32_distribution /= fp32_distribution.sum()
        # quantize bin[0] .. bin[i-1] into `levels` quant levels, then expand back to i bins
        level_mass = np.zeros(levels)
        level_nonempty = np.zeros(levels)
        for j in range(i):
            level_mass[j * levels // i] += bins[j]
            level_nonempty[j * levels // i] += bins[j] > 0
        int8_distribution = np.zeros(i)
        for j in range(i):
            if bins[j] > 0:
                int8_distribution[j] = level_mass[j * levels // i] / level_nonempty[j * levels // i]
        if int8_distribution.sum() > 0:
            int8_distribution /= int8_distribution.sum()
        kl = 0.0
        for p, q in zip(fp32_distribution, int8_distribution):
            if p > 0:
                kl += p * np.log(p / (q if q > 0 else 1e-30))
        kld[i] = kl
    best = min(kld, key=lambda i: kld[i])  # the first minimum
    absmax = edges[-1]  # the histogram spans [0, absmax]
    return (best + 0.5) * absmax / n, best, kld


def _hist(rng, kind, n):
    if kind == "normal":
        x = np.abs(rng.standard_normal(100_000))
    elif kind == "relu":  # a spike of exact zeros
        x = np.maximum(rng.standard_normal(100_000), 0)
    elif kind == "heavy":  # heavy tails and a few far outliers
        x = np.concatenate([np.abs(rng.standard_t(df=3, size=100_000)), [60.0, 75.0, 90.0]])
    elif kind == "outliers":
        x = np.concatenate([np.abs(rng.standard_normal(100_000)), [40.0, 55.0]])
    elif kind == "uniform":
        x = rng.uniform(0, 3, size=50_000)
    else:
        raise ValueError(kind)
    return np.histogram(x, bins=n, range=(0, x.max()))


KINDS = ["normal", "relu", "heavy", "outliers", "uniform"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_bits,unsigned,n", [(8, False, 2048), (8, True, 2048), (8, False, 512), (4, False, 600),
                                                 (8, False, 4096)])
def test_matches_pseudocode(kind, num_bits, unsigned, n):
    rng = np.random.default_rng(KINDS.index(kind) * 100_000 + n + num_bits + unsigned)
    h, e = _hist(rng, kind, n)
    threshold, best, kld = kld_loop(h, e, num_bits, unsigned)
    cuts, kl = K.kld_divergence(torch.tensor(h), torch.tensor(e), num_bits=num_bits, unsigned=unsigned)
    assert cuts.tolist() == list(kld)
    np.testing.assert_allclose(kl.numpy(), np.array(list(kld.values())), rtol=1e-9, atol=1e-15)
    got = K.kld_amax(torch.tensor(h), torch.tensor(e), num_bits=num_bits, unsigned=unsigned)
    assert got.shape == () and got.dtype == torch.float32
    i_got = int(np.rint(got.item() * n / e[-1] - 0.5))
    assert i_got == best
    assert got.item() == pytest.approx(threshold, rel=1e-6)


def test_grid_is_tpu_mlirs_grid_for_2048_bins():
    assert K.kld_cuts(2048).tolist() == list(range(128, 2048, 128))


def test_int64_counts_and_float32_edges_from_the_calibrator():
    """The calibrator hands int64 counts and float32 edges over [0, R]; the result is clamped to the max seen."""
    torch.manual_seed(0)
    cal = HistogramCalibrator(8, None, False)
    cal.collect(torch.cat([torch.randn(50_000), torch.tensor([30.0])]))
    cal.collect(torch.randn(50_000) * 1.5)
    counts, edges = cal.histogram()
    assert counts.dtype == torch.int64 and edges[0] == 0
    threshold, _, _ = kld_loop(counts.numpy(), edges.double().numpy())
    got = cal.compute_amax("kld")
    assert got.item() == pytest.approx(threshold, rel=1e-6)
    assert 1.0 < got.item() < 30.0


def test_clamped_to_max_when_data_sits_in_the_first_bins():
    cal = HistogramCalibrator(8, None, False, num_bins=256)
    cal.collect(torch.tensor([0.0, 1.0]))
    cal.collect(torch.tensor([100.0]))  # R grows to 100: the first batch sits in the first bins
    assert cal.compute_amax("kld").item() <= 100.0


def test_batched_equals_rows():
    rng = np.random.default_rng(5)
    hs, es = zip(*[_hist(rng, k, 1024) for k in KINDS[:4]])
    counts = torch.tensor(np.stack(hs)).reshape(2, 2, 1024)
    edges = torch.tensor(np.stack(es)).reshape(2, 2, 1025)
    both = K.kld_amax(counts, edges)
    assert both.shape == (2, 2)
    rows = torch.stack([K.kld_amax(counts[a, b], edges[a, b]) for a in range(2) for b in range(2)]).reshape(2, 2)
    assert torch.equal(both, rows)
    for a in range(2):
        for b in range(2):
            assert both[a, b].item() == pytest.approx(kld_loop(counts[a, b].numpy(), edges[a, b].numpy())[0], rel=1e-6)


def test_many_rows_are_chunked():
    """More rows than one dense step holds: the chunks give the same as one row at a time."""
    rng = np.random.default_rng(2)
    counts = torch.tensor(rng.poisson(rng.uniform(1, 50, size=(80, 1))[:, [0] * 2048] * np.exp(-np.arange(2048) / 300)))
    edges = torch.linspace(0, 10, 2049).expand(80, -1)
    both = K.kld_amax(counts, edges)
    assert torch.equal(both[[0, 41, 79]], torch.stack([K.kld_amax(counts[r], edges[r]) for r in (0, 41, 79)]))


def test_far_outliers_are_clipped():
    """A bulk in the first cuts and two far outliers: the cut lands just past the bulk, far below the outliers."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(200_000), [50.0, -60.0]])
    h, e = np.histogram(np.abs(x), bins=2048, range=(0, 60.0))
    amax = K.kld_amax(torch.tensor(h), torch.tensor(e)).item()
    assert 3.0 < amax < 10.0


def test_registered_with_the_common_signature():
    assert "kld" in S.search_names()
    assert S.get_search("kld") is K.kld_amax
    h = torch.tensor([[10] * 32])
    e = torch.linspace(0, 32, 33)[None]
    # the keywords every search receives from the calibrator are accepted
    assert K.kld_amax(h, e, num_bits=8, unsigned=False, start_bin=128, stride=1, percentile=99.9).shape == (1,)


def test_errors():
    with pytest.raises(ValueError, match="at least 16 bins"):
        K.kld_amax(torch.ones(8, dtype=torch.int64), torch.arange(9.0))
    with pytest.raises(ValueError, match="histogram shapes"):
        K.kld_amax(torch.ones(1, 32), torch.arange(32.0)[None])
    with pytest.raises(ValueError, match="num_bits"):
        K.kld_amax(torch.ones(32), torch.arange(33.0), num_bits=1)


def test_relu_zeros_do_not_collapse_the_threshold():
    """Regression: a ReLU6-like activation with 70% exact zeros got a threshold at the first cut (1/16 of max)."""
    torch.manual_seed(0)
    x = torch.relu(torch.randn(200_000) * 2.5).clamp(max=6.0)
    x[torch.rand_like(x) < 0.4] = 0
    cal = HistogramCalibrator(8, None, True)
    cal.collect(x)
    assert cal.compute_amax("kld").item() > 2.0
