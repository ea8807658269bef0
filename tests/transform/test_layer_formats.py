"""Per-layer formats (qdq.transform.layer_formats): set per layer or per model, read back, exported."""

import pytest
import torch

import qdq
from qdq.transform.layer_formats import layer_formats, set_layer_format, set_model_format
from qdq.onnx import check_tensorrt, export_onnx, verify

from format_models import quantized_cnn, quantized_mlp


def test_set_layer_format_and_read_it_back():
    model = quantized_mlp()
    set_layer_format(model, "0", "fp8")
    set_layer_format(model, "2", "int4", block_size=128)
    set_layer_format(model, "4", "float")
    assert layer_formats(model) == {"0": "fp8", "2": "int4", "4": "float"}
    assert model[2]._weight_quantizer.block_size == 128 and not model[2]._input_quantizer.is_enabled
    assert model[0]._weight_quantizer.axis == 0 and model[0]._weight_quantizer.num_bits == (4, 3)
    assert model[0]._input_quantizer.name == "0._input_quantizer"


def test_bad_formats_name_the_layer():
    model = quantized_cnn()
    with pytest.raises(ValueError, match="layer '0' \\(QuantConv2d\\): INT4 weight-only is for Linear"):
        set_layer_format(model, "0", "int4")
    with pytest.raises(ValueError, match="layer '4': 8 input features are not a multiple of block_size 64"):
        set_layer_format(model, "4", "int4")
    with pytest.raises(ValueError, match="unknown format 'fp16'"):
        set_layer_format(model, "4", "fp16")
    with pytest.raises(ValueError, match="no layer 'nope'"):
        set_layer_format(model, "nope", "fp8")


def test_set_model_format_fp8_covers_pooling_and_exports(tmp_path):
    model = quantized_cnn()
    assert set_model_format(model, "fp8", fp8_fallback=None) == {"0": "fp8", "4": "fp8"}
    assert model[2]._input_quantizer.num_bits == (4, 3)  # the pool's input too
    qdq.calibrate_model(model, [torch.randn(4, 3, 8, 8)], progress=False)
    info = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", dynamic_batch=True)
    assert verify(model, info.path, torch.randn(3, 3, 8, 8)).ok
    assert [f for f in check_tensorrt(info.path) if f.severity == "error"] == []


def test_set_model_format_fp8_keeps_what_tensorrt_has_no_fp8_kernel_for():
    """Depthwise and small convolutions and small Linear layers stay out of FP8 (ModelOpt's FP8 rule)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),               # 3 input channels
        torch.nn.Conv2d(32, 32, 3, padding=1, groups=32),   # depthwise: 1 input channel per group
        torch.nn.Conv2d(32, 16, 1),                         # 16 output channels
        torch.nn.Conv2d(16, 64, 1),                         # 16 input channels
        torch.nn.Conv2d(64, 64, 7, padding=3, groups=2),    # 32 per group, 49-element kernel
        torch.nn.Conv2d(64, 48, 3, padding=1, groups=2),    # 32 per group, 48 out: FP8
        torch.nn.Conv2d(48, 17, 1),                         # 17 out: FP8
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(17, 32),                            # FP8
        torch.nn.Linear(32, 10))                            # 10 outputs
    qdq.replace_to_quantization_module(model)
    expected = {"0": "float", "1": "float", "2": "float", "3": "float", "4": "float", "5": "fp8", "6": "fp8",
                "9": "fp8", "10": "float"}
    assert set_model_format(model, "fp8") == expected
    assert not model[1]._input_quantizer.is_enabled and model[5]._weight_quantizer.num_bits == (4, 3)
    assert model[7]._input_quantizer.num_bits == (4, 3)  # the pool's input follows the model's format
    mixed = set_model_format(model, "fp8", fp8_fallback="int8")
    assert mixed == {p: ("int8" if f == "float" else f) for p, f in expected.items()}
    assert set(set_model_format(model, "fp8", fp8_fallback=None).values()) == {"fp8"}
    assert set_model_format(model, "fp8", layers=["1"])["1"] == "fp8"  # an explicit list is taken as asked
    with pytest.raises(ValueError, match="fp8_fallback must be 'float', 'int8' or None, got 'fp16'"):
        set_model_format(model, "fp8", fp8_fallback="fp16")
    assert qdq.fp8_exclusion(model[4]) == "a 49-element kernel (FP8 convolutions take at most 32)"


def test_set_model_format_int4_leaves_other_layers():
    model = quantized_cnn()
    assert set_model_format(model, "int4", block_size=32) == {"0": "int8", "4": "int8"}  # 8 features: not divisible
    model = quantized_mlp()
    assert set_model_format(model, "int4") == {"0": "int4", "2": "int4", "4": "int4"}


def test_fp8_default_on_efficientnet_lite0_keeps_the_depthwise_convolutions_float():
    """The layers the rule keeps float on EfficientNet-Lite0 (whose convolutions are Conv2d subclasses): the 16
    depthwise convolutions, the 3-channel stem and the two 1x1 convolutions with 16 channels."""
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    model = efficientnet.EfficientNet.from_name("efficientnet-lite0")
    qdq.replace_to_quantization_module(model)
    formats = set_model_format(model, "fp8")
    kept = sorted(p for p, f in formats.items() if f == "float")
    depthwise = sorted(f"_blocks.{i}._depthwise_conv" for i in range(16))
    assert kept == sorted(depthwise + ["_conv_stem", "_blocks.0._project_conv", "_blocks.1._expand_conv"])
    assert list(formats.values()).count("fp8") == 31 and formats["_fc"] == "fp8"


def test_replacing_a_quantizer_reaches_every_attribute_that_names_it():
    """A quantizer two attributes of one module share (q and k of an attention block) is replaced under both."""
    from qdq.nn import TensorQuantizer
    from qdq.transform.layer_formats import _replace_everywhere

    holder = torch.nn.Module()
    shared = TensorQuantizer()
    holder.q_quantizer = shared
    holder.k_quantizer = shared
    new = TensorQuantizer()
    _replace_everywhere(holder, shared, new)
    assert holder.q_quantizer is new and holder.k_quantizer is new
