"""Hostile arguments to calibrate_model / compute_amax: clear errors, raised before the data is fed."""

import pytest
import torch
from torch import nn

import qdq


def _model():
    model = nn.Sequential(nn.Linear(4, 4))
    qdq.replace_to_quantization_module(model)
    return model


@pytest.mark.parametrize("data", [None, 5, object()])
def test_data_that_is_neither_iterable_nor_a_forward_loop(data):
    """Regression: calibrate_model(model, None) gave "'NoneType' object is not iterable"."""
    with pytest.raises(TypeError, match=r"data must be an iterable of batches .* or a forward loop .* got"):
        qdq.calibrate_model(_model(), data, progress=False)


def test_a_misspelt_search_keyword_fails_before_collecting():
    """Regression: calibrate_model(..., start_bn=64) ignored the typo; now it fails before any batch is fed."""
    fed = []

    def batches():
        fed.append(1)
        yield torch.randn(8, 4)

    with pytest.raises(TypeError, match=r"calibrate_model: unknown keyword arguments \['start_bn'\]"):
        qdq.calibrate_model(_model(), batches(), method="mse", start_bn=64, progress=False)
    assert fed == []
    model = _model()
    qdq.collect_stats(model, [torch.randn(8, 4)], progress=False)
    with pytest.raises(TypeError, match=r"compute_amax: unknown keyword arguments \['percentil'\]"):
        qdq.compute_amax(model, method="max", percentil=99.0)
