import logging

import numpy as np
import pytest
import torch
from torch import nn

from qdq import calib, calibrate_model, collect_stats, compute_amax
from qdq import nn as quant_nn
from qdq.transform.replace import replace_to_quantization_module
from qdq.transform.switches import quantizers


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    replace_to_quantization_module(model)
    return model


class Counting:
    """An iterable of batches that counts how many were taken."""

    def __init__(self, n, make=lambda i: (torch.randn(2, 3, 6, 6), torch.zeros(2))):
        self.n, self.make, self.taken = n, make, 0

    def __iter__(self):
        for i in range(self.n):
            self.taken += 1
            yield self.make(i)

    def __len__(self):
        return self.n


def test_feeds_exactly_num_batches():
    model = _model()
    data = Counting(10)
    report = calibrate_model(model, data, num_batches=4, progress=False)
    assert data.taken == 4 and report.batches == 4
    assert model[0].input_quantizer.calibrator.num_batches == 4


def test_max_amax_equals_data_max():
    model = _model()
    batches = [torch.randn(2, 3, 6, 6) * (i + 1) for i in range(3)]
    calibrate_model(model, batches, progress=False)
    expected = torch.stack([b.abs().max() for b in batches]).max()
    assert model[0].input_quantizer.amax.item() == expected.item()
    w = model[0].weight
    assert torch.equal(model[0].weight_quantizer.amax, w.abs().amax(dim=(1, 2, 3), keepdim=True))


def test_restores_modes_and_flags_also_on_error():
    model = _model()
    model.train()
    model[4].eval()
    model[0].input_quantizer.disable_clip()
    before = {id(q): q.state() for _, q in quantizers(model)}

    def bad(i):
        if i == 2:
            return (torch.randn(2, 5, 6, 6), None)  # wrong channel count
        return (torch.randn(2, 3, 6, 6), None)

    with pytest.raises(RuntimeError, match=r"calibration batch 2 \(Tensor\(2, 5, 6, 6\) float32\) failed"):
        calibrate_model(model, Counting(5, bad), progress=False)
    assert model.training and not model[4].training and model[0].training
    assert {id(q): q.state() for _, q in quantizers(model)} == before
    calibrate_model(model, [torch.randn(2, 3, 6, 6)], progress=False)
    assert model.training and not model[4].training
    assert {id(q): q.state() for _, q in quantizers(model)} == before


@pytest.mark.parametrize("method", ["entropy", "mse", "percentile"])
def test_histogram_methods_swap_in_histogram_calibrators(method, caplog):
    model = _model()
    with caplog.at_level(logging.INFO, logger="qdq"):
        report = calibrate_model(model, [torch.randn(4, 3, 6, 6) for _ in range(3)], method=method, progress=False)
    # said, not done behind the user's back: the log and the report name the quantizers and the reason
    assert (f"method='{method}': 3 quantizers collect a histogram (HistogramCalibrator) instead of their max "
            "calibrator") in caplog.text
    assert "0._input_quantizer, 2._input_quantizer, 4._input_quantizer" in caplog.text
    assert "keep their MaxCalibrator" in caplog.text and "0._weight_quantizer (per-channel (axis=0))" in caplog.text
    assert report.replaced_calibrators == ["0._input_quantizer", "2._input_quantizer", "4._input_quantizer"]
    assert isinstance(model[0].input_quantizer.calibrator, calib.HistogramCalibrator)
    assert isinstance(model[0].weight_quantizer.calibrator, calib.MaxCalibrator)  # per-channel weights keep max
    assert report.calibrated == 5 and report.method == method
    assert 0 < model[0].input_quantizer.amax.item() <= 5.5


def test_percentile_argument_reaches_the_search():
    model = _model()
    x = torch.randn(64, 3, 6, 6)
    calibrate_model(model, [x], method="percentile", percentile=50.0, progress=False)
    assert model[0].input_quantizer.amax.item() == pytest.approx(float(np.percentile(x.abs(), 50)), abs=0.01)


def test_input_kinds_dict_callable_preprocess():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, scale=1.0):
            return self.fc(x * scale)

    model = Kw()
    replace_to_quantization_module(model)
    calibrate_model(model, [{"x": torch.ones(2, 3), "scale": 2.0}], progress=False)
    assert model.fc.input_quantizer.amax.item() == 2.0
    calibrate_model(model, lambda m: m(torch.full((1, 3), 3.0)), progress=False)
    assert model.fc.input_quantizer.amax.item() == 3.0
    calibrate_model(model, [np.ones((1, 3), dtype=np.float32) * 4], preprocess=torch.from_numpy, progress=False)
    assert model.fc.input_quantizer.amax.item() == 4.0


def test_bad_batch_type_named():
    model = _model()
    with pytest.raises(TypeError, match="calibration batch 0 is a str"):
        calibrate_model(model, ["image.jpg"], progress=False)


def test_empty_data():
    with pytest.raises(ValueError, match="yielded no batches"):
        calibrate_model(_model(), [], progress=False)


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _model()
        self.unused = quant_nn.QuantLinear(2, 2)

    def forward(self, x):
        return self.body(x)


def test_strict_names_unused_quantizers():
    model = WithUnused()
    with pytest.raises(RuntimeError, match=r"2 quantizers saw no calibration data: unused._input_quantizer, "
                                           r"unused._weight_quantizer"):
        calibrate_model(model, [torch.randn(1, 3, 6, 6)], progress=False)
    calibrate_model(model, [torch.randn(1, 3, 6, 6)], strict=False, progress=False)
    assert not model.unused.input_quantizer.is_enabled and model.body[0].input_quantizer.amax is not None


def test_shared_module_calibrates_on_both_uses():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    replace_to_quantization_module(model)
    x = torch.randn(3, 4)
    calibrate_model(model, [x], progress=False)
    with torch.no_grad():
        h = torch.relu(nn.functional.linear(x, shared.weight, shared.bias))
    assert shared.input_quantizer.calibrator.num_batches == 2
    assert shared.input_quantizer.amax.item() == max(x.abs().max().item(), h.abs().max().item())


def test_collect_then_several_methods():
    model = _model()
    for _, q in quantizers(model):
        if q.axis is None:
            q.set_calibrator(calib.HistogramCalibrator(8, None, False))
    collect_stats(model, [torch.randn(8, 3, 6, 6) for _ in range(2)], progress=False)
    amaxes = {}
    for method in ["max", "entropy", "mse", "percentile"]:
        compute_amax(model, method=method)
        amaxes[method] = model[0].input_quantizer.amax.item()
    assert amaxes["max"] >= max(amaxes["entropy"], amaxes["mse"], amaxes["percentile"])
    with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
        compute_amax(model, method="kl")


def test_no_quantizers():
    with pytest.raises(RuntimeError, match="no enabled quantizer"):
        calibrate_model(nn.Linear(2, 2), [torch.randn(1, 2)], progress=False)


def test_bad_num_batches():
    with pytest.raises(ValueError, match="num_batches"):
        calibrate_model(_model(), [torch.randn(1, 3, 6, 6)], num_batches=0, progress=False)


def test_quantized_after_calibration():
    model = _model()
    x = torch.randn(2, 3, 6, 6)
    calibrate_model(model, [x], progress=False)
    model.eval()
    with torch.no_grad():
        q_out = model(x)
        for _, q in quantizers(model):
            q.disable()
        f_out = model(x)
    assert not torch.equal(q_out, f_out) and torch.allclose(q_out, f_out, atol=0.1)


# ----------------------------------------------------------------------------------------------------------------
# one vocabulary: a descriptor names the search; calibrate_model says what it collects
# ----------------------------------------------------------------------------------------------------------------


def _linear_pair(desc):
    torch.manual_seed(3)
    return nn.Sequential(quant_nn.QuantLinear(16, 16, quant_desc_input=desc), nn.ReLU(),
                         quant_nn.QuantLinear(16, 4, quant_desc_input=desc))


@pytest.mark.parametrize("method,args", [("entropy", {}), ("mse", {"start_bin": 64, "stride": 2}),
                                         ("percentile", {"percentile": 99.0, "num_bins": 512}), ("kld", {})])
def test_a_descriptor_naming_the_search_equals_the_explicit_path_exactly(method, args):
    """QuantDescriptor(calib_method="entropy") is a histogram with an entropy amax: the same amax, bit for bit, as
    calib_method="histogram" calibrated with method="entropy" (and the same parameters)."""
    from qdq.tensor_quant import QuantDescriptor

    g = torch.Generator().manual_seed(5)
    data = [torch.randn(32, 16, generator=g) * (1 + i) for i in range(4)]
    named = _linear_pair(QuantDescriptor(calib_method=method, calib_args=args))
    assert isinstance(named[0].input_quantizer.calibrator, calib.HistogramCalibrator)
    assert named[0].input_quantizer.calibrator.num_bins == args.get("num_bins", 2048)
    report = calibrate_model(named, data, progress=False)
    assert report.method == "per-quantizer" and report.replaced_calibrators == []
    explicit = _linear_pair(QuantDescriptor(calib_method="histogram",
                                            calib_args={k: v for k, v in args.items() if k == "num_bins"}))
    calibrate_model(explicit, data, method=method, progress=False,
                    **{k: v for k, v in args.items() if k != "num_bins"})
    for i in (0, 2):
        a, b = named[i].input_quantizer.amax, explicit[i].input_quantizer.amax
        assert torch.equal(a, b), (method, i, a, b)
        assert torch.equal(named[i].weight_quantizer.amax, named[i].weight.detach().abs().amax(1, keepdim=True))
    # and the same as the calibrator's own search
    ref = calib.HistogramCalibrator(8, None, False, num_bins=args.get("num_bins", 2048))
    for x in data:
        ref.collect(x)
    expected = ref.compute_amax(method, **{k: v for k, v in args.items() if k != "num_bins"})
    assert torch.equal(named[0].input_quantizer.amax, expected)


def test_without_method_nothing_is_swapped_and_max_stays_max(caplog):
    """Regression: collect_stats/calibrate_model replaced max calibrators by histogram ones with only a count in
    the log. Without method= each quantizer keeps the calibrator its descriptor gave it."""
    model = _model()
    before = {name: type(q.calibrator) for name, q in quantizers(model)}
    data = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    with caplog.at_level(logging.INFO, logger="qdq.calibrate.model"):
        collect_stats(model, data, progress=False)
        report = compute_amax(model)
    assert {name: type(q.calibrator) for name, q in quantizers(model)} == before
    assert "collect a histogram" not in caplog.text and report.replaced_calibrators == []
    x = data[0].abs().max().maximum(data[1].abs().max())
    assert torch.equal(model[0].input_quantizer.amax, x)


def test_a_method_overriding_the_descriptors_search_is_logged(caplog):
    from qdq.tensor_quant import QuantDescriptor

    model = _linear_pair(QuantDescriptor(calib_method="entropy"))
    data = [torch.randn(16, 16) for _ in range(2)]
    with caplog.at_level(logging.INFO, logger="qdq.calibrate.model"):
        calibrate_model(model, data, method="percentile", progress=False)
    assert "method='percentile' overrides the search the descriptors of 2 quantizers name" in caplog.text
    assert "0._input_quantizer (entropy)" in caplog.text


def test_a_histogram_without_a_search_warns_naming_the_quantizers(caplog):
    from qdq.tensor_quant import QuantDescriptor

    model = _linear_pair(QuantDescriptor(calib_method="histogram"))
    data = [torch.randn(16, 16) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="qdq.calibrate.model"):
        calibrate_model(model, data, progress=False)
    assert "2 quantizers collected histograms but no search was named" in caplog.text
    assert "0._input_quantizer, 2._input_quantizer" in caplog.text
    assert torch.equal(model[0].input_quantizer.amax, torch.stack([x.abs().max() for x in data]).max())
