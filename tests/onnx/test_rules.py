"""ONNX-driven scale matching, and the whole flow (replace, patch, rules, calibrate, export, check, verify)."""

import pytest
import torch
import torchvision
from torch import nn

import qdq
from examples.yolov5 import model as yolo
from qdq import nn as quant_nn
from qdq.onnx import export_onnx, verify
from qdq.onnx.check import check_tensorrt, quantize_groups
from qdq.onnx.rules import apply_custom_rules_to_quantizer, find_quantizer_pairs, share_quantizer
from qdq.rules import apply_resnet_rules, apply_yolov5_rules
from qdq.transform.switches import quantizers

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]
SCALE_RULES = {"scale-mismatch", "fanout-scale", "add-scale-mismatch"}


class NestedConcat(nn.Module):
    """cat(cat(a, b), c) with one quantizer per concat input, then a conv: everything must share one scale."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (quant_nn.QuantConv2d(3, 2, 1) for _ in range(3))
        self.inner = quant_nn.QuantConcat(dim=1, shared=False, num_inputs=2)
        self.outer = quant_nn.QuantConcat(dim=1, shared=False, num_inputs=2)
        self.pool = nn.MaxPool2d(2)
        self.head = quant_nn.QuantConv2d(6, 4, 1)

    def forward(self, x):
        y = self.inner(torch.relu(self.a(x)), torch.relu(self.b(x)))
        return self.head(self.pool(self.outer(y, torch.relu(self.c(x)))))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_nested_concats_and_maxpool_collapse_into_one_quantizer(dynamo, tmp_path):
    model = NestedConcat()
    pairs = apply_custom_rules_to_quantizer(model, torch.randn(1, 3, 8, 8), dynamo=dynamo)
    shared = {id(model.inner._input0_quantizer), id(model.inner._input1_quantizer),
              id(model.outer._input0_quantizer), id(model.outer._input1_quantizer), id(model.head._input_quantizer)}
    assert len(shared) == 1, pairs
    # the convs a, b, c read the same input: their input quantizers share too
    assert model.a._input_quantizer is model.b._input_quantizer is model.c._input_quantizer
    qdq.calibrate_model(model, [torch.randn(2, 3, 8, 8)], progress=False)
    info = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "n.onnx", dynamo=dynamo)
    assert not [f for f in check_tensorrt(info.model) if f.rule in SCALE_RULES]
    assert verify(model, info.path, torch.randn(1, 3, 8, 8)).ok


def test_without_rules_the_checker_sees_mismatches(tmp_path):
    model = NestedConcat()
    qdq.calibrate_model(model, [torch.randn(2, 3, 8, 8)], progress=False)
    info = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "n.onnx")
    assert {f.rule for f in check_tensorrt(info.model)} & SCALE_RULES
    assert quantize_groups(info.model)
    assert find_quantizer_pairs(info.model)  # names guessed from TorchScript scopes


def _yolo():
    model = yolo.yolov5_tiny(nc=3, seed=0).eval()
    qdq.replace_to_quantization_module(model)
    apply_yolov5_rules(model)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_yolov5_flow_passes_the_checker_and_matches_onnxruntime(dynamo, tmp_path):
    model = _yolo()
    x = torch.randn(1, 3, 64, 64)
    apply_custom_rules_to_quantizer(model, x, dynamo=dynamo)
    qdq.calibrate_model(model, [torch.randn(2, 3, 64, 64) for _ in range(2)], method="mse", progress=False)
    info = export_onnx(model, x, tmp_path / "yolo.onnx", dynamo=dynamo, output_names=None)
    findings = check_tensorrt(info.model)
    assert not [f for f in findings if f.severity == "error"], findings
    assert not [f for f in findings if f.rule in SCALE_RULES], findings
    # Every QuantizeLinear agrees with qdq to one step (a step only at exact rounding ties: ONNX divides by the scale,
    # PyTorch's kernels multiply by its reciprocal). mse amax on the power-of-two histogram grid makes the scale
    # ratios of consecutive quantizers simple fractions, so ties are more frequent (33 of 102,144 values here), and
    # this random-weight detector amplifies each flip to 16-25 output steps: the outputs are held to 32.
    report = verify(model, info.path, x, output_tolerance_steps=32)
    assert report.rounding.max_step_difference <= 1 and report.rounding.num_differing < 1e-3 * report.rounding.num_elements
    assert report.ok, str(report)


@pytest.mark.slow
def test_resnet50_flow_passes_the_checker(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()
    qdq.replace_to_quantization_module(model)
    apply_resnet_rules(model)
    x = torch.randn(1, 3, 64, 64)
    apply_custom_rules_to_quantizer(model, x)
    qdq.calibrate_model(model, [torch.randn(2, 3, 64, 64)], progress=False)
    info = export_onnx(model, x, tmp_path / "r50.onnx")
    findings = check_tensorrt(info.model)
    assert not [f for f in findings if f.severity == "error" or f.rule in SCALE_RULES], findings
    # each residual add's skip quantizer is the one of the convs reading the same tensor
    block = model.layer1[1]
    assert block.addop._input1_quantizer is block.conv1._input_quantizer
    # 50 layers deep the one-step rounding flips (float sums differ in their last bits) compound; every Q rounds
    # as qdq does, and the outputs stay within a few steps
    report = verify(model, info.path, x, output_tolerance_steps=10)
    assert report.ok and report.rounding.max_step_difference <= 1, str(report)
    assert report.rounding.num_differing < report.rounding.num_elements * 1e-3


def test_extra_pairs_and_share_after_calibration():
    model = NestedConcat()
    qdq.calibrate_model(model, [torch.randn(2, 3, 8, 8)], progress=False)
    a_amax = model.inner._input0_quantizer.amax.clone()
    b_amax = model.inner._input1_quantizer.amax.clone()
    apply_custom_rules_to_quantizer(model, torch.randn(1, 3, 8, 8), extra_pairs=[("head", "inner")])
    assert model.inner._input0_quantizer is model.head._input_quantizer
    assert model.head._input_quantizer.amax >= torch.maximum(a_amax, b_amax)
    with pytest.raises(ValueError, match="no module 'nope'"):
        apply_custom_rules_to_quantizer(model, torch.randn(1, 3, 8, 8), extra_pairs=[("head", "nope")])


def test_share_refuses_different_descriptors():
    a = quant_nn.TensorQuantizer()
    b = quant_nn.TensorQuantizer(qdq.QuantDescriptor(unsigned=True))
    with pytest.raises(ValueError, match="unsigned differs"):
        share_quantizer(nn.Module(), a, b)


def test_needs_inputs():
    with pytest.raises(ValueError, match="example_inputs"):
        apply_custom_rules_to_quantizer(NestedConcat())


def test_user_export_fn_and_no_temp_files_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = NestedConcat()
    calls = []

    def export_fn(m, path):
        calls.append(path)
        torch.onnx.export(m, (torch.randn(1, 3, 8, 8),), path, opset_version=13, dynamo=False)

    apply_custom_rules_to_quantizer(model, export_fn=export_fn)
    assert model.inner._input0_quantizer is model.outer._input1_quantizer
    assert list(tmp_path.iterdir()) == [] and not calls[0].startswith(str(tmp_path))
    assert not any(q.export_mode for _, q in quantizers(model))


def test_tagged_export_takes_the_exports_arguments(tmp_path, monkeypatch):
    """The rules step and the placement export with the user's export arguments (they exported opset 17 with an
    input named "input" whatever the user's export said)."""
    import onnx

    from qdq.onnx import export as export_module
    from qdq.onnx import placement, rules

    args = {"opset": 18, "input_names": ["images"], "dynamic_batch": True}
    mapping = export_module.export_with_quantizer_tags(NestedConcat(), torch.randn(1, 3, 8, 8), tmp_path / "t.onnx",
                                                       **args)
    tagged = onnx.load(str(tmp_path / "t.onnx"))
    assert {o.version for o in tagged.opset_import if o.domain in ("", "ai.onnx")} == {18}
    assert [i.name for i in tagged.graph.input] == ["images"]
    assert tagged.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert len(set(mapping.values())) == len(mapping) > 0
    seen = []

    def recording(*a, **kw):
        seen.append({k: kw[k] for k in args if k in kw})
        return export_module.export_with_quantizer_tags(*a, **kw)

    monkeypatch.setattr(rules, "export_with_quantizer_tags", recording)
    monkeypatch.setattr(placement, "export_with_quantizer_tags", recording)
    model = NestedConcat()
    apply_custom_rules_to_quantizer(model, torch.randn(1, 3, 8, 8), export_args=args)
    assert seen == [args, args]  # placement, then the rules' own export
    assert model.inner._input0_quantizer is model.outer._input1_quantizer
    with pytest.raises(ValueError, match="opset must be an int >= 13"):
        export_module.export_with_quantizer_tags(NestedConcat(), torch.randn(1, 3, 8, 8), tmp_path / "u.onnx",
                                                 opset=11)
    # every keyword of an export_onnx call is taken: its own (float_dtype raises the opset as export_onnx does,
    # dynamo chooses the exporter) as well as torch.onnx.export's
    export_module.export_with_quantizer_tags(NestedConcat(), torch.randn(1, 3, 8, 8), tmp_path / "h.onnx",
                                             float_dtype=torch.float16, deploy=True)
    half = onnx.load(str(tmp_path / "h.onnx"))
    assert {o.version for o in half.opset_import if o.domain in ("", "ai.onnx")} == {19}
    model = NestedConcat()
    apply_custom_rules_to_quantizer(model, torch.randn(1, 3, 8, 8), export_args={"dynamo": False, "opset": 17})
    assert model.inner._input0_quantizer is model.outer._input1_quantizer
