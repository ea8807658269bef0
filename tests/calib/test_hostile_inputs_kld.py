"""KLD on data that fits the quantization grid: low-cardinality data keeps its range."""

import pytest
import torch

from qdq.calib import HistogramCalibrator, kld_amax
from qdq.calib.kld import fits_grid, kld_divergence


def _kld(x, num_bits=8, unsigned=False, axis=None):
    cal = HistogramCalibrator(num_bits, axis, unsigned)
    cal.collect(x)
    return cal.compute_amax(method="kld")


@pytest.mark.parametrize("values", [[3.0], [-3.0, 3.0], [1.0, 3.0], [0.0, 1.0, 2.0, 3.0], [0.5, -2.0, 3.0]])
def test_low_cardinality_data_keeps_its_range(values):
    """Regression: KLD on data with one or two distinct values clipped almost everything (amax 0.19 for data that
    is all 3.0), because the cut grid never tries the full range."""
    x = torch.tensor(values * 250)
    assert _kld(x).item() == 3.0


def test_unsigned_and_low_bit_low_cardinality():
    assert _kld(torch.tensor([0.0, 5.0] * 100), unsigned=True).item() == 5.0
    # 4 signed bits: 8 levels on |x|; 3 distinct magnitudes fall in distinct levels of [0, 3]
    assert _kld(torch.tensor([1.0, 2.0, 3.0] * 100), num_bits=4).item() == 3.0


def test_per_channel_low_cardinality():
    x = torch.stack([torch.full((64,), 2.0), torch.full((64,), -0.5)])
    assert _kld(x, axis=0).flatten().tolist() == [2.0, 0.5]


def test_continuous_data_still_uses_the_kld_cut():
    """Data with many distinct values is not touched by the rule: the threshold is the searched cut's."""
    torch.manual_seed(0)
    counts = torch.histc(torch.randn(200_000).abs(), bins=2048, min=0, max=8).long()
    edges = torch.linspace(0, 8, 2049)
    assert not bool(fits_grid(counts[None], 128))
    cuts, kl = kld_divergence(counts, edges)
    i = int(cuts[int(kl.argmin())])
    assert kld_amax(counts, edges).item() == pytest.approx(float((edges[i] + edges[i + 1]) / 2))
    assert kld_amax(counts, edges).item() < 8.0


def test_fits_grid_rule():
    c = torch.zeros(2, 32, dtype=torch.int64)
    c[0, [0, 8, 31]] = 5  # levels 0, 1, 3 of 4
    c[1, [0, 1]] = 5  # two bins in level 0
    assert fits_grid(c, 4).tolist() == [True, False]
    assert not bool(fits_grid(torch.zeros(1, 32, dtype=torch.int64), 4))  # an empty histogram fits nothing
