"""The vectorised amax searches against loop transcriptions of the same algorithms."""

import numpy as np
import pytest
import torch

import reference as ref
from qdq.calib import amax_search as S


def _hist(rng, kind, n):
    if kind == "t3":
        x = np.abs(rng.standard_t(df=3, size=100_000)) * rng.uniform(0.1, 10)
    elif kind == "relu":
        x = np.maximum(rng.standard_normal(100_000), 0)
    elif kind == "outliers":
        x = np.concatenate([np.abs(rng.standard_normal(100_000)), [40.0, 55.0]])
    else:
        x = rng.uniform(0, 3, size=50_000)
    h, e = np.histogram(x, bins=n, range=(0, x.max()))
    return h, e


@pytest.mark.parametrize("kind", ["t3", "relu", "outliers", "uniform"])
@pytest.mark.parametrize("num_bits,unsigned,n,stride", [(8, False, 512, 1), (8, True, 600, 3), (4, False, 256, 1),
                                                        (8, False, 2048, 16)])
def test_entropy_matches_loop(kind, num_bits, unsigned, n, stride):
    rng = np.random.default_rng(sum(map(ord, kind)) * 10007 + n)  # reproducible across processes
    h, e = _hist(rng, kind, n)
    start = 128 if n >= 512 else 16
    expected, div = ref.entropy_loop(h, e, num_bits, unsigned, stride, start)
    got = S.entropy_amax(torch.tensor(h)[None], torch.tensor(e)[None], num_bits=num_bits, unsigned=unsigned,
                         start_bin=start, stride=stride)
    assert got.shape == (1,)
    # same cut, or one whose divergence ties the reference minimum to floating noise
    cand = list(range(start, n + 1, stride))
    chosen = int(np.argmin(np.abs(e[cand] - got.item())))
    assert div[chosen] <= div.min() * (1 + 1e-9) + 1e-12
    assert got.item() == pytest.approx(float(expected), rel=1e-6) or div[chosen] == pytest.approx(div.min())


@pytest.mark.parametrize("kind", ["t3", "relu", "outliers"])
@pytest.mark.parametrize("num_bits", [4, 8])
def test_mse_matches_loop(kind, num_bits):
    rng = np.random.default_rng(7)
    h, e = _hist(rng, kind, 512)
    e = e.astype(np.float32)
    expected, errs = ref.mse_loop(h, e, num_bits, False, 1, 128)
    got = S.mse_amax(torch.tensor(h)[None], torch.tensor(e)[None], num_bits=num_bits)
    chosen = int(np.argmin(np.abs(e[128:] - got.item())))
    assert errs[chosen] <= errs.min() * (1 + 1e-5)


@pytest.mark.parametrize("p", [50.0, 90.0, 99.0, 99.99, 100.0])
def test_percentile_against_numpy(p):
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_normal(200_000))
    h, e = np.histogram(x, bins=2048, range=(0, x.max()))
    got = S.percentile_amax(torch.tensor(h)[None], torch.tensor(e)[None], percentile=p).item()
    width = e[1] - e[0]
    # the right edge of the bin holding the percentile: never below it, less than a bin above
    assert np.percentile(x, p) - 1e-6 <= got < np.percentile(x, p) + width + 1e-6
    assert (x <= got + 1e-6).mean() >= p / 100 - 1e-12  # got is float32


def test_outliers_are_clipped_by_entropy_and_mse():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(200_000), [9.0, -10.0]])
    h, e = np.histogram(np.abs(x), bins=2048, range=(0, 10.0))
    for fn in (S.entropy_amax, S.mse_amax):
        amax = fn(torch.tensor(h)[None], torch.tensor(e)[None]).item()
        assert 2.0 < amax < 8.0, (fn.__name__, amax)


def test_batched_equals_rows():
    rng = np.random.default_rng(5)
    hs, es = zip(*[_hist(rng, k, 512) for k in ["t3", "relu", "uniform"]])
    counts = torch.tensor(np.stack(hs))
    edges = torch.tensor(np.stack(es))
    for fn in (S.entropy_amax, S.mse_amax, S.percentile_amax, S.max_amax):
        both = fn(counts, edges)
        rows = torch.cat([fn(counts[i:i + 1], edges[i:i + 1]) for i in range(3)])
        assert torch.equal(both, rows), fn.__name__


def test_max_amax_is_last_nonempty_edge():
    assert S.max_amax(torch.tensor([[0, 4, 0, 1, 0, 0]]), torch.arange(7.0)[None]).item() == 4.0


def test_registry():
    assert set(S.search_names()) >= {"entropy", "mse", "percentile", "max"}
    with pytest.raises(ValueError, match="unknown calibration method 'kl'.*entropy"):
        S.get_search("kl")
    with pytest.raises(ValueError, match="already registered"):
        S.register_search("mse", lambda c, e, **k: c)


@pytest.mark.parametrize("p", [0, -1, 101, float("nan")])
def test_bad_percentile(p):
    with pytest.raises(ValueError, match="percentile"):
        S.percentile_amax(torch.ones(1, 4), torch.arange(5.0)[None], percentile=p)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="histogram shapes"):
        S.entropy_amax(torch.ones(1, 4), torch.arange(4.0)[None])


@pytest.mark.parametrize("ties", ["first", "last"])
def test_tolerant_argmin_matches_numpy_with_ties_to_floating_noise(ties):
    """The one argmin helper of the searches (entropy and mse take the last tie, kld the first)."""
    from qdq.calib.amax_search import tolerant_argmin

    rng = np.random.default_rng(3)
    v = rng.integers(0, 4, size=(50, 9)).astype(np.float64)
    v[::3] += 1e-14 * rng.random((17, 9))  # noise below the relative 1e-12: still a tie
    v[1, 4] = v[1].min() - 1e-9  # above it: a strict minimum
    got = tolerant_argmin(torch.from_numpy(v), ties).numpy()
    for row, k in zip(v, got):
        tied = np.flatnonzero(row <= row.min() + abs(row.min()) * 1e-12 + 1e-300)
        assert k == (tied[0] if ties == "first" else tied[-1])
    assert got[1] == 4
    with pytest.raises(ValueError, match="ties"):
        tolerant_argmin(torch.from_numpy(v), "middle")
