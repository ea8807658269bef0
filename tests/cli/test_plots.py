import math
import pytest
import torch
from torch import nn

import qdq
from qdq import nn as quant_nn
from qdq.calib import HistogramCalibrator
from qdq.cli.plots import method_stats, plot_histogram, plot_sensitivity
from qdq.calibrate.sensitivity import build_sensitivity_profile
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


def _image(path):
    """The PNG as an RGBA array; fails on anything that is not a decodable PNG."""
    from matplotlib import image

    assert path.read_bytes().startswith(PNG)
    return image.imread(path)


def test_histogram_stats_match_the_data():
    """Clipped fraction and error are those of the raw data, to the histogram's resolution."""
    cal = HistogramCalibrator(num_bits=4, axis=None, unsigned=False, num_bins=4096)
    x = torch.randn(50000)
    cal.collect(x)
    stats = {s.method: s for s in method_stats(cal, {"narrow": 1.0, "wide": 3.5})}
    for key, amax in (("narrow", 1.0), ("wide", 3.5)):
        clipped = float((x.abs() > amax).float().mean())
        assert abs(stats[key].clipped - clipped) < 2e-3, (key, stats[key].clipped, clipped)
        scale = torch.tensor(amax / 7)
        mse = float(((x.abs() / scale).round().clamp(max=7) * scale - x.abs()).square().mean())
        assert stats[key].mse == pytest.approx(mse, rel=0.05)
    assert stats["narrow"].clipped > stats["wide"].clipped


def test_histogram_png_shows_each_method(tmp_path):
    """Coinciding methods both reach the legend with their clipped fraction; the picture is not blank."""
    q = quant_nn.TensorQuantizer(QuantDescriptor(calib_method="histogram"), if_calib=True, if_quant=False)
    q(torch.relu(torch.randn(20000)))
    plot_histogram(q, tmp_path / "h.png", methods=("max", "percentile"), percentile=100)
    pixels = _image(tmp_path / "h.png")
    assert pixels.shape[:2] == (int(4.5 * 110), 8 * 110)
    assert pixels[..., :3].std() > 0.05


def test_sensitivity_png(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    qdq.replace_to_quantization_module(model)
    x = torch.randn(64, 8)
    qdq.calibrate_model(model, [x], progress=False)
    with torch.no_grad(), qdq.disable_quantization(model):
        ref = model(x)

    def metric(m):
        with torch.no_grad():
            return -float(((m(x) - ref) ** 2).mean())

    profile = build_sensitivity_profile(model, metric, print_table=False, progress=False)
    drawn = plot_sensitivity(profile, tmp_path / "s.png")
    assert drawn == [r.metric for r in profile.rows]
    assert profile.float_metric == 0.0 and all(v <= 0.0 for v in drawn)
    assert _image(tmp_path / "s.png")[..., :3].std() > 0.05


def test_sensitivity_png_with_an_infinite_baseline(tmp_path):
    """Regression: an SQNR metric is +inf for the float model, which broke the axis limits."""
    from qdq.calibrate.sensitivity import SensitivityProfile, SensitivityRow

    rows = [SensitivityRow("a", 30.0, -math.inf, 2.0), SensitivityRow("b", math.inf, 0.0, math.inf)]
    profile = SensitivityProfile("disable_one", math.inf, 28.0, rows)
    assert plot_sensitivity(profile, tmp_path / "s.png") == [30.0, math.inf]
    assert _image(tmp_path / "s.png")[..., :3].std() > 0.05
