"""Misspelt search keywords are errors, not silently ignored."""

import pytest
import torch

from qdq.calib import HistogramCalibrator
from qdq.calib.amax_search import check_search_keywords, search_keywords


def _hist():
    cal = HistogramCalibrator(8, None, False)
    cal.collect(torch.randn(1000))
    return cal


@pytest.mark.parametrize("method,kw", [("percentile", {"percentil": 99.0}), ("mse", {"start_bn": 10}),
                                       ("entropy", {"strides": 2}), ("kld", {"foo": 1})])
def test_unknown_search_keyword_is_a_type_error_naming_it(method, kw):
    """Regression: compute_amax(method="percentile", percentil=99) ignored the typo and used 99.99."""
    with pytest.raises(TypeError, match=rf"unknown keyword arguments \['{next(iter(kw))}'\]"):
        _hist().compute_amax(method=method, **kw)


def test_known_keywords_of_other_searches_are_accepted():
    cal = _hist()
    # one set of keywords for every quantizer of a model, whatever its search: start_bin does not bother percentile
    assert cal.compute_amax(method="percentile", percentile=100, start_bin=64).item() == pytest.approx(
        cal.compute_amax(method="max").item(), rel=1e-3)
    assert set(search_keywords()) >= {"percentile", "start_bin", "stride"}
    check_search_keywords(["percentile", "stride"])
