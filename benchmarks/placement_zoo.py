"""Automatic Q/DQ placement on a zoo of models built from code (random weights), rated by the fusion predictor.

Per model, side by side in one run:

* ``today``: ``replace_to_quantization_module`` + the scale-matching rules without placement (``placement=False``),
  the per-layer placement qdq had before the automatic pass;
* ``auto``: the same plus :func:`qdq.onnx.placement.place_quantizers` (what ``apply_custom_rules_to_quantizer`` now
  does by default);
* ``modelopt``: ModelOpt's ONNX PTQ of the float file (``modelopt.onnx.quantization.quantize``, CPU calibration),
  when ``--modelopt-dir`` holds its output (``benchmarks/modelopt_onnx_ptq.py``, run in a venv with ModelOpt, writes
  it from the float files this script saves with ``--save-float``).

Columns: INT8 share of Conv/Gemm/MatMul FLOPs, float residual Adds, precision transitions, mismatched scale groups
(requantize layers), checker errors/warnings (``add-float`` counted as a warning in a quantized model), whether
ONNX Runtime agrees with PyTorch on every QuantizeLinear (``verify``), and the placement time over one export of the
same model, measured back to back.

    PYTHONPATH=. python benchmarks/placement_zoo.py --out /tmp/zoo [--models resnet18,mobilenet_v2] \\
        [--save-float /tmp/zoo/float] [--modelopt-dir /tmp/zoo/modelopt]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import qdq  # noqa: E402
from qdq.onnx.check import check_tensorrt  # noqa: E402
from qdq.onnx.export import export_onnx, export_with_quantizer_tags  # noqa: E402
from qdq.onnx.fusion import predict_fusion  # noqa: E402
from qdq.onnx.placement import place_quantizers  # noqa: E402
from qdq.onnx.rules import apply_custom_rules_to_quantizer  # noqa: E402

logger = logging.getLogger("benchmarks.placement_zoo")


class _First(nn.Module):
    """Returns one output of a model whose forward returns a dict (segmentation) or features (detection)."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x):
        if self.kind == "seg":
            return self.model(x)["out"]
        features = list(self.model.backbone(x).values())
        head = self.model.head(features)
        return head["bbox_regression"], head["cls_logits"]


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    import torchvision.models as tvm

    torch.manual_seed(0)
    if name == "efficientnet_lite0":
        from qdq.cli.zoo import build_model

        return build_model(name)[0], (1, 3, 224, 224)
    if name == "yolov5":
        from examples.yolov5 import model as yolo

        return yolo.yolov5_tiny(nc=3, seed=0), (1, 3, 128, 128)
    if name in ("convnext_atto", "mobilevit_xxs"):
        import timm

        return timm.create_model(name, pretrained=False), (1, 3, 128, 128)
    if name == "googlenet":
        return tvm.googlenet(weights=None, aux_logits=False, init_weights=False), (1, 3, 128, 128)
    if name == "inception_v3":
        return tvm.inception_v3(weights=None, aux_logits=False, init_weights=False), (1, 3, 160, 160)
    if name.startswith(("lraspp", "deeplabv3")):
        return _First(getattr(tvm.segmentation, name)(weights=None, weights_backbone=None), "seg"), (1, 3, 128, 128)
    if name == "ssdlite320_mobilenet_v3_large":
        return _First(tvm.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None), "det"), (1, 3, 160, 160)
    return tvm.get_model(name, weights=None), (1, 3, 128, 128)


ZOO = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf",
       "convnext_tiny", "shufflenet_v2_x1_0", "googlenet", "densenet121", "inception_v3",
       "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "ssdlite320_mobilenet_v3_large",
       "convnext_atto", "mobilevit_xxs", "yolov5", "efficientnet_lite0"]


def rate(path: Path) -> dict:
    findings = check_tensorrt(path)
    quantized = any(f.rule != "no-qdq" for f in findings) or True
    fusion = predict_fusion(path)
    errors = sum(f.severity == "error" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    if quantized:  # add-float as a warning (the checker's own rule says so from this change on)
        warnings += sum(f.rule == "add-float" and f.severity == "info" for f in findings)
    out = fusion.summary()
    out.update(errors=errors, warnings=warnings,
               warning_rules=sorted({f.rule for f in findings if f.severity != "info" or f.rule == "add-float"}))
    return out


def run_variant(model: nn.Module, shape, out: Path, name: str, auto: bool, verify: bool) -> dict:
    x = torch.randn(shape)
    report = None
    if auto:  # one export of the same model and the placement, back to back
        t0 = time.perf_counter()
        export_with_quantizer_tags(model, x, out / f"{name}.tagged.onnx")
        tagged_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = place_quantizers(model, x)
        place_s = time.perf_counter() - t0
    apply_custom_rules_to_quantizer(model, x, placement=False)
    qdq.calibrate_model(model, [torch.randn(shape) for _ in range(2)], progress=False)
    path = out / f"{name}.{'auto' if auto else 'today'}.onnx"
    t0 = time.perf_counter()
    export_onnx(model, x, path, output_names=None)
    export_s = time.perf_counter() - t0
    row = rate(path)
    row.update(export_s=round(export_s, 2))
    if report is not None:
        row.update(placed=len(report.placed), place_s=round(place_s, 2), tagged_export_s=round(tagged_s, 2),
                   place_over_export=round(place_s / tagged_s, 2))
    if verify:
        rep = qdq.verify(model, path, x)
        row["verify"] = bool(rep.ok)
        row["verify_q_steps"] = int(rep.rounding.max_step_difference)
        row["verify_out_steps"] = round(max((o.max_error_steps for o in rep.outputs), default=0.0), 2)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--save-float", type=Path, help="also write each float model here (for ModelOpt)")
    parser.add_argument("--modelopt-dir", type=Path, help="folder with <model>.modelopt.onnx files to rate")
    parser.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime comparison")
    parser.add_argument("--rate-only", action="store_true", help="rate the files an earlier run left in --out "
                        "(and --modelopt-dir) again, with the current checker and predictor, without building models")
    args = parser.parse_args(argv)
    if args.rate_only:
        return rate_only(args)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in args.models.split(","):
        try:
            float_model, shape = build(name)
            float_model.eval()
            if args.save_float:
                args.save_float.mkdir(parents=True, exist_ok=True)
                export_onnx(float_model, torch.randn(shape), args.save_float / f"{name}.onnx", quantize=False,
                            output_names=None)
            qdq.replace_to_quantization_module(float_model)
            row = {"input": list(shape)}
            for auto in (False, True):
                model = copy.deepcopy(float_model)
                row["auto" if auto else "today"] = run_variant(model, shape, args.out, name, auto, not args.no_verify)
            mo = args.modelopt_dir / f"{name}.modelopt.onnx" if args.modelopt_dir else None
            if mo is not None and mo.is_file():
                row["modelopt"] = rate(mo)
            rows[name] = row
        except Exception as exc:  # one model's failure is reported in the table, not hidden
            logger.exception("%s failed", name)
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print_row(name, rows[name], flush=True)
    (args.out / "placement_zoo.json").write_text(json.dumps(rows, indent=1))
    return 0


def rate_only(args) -> int:
    old = json.loads((args.out / "placement_zoo.json").read_text()) if (args.out / "placement_zoo.json").is_file() else {}
    rows = {}
    for name in args.models.split(","):
        row = {}
        for variant in ("today", "auto"):
            path = args.out / f"{name}.{variant}.onnx"
            if path.is_file():
                row[variant] = {**old.get(name, {}).get(variant, {}), **rate(path)}
        mo = args.modelopt_dir / f"{name}.modelopt.onnx" if args.modelopt_dir else None
        if mo is not None and mo.is_file():
            row["modelopt"] = rate(mo)
        if row:
            rows[name] = row
            print_row(name, row, flush=True)
    (args.out / "placement_zoo_rated.json").write_text(json.dumps(rows, indent=1))
    return 0


HEADER = ("model", "variant", "int8 share", "float adds", "transitions", "mismatched", "err/warn", "verify",
          "place/export")


def print_row(name: str, row: dict, flush: bool = False) -> None:
    if not hasattr(print_row, "done"):
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "---|" * len(HEADER))
        print_row.done = True
    if "error" in row:
        print(f"| {name} | - | {row['error']} |" + " |" * (len(HEADER) - 3), flush=flush)
        return
    for variant in ("today", "auto", "modelopt"):
        r = row.get(variant)
        if r is None:
            continue
        ratio = f"{r['place_over_export']:.2f}x ({r['place_s']:.1f} s)" if "place_over_export" in r else "-"
        verify = ("ok" if r["verify"] else f"Q {r['verify_q_steps']} / out {r['verify_out_steps']} steps"
                  ) if "verify" in r else "-"
        print(f"| {name} | {variant} | {100 * r['int8_share']:.2f}% | {r['float_residual_adds']} | "
              f"{r['precision_transitions']} | {r['mismatched_scale_groups']} | {r['errors']}/{r['warnings']} | "
              f"{verify} | {ratio} |", flush=flush)


if __name__ == "__main__":
    sys.exit(main())
