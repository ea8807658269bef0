import numpy as np
import pytest
import torch

from qdq.calib import MaxCalibrator, NoDataCollectedError, NonFiniteWarning


@pytest.mark.parametrize("axis", [None, 0, 1, (0, 2), -1])
def test_running_max_matches_numpy(axis):
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((4, 3, 5)).astype(np.float32) * s for s in (1, 3, 0.5)]
    cal = MaxCalibrator(8, axis, False)
    for x in xs:
        cal.collect(torch.from_numpy(x))
    stacked = np.abs(np.stack(xs))
    if axis is None:
        expected = stacked.max()
    else:
        kept = [a % 3 for a in ((axis,) if isinstance(axis, int) else axis)]
        red = tuple([0] + [d + 1 for d in range(3) if d not in kept])
        expected = stacked.max(axis=red, keepdims=True)[0]
    got = cal.compute_amax()
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), expected)


def test_non_contiguous_and_half():
    x = torch.randn(5, 6).t()
    cal = MaxCalibrator(8, 0, False)
    cal.collect(x.half())
    np.testing.assert_array_equal(cal.compute_amax().numpy(), x.half().float().abs().amax(1, keepdim=True).numpy())


def test_nonfinite_skipped_and_counted():
    cal = MaxCalibrator(8, 0, False)
    x = torch.tensor([[1.0, float("nan")], [float("inf"), -2.0], [0.5, 0.25]])
    with pytest.warns(NonFiniteWarning, match="skipped 2 NaN/Inf"):
        cal.collect(x)
    assert cal.num_nonfinite == 2
    assert cal.compute_amax().flatten().tolist() == [1.0, 2.0, 0.5]


def test_no_data_is_an_error():
    cal = MaxCalibrator()
    with pytest.raises(NoDataCollectedError):
        cal.compute_amax()
    cal.collect(torch.empty(0))
    with pytest.raises(NoDataCollectedError):
        cal.compute_amax()


def test_unsigned_negative_is_an_error():
    with pytest.raises(ValueError, match="negative data"):
        MaxCalibrator(8, None, True).collect(torch.tensor([1.0, -1.0]))


def test_channel_count_change_is_an_error():
    cal = MaxCalibrator(8, 0, False)
    cal.collect(torch.randn(3, 2))
    with pytest.raises(ValueError, match="does not match"):
        cal.collect(torch.randn(4, 2))


def test_reset_and_track():
    cal = MaxCalibrator(8, None, False, track_amax=True)
    cal.collect(torch.tensor([2.0]))
    cal.collect(torch.tensor([-3.0]))
    assert [a.item() for a in cal.amaxs] == [2.0, 3.0]
    cal.reset()
    with pytest.raises(NoDataCollectedError):
        cal.compute_amax()


def test_only_max_method():
    cal = MaxCalibrator()
    cal.collect(torch.ones(3))
    assert cal.compute_amax(method="max").item() == 1.0
    with pytest.raises(ValueError, match="histogram calibrator"):
        cal.compute_amax(method="entropy")


def test_channel_count_change_is_value_and_runtime_error_naming_both_shapes():
    from qdq.calib import ShapeChangedError

    cal = MaxCalibrator(8, 0, False)
    cal.collect(torch.rand(32, 63, 7, 7))
    with pytest.raises(RuntimeError, match=r"shape changed: \(33, 1, 1, 1\).*\(32, 1, 1, 1\)") as info:
        cal.collect(torch.rand(33, 63, 7, 7))
    assert isinstance(info.value, ShapeChangedError) and isinstance(info.value, ValueError)
    assert cal.num_batches == 1  # the refused tensor was not counted
