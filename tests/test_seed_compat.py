"""pytorch_quantization-era user code (the calls of the NVIDIA YOLOv5/BEVFusion QAT scripts in seed 001) runs on
qdq with only the package name changed in its imports.

The "user code" below is written the way those scripts use the API: the same imports, attribute names, private
attributes they touch and call sequences.
"""

import re

import pytest
import torch
from torch import nn

# --- the imports, with pytorch_quantization -> qdq (and absl's logging -> qdq.quant_logging) ----------------------
from qdq import calib
from qdq import nn as quant_nn
from qdq import quant_logging
from qdq import quant_modules
from qdq.nn.modules import _utils as quant_nn_utils
from qdq.tensor_quant import QuantDescriptor


# --- a small YOLO-style model ---------------------------------------------------------------------------------------
class Conv(nn.Module):
    def __init__(self, c1, c2, k=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, padding=k // 2)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


class Bottleneck(nn.Module):
    def __init__(self, c, shortcut=True):
        super().__init__()
        self.cv1 = Conv(c, c, 1)
        self.cv2 = Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(Conv(3, 8, 3), Bottleneck(8), nn.MaxPool2d(2), Conv(8, 8, 1), Bottleneck(8, False))
        self.concat_convs = nn.ModuleList([Conv(8, 4), Conv(8, 4)])
        self.head = nn.Linear(8, 5)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.model(x)
        x = torch.cat([self.concat_convs[0](x), self.concat_convs[1](x)], dim=1)
        return self.head(self.pool(x).flatten(1))


# --- user code: initialize ------------------------------------------------------------------------------------------
def initialize():
    quant_desc_input = QuantDescriptor(calib_method="histogram")
    quant_nn.QuantConv2d.set_default_quant_desc_input(quant_desc_input)
    quant_nn.QuantMaxPool2d.set_default_quant_desc_input(quant_desc_input)
    quant_nn.QuantLinear.set_default_quant_desc_input(quant_desc_input)
    quant_logging.set_verbosity(quant_logging.ERROR)


# --- user code: the copied helpers ----------------------------------------------------------------------------------
def transfer_torch_to_quantization(nninstance, quantmodule):
    quant_instance = quantmodule.__new__(quantmodule)
    for k, val in vars(nninstance).items():
        setattr(quant_instance, k, val)

    def __init__(self):
        if isinstance(self, quant_nn.QuantAdaptiveAvgPool2d):
            quant_desc_input = quant_nn_utils.pop_quant_desc_in_kwargs(self.__class__, input_only=True)
        else:
            quant_desc_input, quant_desc_weight = quant_nn_utils.pop_quant_desc_in_kwargs(self.__class__)
        if isinstance(self, quant_nn_utils.QuantInputMixin):
            self.init_quantizer(quant_desc_input)
            if isinstance(self._input_quantizer._calibrator, calib.HistogramCalibrator):
                self._input_quantizer._calibrator._torch_hist = True
        else:
            self.init_quantizer(quant_desc_input, quant_desc_weight)
            if isinstance(self._input_quantizer._calibrator, calib.HistogramCalibrator):
                self._input_quantizer._calibrator._torch_hist = True
                self._weight_quantizer._calibrator._torch_hist = True

    __init__(quant_instance)
    return quant_instance


def quantization_ignore_match(ignore_policy, path):
    if ignore_policy is None:
        return False
    if callable(ignore_policy):
        return ignore_policy(path)
    if isinstance(ignore_policy, str):
        ignore_policy = [ignore_policy]
    return path in ignore_policy or any(re.match(item, path) for item in ignore_policy)


def replace_to_quantization_module(model, ignore_policy=None):
    module_dict = {}
    for entry in quant_modules._DEFAULT_QUANT_MAP:
        module = getattr(entry.orig_mod, entry.mod_name)
        module_dict[id(module)] = entry.replace_mod

    def recursive_and_replace_module(module, prefix=""):
        for name in module._modules:
            submodule = module._modules[name]
            path = name if prefix == "" else prefix + "." + name
            recursive_and_replace_module(submodule, path)
            submodule_id = id(type(submodule))
            if submodule_id in module_dict:
                if quantization_ignore_match(ignore_policy, path):
                    continue
                module._modules[name] = transfer_torch_to_quantization(submodule, module_dict[submodule_id])

    recursive_and_replace_module(model)


class QuantAdd(torch.nn.Module):
    def __init__(self, quantization):
        super().__init__()
        if quantization:
            self._input0_quantizer = quant_nn.TensorQuantizer(QuantDescriptor(num_bits=8, calib_method="histogram"))
            self._input1_quantizer = quant_nn.TensorQuantizer(QuantDescriptor(num_bits=8, calib_method="histogram"))
            self._input0_quantizer._calibrator._torch_hist = True
            self._input1_quantizer._calibrator._torch_hist = True
            self._fake_quant = True
        self.quantization = quantization

    def forward(self, x, y):
        if self.quantization:
            return self._input0_quantizer(x) + self._input1_quantizer(y)
        return x + y


def bottleneck_quant_forward(self, x):
    if hasattr(self, "addop"):
        return self.addop(x, self.cv2(self.cv1(x))) if self.add else self.cv2(self.cv1(x))
    return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


def replace_bottleneck_forward(model):
    for name, bottleneck in model.named_modules():
        if bottleneck.__class__.__name__ == "Bottleneck":
            if bottleneck.add and not hasattr(bottleneck, "addop"):
                bottleneck.addop = QuantAdd(bottleneck.add)
            bottleneck.__class__.forward = bottleneck_quant_forward


def get_attr_with_path(m, path):
    for p in path.split("."):
        m = getattr(m, p)
    return m


def calibrate_model(model, dataloader, device, num_batch=25):
    def compute_amax(model, **kwargs):
        for name, module in model.named_modules():
            if isinstance(module, quant_nn.TensorQuantizer):
                if module._calibrator is not None:
                    if isinstance(module._calibrator, calib.MaxCalibrator):
                        module.load_calib_amax()
                    else:
                        module.load_calib_amax(**kwargs)
                    module._amax = module._amax.to(device)

    def collect_stats(model, data_loader, device, num_batch=200):
        model.eval()
        for name, module in model.named_modules():
            if isinstance(module, quant_nn.TensorQuantizer):
                if module._calibrator is not None:
                    module.disable_quant()
                    module.enable_calib()
                else:
                    module.disable()
        with torch.no_grad():
            for i, datas in enumerate(data_loader):
                imgs = datas[0].to(device, non_blocking=True).float() / 255.0
                model(imgs)
                if i >= num_batch:
                    break
        for name, module in model.named_modules():
            if isinstance(module, quant_nn.TensorQuantizer):
                if module._calibrator is not None:
                    module.enable_quant()
                    module.disable_calib()
                else:
                    module.enable()

    collect_stats(model, dataloader, device, num_batch=num_batch)
    compute_amax(model, method="mse")


def build_sensitivity_profile(model, eval_model_callback, printed):
    quant_layer_names = []
    for name, module in model.named_modules():
        if name.endswith("_quantizer"):
            module.disable()
            layer_name = name.replace("._input_quantizer", "").replace("._weight_quantizer", "")
            if layer_name not in quant_layer_names:
                quant_layer_names.append(layer_name)
    summary = []
    for quant_layer in quant_layer_names:
        for name, module in model.named_modules():
            if name.endswith("_quantizer") and quant_layer in name:
                module.enable()
                printed.append(f"{name:40}: {module}")
        with torch.no_grad():
            summary.append((eval_model_callback(model), quant_layer))
        for name, module in model.named_modules():
            if name.endswith("_quantizer") and quant_layer in name:
                module.disable()
    return summary


# --- the test -------------------------------------------------------------------------------------------------------
def _loader(n=6):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8), torch.zeros(2)) for _ in range(n)]


def test_seed_flow_runs_unchanged():
    saved = {c: (getattr(c, "default_quant_desc_input")) for c in (quant_nn.QuantConv2d, quant_nn.QuantMaxPool2d,
                                                                    quant_nn.QuantLinear)}
    original_forward = Bottleneck.forward
    try:
        initialize()
        torch.manual_seed(0)
        model = Net()
        replace_bottleneck_forward(model)
        replace_to_quantization_module(model, ignore_policy=["head"])
        assert isinstance(model.model[0].conv, quant_nn.QuantConv2d)
        assert not isinstance(model.head, quant_nn.QuantLinear)  # ignored
        assert isinstance(model.pool, quant_nn.QuantAdaptiveAvgPool2d)
        # rules-style manual pair: the second concat branch shares the first branch's input quantizer
        major, sub = "concat_convs.0.conv", "concat_convs.1.conv"
        get_attr_with_path(model, sub)._input_quantizer = get_attr_with_path(model, major)._input_quantizer

        calibrate_model(model, _loader(), "cpu", num_batch=3)
        q = model.model[0].conv._input_quantizer
        assert q.amax is not None and 0 < q.amax.item() <= 1.0
        assert model.model[1].addop._input0_quantizer.amax is not None
        assert model.concat_convs[1].conv._input_quantizer is model.concat_convs[0].conv._input_quantizer

        x = torch.rand(2, 3, 16, 16)
        model.eval()
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, 5) and torch.isfinite(out).all()

        printed = []
        summary = build_sensitivity_profile(model, lambda m: float(m(x).abs().mean()), printed)
        assert len(summary) >= 8 and any("TensorQuantizer(8bit" in line for line in printed)
    finally:
        for c, d in saved.items():
            c.set_default_quant_desc_input(d)
        Bottleneck.forward = original_forward


def test_same_flow_with_qdq_helpers():
    """What the copied helpers did, with the functions qdq now provides."""
    import qdq
    from qdq.calibrate.sensitivity import build_sensitivity_profile as profile

    torch.manual_seed(0)
    model = Net()
    quant_modules.replace_to_quantization_module(model, ignore_policy=["head"])
    data = [(b.float() / 255.0, y) for b, y in _loader()]
    qdq.calibrate_model(model, data, num_batches=3, method="mse", progress=False)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        result = profile(model, lambda m: float(m(x).abs().mean()), print_table=False, progress=False)
    assert len(result.rows) == len([1 for _ in qdq.calibrate.sensitivity.quantized_layers(model)])
    for i in range(len(model.model)):
        layer = model.model[i]
        if qdq.have_quantizer(layer):
            qdq.disable_quantization(layer).apply()
            qdq.enable_quantization(layer).apply()


# --- seed 001's cmd_quantize and sensitivity loop, on the YOLOv5-shaped model of examples/yolov5 --------------------
@pytest.mark.slow
def test_seed_cmd_quantize_on_yolov5(tmp_path, caplog):
    """Seed 001's ``cmd_quantize`` and ``cmd_sensitive_analysis`` bodies as written, with qdq's own
    ``apply_custom_rules_to_quantizer(model, export_onnx)`` (the user's callable in second position, before
    calibration: pytorch_quantization exports an uncalibrated model there) and ``calibrate_model(model, loader,
    device)``; the seed's helpers above stand for its ``quantize.`` module. Regression: the callable used to be taken
    for ``example_inputs`` and the export of uncalibrated quantizers refused."""
    import logging
    import types

    import onnx

    import qdq
    from examples.yolov5 import model as yolo

    saved = {c: c.default_quant_desc_input for c in (quant_nn.QuantConv2d, quant_nn.QuantMaxPool2d,
                                                      quant_nn.QuantLinear)}
    original_forward = yolo.Bottleneck.forward
    quantize = types.SimpleNamespace(
        initialize=initialize, replace_bottleneck_forward=replace_bottleneck_forward,
        replace_to_quantization_module=replace_to_quantization_module,
        apply_custom_rules_to_quantizer=qdq.apply_custom_rules_to_quantizer,
        calibrate_model=lambda model, loader, device: qdq.calibrate_model(
            model, loader, device, method="mse", progress=False),
        have_quantizer=qdq.have_quantizer, disable_quantization=qdq.disable_quantization,
        enable_quantization=qdq.enable_quantization,
    )
    exported = []

    def export_onnx(model, file):  # the user's export function: (model, file), pytorch_quantization's switch
        quant_nn.TensorQuantizer.use_fb_fake_quant = True
        model.eval()
        with torch.no_grad():
            torch.onnx.export(model, torch.zeros(1, 3, 64, 64), file, opset_version=13, input_names=["images"],
                              dynamo=False)
        quant_nn.TensorQuantizer.use_fb_fake_quant = False
        exported.append(file)

    def load_yolov5s_model(weight, device):
        return yolo.yolov5_tiny(nc=3).to(device)

    def create_coco_train_dataloader(cocodir):
        g = torch.Generator().manual_seed(1)
        return [torch.rand(2, 3, 64, 64, generator=g) for _ in range(4)]

    create_coco_val_dataloader = create_coco_train_dataloader

    def evaluate_coco(model, val_dataloader):
        with torch.no_grad():
            return float(sum(o.float().abs().mean() for o in model(val_dataloader[0])))

    weight, cocodir, device, ignore_policy = None, None, "cpu", None
    try:
        with caplog.at_level(logging.WARNING, logger="qdq"):
            # ---- cmd_quantize, as in the seed ----
            quantize.initialize()

            model = load_yolov5s_model(weight, device)
            train_dataloader = create_coco_train_dataloader(cocodir)
            val_dataloader = create_coco_val_dataloader(cocodir)
            quantize.replace_bottleneck_forward(model)
            quantize.replace_to_quantization_module(model, ignore_policy=ignore_policy)
            quantize.apply_custom_rules_to_quantizer(model, export_onnx)
            quantize.calibrate_model(model, train_dataloader, device)
        assert len(exported) == 2  # the user's export, called by the placement pass and by the shared-scale rules
        assert quant_nn.TensorQuantizer.use_fb_fake_quant is False
        assert "has no amax" not in caplog.text  # the rules step quantized nothing per batch
        adds = [m for m in model.modules() if isinstance(m, QuantAdd)]
        assert adds and all(a._input0_quantizer is a._input1_quantizer for a in adds)  # the rules shared them
        quantizers = [m for m in model.modules() if isinstance(m, quant_nn.TensorQuantizer)]
        assert all(q.amax is not None for q in quantizers)

        # export of the calibrated model: every Add and Concat group has one scale (TensorRT fuses them)
        path = tmp_path / "yolo_qdq.onnx"
        qdq.export_onnx(model, torch.rand(1, 3, 64, 64), path)
        findings = qdq.check_tensorrt(onnx.load(str(path)))
        assert not [f for f in findings if "scale-mismatch" in f.rule], findings
        # the user's own export (use_fb_fake_quant) of the calibrated model also works
        export_onnx(model, str(tmp_path / "user.onnx"))
        assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp_path / "user.onnx")).graph.node)

        # ---- cmd_sensitive_analysis's loop, as in the seed (over the model's top-level blocks) ----
        summary, printed = [], []
        print = printed.append
        blocks = list(model.backbone.children()) + list(model.neck.children())
        for i in range(0, len(blocks)):
            layer = blocks[i]
            if quantize.have_quantizer(layer):
                print(f"Quantization disable model.{i}")
                quantize.disable_quantization(layer).apply()
                ap = evaluate_coco(model, val_dataloader)
                summary.append([ap, f"model.{i}"])
                quantize.enable_quantization(layer).apply()
            else:
                print(f"ignore model.{i} because it is {type(layer)}")
        assert len(summary) >= 3 and all(q.is_enabled for q in quantizers)
    finally:
        for c, d in saved.items():
            c.set_default_quant_desc_input(d)
        yolo.Bottleneck.forward = original_forward
        quant_nn.TensorQuantizer.use_fb_fake_quant = False
