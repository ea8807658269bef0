"""The calibrator contract: named statistics, merge (associative, the empty statistics neutral), load, against NumPy."""

import copy

import numpy as np
import pytest
import torch

from qdq.calib import HistogramCalibrator, MaxCalibrator, StatsMismatchError

METHODS = ["max", "entropy", "mse", "percentile", "kld"]


def _shares(axis):
    """Three shares of data whose ranges differ (so histogram grids grow when merged), with a channel axis of 3."""
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((50, 3)) * scale + shift).astype(np.float32)
            for scale, shift in ((0.1, 0.0), (4.0, 1.0), (1.0, -2.0))]


def _collected(cls, axis, xs, **kw):
    cal = cls(8, axis, False, **kw)
    for x in xs:
        cal.collect(torch.from_numpy(x))
    return cal


def _np_histogram(x: np.ndarray, num_bins: int):
    """NumPy reference of the power-of-two grid: the smallest e with max|x| < num_bins * 2**e, counts of
    floor(|x| / 2**e)."""
    a = np.abs(x.astype(np.float64))
    e = int(np.floor(np.log2(a.max() / num_bins))) + 1 if a.max() > 0 else -126
    while a.max() >= num_bins * 2.0**e:
        e += 1
    while e > -126 and a.max() < num_bins * 2.0 ** (e - 1):
        e -= 1
    return e, np.bincount(np.floor(a / 2.0**e).astype(np.int64), minlength=num_bins)


@pytest.mark.parametrize("axis", [None, 1])
def test_max_stats_are_named_and_match_numpy(axis):
    xs = _shares(axis)
    stats = _collected(MaxCalibrator, axis, xs).stats()
    assert list(stats) == ["amax", "min", "max"]
    union = np.concatenate(xs)
    red = None if axis is None else 0
    np.testing.assert_array_equal(stats["amax"].numpy().reshape(-1), np.abs(union).max(axis=red).reshape(-1))
    np.testing.assert_array_equal(stats["min"].numpy().reshape(-1), union.min(axis=red).reshape(-1))
    np.testing.assert_array_equal(stats["max"].numpy().reshape(-1), union.max(axis=red).reshape(-1))
    assert tuple(stats["amax"].shape) == ((1, 3) if axis == 1 else ())


@pytest.mark.parametrize("axis", [None, 1])
def test_histogram_stats_are_named_and_match_numpy(axis):
    xs = _shares(axis)
    cal = _collected(HistogramCalibrator, axis, xs, num_bins=64)
    stats = cal.stats()
    assert list(stats) == ["exp", "max", "low", "counts"]
    union = np.concatenate(xs)
    columns = [union.reshape(-1)] if axis is None else [union[:, c] for c in range(3)]
    shape = () if axis is None else (1, 3)
    assert tuple(stats["counts"].shape) == shape + (64,) and stats["counts"].dtype == torch.int64
    for c, column in enumerate(columns):
        e, counts = _np_histogram(column, 64)
        assert int(stats["exp"].reshape(-1)[c]) == e
        np.testing.assert_array_equal(stats["counts"].reshape(-1, 64)[c].numpy(), counts)
        assert float(stats["max"].reshape(-1)[c]) == np.abs(column).max()


@pytest.mark.parametrize("cls,kw", [(MaxCalibrator, {}), (HistogramCalibrator, {"num_bins": 64})])
@pytest.mark.parametrize("axis", [None, 1])
def test_merge_is_associative_and_equals_one_calibrator_on_the_union(cls, kw, axis):
    xs = _shares(axis)
    a, b, c = (_collected(cls, axis, [x], **kw) for x in xs)
    left = copy.deepcopy(a).merge(b).merge(c)  # (a + b) + c
    right = copy.deepcopy(a).merge(copy.deepcopy(b).merge(c))  # a + (b + c)
    reverse = copy.deepcopy(c).merge(copy.deepcopy(b)).merge(a)  # (c + b) + a
    union = _collected(cls, axis, [np.concatenate(xs)], **kw)
    for merged in (left, right, reverse):
        for name, value in union.stats().items():
            assert torch.equal(merged.stats()[name], value), name
        assert merged.num_batches == 3
    if cls is HistogramCalibrator:
        for method in METHODS:
            assert torch.equal(left.compute_amax(method), union.compute_amax(method)), method
    else:
        assert torch.equal(left.compute_amax(), union.compute_amax())


@pytest.mark.parametrize("cls,kw", [(MaxCalibrator, {}), (HistogramCalibrator, {"num_bins": 64})])
@pytest.mark.parametrize("axis", [None, 1])
def test_empty_statistics_are_the_neutral_element(cls, kw, axis):
    full = _collected(cls, axis, _shares(axis), **kw)
    before = full.stats()
    empty = cls(8, axis, False, **kw)
    assert empty.stats() == {} and empty.stats_shape is None
    assert full.merge(empty) is full  # a calibrator that saw nothing
    full.merge({})  # the empty statistics
    full.merge(empty.empty_stats(full.stats_shape))  # the neutral element as tensors
    for name, value in before.items():
        assert torch.equal(full.stats()[name], value), name
    assert full.num_batches == 3
    copied = cls(8, axis, False, **kw).merge(full)  # merging into nothing copies
    for name, value in before.items():
        assert torch.equal(copied.stats()[name], value), name
    assert copied.num_batches == 3
    # the neutral tensors combined with themselves stay neutral
    neutral = empty.empty_stats(full.stats_shape)
    twice = empty.combine_stats([neutral, neutral])
    for name, value in neutral.items():
        assert torch.equal(twice[name], value), name


def test_load_stats_round_trips_every_method():
    source = _collected(HistogramCalibrator, None, _shares(None), num_bins=128)
    target = HistogramCalibrator(8, None, False, num_bins=128)
    target.load_stats(source.stats(), num_batches=source.num_batches)
    assert target.num_batches == 3 and not target.combined and target.combine_state == "local"
    for method in METHODS:
        assert torch.equal(target.compute_amax(method), source.compute_amax(method)), method
    target.load_stats({}, num_batches=0)
    assert target.stats() == {} and not target.collected


def test_mismatched_statistics_are_refused_with_their_names():
    a = _collected(HistogramCalibrator, None, _shares(None), num_bins=64)
    with pytest.raises(StatsMismatchError, match="settings"):
        a.merge(_collected(HistogramCalibrator, None, _shares(None), num_bins=32))
    with pytest.raises(StatsMismatchError, match="MaxCalibrator"):
        a.merge(_collected(MaxCalibrator, None, _shares(None)))
    eight, four = MaxCalibrator(8), MaxCalibrator(4)
    eight.collect(torch.ones(2))
    four.collect(torch.ones(2))
    with pytest.raises(StatsMismatchError, match="num_bits 4 into num_bits 8"):
        eight.merge(four)
    per_channel = _collected(MaxCalibrator, 1, _shares(1))
    with pytest.raises(StatsMismatchError, match="'amax'.*shape"):
        per_channel.merge(_collected(MaxCalibrator, None, _shares(None)).stats())
    with pytest.raises(StatsMismatchError, match="fields"):
        per_channel.merge({"amax": torch.ones(1, 3)})
