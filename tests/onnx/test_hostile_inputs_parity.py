"""Hostile inputs to verify(): unreadable files are clear errors; the report prints its verdict and tolerance."""

import pytest
import torch
from torch import nn

import qdq
from qdq.onnx import export_onnx, verify
from qdq.onnx.check import ModelReadError
from qdq.onnx.parity import OutputParity, VerifyReport


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    qdq.replace_to_quantization_module(model)
    qdq.calibrate_model(model, [torch.randn(16, 8)], progress=False)
    return model


@pytest.mark.parametrize("content,message", [(b"not an onnx file", "is not an ONNX model"),
                                             (b"", "is not an ONNX model: it has no graph")])
def test_verify_of_a_non_onnx_or_empty_file_is_a_clear_error(content, message, tmp_path):
    """Regression: verify on a non-ONNX or empty file gave protobuf's DecodeError / ONNX Runtime's INVALID_ARGUMENT."""
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelReadError, match=rf"m.onnx' {message}"):
        verify(_model(), path, torch.randn(1, 8))


def test_verify_of_a_missing_file_or_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.onnx' does not exist"):
        verify(_model(), tmp_path / "nope.onnx", torch.randn(1, 8))
    with pytest.raises(FileNotFoundError, match=r"is a directory, not an ONNX file"):
        verify(_model(), tmp_path, torch.randn(1, 8))
    with pytest.raises(TypeError, match=r"verify takes a path or an onnx.ModelProto, got int"):
        verify(_model(), 3, torch.randn(1, 8))


@pytest.mark.parametrize("tolerance", [-1, float("nan"), "2", True])
def test_verify_refuses_a_bad_tolerance(tolerance, tmp_path):
    with pytest.raises(ValueError, match=r"output_tolerance_steps must be a number >= 0"):
        verify(_model(), tmp_path / "m.onnx", torch.randn(1, 8), output_tolerance_steps=tolerance)


def test_report_prints_ok_with_its_tolerance(tmp_path):
    """Regression: VerifyReport never printed its verdict."""
    model = _model()
    path = tmp_path / "m.onnx"
    export_onnx(model, torch.randn(1, 8), path, dynamic_batch=True)
    report = verify(model, path, torch.randn(5, 8), output_tolerance_steps=2)
    assert report.ok
    assert str(report).splitlines()[0] == ("OK: ONNX Runtime against PyTorch, tolerance 2 output step(s) and 1 "
                                           "QuantizeLinear step")


def test_report_prints_mismatch():
    report = VerifyReport(outputs=[OutputParity("y", 0.5, 0.1, 5.0, 10, 3)], output_tolerance_steps=4)
    assert not report.ok
    assert str(report).startswith("MISMATCH: ONNX Runtime against PyTorch, tolerance 4 output step(s)")


def test_verify_of_a_model_proto_without_graph():
    import onnx

    with pytest.raises(ModelReadError, match=r"the onnx.ModelProto has no graph"):
        verify(_model(), onnx.ModelProto(), torch.randn(1, 8))


def test_custom_rules_on_a_non_module():
    with pytest.raises(TypeError, match=r"apply_custom_rules_to_quantizer takes an nn.Module, got NoneType"):
        qdq.apply_custom_rules_to_quantizer(None, torch.randn(1, 8))
