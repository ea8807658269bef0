"""Auto-tune on small models, checked against an independent measurement of each layer's output distance."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qdq import calibrate_model, quant_modules
from qdq.calibrate.autotune import TuneResult, autotune, tunable_layers
from qdq.transform.switches import quantizers
from qdq.tensor_quant import fake_quantize_by_amax


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(32, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class Branches(nn.Module):
    """One activation read by two conv layers with their own quantizers.

    Half of the channels are bounded by 1, the other half carry the outliers. ``left`` reads only the bounded half and
    ``right`` only the other, so ``right`` wants a larger input amax than ``left``.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 4, 1)
        self.right = nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            self.left.weight[:, 4:] = 0
            self.right.weight[:, :4] = 0

    def forward(self, x):
        y = F.relu(self.stem(x))
        y = torch.cat([y[:, :4].clamp(max=1.0), y[:, 4:]], 1)
        return self.left(y) + self.right(y)


def _data(n=6, seed=0):
    """Random images with a few large outliers per batch."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randn(4, 3, 8, 8, generator=g)
        idx = torch.randint(0, x.numel(), (3,), generator=g)
        x.view(-1)[idx] = torch.tensor([12.0, -15.0, 9.0])
        batches.append(x)
    return batches


def _calibrated(cls=Net, method="kld"):
    torch.manual_seed(0)
    model = cls()
    quant_modules.replace_to_quantization_module(model)
    calibrate_model(model, _data(), method=method, progress=False)
    return model


def _distances(model, layer_name, batches, amaxes):
    """||layer(fake_quant(x, a)) - layer(x)||_2 over the batches for each amax, measured without autotune.

    The model runs with only its weight quantizers enabled; the layer's input and output are captured with a hook.
    """
    layer = dict(model.named_modules())[layer_name]
    iq = layer._input_quantizer
    weight_ids = {id(m._weight_quantizer) for m in tunable_layers(model).values()}
    saved = {q: q.state() for _, q in quantizers(model)}
    captured = []
    handle = layer.register_forward_hook(lambda m, a, out: captured.append((a[0].clone(), out.clone())))
    try:
        for _, q in quantizers(model):
            q.disable_calib()
            if id(q) not in weight_ids:
                q.disable()
        with torch.no_grad():
            for x in batches:
                model(x)
            handle.remove()
            out = []
            for a in amaxes:
                total = 0.0
                for x, ref in captured:
                    y = layer(fake_quantize_by_amax(x, torch.tensor(a), iq.num_bits, iq.unsigned, iq.narrow_range))
                    total += float(((y.double() - ref.double()) ** 2).sum())
                out.append(math.sqrt(total))
    finally:
        handle.remove()
        for q, s in saved.items():
            q.set_state(s)
    return out


def test_tunes_every_weighted_layer_within_bounds():
    model = _calibrated()
    before = {n: m._input_quantizer.amax.item() for n, m in tunable_layers(model).items()}
    data = _data(4, seed=1)
    results = autotune(model, data, num_batches=3, progress=False)
    assert list(results) == ["conv1", "conv2", "fc1", "fc2"]
    for name, r in results.items():
        assert isinstance(r, TuneResult)
        q = dict(model.named_modules())[name]._input_quantizer
        assert r.initial == pytest.approx(before[name], rel=0, abs=0)  # calibrate_model(method="kld") set it
        assert r.absmax == q.calibrator.compute_amax("max").item()
        assert r.initial <= r.amax <= r.absmax
        assert q.amax.item() == r.amax
        assert r.candidates[0] == r.initial and r.candidates[-1] == r.absmax and len(r.candidates) == 10
        steps = torch.tensor(r.candidates).diff()
        assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-4)
        assert r.calls == 3 and not r.shared_with


@pytest.mark.slow
def test_tuned_distance_is_not_worse_than_initial():
    model = _calibrated()
    data = _data(4, seed=1)
    results = autotune(model, data, num_batches=3, progress=False)
    moved = 0
    for name, r in results.items():
        d_initial, d_tuned, d_best = _distances(model, name, data[:3], [r.initial, r.amax, r.best])
        assert d_tuned <= d_initial * (1 + 1e-6), name
        assert r.distances[0] == pytest.approx(d_initial, rel=1e-5)
        assert r.best_distance == pytest.approx(d_best, rel=1e-5)
        moved += r.amax != r.initial
    assert moved >= 1  # the outliers make a larger amax pay somewhere


def test_reported_distances_match_independent_measurement():
    model = _calibrated()
    data = _data(2, seed=3)
    r = autotune(model, data, num_batches=2, candidates=4, progress=False)["conv2"]
    assert r.distances == pytest.approx(_distances(model, "conv2", data, r.candidates), rel=1e-5)
    assert r.best == r.candidates[min(range(4), key=lambda k: r.distances[k])]


@pytest.mark.slow
def test_activation_read_by_two_layers_takes_the_largest():
    # entropy starts from a threshold well inside the range (on this data KLD starts at the maximum, where the two
    # layers cannot disagree)
    model = _calibrated(Branches, method="entropy")
    data = _data(3, seed=2)
    results = autotune(model, data, method_init="entropy", progress=False)
    left, right = results["left"], results["right"]
    assert left.shared_with == ("right",) and right.shared_with == ("left",)
    assert not results["stem"].shared_with
    own = []
    for r in (left, right):
        d = _distances(model, r.layer, data, r.candidates)
        own.append(r.candidates[min(range(len(d)), key=d.__getitem__)])
        assert r.best == own[-1]
    assert left.best != right.best  # the rule is exercised: the larger one wins
    assert left.amax == right.amax == max(own)
    assert model.left._input_quantizer.amax.item() == model.right._input_quantizer.amax.item() == max(own)
    for r in (left, right):
        assert r.initial <= r.amax <= r.absmax


def test_shared_quantizer_object_takes_the_largest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    quant_modules.replace_to_quantization_module(model)
    model[2]._input_quantizer = model[0]._input_quantizer  # one quantizer for two different tensors
    data = [torch.cat([torch.randn(16, 8), torch.full((1, 8), 7.0)]) for _ in range(3)]
    calibrate_model(model, data, method="kld", progress=False)
    results = autotune(model, data, progress=False)
    a, b = results["0"], results["2"]
    assert a.quantizer == b.quantizer == "0._input_quantizer"
    assert a.candidates == b.candidates
    assert a.amax == b.amax == max(a.best, b.best) == model[0]._input_quantizer.amax.item()
    assert a.shared_with == ("2",)


def test_modes_restored():
    model = _calibrated()
    model.train()
    model.fc2.eval()
    model.conv1._input_quantizer.enable_clip()
    model.fc1._weight_quantizer.disable()
    model.conv2._input_quantizer.enable_calib()
    states = {id(q): q.state() for _, q in quantizers(model)}
    modes = {n: m.training for n, m in model.named_modules()}
    autotune(model, _data(2), progress=False)
    assert {id(q): q.state() for _, q in quantizers(model)} == states
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(not m._forward_hooks for m in model.modules())


def test_modes_restored_on_error():
    model = _calibrated()
    model.train()
    states = {id(q): q.state() for _, q in quantizers(model)}

    def broken():
        yield torch.randn(4, 3, 8, 8)
        yield torch.randn(4, 5, 8, 8)  # wrong channel count

    with pytest.raises(RuntimeError, match=r"autotune batch 1 \(Tensor\(4, 5, 8, 8\) float32\) failed"):
        autotune(model, broken(), progress=False)
    assert {id(q): q.state() for _, q in quantizers(model)} == states
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())


def test_forward_loop_and_method_init_none():
    model = _calibrated()
    start = model.fc1._input_quantizer.amax.item() / 2
    model.fc1._input_quantizer.amax = start
    data = _data(2)

    def loop(m):
        for x in data:
            m(x)

    results = autotune(model, loop, method_init=None, candidates=3, progress=False)
    assert results["fc1"].initial == start and results["fc1"].calls == 2
    assert start <= results["fc1"].amax <= results["fc1"].absmax


def test_no_histogram_quantizers():
    torch.manual_seed(0)
    model = Net()
    quant_modules.replace_to_quantization_module(model)
    hint = r"no layer .* calibrated histogram.*calibrate_model\(model, data, method='kld'\)"
    with pytest.raises(RuntimeError, match=hint):
        autotune(model, _data(1), progress=False)  # never calibrated
    calibrate_model(model, _data(2), method="max", progress=False)
    with pytest.raises(RuntimeError, match="calibrate_model"):
        autotune(model, _data(1), progress=False)  # max calibrators only


def test_empty_data_and_bad_arguments():
    model = _calibrated()
    with pytest.raises(ValueError, match="yielded no batches"):
        autotune(model, [], progress=False)
    with pytest.raises(ValueError, match="candidates"):
        autotune(model, _data(1), candidates=1, progress=False)
    with pytest.raises(ValueError, match="num_batches"):
        autotune(model, _data(1), num_batches=0, progress=False)


def test_layer_not_reached_keeps_its_amax(caplog):
    model = _calibrated()
    before = model.fc2._input_quantizer.amax.item()

    def loop(m):  # runs only the convolutions
        m.conv2(F.relu(m.conv1(_data(1)[0])))

    with caplog.at_level(logging.WARNING, logger="qdq.calibrate.autotune"):
        results = autotune(model, loop, progress=False)
    assert set(results) == {"conv1", "conv2"}
    assert model.fc2._input_quantizer.amax.item() == before
    assert "fc1, fc2" in caplog.text


def test_calibrate_model_with_autotune():
    """calibrate_model(method="kld", autotune=True) runs the search and the auto-tune in one call."""
    import qdq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    qdq.replace_to_quantization_module(model)
    data = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    data[0][0, 0, 0, 0] = 25.0  # an outlier for the thresholds to decide about
    report = qdq.calibrate_model(model, data, method="kld", autotune=True, tune_batches=2, progress=False)
    assert set(report.autotune) == {"0", "3"} and report.autotune_seconds > 0
    for result in report.autotune.values():
        assert result.initial - 1e-6 <= result.amax <= result.absmax + 1e-6
    with pytest.raises(ValueError, match="histogram method"):
        qdq.calibrate_model(model, data, method="max", autotune=True, progress=False)
