"""Hostile calibration tables and TensorRT caches: float32 overflow, a missing header, duplicate keys."""

import json

import pytest
import torch
from torch import nn

from qdq import calibrate_model
from qdq.calibrate.calib_table import (
    CalibTableError,
    load_calib_table,
    read_tensorrt_cache,
    save_calib_table,
    write_tensorrt_cache,
)
from qdq.transform.replace import replace_to_quantization_module


@pytest.mark.parametrize("amax", [1e39, 3.5e38, float(torch.finfo(torch.float32).max) * 2])
def test_write_cache_refuses_an_amax_that_overflows_float32(amax, tmp_path):
    """Regression: write_tensorrt_cache({"t": 1e39}) wrote Inf: the finite check ran before the float32 cast."""
    with pytest.raises(CalibTableError, match=r"tensor 't': amax .* overflows float32"):
        write_tensorrt_cache({"t": amax}, tmp_path / "c.cache")
    assert not (tmp_path / "c.cache").exists()


def test_write_cache_takes_the_largest_float32(tmp_path):
    big = float(torch.finfo(torch.float32).max)
    write_tensorrt_cache({"t": big}, tmp_path / "c.cache")
    _, scales = read_tensorrt_cache(tmp_path / "c.cache")
    assert scales["t"] == pytest.approx(big / 127, rel=1e-6)


def test_read_cache_without_a_header_is_an_error(tmp_path):
    """Regression: a cache without header took its first entry for the header and lost that tensor."""
    path = tmp_path / "c.cache"
    path.write_text("input: 3c010a14\nconv: 3c010a14\n")
    with pytest.raises(CalibTableError, match=r"c.cache, line 1: expected the header .* got the tensor entry "
                                              r"'input: 3c010a14'"):
        read_tensorrt_cache(path)


def test_read_cache_with_a_header_still_reads(tmp_path):
    path = tmp_path / "c.cache"
    path.write_text("TRT-8601-EntropyCalibration2\nonnx::Conv_7: 3c010a14\n")
    header, scales = read_tensorrt_cache(path)
    assert header == "TRT-8601-EntropyCalibration2" and list(scales) == ["onnx::Conv_7"]


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    replace_to_quantization_module(model)
    calibrate_model(model, [torch.randn(8, 4)], progress=False)
    return model


def test_duplicate_quantizer_in_a_table_is_an_error_naming_it(tmp_path):
    """Regression: a table naming a quantizer twice was accepted, the last entry winning."""
    model = _model()
    path = tmp_path / "t.json"
    save_calib_table(model, path)
    text = path.read_text()
    entry = '    "0._input_quantizer": {"amax": 9.0, "num_bits": 8, "unsigned": false, "axis": null},\n'
    text = text.replace('  "quantizers": {\n', '  "quantizers": {\n' + entry, 1)
    path.write_text(text)
    with pytest.raises(CalibTableError, match=r"t.json: key '0._input_quantizer' appears more than once"):
        load_calib_table(model, path)


def test_duplicate_top_level_key_in_a_table_is_an_error(tmp_path):
    model = _model()
    path = tmp_path / "t.json"
    save_calib_table(model, path)
    table = json.loads(path.read_text())
    path.write_text('{"version": 1, ' + json.dumps(table)[1:])
    with pytest.raises(CalibTableError, match=r"key 'version' appears more than once"):
        load_calib_table(model, path)


def test_writing_to_a_folder_is_a_clear_error(tmp_path):
    """Regression: the error named the temporary file (``.x.abc.tmp -> folder``), not the mistake."""
    with pytest.raises(IsADirectoryError, match=r"is a folder; give the path of the file to write"):
        save_calib_table(_model(), tmp_path)
    with pytest.raises(IsADirectoryError, match=r"is a folder; give the path of the file to write"):
        write_tensorrt_cache({"t": 1.0}, tmp_path)


def test_saving_a_table_before_calibration_warns(tmp_path, caplog):
    model = nn.Sequential(nn.Linear(4, 2))
    replace_to_quantization_module(model)
    with caplog.at_level("WARNING", logger="qdq.calibrate.calib_table"):
        save_calib_table(model, tmp_path / "t.json")
    assert "none of the 2 quantizers has an amax (calibrate the model first)" in caplog.text
