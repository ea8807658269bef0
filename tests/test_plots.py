import pytest
import torch
from torch import nn

import qdq
from qdq import nn as quant_nn
from qdq.plots import plot_histogram, plot_sensitivity
from qdq.sensitivity import build_sensitivity_profile
from qdq.tensor_quant import QuantDescriptor

PNG = b"\x89PNG\r\n\x1a\n"


def test_histogram_png_and_amaxes(tmp_path):
    q = quant_nn.TensorQuantizer(QuantDescriptor(calib_method="histogram"), if_calib=True, if_quant=False)
    q(torch.cat([torch.randn(20000), torch.tensor([30.0])]))
    amaxes = plot_histogram(q, tmp_path / "h.png", methods=("max", "percentile", "kld"), percentile=99.9)
    assert (tmp_path / "h.png").read_bytes().startswith(PNG)
    assert amaxes["max"] == 30.0 and amaxes["percentile"] < 5.0
    assert amaxes["percentile"] == q.calibrator.compute_amax("percentile", percentile=99.9).item()


def test_histogram_needs_histogram_calibrator(tmp_path):
    with pytest.raises(TypeError, match="no histogram calibrator"):
        plot_histogram(quant_nn.TensorQuantizer(), tmp_path / "x.png")


def test_sensitivity_png(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    qdq.replace_to_quantization_module(model)
    x = torch.randn(64, 8)
    qdq.calibrate_model(model, [x], progress=False)
    with torch.no_grad(), qdq.disable_quantization(model):
        ref = model(x)
    profile = build_sensitivity_profile(model, lambda m: -float(((m(x) - ref) ** 2).mean()), print_table=False,
                                        progress=False)
    plot_sensitivity(profile, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes().startswith(PNG)
