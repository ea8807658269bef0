import json
import logging
import math
import struct

import numpy as np
import pytest
import torch
from torch import nn

from qdq import calibrate_model
from qdq import nn as quant_nn
from qdq.calibrate.calib_table import (
    TABLE_VERSION,
    CalibTableError,
    load_calib_table,
    read_tensorrt_cache,
    save_calib_table,
    write_tensorrt_cache,
)
from qdq.calibrate.data import NumpyFolderSource
from qdq.transform.replace import replace_to_quantization_module
from qdq.transform.switches import quantizers
from qdq.tensor_quant import QuantDescriptor


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    replace_to_quantization_module(model)
    return model


def _calibrated(tmp_path, seed=0):
    model = _model(seed)
    calibrate_model(model, [torch.randn(2, 3, 6, 6) for _ in range(2)], progress=False)
    return model


def _amaxes(model):
    return {n: None if q.amax is None else q.amax.clone() for n, q in quantizers(model)}


def _edit(path, change):
    table = json.loads(path.read_text())
    change(table)
    path.write_text(json.dumps(table))


# --------------------------------------------------------------------------------------------------------------------
# qdq's table
# --------------------------------------------------------------------------------------------------------------------


def test_round_trip_is_bit_exact(tmp_path):
    model = _calibrated(tmp_path)
    path = tmp_path / "sub" / "table.json"
    save_calib_table(model, path, method="entropy")
    fresh = _model(seed=1)
    report = load_calib_table(fresh, path)
    assert report.method == "entropy" and report.missing == [] and report.extra == [] and report.no_amax == []
    assert sorted(report.loaded) == sorted(n for n, _ in quantizers(model))
    for name, amax in _amaxes(model).items():
        loaded = dict(quantizers(fresh))[name].amax
        assert loaded.shape == amax.shape and torch.equal(loaded, amax), name
    assert fresh[0].weight_quantizer.amax.shape == (4, 1, 1, 1)  # per-channel shape kept


def test_file_contents(tmp_path):
    layer = quant_nn.QuantLinear(3, 2)
    layer.input_quantizer.amax = 0.1
    path = tmp_path / "t.json"
    written = save_calib_table(layer, path)
    text = path.read_text()
    table = json.loads(text)
    assert table == written
    assert table["format"] == "qdq-calib-table" and table["version"] == TABLE_VERSION and table["method"] is None
    assert table["quantizers"]["_input_quantizer"] == {"amax": 0.1, "num_bits": 8, "unsigned": False, "axis": None}
    assert table["quantizers"]["_weight_quantizer"]["amax"] is None
    assert table["quantizers"]["_weight_quantizer"]["axis"] == 0
    assert '"amax": 0.1,' in text  # the shortest float32 form, not 0.10000000149011612
    assert len([line for line in text.splitlines() if "_quantizer" in line]) == 2  # one quantizer per line
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left


def test_null_amax_leaves_quantizer_and_is_reported(tmp_path, caplog):
    layer = quant_nn.QuantLinear(3, 2)
    layer.input_quantizer.amax = 2.0
    path = tmp_path / "t.json"
    save_calib_table(layer, path)
    target = quant_nn.QuantLinear(3, 2)
    target.weight_quantizer.amax = torch.full((2, 1), 5.0)
    with caplog.at_level(logging.INFO, logger="qdq.calibrate.calib_table"):
        report = load_calib_table(target, path)
    assert report.loaded == ["_input_quantizer"] and report.no_amax == ["_weight_quantizer"]
    assert "without amax" in caplog.text
    assert torch.equal(target.weight_quantizer.amax, torch.full((2, 1), 5.0))
    assert target.input_quantizer.amax.item() == 2.0


def test_shape_checked_only_against_an_existing_amax(tmp_path):
    layer = quant_nn.QuantLinear(3, 2)
    layer.weight_quantizer.amax = torch.tensor([[1.0], [2.0]])
    path = tmp_path / "t.json"
    save_calib_table(layer, path)
    fresh = quant_nn.QuantLinear(3, 2)  # no amax: the table's shape is taken
    load_calib_table(fresh, path)
    assert torch.equal(fresh.weight_quantizer.amax, torch.tensor([[1.0], [2.0]]))
    other = quant_nn.QuantLinear(3, 2)
    other.weight_quantizer.amax = torch.ones(2)
    other.input_quantizer.amax = 7.0
    message = r"_weight_quantizer: amax has shape \(2, 1\) in the table, \(2,\) in the model"
    with pytest.raises(CalibTableError, match=message):
        load_calib_table(other, path)
    assert other.input_quantizer.amax.item() == 7.0  # nothing was set


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("num_bits", 4, r"_input_quantizer: num_bits is 4 in the table, 8 in the model"),
        ("unsigned", True, r"_input_quantizer: unsigned is True in the table, False in the model"),
        ("axis", [0], r"_input_quantizer: axis is 0 in the table, None in the model"),
    ],
)
def test_settings_mismatch_named(tmp_path, key, value, message):
    layer = quant_nn.QuantLinear(3, 2)
    layer.input_quantizer.amax = 1.0
    path = tmp_path / "t.json"
    save_calib_table(layer, path)
    _edit(path, lambda t: t["quantizers"]["_input_quantizer"].update({key: value}))
    with pytest.raises(CalibTableError, match=message):
        load_calib_table(quant_nn.QuantLinear(3, 2), path)


def test_tuple_axis_round_trips(tmp_path):
    q = quant_nn.TensorQuantizer(QuantDescriptor(axis=(0, 1)))
    q.amax = torch.arange(6, dtype=torch.float32).reshape(2, 3, 1)
    holder = nn.Module()
    holder.q = q
    path = tmp_path / "t.json"
    save_calib_table(holder, path)
    assert json.loads(path.read_text())["quantizers"]["q"]["axis"] == [0, 1]
    other = nn.Module()
    other.q = quant_nn.TensorQuantizer(QuantDescriptor(axis=(0, 1)))
    load_calib_table(other, path)
    assert torch.equal(other.q.amax, q.amax)


def test_missing_and_extra_strict_and_not(tmp_path, caplog):
    model = _calibrated(tmp_path)
    path = tmp_path / "t.json"
    save_calib_table(model, path)
    _edit(path, lambda t: (t["quantizers"].pop("0._input_quantizer"),
                           t["quantizers"].update({"ghost._input_quantizer": {"amax": 1.0, "num_bits": 8,
                                                                              "unsigned": False, "axis": None}})))
    fresh = _model()
    message = (r"1 quantizers of the model are not in it: 0\._input_quantizer; "
               r"1 names in it are not quantizers of the model: ghost\._input_quantizer")
    with pytest.raises(CalibTableError, match=message):
        load_calib_table(fresh, path)
    assert all(q.amax is None or n.endswith("weight_quantizer") for n, q in quantizers(fresh))  # nothing set
    with caplog.at_level(logging.WARNING, logger="qdq.calibrate.calib_table"):
        report = load_calib_table(fresh, path, strict=False)
    assert "does not match the model" in caplog.text
    assert report.missing == ["0._input_quantizer"] and report.extra == ["ghost._input_quantizer"]
    assert len(report.loaded) == 3 and fresh[0].input_quantizer.amax is None
    assert torch.equal(fresh[3].input_quantizer.amax, model[3].input_quantizer.amax)


def test_long_name_lists_are_cut(tmp_path):
    holder = nn.Module()
    for i in range(25):
        setattr(holder, f"q{i:02d}", quant_nn.TensorQuantizer())
    path = tmp_path / "t.json"
    save_calib_table(holder, path)
    with pytest.raises(CalibTableError) as info:
        load_calib_table(_model(), path)
    message = str(info.value)
    assert "25 names in it are not quantizers" in message and "q19, ..." in message and "q20" not in message


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json {", r"t\.json is not JSON"),
        ("[1, 2]", r"t\.json must hold a JSON object"),
        ('{"version": 1, "quantizers": {}}', r"t\.json has no 'format' key"),
        ('{"format": "qdq-calib-table", "quantizers": {}}', r"t\.json has no 'version' key"),
        ('{"format": "qdq-calib-table", "version": 1}', r"t\.json has no 'quantizers' key"),
        ('{"format": "other", "version": 1, "quantizers": {}}', r"'format' is 'other'"),
        ('{"format": "qdq-calib-table", "version": 9, "quantizers": {}}', r"'version' is 9.*newer qdq"),
        ('{"format": "qdq-calib-table", "version": "1", "quantizers": {}}', r"'version' is '1'"),
        ('{"format": "qdq-calib-table", "version": 1, "quantizers": []}', r"'quantizers' must be an object"),
        ('{"format": "qdq-calib-table", "version": 1, "method": 3, "quantizers": {}}', r"'method' must be"),
    ],
)
def test_file_errors_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(CalibTableError, match=message):
        load_calib_table(_model(), path)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"num_bits": 8, "unsigned": False, "axis": None}, r"quantizers\['a'\] has no 'amax' key"),
        ({"amax": 1.0, "unsigned": False, "axis": None}, r"quantizers\['a'\] has no 'num_bits' key"),
        ({"amax": -1.0, "num_bits": 8, "unsigned": False, "axis": None}, r"\['amax'\] must be finite and >= 0"),
        ({"amax": float("nan"), "num_bits": 8, "unsigned": False, "axis": None}, r"\['amax'\] must be finite"),
        ({"amax": [[1.0], [1.0, 2.0]], "num_bits": 8, "unsigned": False, "axis": 0}, r"not a rectangular"),
        ({"amax": True, "num_bits": 8, "unsigned": False, "axis": None}, r"\['amax'\] must be null, a number"),
        ({"amax": [], "num_bits": 8, "unsigned": False, "axis": 0}, r"\['amax'\] is empty"),
        ({"amax": 1.0, "num_bits": "8", "unsigned": False, "axis": None}, r"\['num_bits'\] must be an int"),
        ({"amax": 1.0, "num_bits": 8, "unsigned": 0, "axis": None}, r"\['unsigned'\] must be true or false"),
        ({"amax": 1.0, "num_bits": 8, "unsigned": False, "axis": "0"}, r"\['axis'\] must be null, an int"),
        ("x", r"quantizers\['a'\] must be an object"),
    ],
)
def test_entry_errors_name_file_and_quantizer(tmp_path, entry, message):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": "qdq-calib-table", "version": 1, "quantizers": {"a": entry}}))
    with pytest.raises(CalibTableError, match=r"t\.json: " + message if "quantizers" in message else message):
        load_calib_table(_model(), path)


def test_missing_file_and_model_without_quantizers(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"calibration table .*nope\.json does not exist"):
        load_calib_table(_model(), tmp_path / "nope.json")
    with pytest.raises(ValueError, match="no TensorQuantizer"):
        save_calib_table(nn.Linear(2, 2), tmp_path / "t.json")
    with pytest.raises(TypeError, match="method must be a string"):
        save_calib_table(_model(), tmp_path / "t.json", method=3)


def test_learned_amax_updated_in_place(tmp_path):
    layer = quant_nn.QuantLinear(3, 2)
    layer.input_quantizer.amax = 4.0
    path = tmp_path / "t.json"
    save_calib_table(layer, path)
    target = quant_nn.QuantLinear(3, 2)
    target.input_quantizer.amax = 1.0
    target.input_quantizer.init_learn_amax()
    parameter = target.input_quantizer.amax
    load_calib_table(target, path, strict=False)
    assert target.input_quantizer.amax is parameter and parameter.item() == 4.0


def test_calibrate_from_a_source_then_save_and_load(tmp_path):
    (tmp_path / "data").mkdir()
    for i in range(3):
        np.save(tmp_path / "data" / f"{i}.npy", np.random.default_rng(i).normal(size=(3, 6, 6)).astype(np.float32))
    model = _model()
    calibrate_model(model, NumpyFolderSource(tmp_path / "data", batch_size=2), method="mse", progress=False)
    save_calib_table(model, tmp_path / "t.json", method="mse")
    fresh = _model()
    assert load_calib_table(fresh, tmp_path / "t.json").method == "mse"
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), fresh.eval()(x))


# --------------------------------------------------------------------------------------------------------------------
# TensorRT calibration cache
# --------------------------------------------------------------------------------------------------------------------


def test_tensorrt_golden_values(tmp_path):
    path = tmp_path / "calib.cache"
    write_tensorrt_cache({"input": 127.0, "conv1_out": 1.0}, path)
    expected_hex = struct.pack(">f", np.float32(1.0) / np.float32(127.0)).hex()
    assert expected_hex == "3c010204"
    assert path.read_text() == "TRT-8601-EntropyCalibration2\ninput: 3f800000\nconv1_out: 3c010204\n"


def test_tensorrt_order_header_and_round_trip(tmp_path):
    amax = {"z": 3.5, "onnx::Conv_7": 0.25, "a": torch.tensor(10.0), "b": np.float32(2.0), "c": np.array([6.0])}
    plain = {"z": 3.5, "onnx::Conv_7": 0.25, "a": 10.0, "b": 2.0, "c": 6.0}
    path = tmp_path / "calib.cache"
    write_tensorrt_cache(amax, path, header="TRT-100300-MinMaxCalibration")
    header, scales = read_tensorrt_cache(path)
    assert header == "TRT-100300-MinMaxCalibration"
    assert list(scales) == list(amax)  # the mapping's order
    for name, value in plain.items():
        assert scales[name] == (np.float32(value) / np.float32(127)).item(), name
        assert math.isclose(scales[name] * 127, value, rel_tol=1e-6)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "2.0", torch.ones(3)])
def test_tensorrt_bad_amax_names_tensor(tmp_path, bad):
    with pytest.raises(CalibTableError, match=r"tensor 'conv\.out'"):
        write_tensorrt_cache({"fine": 1.0, "conv.out": bad}, tmp_path / "c.cache")
    assert not (tmp_path / "c.cache").exists()


def test_tensorrt_zero_amax_warns_and_stays_positive(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qdq.calibrate.calib_table"):
        write_tensorrt_cache({"dead": 0.0}, tmp_path / "c.cache")
    assert "amax is 0 for 1 tensors" in caplog.text and "dead" in caplog.text
    assert read_tensorrt_cache(tmp_path / "c.cache")[1]["dead"] > 0


def test_tensorrt_bad_names_and_header(tmp_path):
    with pytest.raises(CalibTableError, match="tensor name 'a\\\\nb'"):
        write_tensorrt_cache({"a\nb": 1.0}, tmp_path / "c.cache")
    with pytest.raises(CalibTableError, match="header must be one non-empty line"):
        write_tensorrt_cache({"a": 1.0}, tmp_path / "c.cache", header="")
    with pytest.raises(TypeError, match="must be a mapping"):
        write_tensorrt_cache([("a", 1.0)], tmp_path / "c.cache")


def test_tensorrt_reader_accepts_short_hex_and_blank_lines(tmp_path):
    path = tmp_path / "c.cache"
    path.write_text("TRT-8601-EntropyCalibration2\r\n\r\nx:  3f800000\r\ny: 1\r\n\r\n")
    header, scales = read_tensorrt_cache(path)
    assert header == "TRT-8601-EntropyCalibration2"
    assert scales["x"] == 1.0 and scales["y"] == struct.unpack(">f", bytes.fromhex("00000001"))[0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", r"the first line must be the header"),
        ("\nx: 3f800000\n", r"the first line must be the header"),
        ("H\nx 3f800000\n", r"c\.cache, line 2: expected 'tensor name: 8 hex digits'"),
        ("H\nx: 3f80000g\n", r"c\.cache, line 2: expected"),
        ("H\nx: 3f800000\n\n: 3f800000\n", r"c\.cache, line 4: expected"),
        ("H\nx: 3f800000\nx: 3f800000\n", r"c\.cache, line 3: tensor 'x' is listed twice"),
        ("H\nx: bf800000\n", r"c\.cache, line 2: tensor 'x' has scale -1\.0"),
        ("H\nx: 7fc00000\n", r"c\.cache, line 2: tensor 'x' has scale nan"),
    ],
)
def test_tensorrt_reader_errors_name_line(tmp_path, text, message):
    path = tmp_path / "c.cache"
    path.write_text(text)
    with pytest.raises(CalibTableError, match=message):
        read_tensorrt_cache(path)


def test_tensorrt_reader_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.cache does not exist"):
        read_tensorrt_cache(tmp_path / "nope.cache")


def test_fp8_and_blocked_int4_round_trip(tmp_path):
    """FP8 (num_bits [4, 3]) and blocked INT4 (block_size) entries are written, read back and checked."""
    import json

    import qdq
    from qdq.transform.layer_formats import set_layer_format

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        qdq.replace_to_quantization_module(model)
        set_layer_format(model, "0", "int4", block_size=32)
        set_layer_format(model, "2", "fp8")
        return model

    model = build()
    qdq.calibrate_model(model, [torch.randn(8, 64)], progress=False)
    path = tmp_path / "t.json"
    qdq.save_calib_table(model, path)
    entries = json.loads(path.read_text())["quantizers"]
    assert entries["0._weight_quantizer"]["block_size"] == 32 and entries["2._input_quantizer"]["num_bits"] == [4, 3]
    fresh = build()
    qdq.load_calib_table(fresh, path)
    for (_, a), (_, b) in zip(qdq.quantizers(model), qdq.quantizers(fresh)):
        assert (a.amax is None and b.amax is None) or torch.equal(a.amax, b.amax)
    other = build()
    set_layer_format(other, "0", "int4", block_size=64)
    with pytest.raises(qdq.calibrate.calib_table.CalibTableError, match="block_size is 32 in the table, 64 in the model"):
        qdq.load_calib_table(other, path)
