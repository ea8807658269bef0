"""Hostile arguments to the QAT helpers."""

import math

import pytest
from torch import nn

from qdq.transform.qat import Distiller, qat_learning_rate


@pytest.mark.parametrize("lr", [float("nan"), math.inf, 0.0, -1.0])
def test_qat_learning_rate_refuses_nan_and_inf(lr):
    """Regression: qat_learning_rate(nan) returned nan."""
    with pytest.raises(ValueError, match=r"need original_lr > 0"):
        qat_learning_rate(lr)


def test_distiller_argument_types():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"Distiller takes nn.Module student and teacher, got Sequential and str"):
        Distiller(model, "teacher")
    with pytest.raises(TypeError, match=r"layers must be a list of module paths, got the string '0'"):
        Distiller(model, layers="0")
    with pytest.raises(ValueError, match=r"the student model has no module 'fc'"):
        Distiller(model, layers=["fc"])
