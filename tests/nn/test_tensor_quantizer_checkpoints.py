"""Checkpoints of quantized models load the way users expect (issue: strict loads that silently fell back to
per-batch amax, per-channel amax of another layout accepted, learned amax coming back as a buffer, CUDA devices
kept after ``map_location="cpu"``)."""

import io
import logging

import pytest
import torch
from torch import nn

import qdq
from qdq import nn as quant_nn
from qdq.tensor_quant import QuantDescriptor


def _net(**kw):
    torch.manual_seed(0)
    return nn.Sequential(quant_nn.QuantConv2d(3, 4, 3, **kw), nn.ReLU(), quant_nn.QuantConv2d(4, 2, 1, **kw))


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 8, 8, generator=g) for _ in range(2)]


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=False)


def test_strict_load_reports_a_missing_amax_the_model_needs():
    """Regression: a checkpoint saved before calibration loaded with strict=True into a fresh model and left every
    quantizer on per-batch amax, silently."""
    uncalibrated = _roundtrip(_net().state_dict())
    fresh = _net()
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*0\._input_quantizer\._amax"):
        fresh.load_state_dict(uncalibrated, strict=True)
    result = _net().load_state_dict(uncalibrated, strict=False)
    assert "0._input_quantizer._amax" in result.missing_keys


def test_float_checkpoint_still_loads_strictly_into_a_quantized_model():
    """Pretrained float weights (no quantizers in the checkpoint) load with strict=True, as in pytorch_quantization."""
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    _net().load_state_dict(_roundtrip(float_model.state_dict()), strict=True)


def test_disabled_quantizer_needs_no_amax_at_load():
    state = _roundtrip(_net().state_dict())
    fresh = _net()
    qdq.disable_quantization(fresh).apply()
    fresh.load_state_dict(state, strict=True)


def test_calibrated_checkpoint_round_trips_strictly():
    model = _net()
    qdq.calibrate_model(model, _data(), progress=False)
    fresh = _net()
    fresh.load_state_dict(_roundtrip(model.state_dict()), strict=True)
    for (name, q), (_, q2) in zip(qdq.quantizers(model), qdq.quantizers(fresh)):
        assert torch.equal(q.amax, q2.amax), name


@pytest.mark.parametrize("shape, match", [((1, 4, 1, 1), "varies along dimension"), ((5, 1, 1, 1), "shape")])
def test_per_channel_amax_of_wrong_layout_or_shape_is_refused_with_the_quantizer_name(shape, match):
    model = _net()
    qdq.calibrate_model(model, _data(), progress=False)
    state = model.state_dict()
    state["0._weight_quantizer._amax"] = torch.ones(shape)
    target = _net()
    qdq.calibrate_model(target, _data(), progress=False)
    with pytest.raises(RuntimeError, match=match) as err:
        target.load_state_dict(state)
    assert "0._weight_quantizer" in str(err.value)
    # into a fresh (uncalibrated) model the layout is still checked
    if match.startswith("varies"):
        with pytest.raises(RuntimeError, match=match):
            _net().load_state_dict(state)


def test_per_tensor_quantizer_refuses_a_per_channel_amax():
    q = quant_nn.TensorQuantizer()
    with pytest.raises(RuntimeError, match="per-tensor quantizer takes one amax"):
        q.load_state_dict({"_amax": torch.ones(4, 1, 1, 1)})


def test_learned_amax_loads_back_as_a_trainable_parameter():
    desc = QuantDescriptor(learn_amax=True)
    model = _net(quant_desc_input=desc)
    qdq.calibrate_model(model, _data(), progress=False)
    assert isinstance(model[0]._input_quantizer._amax, nn.Parameter)
    with torch.no_grad():
        model[0]._input_quantizer._amax.mul_(0.5)  # "trained"
    fresh = _net(quant_desc_input=desc)
    fresh.load_state_dict(_roundtrip(model.state_dict()), strict=True)
    amax = fresh[0]._input_quantizer._amax
    assert isinstance(amax, nn.Parameter) and amax.requires_grad
    assert torch.equal(amax, model[0]._input_quantizer.amax)
    assert any(p is amax for p in fresh.parameters())
    fresh(_data()[0]).sum().backward()
    assert amax.grad is not None and torch.isfinite(amax.grad).all()


def test_model_pickled_with_a_cuda_device_loads_calibrates_and_exports_on_cpu(tmp_path):
    """A whole model saved on CUDA and loaded with map_location="cpu": no quantizer keeps the CUDA device (the
    device is simulated on the quantizers: this machine has no GPU)."""
    model = _net()
    qdq.calibrate_model(model, _data(), progress=False)
    for _, q in qdq.quantizers(model):
        q._device = torch.device("cuda", 0)
    loaded = _roundtrip(model)
    assert all(q._device.type == "cpu" for _, q in qdq.quantizers(loaded))
    qdq.calibrate_model(loaded, _data(), progress=False)
    loaded.load_state_dict(_roundtrip(loaded.state_dict()))
    qdq.export_onnx(loaded, _data()[0], tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").stat().st_size > 0


def test_uncalibrated_quantizer_warns_once_with_its_name(caplog):
    model = _net()
    qdq.transform.replace.name_quantizers(model)
    with caplog.at_level(logging.WARNING, logger="qdq"):
        model(_data()[0])
        model(_data()[1])
    lines = [r for r in caplog.records if "0._input_quantizer" in r.getMessage() and "no amax" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING


def test_rules_step_exports_an_uncalibrated_model_but_export_onnx_still_refuses(tmp_path):
    model = _net()
    calls = []

    def export(m, path):
        calls.append(path)
        torch.onnx.export(m, (torch.randn(1, 3, 8, 8),), path, dynamo=False)

    qdq.apply_custom_rules_to_quantizer(model, export)  # the callable in second position
    assert calls
    with pytest.raises(RuntimeError, match="has no amax"):
        qdq.export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "x.onnx")
    quant_nn.TensorQuantizer.use_fb_fake_quant = True
    try:
        with pytest.raises(RuntimeError, match="has no amax"):
            model(torch.randn(1, 3, 8, 8))
    finally:
        quant_nn.TensorQuantizer.use_fb_fake_quant = False
