"""export_onnx arguments: a folder as path, an opset that is not an int."""

import pytest
import torch
from torch import nn

import qdq
from qdq.onnx import export_onnx


def _model():
    model = nn.Sequential(nn.Linear(4, 4))
    qdq.replace_to_quantization_module(model)
    qdq.calibrate_model(model, [torch.randn(8, 4)], progress=False)
    return model


def test_export_to_a_folder_is_a_clear_error(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"export_onnx: .* is a folder; give the path of the .onnx file"):
        export_onnx(_model(), torch.randn(1, 4), tmp_path)


@pytest.mark.parametrize("opset", ["17", 17.0, True, None])
def test_opset_must_be_an_int(opset, tmp_path):
    """Regression: opset="17" gave "'<' not supported between instances of 'str' and 'int'"."""
    with pytest.raises(TypeError, match=r"opset must be an int"):
        export_onnx(_model(), torch.randn(1, 4), tmp_path / "m.onnx", opset=opset)
