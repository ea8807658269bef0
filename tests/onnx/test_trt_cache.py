"""TensorRT 10 calibration caches from a calibrated model and from a QDQ file (float ONNX + cache)."""

import numpy as np
import onnx
import torch

import qdq
from qdq.calibrate.calib_table import read_tensorrt_cache
from qdq.onnx import export_onnx
from qdq.onnx.parity import run_onnxruntime
from qdq.onnx.trt_cache import qdq_to_float_and_cache, write_model_tensorrt_cache


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(144, 2))
    qdq.replace_to_quantization_module(model)
    qdq.calibrate_model(model, [torch.randn(4, 3, 8, 8) for _ in range(2)], progress=False)
    return model.eval()


def test_cache_from_a_model_reads_back_as_the_model_amax(tmp_path):
    model = _model()
    cache = write_model_tensorrt_cache(model, tmp_path / "c.cache", torch.randn(1, 3, 8, 8),
                                       float_path=tmp_path / "float.onnx")
    _, scales = read_tensorrt_cache(tmp_path / "c.cache")
    amax = sorted(float(m.input_quantizer.amax) for m in (model[0], model[2], model[5]))
    assert len(scales) == 3 and np.allclose(sorted(s * 127 for s in scales.values()), amax, rtol=1e-6)
    float_names = {o for n in onnx.load(str(tmp_path / "float.onnx")).graph.node for o in n.output}
    assert set(cache) <= float_names | {"input"}


def test_qdq_file_to_float_model_keeps_the_quantized_weights(tmp_path):
    model = _model()
    x = torch.randn(2, 3, 8, 8)
    fake = export_onnx(model, x[:1], tmp_path / "q.onnx", dynamic_batch=True)
    deploy = export_onnx(model, x[:1], tmp_path / "d.onnx", dynamic_batch=True, deploy=True)
    float_fake, cache_fake = qdq_to_float_and_cache(fake.model)
    float_deploy, cache_deploy = qdq_to_float_and_cache(deploy.model)
    assert cache_fake == cache_deploy and len(cache_fake) == 3
    assert not [n for n in float_fake.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    # the float model computes with the fake-quantized weights and float activations
    for name, q in qdq.transform.switches.quantizers(model):
        if "input" in name:
            q.disable()
    with torch.no_grad():
        expected = model(x).numpy()
    for converted in (float_fake, float_deploy):
        (out,) = run_onnxruntime(converted, x)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_public_write_tensorrt_cache_takes_a_model(tmp_path):
    """qdq.write_tensorrt_cache(model, path, example_inputs): the cache under the float export's tensor names, read
    back as each input quantizer's amax."""
    model = _model()
    x = torch.randn(1, 3, 8, 8)
    cache = qdq.write_tensorrt_cache(model, tmp_path / "c.cache", x, float_path=tmp_path / "float.onnx")
    header, scales = read_tensorrt_cache(tmp_path / "c.cache")
    assert header == qdq.calibrate.calib_table.TENSORRT_HEADER and set(scales) == set(cache)
    float_model = onnx.load(str(tmp_path / "float.onnx"))
    # each cached tensor is the input of the layer whose quantizer it came from, in the float file
    readers = {}
    for node in float_model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            readers[node.input[0]] = node
    layers = [model[0], model[2], model[5]]
    assert sorted(readers) == sorted(scales) and len(scales) == len(layers)
    by_order = [n.input[0] for n in float_model.graph.node if n.op_type in ("Conv", "Gemm")]
    for tensor, layer in zip(by_order, layers):
        amax = float(layer.input_quantizer.amax)
        assert abs(scales[tensor] * 127 - amax) <= 1e-6 * amax
        assert scales[tensor] == np.float32(np.float32(amax) / np.float32(127))
    # the same file written from the amax mapping
    assert qdq.write_tensorrt_cache(cache, tmp_path / "d.cache") is None
    assert (tmp_path / "d.cache").read_text() == (tmp_path / "c.cache").read_text()


def test_public_write_tensorrt_cache_refuses_what_it_cannot_take(tmp_path):
    import pytest

    model = _model()
    with pytest.raises(TypeError, match="a model needs example_inputs"):
        qdq.write_tensorrt_cache(model, tmp_path / "c.cache")
    with pytest.raises(TypeError, match="takes no example_inputs"):
        qdq.write_tensorrt_cache({"input": 1.0}, tmp_path / "c.cache", torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match="qdq_to_float_and_cache"):
        qdq.write_tensorrt_cache("model.onnx", tmp_path / "c.cache")
