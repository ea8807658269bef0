"""QDQ export with both exporters, checked with onnx.checker and against ONNX Runtime."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import numpy_helper
from torch import nn

import qdq
from qdq import nn as quant_nn
from qdq.onnx import ExportError, export_onnx, verify
from qdq.onnx.parity import run_onnxruntime
from qdq.transform.switches import quantizers
from qdq.tensor_quant import QuantDescriptor

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]


def _calibrate(model, shape, n=3, method="max"):
    torch.manual_seed(0)
    data = [torch.randn(shape) for _ in range(n)]
    qdq.calibrate_model(model, data, method=method, progress=False)
    return data


def _ops(model_proto):
    return [n.op_type for n in model_proto.graph.node]


class Wrap(nn.Module):
    """Puts a single layer (or a two-input op) behind a plain forward for export."""

    def __init__(self, layer, two_inputs=False):
        super().__init__()
        self.layer, self.two = layer, two_inputs

    def forward(self, x):
        return self.layer(x, x * 0.5 + 1) if self.two else self.layer(x)


LAYERS = [
    ("conv1d", lambda: quant_nn.QuantConv1d(3, 4, 3, padding=1), (2, 3, 10)),
    ("conv2d", lambda: quant_nn.QuantConv2d(3, 4, 3, stride=2, groups=1), (2, 3, 9, 9)),
    ("conv2d_dw", lambda: quant_nn.QuantConv2d(4, 4, 3, groups=4, padding="same"), (2, 4, 8, 8)),
    ("conv3d", lambda: quant_nn.QuantConv3d(2, 3, 2), (1, 2, 4, 4, 4)),
    ("convT1d", lambda: quant_nn.QuantConvTranspose1d(3, 4, 3, stride=2), (2, 3, 6)),
    ("convT2d", lambda: quant_nn.QuantConvTranspose2d(4, 6, 3, stride=2, groups=2), (2, 4, 5, 5)),
    ("convT3d", lambda: quant_nn.QuantConvTranspose3d(2, 3, 2), (1, 2, 3, 3, 3)),
    ("linear", lambda: quant_nn.QuantLinear(6, 5), (4, 6)),
    ("maxpool2d", lambda: quant_nn.QuantMaxPool2d(2), (2, 3, 8, 8)),
    ("avgpool2d", lambda: quant_nn.QuantAvgPool2d(2), (2, 3, 8, 8)),
    ("adaptiveavgpool2d", lambda: quant_nn.QuantAdaptiveAvgPool2d(1), (2, 3, 8, 8)),
    ("avgpool1d", lambda: quant_nn.QuantAvgPool1d(2), (2, 3, 8)),
]


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[l[0] for l in LAYERS])
def test_every_layer_matches_onnxruntime(name, make, shape, dynamo, tmp_path):
    torch.manual_seed(0)
    model = Wrap(make())
    _calibrate(model, shape)
    info = export_onnx(model, torch.randn(shape), tmp_path / f"{name}.onnx", dynamo=dynamo)
    ops = _ops(info.model)
    has_weight = hasattr(model.layer, "weight")
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == (2 if has_weight else 1)
    for node in info.model.graph.node:
        if node.op_type == "QuantizeLinear":
            zp = _const(info.model, node.input[2])
            assert zp.dtype == np.int8 and not zp.any()
    if has_weight:
        w_dq = _weight_dq(info.model)
        axis = next(a.i for a in w_dq.attribute if a.name == "axis")
        assert axis == 0
        assert _const(info.model, w_dq.input[1]).size == model.layer.weight.shape[0]
    report = verify(model, info.path, torch.randn(shape) * 1.5)
    assert report.ok, str(report)


def _const(model, name):
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(name)


def _weight_dq(model):
    inits = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in inits:
            q_out = node.output[0]
            return next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q_out)
    raise AssertionError("no weight Q/DQ")


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("op", ["add", "concat"])
def test_add_and_concat(op, dynamo, tmp_path):
    layer = quant_nn.QuantAdd(shared=True) if op == "add" else quant_nn.QuantConcat(dim=1)
    model = Wrap(layer, two_inputs=True)
    _calibrate(model, (2, 3, 4))
    info = export_onnx(model, torch.randn(2, 3, 4), tmp_path / "m.onnx", dynamo=dynamo)
    assert _ops(info.model).count("QuantizeLinear") == 2
    scales = {float(_const(info.model, n.input[1])) for n in info.model.graph.node if n.op_type == "QuantizeLinear"}
    assert len(scales) == 1  # one shared quantizer -> one scale
    assert verify(model, info.path, torch.randn(2, 3, 4)).ok


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_resnet18_both_exporters(dynamo, tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    qdq.replace_to_quantization_module(model)
    _calibrate(model, (2, 3, 32, 32), method="percentile")
    info = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "r18.onnx", dynamo=dynamo, dynamic_batch=True)
    # 21 convs + fc, + avgpool; the dynamo exporter's optimizer merges the identical Q/DQ pairs of a block's conv1
    # and downsample (same tensor, same amax): 40 instead of 43
    assert _ops(info.model).count("DequantizeLinear") == (40 if dynamo else 2 * 21 + 1)
    report = verify(model, info.path, torch.randn(3, 3, 32, 32))
    assert report.ok, str(report)
    assert report.outputs[0].max_error_steps < 1


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_deploy_form_same_outputs(dynamo, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    qdq.replace_to_quantization_module(model)
    _calibrate(model, (2, 3, 8, 8))
    fake = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "fake.onnx", dynamo=dynamo, dynamic_batch=True)
    deploy = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "deploy.onnx", dynamo=dynamo, deploy=True,
                         dynamic_batch=True)
    int8_inits = [i for i in deploy.model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
    assert len(int8_inits) == 3
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) > 1 for i in deploy.model.graph.initializer)
    assert _ops(deploy.model).count("QuantizeLinear") == 3 and _ops(deploy.model).count("DequantizeLinear") == 6
    weight_bytes = [sum(len(i.raw_data) for i in m.model.graph.initializer if len(i.dims) > 1) for m in (fake, deploy)]
    assert weight_bytes[1] * 4 == weight_bytes[0]
    x = torch.randn(2, 3, 8, 8)
    a, b = run_onnxruntime(fake.path, x)[0], run_onnxruntime(deploy.path, x)[0]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    # the stored integers are exactly what PyTorch's weight fake quantization used
    w_int = numpy_helper.to_array(int8_inits[0]).astype(np.float32)
    wq = model[0].weight_quantizer
    np.testing.assert_array_equal(w_int * wq.scale.numpy(), wq(model[0].weight).detach().numpy())
    assert verify(model, deploy.path, x).ok


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_narrow_range_export(dynamo, tmp_path):
    desc = QuantDescriptor(narrow_range=True)
    model = Wrap(quant_nn.QuantLinear(4, 3, quant_desc_input=desc,
                                      quant_desc_weight=QuantDescriptor(axis=0, narrow_range=True)))
    _calibrate(model, (8, 4))
    model.layer.input_quantizer.amax = 0.5  # so that many inputs saturate, at -127 not -128
    info = export_onnx(model, torch.randn(1, 4), tmp_path / "n.onnx", dynamo=dynamo, dynamic_batch=True)
    x = torch.randn(64, 4) * 3
    assert verify(model, info.path, x).ok
    assert model.layer.input_quantizer(x).min().item() == pytest.approx(-127 * 0.5 / 127)


def test_errors_name_every_quantizer_and_state_is_restored(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    qdq.replace_to_quantization_module(model)
    with pytest.raises(ExportError, match=r"(?s)0._input_quantizer: has no amax.*2._weight_quantizer: has no amax"):
        export_onnx(model, torch.randn(1, 4), tmp_path / "x.onnx")
    _calibrate(model, (2, 4))
    model[0].input_quantizer.enable_calib()
    with pytest.raises(ExportError, match="0._input_quantizer: still in calibration mode"):
        export_onnx(model, torch.randn(1, 4), tmp_path / "x.onnx")
    model[0].input_quantizer.disable_calib()
    four = QuantDescriptor(num_bits=4, axis=0)
    model[2].weight_quantizer._num_bits = 4
    with pytest.raises(ExportError, match="2._weight_quantizer: 4-bit"):
        export_onnx(model, torch.randn(1, 4), tmp_path / "x.onnx")
    del four
    model[2].weight_quantizer._num_bits = 8
    model.train()
    before = [q.state() for _, q in quantizers(model)]

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model.add_module("boom", Boom())
    with pytest.raises(ExportError, match="boom"):
        export_onnx(model, torch.randn(1, 4), tmp_path / "x.onnx")
    assert model.training and not any(q.export_mode for _, q in quantizers(model))
    assert [q.state() for _, q in quantizers(model)] == before


def test_disabled_quantizers_export_as_float_and_quantize_false(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    qdq.replace_to_quantization_module(model)
    _calibrate(model, (2, 4))
    model[2].input_quantizer.disable()
    info = export_onnx(model, torch.randn(1, 4), tmp_path / "p.onnx")
    assert _ops(info.model).count("QuantizeLinear") == 3
    flt = export_onnx(model, torch.randn(1, 4), tmp_path / "f.onnx", quantize=False)
    assert "QuantizeLinear" not in _ops(flt.model)
    assert model[0].input_quantizer.is_enabled and not model[2].input_quantizer.is_enabled


def test_simplify_keeps_qdq(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    qdq.replace_to_quantization_module(model)
    _calibrate(model, (2, 3, 8, 8))
    plain = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "a.onnx")
    simple = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "b.onnx", simplify=True, dynamic_batch=True)
    assert _ops(simple.model).count("QuantizeLinear") == _ops(plain.model).count("QuantizeLinear") == 4
    assert verify(model, simple.path, torch.randn(2, 3, 8, 8)).ok


def test_no_files_in_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = nn.Sequential(nn.Linear(4, 2))
    qdq.replace_to_quantization_module(model)
    _calibrate(model, (2, 4))
    export_onnx(model, torch.randn(1, 4), tmp_path / "out" / "m.onnx")
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["out"]


def test_opset_too_low(tmp_path):
    with pytest.raises(ValueError, match="opset 11"):
        export_onnx(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "x.onnx", opset=11)


class _LSTMHead(nn.Module):
    def __init__(self, bidirectional):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=bidirectional)

    def forward(self, x):
        return self.lstm(x)[0]


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidirectional", "bidirectional"])
def test_lstm_matches_onnxruntime(bidirectional, dynamo, tmp_path):
    """QuantLSTM exports with its input and weights behind Q/DQ pairs (TorchScript: as ONNX LSTM nodes; dynamo
    writes the recurrence out), and ONNX Runtime agrees."""
    torch.manual_seed(0)
    model = _LSTMHead(bidirectional).eval()
    qdq.replace_to_quantization_module(model)
    assert isinstance(model.lstm, quant_nn.QuantLSTM)
    _calibrate(model, (3, 5, 6))
    info = export_onnx(model, torch.randn(3, 5, 6), tmp_path / "lstm.onnx", dynamic_batch=not dynamo, dynamo=dynamo)
    ops = _ops(info.model)
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") > 0
    if not dynamo:
        assert ops.count("LSTM") == 2
        directions = 2 if bidirectional else 1
        # per layer: its input, then W_ih and W_hh of every direction
        assert ops.count("QuantizeLinear") == 2 * (1 + 2 * directions)
    report = verify(model, info.path, torch.randn(4 if not dynamo else 3, 5, 6) * 1.5)
    assert report.ok, str(report)


def test_disabled_quantizer_without_amax_exports(tmp_path):
    """Regression: calibrate_model(strict=False) disables quantizers that saw no data; export_mode then switched
    them to export mode too, which raised on their missing amax although check_exportable skips them."""

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    model = Unused()
    qdq.replace_to_quantization_module(model)
    qdq.calibrate_model(model, [torch.randn(2, 4)], progress=False, strict=False)
    assert model.unused.input_quantizer.amax is None and not model.unused.input_quantizer.is_enabled
    info = export_onnx(model, torch.randn(1, 4), tmp_path / "m.onnx")
    assert _ops(info.model).count("QuantizeLinear") == 2


def test_equal_weights_are_initializers_not_identities(tmp_path):
    """The TorchScript exporter writes parameters with equal values once and the others as Identity nodes (the
    layers of nn.TransformerEncoder start as copies); the export turns those into initializers again."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].load_state_dict(model[0].state_dict())
    qdq.replace_to_quantization_module(model)
    _calibrate(model, (2, 4))
    info = export_onnx(model, torch.randn(3, 4), tmp_path / "m.onnx")
    assert "Identity" not in _ops(info.model)
    inits = {i.name for i in info.model.graph.initializer}
    weight_qs = [n for n in info.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]
    assert len(weight_qs) == 2
    assert verify(model, info.path, torch.randn(3, 4)).ok


class _GPT2(nn.Module):
    def __init__(self):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                         bos_token_id=0, eos_token_id=0)
        self.gpt2 = transformers.GPT2Model(config)

    def forward(self, ids):
        return self.gpt2(input_ids=ids).last_hidden_state


@pytest.mark.slow
def test_an_invalid_dynamo_file_is_an_export_error_that_names_the_opset(tmp_path):
    """torch's dynamo exporter converts its opset-18 graph to opset 17 and leaves Split's num_outputs in HF GPT-2:
    the file fails the ONNX checker. That is an ExportError saying which opset to ask for, and that one works."""
    torch.manual_seed(0)
    model, ids = _GPT2().eval(), torch.randint(0, 100, (2, 16))
    qdq.replace_to_quantization_module(model)
    qdq.calibrate_model(model, [ids], progress=False)
    with pytest.raises(ExportError, match="fails the ONNX checker.*opset=18"):
        export_onnx(model, ids, tmp_path / "m17.onnx", dynamo=True)
    info = export_onnx(model, ids, tmp_path / "m18.onnx", dynamo=True, opset=18)
    assert info.opset == 18 and verify(model, info.path, ids).ok
