"""Per-layer quantization configs (qdq.config): round trips, mixed precision, per-layer calibration, export, and
every kind of invalid config."""

import copy
import json
import logging

import onnx
import pytest
import torch
import torchvision
from torch import nn

from qdq import nn as quant_nn
from qdq.calib import HistogramCalibrator, MaxCalibrator
from qdq.config import (
    CONFIG_FORMAT,
    CONFIG_VERSION,
    QuantConfigError,
    QuantizeReport,
    calibrate_from_config,
    create_quant_config,
    load_quant_config,
    apply_quant_config,
    save_quant_config,
)
from qdq.onnx import ExportError, export_onnx
from qdq.transform.replace import is_quantized, replace_to_quantization_module
from qdq.tensor_quant import QuantDescriptor
from qdq.transform.switches import quantizers


class SamePadConv(nn.Conv2d):
    """A conv subclass with its own forward (as EfficientNet's static same-padding conv)."""

    def forward(self, x):
        return nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(),          # 0
        SamePadConv(8, 8, 3), nn.ReLU(),        # 2
        nn.Conv2d(8, 8, 3), nn.ReLU(),          # 4
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # 6
        nn.Linear(8, 10),                       # 8
    )


CNN_LAYERS = ["0", "2", "4", "6", "8"]


def batches(n=3, shape=(4, 3, 12, 12)):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def write(path, config):
    path.write_text(json.dumps(config, indent=2))
    return path


def dq_count(info):
    return sum(n.op_type == "DequantizeLinear" for n in info.model.graph.node)


# ----------------------------------------------------------------------------------------------------------------
# creating and round trips
# ----------------------------------------------------------------------------------------------------------------


def test_create_lists_every_layer_the_module_map_quantizes_and_leaves_the_model_alone():
    model = small_cnn()
    weights = [p for p in model.parameters()]
    config = create_quant_config(None, model)
    assert list(config["layers"]) == CNN_LAYERS
    assert not any(is_quantized(m) for m in model.modules())  # the model is not converted
    assert [p for p in model.parameters()] == weights
    assert config["layers"]["2"]["type"] == "SamePadConv"
    assert set(config["layers"]["6"]) == {"type", "enabled", "input"}  # a pool has no weight
    reference = copy.deepcopy(model)
    assert replace_to_quantization_module(reference).replaced == CNN_LAYERS


def test_create_on_resnet18_matches_replacement():
    model = torchvision.models.resnet18()
    config = create_quant_config(None, model)
    assert list(config["layers"]) == replace_to_quantization_module(copy.deepcopy(model)).replaced
    assert len(config["layers"]) == 22


def test_file_round_trip(tmp_path):
    model = small_cnn()
    path = tmp_path / "sub" / "config.json"
    written = create_quant_config(
        path, model, skip_layers=["8"], num_batches=3,
        input=QuantDescriptor(calib_method="percentile", calib_args={"percentile": 99.5, "num_bins": 512},
                              narrow_range=True),
        weight=QuantDescriptor(num_bits=6, calib_method="mse", calib_args={"num_bins": 512}, narrow_range=True))
    read = load_quant_config(path)
    assert read == written
    assert read["format"] == CONFIG_FORMAT and read["version"] == 2 == CONFIG_VERSION
    assert read["global"]["num_batches"] == 3 and read["global"]["skip_layers"] == ["8"]
    assert read["layers"]["0"]["input"]["calib_args"] == {"num_bins": 512, "percentile": 99.5}
    assert read["layers"]["0"]["weight"] == {"num_bits": 6, "calib_method": "mse",
                                             "calib_args": {"num_bins": 512, "start_bin": 128, "stride": 1},
                                             "axis": None, "unsigned": False, "symmetric": True,
                                             "narrow_range": True}
    # every tensor section is the dict form of the descriptor the layer gets
    assert QuantDescriptor.from_dict(read["layers"]["0"]["weight"]) == QuantDescriptor(
        num_bits=6, calib_method="mse", calib_args={"num_bins": 512}, narrow_range=True)
    assert read["layers"]["8"]["enabled"] is False
    again = tmp_path / "again.json"
    assert save_quant_config(read, again) == read
    assert again.read_text() == path.read_text()  # writing is deterministic


def test_resolved_config_of_the_report_round_trips(tmp_path):
    model = small_cnn()
    report = apply_quant_config(model, {"version": 2, "layers": {"4": {"enabled": False}}})
    path = tmp_path / "resolved.json"
    save_quant_config(report, path)
    assert load_quant_config(path) == report.config
    fresh = small_cnn()
    again = apply_quant_config(fresh, path, strict=True)
    assert again.bits == report.bits and again.float_layers == ["4"]


# ----------------------------------------------------------------------------------------------------------------
# applying a config
# ----------------------------------------------------------------------------------------------------------------


def test_mixed_precision_and_per_layer_settings_are_applied(tmp_path):
    model = small_cnn()
    config = create_quant_config(None, model)
    layers = config["layers"]
    layers["0"]["weight"]["num_bits"] = 4
    layers["2"]["input"].update(num_bits=6, unsigned=True)
    layers["2"]["weight"]["axis"] = None
    layers["4"]["enabled"] = False
    layers["8"]["input"] = {"num_bits": 8, "calib_method": "max", "unsigned": False, "symmetric": False,
                            "narrow_range": False}
    report = apply_quant_config(model, write(tmp_path / "c.json", config))
    assert report.quantized == ["0", "2", "6", "8"] and report.float_layers == ["4"]
    assert report.bits == {"0": (8, 4), "2": (6, 8), "6": (8, None), "8": (8, 8)}
    assert report.not_exportable == ["0", "2"]
    assert model[0].weight_quantizer.num_bits == 4 and model[0].weight_quantizer.axis == 0
    assert model[2].input_quantizer.num_bits == 6 and model[2].input_quantizer.unsigned
    assert model[2].weight_quantizer.axis is None
    assert not is_quantized(model[4]) and type(model[4]) is nn.Conv2d
    assert not model[8].input_quantizer.symmetric
    assert type(model[2]).__name__ == "QuantSamePadConv"
    assert model[0].weight_quantizer.name == "0._weight_quantizer"


def test_histogram_methods_get_histogram_calibrators_with_their_bins():
    model = small_cnn()
    config = {"version": 2, "global": {"input": {"calib_method": "entropy", "calib_args": {"num_bins": 256}}},
              "layers": {"8": {"input": {"calib_method": "percentile"}}}}
    apply_quant_config(model, config)
    cal = model[0].input_quantizer.calibrator
    assert isinstance(cal, HistogramCalibrator) and cal.num_bins == 256
    # a layer that sets another method starts from that method's defaults, not the global method's parameters
    assert model[8].input_quantizer.calibrator.num_bins == 2048
    assert isinstance(model[0].weight_quantizer.calibrator, MaxCalibrator)


def test_parameters_inherit_from_global_only_for_the_same_method():
    model = small_cnn()
    config = {"version": 2, "global": {"input": {"calib_method": "percentile", "calib_args": {"percentile": 90.0}}},
              "layers": {"0": {"input": {"num_bits": 7}}, "2": {"input": {"calib_method": "percentile"}},
                         "4": {"input": {"calib_method": "mse"}},
                         "6": {"input": {"calib_args": {"num_bins": 512}}}}}
    report = apply_quant_config(model, config)
    resolved = report.config["layers"]
    assert resolved["0"]["input"]["calib_args"]["percentile"] == 90.0 and resolved["0"]["input"]["num_bits"] == 7
    assert resolved["2"]["input"]["calib_args"]["percentile"] == 90.0
    assert resolved["4"]["input"]["calib_args"] == {"num_bins": 2048, "start_bin": 128, "stride": 1}
    assert resolved["6"]["input"]["calib_args"] == {"num_bins": 512, "percentile": 90.0}  # merged key by key
    assert model[0].input_quantizer.quant_desc.calib_args == {"num_bins": 2048, "percentile": 90.0}


def test_omitted_layers_get_global_settings_and_are_logged(caplog):
    model = small_cnn()
    with caplog.at_level(logging.INFO, logger="qdq.config"):
        report = apply_quant_config(model, {"version": 2, "global": {"weight": {"num_bits": 5}},
                                        "layers": {"0": {"weight": {"num_bits": 8}}}})
    assert report.defaulted == ["2", "4", "6", "8"]
    assert "not in the config" in caplog.text and "2, 4, 6, 8" in caplog.text
    assert model[0].weight_quantizer.num_bits == 8 and model[4].weight_quantizer.num_bits == 5


def test_strict_mode_names_the_missing_layers():
    model = small_cnn()
    with pytest.raises(QuantConfigError, match=r"layers: strict: 4 quantizable layers .* missing: 2, 4, 6, 8"):
        apply_quant_config(model, {"version": 2, "layers": {"0": {}}}, strict=True)
    assert not any(is_quantized(m) for m in model.modules())
    # layers that skip_layers covers count as configured
    report = apply_quant_config(model, {"version": 2, "global": {"skip_layers": ["[2468]"]}, "layers": {"0": {}}},
                            strict=True)
    assert report.quantized == ["0"] and report.float_layers == ["2", "4", "6", "8"]


def test_skip_layers_names_patterns_and_subtrees():
    model = torchvision.models.resnet18()
    config = create_quant_config(None, model, skip_layers=["layer4", r"layer3\.0\.conv."])
    off = [name for name, entry in config["layers"].items() if not entry["enabled"]]
    assert off == ["layer3.0.conv1", "layer3.0.conv2", "layer4.0.conv1", "layer4.0.conv2",
                   "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2"]
    report = apply_quant_config(model, config)
    assert report.float_layers == off
    assert not is_quantized(model.layer4[0].conv1) and is_quantized(model.layer3[0].downsample[0])
    # a layer omitted from the file but matched by skip_layers stays float too
    fresh = torchvision.models.resnet18()
    report = apply_quant_config(fresh, {"version": 2, "global": {"skip_layers": ["fc"]}})
    assert report.float_layers == ["fc"] and not is_quantized(fresh.fc)


def test_lstm_and_already_quantized_layers(caplog):
    model = nn.Sequential(nn.LSTM(4, 6, num_layers=2))
    apply_quant_config(model, {"version": 2, "layers": {"0": {"weight": {"num_bits": 4}}}})
    assert [q.num_bits for q in model[0]._weight_quantizers] == [4, 4]
    assert [q.num_bits for q in model[0]._input_quantizers] == [8, 8]

    model = small_cnn()
    replace_to_quantization_module(model)
    model[0].input_quantizer.amax = 1.0
    with caplog.at_level(logging.WARNING, logger="qdq.config"):
        report = apply_quant_config(model, {"version": 2, "layers": {"0": {"input": {"num_bits": 7}},
                                                                 "4": {"enabled": False}}})
    assert model[0].input_quantizer.num_bits == 7 and model[0].input_quantizer.amax is None
    assert not model[4].input_quantizer.is_enabled and not model[4].weight_quantizer.is_enabled
    assert report.float_layers == ["4"]
    assert "0 was already quantized" in caplog.text and "4 was already quantized" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------------------------


def test_per_layer_methods_give_their_own_amax():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    config = {"version": 2, "global": {"num_batches": 2},
              "layers": {"0": {"input": {"calib_method": "percentile",
                                         "calib_args": {"percentile": 90.0, "num_bins": 128}}},
                         "1": {"input": {"calib_method": "max"},
                               "weight": {"calib_method": "percentile", "calib_args": {"percentile": 50.0}}}}}
    apply_quant_config(model, config)
    data = batches(4, (32, 16))
    report = calibrate_from_config(model, data, config, progress=False)
    assert report.batches == 2 and report.calibrated == 4 and report.method == "per-layer"

    reference = HistogramCalibrator(8, None, False, num_bins=128)
    for x in data[:2]:
        reference.collect(x)
    expected = reference.compute_amax("percentile", percentile=90.0)
    assert torch.equal(model[0].input_quantizer.amax, expected)
    assert model[0].input_quantizer.amax < max(x.abs().max() for x in data[:2])
    with torch.no_grad():  # what layer 1 saw: quantization is off while statistics are collected
        for _, q in quantizers(model):
            q.disable()
        hidden = [model[0](x) for x in data[:2]]
        for _, q in quantizers(model):
            q.enable()
    assert torch.equal(model[1].input_quantizer.amax, torch.stack([h.abs().max() for h in hidden]).max())
    w_amax = model[1].weight_quantizer.amax  # per row, at the median of each row's |w|
    assert w_amax.shape == (16, 1) and bool((w_amax < model[1].weight.abs().amax(1, keepdim=True)).all())
    assert torch.equal(model[0].weight_quantizer.amax, model[0].weight.abs().amax(1, keepdim=True))


def test_calibration_takes_the_report_and_num_batches_overrides():
    model = small_cnn()
    config = {"version": 2, "global": {"num_batches": 1, "input": {"calib_method": "mse",
                                                                   "calib_args": {"num_bins": 256}}}}
    report = apply_quant_config(model, config)
    assert calibrate_from_config(model, batches(3), report, progress=False).batches == 1
    assert calibrate_from_config(model, batches(3), report, num_batches=3, progress=False).batches == 3
    assert all(q.amax is not None for _, q in quantizers(model))


def test_quantizers_outside_the_config_use_their_own_calibrator():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.add = quant_nn.QuantAdd()

        def forward(self, x):
            return self.add(self.fc(x), x)

    model = Residual()
    apply_quant_config(model, {"version": 2})
    calibrate_from_config(model, batches(2, (8, 4)), {"version": 2}, progress=False)
    for q in (model.add._input0_quantizer, model.add._input1_quantizer):  # max calibrators: the max seen
        assert torch.equal(q.amax, q.calibrator.compute_amax())
    # a histogram quantizer outside the config whose descriptor names no search takes the global input search
    model = Residual()
    model.add = quant_nn.QuantAdd(quant_desc_input=QuantDescriptor(calib_method="histogram"))
    config = {"version": 2, "global": {"input": {"calib_method": "entropy"}}}
    apply_quant_config(model, config)
    calibrate_from_config(model, batches(2, (4096, 4)), config, progress=False)
    q = model.add._input0_quantizer
    assert torch.equal(q.amax, q.calibrator.compute_amax("entropy"))
    assert not torch.equal(q.amax, q.calibrator.compute_amax("max"))


def test_calibration_refuses_a_model_quantized_with_another_config():
    model = small_cnn()
    apply_quant_config(model, {"version": 2})
    other = {"version": 2, "layers": {"0": {"weight": {"num_bits": 4}}, "2": {"input": {"calib_method": "entropy"}},
                                      "4": {"enabled": False}}}
    with pytest.raises(QuantConfigError) as err:
        calibrate_from_config(model, batches(), other, progress=False)
    text = str(err.value)
    assert 'layers["0"].weight.num_bits: 4 in the config, 8 in 0._weight_quantizer' in text
    assert 'layers["2"].input.calib_method: \'entropy\' in the config, \'max\' in 2._input_quantizer' in text
    assert 'layers["2"].input.calib_method: \'entropy\' needs a HistogramCalibrator' in text
    assert 'layers["4"]: disabled in the config, but 4._input_quantizer is enabled' in text
    fresh = small_cnn()
    with pytest.raises(QuantConfigError, match=r'layers\["0"\]: enabled in the config, but the model has no quantized'):
        calibrate_from_config(fresh, batches(), {"version": 2, "layers": {"0": {}}}, progress=False)


def test_calibration_skips_a_shared_layer_as_apply_does():
    """A layer reachable under two names is kept in float only where skip_layers matches both (apply and
    calibrate agree; before, calibration tested only the first name and refused the model apply had made)."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(4, 4))
            self.b = nn.Sequential(self.a[0])  # the same Linear under "a.0" and "b.0"
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.b(self.a(x)))

    config = {"version": 2, "global": {"skip_layers": ["a.*"]}}
    model = Shared()
    apply_quant_config(model, config)
    assert is_quantized(model.a[0])  # "b.0" does not match: quantized
    report = calibrate_from_config(model, batches(2, (8, 4)), config, progress=False)
    assert report.calibrated == 4 and model.a[0].input_quantizer.amax is not None
    both = {"version": 2, "global": {"skip_layers": [r"[ab]\.0"]}}  # one pattern naming both paths
    model = Shared()
    apply_quant_config(model, both)
    assert not is_quantized(model.a[0])
    assert calibrate_from_config(model, batches(2, (8, 4)), both, progress=False).calibrated == 2


def test_calibration_no_data_is_named():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    model = Unused()
    apply_quant_config(model, {"version": 2})
    with pytest.raises(RuntimeError, match=r"2 quantizers saw no calibration data: unused._input_quantizer"):
        calibrate_from_config(model, batches(1, (2, 4)), {"version": 2}, progress=False)
    calibrate_from_config(model, batches(1, (2, 4)), {"version": 2}, strict=False, progress=False)
    assert not model.unused.input_quantizer.is_enabled


# ----------------------------------------------------------------------------------------------------------------
# float model -> edited file -> mixed-precision QDQ ONNX
# ----------------------------------------------------------------------------------------------------------------


def test_edited_file_to_mixed_precision_onnx(tmp_path):
    model = small_cnn()
    path = tmp_path / "config.json"
    create_quant_config(path, model, skip_layers=["8"], num_batches=2, input=QuantDescriptor(calib_method="entropy"))
    edited = json.loads(path.read_text())
    edited["layers"]["4"]["enabled"] = False                       # float
    edited["layers"]["2"]["weight"]["num_bits"] = 4                # a 4-bit study ...
    edited["layers"]["0"]["input"] = {"calib_method": "percentile", "calib_args": {"percentile": 99.9}}
    write(path, edited)
    report = apply_quant_config(model, path)
    calibrate_from_config(model, batches(), path, progress=False)
    example = torch.randn(1, 3, 12, 12)
    with pytest.raises(ExportError, match=r"2\._weight_quantizer: 4-bit") as err:
        export_onnx(model, example, tmp_path / "m4.onnx")
    assert "0._weight_quantizer" not in str(err.value)
    assert report.not_exportable == ["2"]

    edited["layers"]["2"]["weight"]["num_bits"] = 8                # ... changed back to 8 bits
    write(path, edited)
    model = small_cnn()
    report = apply_quant_config(model, path)
    calibrate_from_config(model, batches(), path, progress=False)
    info = export_onnx(model, example, tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(str(info.path)))
    assert report.quantized == ["0", "2", "6"] and report.float_layers == ["4", "8"]
    assert dq_count(info) == 2 + 2 + 1                             # convs 0 and 2 (input, weight), the pool
    graph = info.model.graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert [producers.get(c.input[1]) for c in convs] == ["DequantizeLinear", "DequantizeLinear", None]
    gemm = next(n for n in graph.node if n.op_type in ("Gemm", "MatMul"))
    assert producers.get(gemm.input[0]) != "DequantizeLinear"


@pytest.mark.slow
def test_resnet18_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "resnet18.json"
    create_quant_config(path, model, skip_layers=["fc"], num_batches=2, input=QuantDescriptor(calib_method="percentile"))
    edited = json.loads(path.read_text())
    edited["global"]["skip_layers"].append("layer4.1")
    for name in ("layer4.1.conv1", "layer4.1.conv2"):
        edited["layers"][name]["enabled"] = False
    edited["layers"]["layer2.0.conv1"]["weight"]["num_bits"] = 4
    edited["layers"]["conv1"]["input"] = {"calib_method": "max"}
    write(path, edited)
    model_4bit = copy.deepcopy(model)
    report = apply_quant_config(model_4bit, path)
    assert report.not_exportable == ["layer2.0.conv1"]
    assert model_4bit.layer2[0].conv1.weight_quantizer.num_bits == 4

    edited["layers"]["layer2.0.conv1"]["weight"]["num_bits"] = 8
    write(path, edited)
    report = apply_quant_config(model, path, strict=True)
    assert report.float_layers == ["layer4.1.conv1", "layer4.1.conv2", "fc"] and len(report.quantized) == 19
    data = batches(3, (2, 3, 32, 32))
    calibrate_from_config(model, data, path, progress=False)
    assert isinstance(model.conv1.input_quantizer.calibrator, MaxCalibrator)
    assert isinstance(model.layer1[0].conv1.input_quantizer.calibrator, HistogramCalibrator)
    info = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "resnet18.onnx")
    onnx.checker.check_model(onnx.load(str(info.path)))
    assert dq_count(info) == 18 * 2 + 1  # 18 quantized convs (input and weight) and the average pool


# ----------------------------------------------------------------------------------------------------------------
# invalid configs: every one is an error naming its JSON path, and the model is left untouched
# ----------------------------------------------------------------------------------------------------------------


def _set(*keys, value):
    def edit(config):
        target = config
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit


def _delete(*keys):
    def edit(config):
        target = config
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return edit


INVALID = {
    "unknown layer": (_set("layers", "9", value={}), 'layers["9"]: the model has no module of that name'),
    "unknown layer, close name": (_set("layers", "conv", value={}), "no module of that name"),
    "layer not in the module map": (_set("layers", "1", value={}), 'layers["1"]: is a ReLU, which the module map'),
    "unknown top-level key": (_set("colour", value=1), "colour: unknown key; valid keys are format, version"),
    "unknown global key": (_set("global", "batchnum", value=1), "global.batchnum: unknown key"),
    "misspelt global key": (_set("global", "skip_layer", value=[]), "(did you mean 'skip_layers'?)"),
    "unknown layer key": (_set("layers", "0", "enable", value=True), 'layers["0"].enable: unknown key'),
    "unknown input key": (_set("layers", "0", "input", "bits", value=8), 'layers["0"].input.bits: unknown key'),
    "unknown weight key": (_set("layers", "0", "weight", "axes", value=0),
                           'layers["0"].weight.axes: unknown key; valid keys are num_bits, '),
    "misspelt tensor key": (_set("layers", "0", "input", "calib_methd", value="max"), "(did you mean 'calib_method'?)"),
    "name is not a config key": (_set("layers", "0", "input", "name", value="x"), 'layers["0"].input.name: unknown'),
    "version-1 method in a version-2 file": (_set("layers", "0", "input", "method", value="mse"),
                                             'layers["0"].input.method: a version-1 key; version 2 calls it '
                                             "calib_method"),
    "version-1 per_channel": (_set("layers", "0", "weight", "per_channel", value=True),
                              'layers["0"].weight.per_channel: a version-1 key; version 2 calls it axis (0 for one'),
    "version-1 percentile": (_set("global", "input", "percentile", value=99.0),
                             "global.input.percentile: a version-1 key; version 2 calls it calib_args.percentile"),
    "version-1 batch_num": (_set("global", "batch_num", value=2),
                            "global.batch_num: a version-1 key; version 2 calls it num_batches"),
    "unknown global tensor key": (_set("global", "weight", "scale", value=1), "global.weight.scale: unknown key"),
    "num_bits too small": (_set("layers", "2", "weight", "num_bits", value=1),
                           'layers["2"].weight.num_bits: num_bits must be in [2, 16], got 1'),
    "num_bits too large": (_set("layers", "2", "input", "num_bits", value=17),
                           'layers["2"].input.num_bits: num_bits must be in [2, 16], got 17'),
    "num_bits float": (_set("global", "input", "num_bits", value=8.0),
                       "global.input.num_bits: num_bits must be an int, got 8.0"),
    "num_bits string": (_set("layers", "0", "weight", "num_bits", value="8"),
                        "weight.num_bits: num_bits must be an int, got '8'"),
    "num_bits bool": (_set("layers", "0", "weight", "num_bits", value=True), "num_bits must be an int, got True"),
    "axis not an int": (_set("layers", "0", "weight", "axis", value="0"),
                        'layers["0"].weight.axis: axis must be None, an int or a tuple of ints'),
    "unsigned not a bool": (_set("layers", "0", "input", "unsigned", value=1),
                            'layers["0"].input.unsigned: unsigned must be a bool, got 1'),
    "unknown method": (_set("layers", "0", "input", "calib_method", value="entrophy"),
                       "input.calib_method: calib_method must be one of ('max', 'histogram', 'entropy', 'mse', "
                       "'percentile', 'kld'"),
    "method not a string": (_set("global", "weight", "calib_method", value=3),
                            "global.weight.calib_method: calib_method must be one of"),
    "calib_args not an object": (_set("layers", "0", "input", "calib_args", value=[1]),
                                 'layers["0"].input.calib_args: must be an object, got an array'),
    "parameter of another method": (_set("layers", "0", "weight", value={"calib_args": {"percentile": 99.0}}),
                                    "weight.calib_args.percentile: calib_args ['percentile'] apply to histogram "
                                    "calibration; calib_method 'max' takes none (the global one)"),
    "search parameter of another search": (_set("layers", "8", "input", value={"calib_method": "mse",
                                                                                "calib_args": {"percentile": 9}}),
                                           "input.calib_args.percentile: calib_args ['percentile'] do not apply to "
                                           "calib_method 'mse', which takes num_bins, start_bin, stride"),
    "histogram parameter with max": (_set("layers", "8", "input", value={"calib_method": "max",
                                                                         "calib_args": {"num_bins": 64}}),
                                     "input.calib_args.num_bins: calib_args ['num_bins'] apply to histogram"),
    "percentile out of range": (_set("global", "input", value={"calib_method": "percentile",
                                                               "calib_args": {"percentile": 101}}),
                                "global.input.calib_args.percentile: calib_args['percentile'] must be a number in "
                                "(0, 100]"),
    "start_bin zero": (_set("layers", "0", "input", value={"calib_method": "entropy", "calib_args": {"start_bin": 0}}),
                       "input.calib_args.start_bin: calib_args['start_bin'] must be an int >= 1"),
    "kld with too few bins": (_set("layers", "0", "input", value={"calib_method": "kld",
                                                                  "calib_args": {"num_bins": 8}}),
                              "input.calib_args.num_bins: calib_method 'kld' needs at least 16 bins"),
    "asymmetric with a histogram": (_set("layers", "0", "input", value={"calib_method": "mse", "symmetric": False}),
                                    'layers["0"].input: asymmetric quantization is calibrated with min/max'),
    "asymmetric narrow range": (_set("layers", "0", "weight", value={"symmetric": False, "narrow_range": True}),
                                'layers["0"].weight: narrow_range has no meaning for asymmetric'),
    "enabled not a bool": (_set("layers", "0", "enabled", value="yes"), 'layers["0"].enabled: must be true or false'),
    "type not a string": (_set("layers", "0", "type", value=1), 'layers["0"].type: must be a string'),
    "type of another model": (_set("layers", "0", "type", value="Linear"),
                              "layers[\"0\"].type: is 'Linear' but the model's layer is a Conv2d"),
    "weight on a pool": (_set("layers", "6", "weight", value={"num_bits": 8}),
                         'layers["6"].weight: AdaptiveAvgPool2d layers have no weight quantizer'),
    "num_batches zero": (_set("global", "num_batches", value=0), "global.num_batches: must be an int >= 1 or null"),
    "skip_layers not a list": (_set("global", "skip_layers", value="8"), "global.skip_layers: must be an array"),
    "skip_layers item not a string": (_set("global", "skip_layers", value=[8]), "global.skip_layers[0]: must be a"),
    "skip_layers bad regex": (_set("global", "skip_layers", value=["la[yer"]), "global.skip_layers[0]: 'la[yer' is "
                                                                              "not a valid regular expression"),
    "skip_layers matching nothing": (_set("global", "skip_layers", value=["8", "head"]),
                                     "global.skip_layers[1]: 'head' matches no quantizable layer"),
    "enabled layer in skip_layers": (_set("global", "skip_layers", value=["8"]),
                                     'layers["8"].enabled: is true but global.skip_layers[0] (\'8\') keeps'),
    "version missing": (_delete("version"), "version: missing; this qdq reads versions 1 and 2"),
    "version newer": (_set("version", value=3), "version: is 3; this qdq reads versions 1 and 2 (the config was "
                                                "written by a newer qdq)"),
    "version string": (_set("version", value="1"), "version: is '1'"),
    "wrong format": (_set("format", value="amct"), "format: is 'amct', not 'qdq-quant-config'"),
    "model not a string": (_set("model", value=3), "model: must be a string"),
    "global not an object": (_set("global", value=[]), "global: must be an object, got an array"),
    "layers not an object": (_set("layers", value=[]), "layers: must be an object (layer path -> entry)"),
    "entry not an object": (_set("layers", "0", value=True), 'layers["0"]: must be an object, got a boolean'),
    "tensor section not an object": (_set("layers", "0", "input", value=8), 'layers["0"].input: must be an object'),
}


@pytest.mark.parametrize("edit,expected", INVALID.values(), ids=list(INVALID))
def test_invalid_configs_are_named(tmp_path, edit, expected):
    model = small_cnn()
    config = create_quant_config(None, model)
    edit(config)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    with pytest.raises(QuantConfigError) as err:
        apply_quant_config(model, path)
    assert expected in str(err.value), str(err.value)
    assert str(path) in str(err.value)
    assert not any(is_quantized(m) for m in model.modules())  # nothing was changed


def test_schema_problems_are_found_without_a_model(tmp_path):
    path = write(tmp_path / "c.json", {"version": 2, "layers": {"x": {"input": {"num_bits": 0}}}})
    with pytest.raises(QuantConfigError, match=r'layers\["x"\].input.num_bits: num_bits must be in \[2, 16\], got 0'):
        load_quant_config(path)
    with pytest.raises(QuantConfigError, match="global.weight.calib_method: calib_method must be one of"):
        save_quant_config({"version": 2, "global": {"weight": {"calib_method": "median"}}}, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_every_problem_is_listed_in_one_error():
    model = small_cnn()
    config = create_quant_config(None, model)
    config["layers"]["0"]["weight"]["num_bits"] = 32
    config["layers"]["2"]["input"]["calib_method"] = "median"
    config["layers"]["nope"] = {}
    config["global"]["extra"] = 1
    with pytest.raises(QuantConfigError) as err:
        apply_quant_config(model, config)
    assert len(err.value.problems) == 4
    assert err.value.source == "(a dict)"
    assert "has 4 problems" in str(err.value)
    for where in ('layers["0"].weight.num_bits', 'layers["2"].input.calib_method', 'layers["nope"]', "global.extra"):
        assert any(p.startswith(where) for p in err.value.problems), where


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        load_quant_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 2,\n  "layers": {,}}')
    with pytest.raises(QuantConfigError, match=r"bad.json has 1 problem:\n  <file>: not JSON: .* line 2 column"):
        load_quant_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(QuantConfigError, match="<root>: must be an object, got an array"):
        apply_quant_config(small_cnn(), bad)
    with pytest.raises(TypeError, match="file path, a dict or a QuantizeReport"):
        apply_quant_config(small_cnn(), 3)


def test_create_arguments_are_checked():
    model = small_cnn()
    with pytest.raises(QuantConfigError, match="global.input.calib_method: calib_method must be one of .*'entrophy'"):
        create_quant_config(None, model, input={"calib_method": "entrophy"})
    with pytest.raises(QuantConfigError, match=r"global.weight.num_bits: num_bits must be in \[2, 16\], got 1"):
        create_quant_config(None, model, weight={"num_bits": 1})
    with pytest.raises(TypeError, match="unknown keywords"):
        create_quant_config(None, model, activation_method="max")
    with pytest.raises(QuantConfigError, match=r"global.skip_layers\[0\]: 'fc' matches no quantizable layer"):
        create_quant_config(None, model, skip_layers="fc")


def test_a_config_for_another_model_is_named_in_the_log(caplog):
    config = create_quant_config(None, small_cnn())
    config["model"] = "ResNet"
    with caplog.at_level(logging.WARNING, logger="qdq.config"):
        report = apply_quant_config(small_cnn(), config)
    assert "was written for a ResNet; this model is a Sequential" in caplog.text
    assert isinstance(report, QuantizeReport)


def test_layers_the_conversion_cannot_quantize_are_named(caplog):
    class OwnForwardLSTM(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x, hx)

    model = nn.Sequential(OwnForwardLSTM(4, 4), nn.Linear(4, 2))
    with caplog.at_level(logging.WARNING, logger="qdq.config"):
        config = create_quant_config(None, model)
    assert list(config["layers"]) == ["1"]
    assert "not listed in the config (cannot be quantized): 0:" in caplog.text
    with pytest.raises(QuantConfigError, match=r'layers\["0"\]: cannot be quantized: .*OwnForwardLSTM overrides'):
        apply_quant_config(model, {"version": 2, "layers": {"0": {}}})


def test_fp8_and_int4_weight_only_layers_from_a_config(tmp_path):
    """num_bits [4, 3] gives FP8 quantizers; weight block_size with input enabled: false gives INT4 weight-only."""
    import qdq
    from qdq.transform.layer_formats import layer_formats
    from qdq.onnx import export_onnx, verify

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    config = {"version": 2, "layers": {
        "0": {"input": {"enabled": False}, "weight": {"num_bits": 4, "block_size": 32}},
        "2": {"input": {"num_bits": [4, 3]}, "weight": {"num_bits": [4, 3]}},
    }}
    report = apply_quant_config(model, config)
    assert report.bits == {"0": (None, 4), "2": ((4, 3), (4, 3))} and report.not_exportable == []
    assert layer_formats(model) == {"0": "int4", "2": "fp8"}
    assert model[0]._weight_quantizer.block_size == 32 and model[2]._weight_quantizer.axis == 0
    calibrate_from_config(model, [torch.randn(8, 64)], report, progress=False)
    info = export_onnx(model, torch.randn(1, 64), tmp_path / "m.onnx", dynamic_batch=True)
    assert verify(model, info.path, torch.randn(4, 64)).ok


def test_bad_format_keys_are_reported():
    model = torch.nn.Sequential(torch.nn.Linear(64, 4))
    with pytest.raises(QuantConfigError) as err:
        apply_quant_config(model, {"version": 2, "layers": {"0": {"input": {"num_bits": [5, 2], "enabled": 1},
                                                              "weight": {"num_bits": 4, "block_size": 48}}}})
    text = str(err.value)
    assert 'layers["0"].input.num_bits: num_bits=(5, 2): the only floating-point format is FP8 E4M3' in text
    assert 'layers["0"].input.enabled: must be true or false, got 1' in text
    assert 'layers["0"].weight.block_size: must be null or one of [32, 64, 128] (TensorRT\'s INT4 blocks), got 48' in text
    assert len(err.value.problems) == 3  # all at once


# ----------------------------------------------------------------------------------------------------------------
# version 2 is the descriptors; version 1 is read as version 2; one conversion builds each quantizer once
# ----------------------------------------------------------------------------------------------------------------


def test_v2_round_trip_is_the_descriptors(tmp_path):
    """File -> apply -> resolved config -> file: the same text, and every quantizer carries the descriptor its
    section is the dict form of."""
    model = small_cnn()
    path = tmp_path / "v2.json"
    create_quant_config(path, model, num_batches=4,
                        input=QuantDescriptor(calib_method="entropy", calib_args={"num_bins": 1024}),
                        weight=QuantDescriptor(axis=0, narrow_range=True))
    edited = json.loads(path.read_text())
    edited["layers"]["2"]["weight"] = {"num_bits": 6, "axis": None, "calib_method": "mse"}
    edited["layers"]["4"]["input"] = {"calib_method": "percentile", "calib_args": {"percentile": 99.5},
                                      "scale_amax": 0.5}
    write(path, edited)
    report = apply_quant_config(model, path, strict=True)
    for layer, role, q in [(p, r, q) for p in ("0", "2", "4", "8") for r, q in
                           (("input", model.get_submodule(p)._input_quantizer),
                            ("weight", model.get_submodule(p)._weight_quantizer))]:
        section = report.config["layers"][layer][role]
        assert q.quant_desc == QuantDescriptor.from_dict(section), (layer, role)
    assert model[2].weight_quantizer.quant_desc == QuantDescriptor(
        num_bits=6, calib_method="mse", narrow_range=True)  # inherited narrow_range, mse's own default arguments
    assert model[4].input_quantizer.scale_amax == 0.5
    assert model[0].input_quantizer.calibrator.num_bins == 1024
    again = tmp_path / "again.json"
    save_quant_config(report, again)
    assert load_quant_config(again) == report.config
    fresh = small_cnn()
    assert apply_quant_config(fresh, again, strict=True).config == report.config
    save_quant_config(load_quant_config(again), tmp_path / "third.json")
    assert (tmp_path / "third.json").read_text() == again.read_text()


def test_each_quantizer_is_built_once(monkeypatch):
    """Regression: quantize_model built every quantizer twice (the conversion's, then the config's)."""
    built = []
    init = quant_nn.TensorQuantizer.__init__

    def counting(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(quant_nn.TensorQuantizer, "__init__", counting)
    model = small_cnn()
    apply_quant_config(model, {"version": 2, "layers": {"4": {"enabled": False},
                                                        "0": {"input": {"calib_method": "entropy"}}}})
    assert len(built) == len(list(quantizers(model))) == 7
    assert isinstance(model[0].input_quantizer.calibrator, HistogramCalibrator)


V1_FILE = {  # as qdq 0.1's create_quant_config wrote it
    "format": "qdq-quant-config", "version": 1, "qdq_version": "0.1.0", "model": "Sequential",
    "global": {
        "batch_num": 3, "skip_layers": ["8"],
        "input": {"num_bits": 8, "method": "entropy", "start_bin": 128, "stride": 1, "num_bins": 1024,
                  "unsigned": False, "symmetric": True, "narrow_range": False},
        "weight": {"num_bits": 8, "method": "max", "per_channel": True, "symmetric": True, "narrow_range": False},
    },
    "layers": {
        "0": {"type": "Conv2d", "enabled": True,
              "input": {"num_bits": 8, "method": "percentile", "percentile": 99.9, "num_bins": 2048, "unsigned": False,
                        "symmetric": True, "narrow_range": False},
              "weight": {"num_bits": 4, "method": "max", "per_channel": False, "symmetric": True,
                         "narrow_range": False}},
        "2": {"input": {"num_bits": 7}},
        "4": {"enabled": False},
        "8": {"type": "Linear", "enabled": False},
    },
}
V2_EQUIVALENT = {
    "version": 2,
    "global": {"num_batches": 3, "skip_layers": ["8"],
               "input": {"calib_method": "entropy", "calib_args": {"num_bins": 1024}}},
    "layers": {"0": {"input": {"calib_method": "percentile", "calib_args": {"percentile": 99.9}},
                     "weight": {"num_bits": 4, "axis": None}},
               "2": {"input": {"num_bits": 7}}, "4": {"enabled": False}, "8": {"enabled": False}},
}


def test_a_v1_file_is_read_as_v2_with_a_warning_and_migrates(tmp_path, caplog):
    old = write(tmp_path / "v1.json", V1_FILE)
    with caplog.at_level(logging.WARNING, logger="qdq.config"):
        report = apply_quant_config(small_cnn(), old)
    assert "is version 1; read as version 2 (method -> calib_method, per_channel -> axis, batch_num -> " \
           "num_batches" in caplog.text
    assert "save_quant_config(load_quant_config(path), path) rewrites it as version 2" in caplog.text
    reference = small_cnn()
    expected = apply_quant_config(reference, V2_EQUIVALENT)
    assert report.config["layers"] == expected.config["layers"] and report.num_batches == 3
    model = small_cnn()
    apply_quant_config(model, old)
    for (name, q), (_, r) in zip(quantizers(model), quantizers(reference)):
        assert q.quant_desc == r.quant_desc, name
    assert model[0].weight_quantizer.axis is None and model[0].weight_quantizer.num_bits == 4  # per_channel false
    assert model[2].weight_quantizer.axis == 0  # per_channel true
    assert model[2].input_quantizer.quant_desc.calib_args == {"num_bins": 1024, "start_bin": 128, "stride": 1}

    new = tmp_path / "v2.json"
    migrated = save_quant_config(load_quant_config(old), new)  # read v1, write v2
    assert migrated["version"] == 2 and json.loads(new.read_text())["version"] == 2
    assert "batch_num" not in new.read_text() and '"method"' not in new.read_text()
    assert apply_quant_config(small_cnn(), new).config["layers"] == expected.config["layers"]
    calibrate_from_config(model, batches(), old, progress=False)  # the old file calibrates as the new one
    calibrate_from_config(reference, batches(), new, progress=False)
    for (name, q), (_, r) in zip(quantizers(model), quantizers(reference)):
        assert torch.equal(q.amax, r.amax), name


def test_v1_problems_are_named_in_v2_words_with_a_note(tmp_path):
    bad = copy.deepcopy(V1_FILE)
    bad["layers"]["0"]["weight"]["num_bits"] = 32
    bad["layers"]["0"]["weight"]["per_channel"] = "yes"
    bad["global"]["input"]["percentile"] = 99.0  # a parameter of another method
    with pytest.raises(QuantConfigError) as err:
        apply_quant_config(small_cnn(), write(tmp_path / "bad.json", bad))
    text = str(err.value)
    assert "has 3 problems (a version-1 config, read as version 2: the paths use the version-2 keys" in text
    assert 'layers["0"].weight.num_bits: num_bits must be in [2, 16], got 32' in text
    assert 'layers["0"].weight.per_channel: must be true or false, got \'yes\'' in text
    assert "global.input.calib_args.percentile: calib_args ['percentile'] do not apply to calib_method 'entropy'" in text


def test_quantize_model_is_a_deprecated_alias():
    from qdq.config import quantize_model

    model = small_cnn()
    with pytest.warns(DeprecationWarning, match="quantize_model is now apply_quant_config"):
        report = quantize_model(model, {"version": 2, "layers": {"4": {"enabled": False}}})
    assert report.float_layers == ["4"] and is_quantized(model[0])
    with pytest.warns(DeprecationWarning, match="batch_num is now num_batches"):
        assert report.batch_num == report.num_batches == 8


def test_create_with_the_old_keywords_warns_and_gives_the_same_config():
    model = small_cnn()
    with pytest.warns(DeprecationWarning, match=r"batch_num= is now num_batches=; activation_calib= is now"):
        old = create_quant_config(None, model, batch_num=3, activation_calib="percentile", percentile=99.5,
                                  weight_calib="mse", num_bins=512, weight_num_bits=6, per_channel=False)
    new = create_quant_config(
        None, model, num_batches=3,
        input=QuantDescriptor(calib_method="percentile", calib_args={"percentile": 99.5, "num_bins": 512}),
        weight=QuantDescriptor(num_bits=6, calib_method="mse", calib_args={"num_bins": 512}))
    assert old == new
    with pytest.raises(TypeError, match="not both"):
        create_quant_config(None, model, batch_num=3, input=QuantDescriptor())
