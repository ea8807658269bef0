"""CIFAR-10 section: a ResNet-20 in fp32, PTQ int8, PTQ with 4-bit weights and QAT with 4-bit weights.

Everything but the bookkeeping comes from ``examples/cifar10/cifar.py`` (``resnet20``, ``loaders``, ``train``,
``ptq``, ``qat``): the float network is trained on the 50,000 training images of ``../shared/data`` (or loaded),
quantized with per-channel weights and per-tensor 8-bit activations (every convolution and the classifier with
4-bit weights in the 4-bit rows), and evaluated on the 10,000 test images.

Training is the slow part on a 2-core CPU: the trained fp32 weights are cached in ``--out`` (``resnet20_fp32.pt``,
reused when trained with the same settings) or taken from ``--cifar-checkpoint``. ``--cifar-epochs`` sets the float
training epochs, ``--cifar-qat-epochs`` the QAT epochs.

Target: 4-bit-weight QAT within 1 point of fp32 where 4-bit PTQ loses more than 3 points.

Run alone: ``python benchmarks/bench_cifar.py --out DIR [--quick]``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from _common import Context, Table, bar_chart, fmt, is_missing, missing, set_threads, write_json

logger = logging.getLogger("benchmarks.cifar")

CHECKPOINT = "resnet20_fp32.pt"
PTQ_METHODS = ("max", "mse")


def settings(ctx: Context) -> dict:
    quick = ctx.quick
    return {
        "epochs": ctx.option("cifar_epochs", 1 if quick else 15),
        "qat_epochs": ctx.option("cifar_qat_epochs", 1),
        "qat_steps": ctx.option("cifar_qat_steps", 3 if quick else None),
        "lr": 0.2,
        "batch_size": ctx.option("cifar_batch_size", 32 if quick else 256),
        "limit_per_class": ctx.option("cifar_limit_per_class", 20 if quick else None),
        "calib_batches": 1 if quick else 8,
        "calib_batch_size": 32 if quick else 128,
        "workers": 0 if quick else 1,
        "seed": 0,
    }


def _float_model(cifar, ctx: Context, cfg: dict, train_loader) -> tuple[torch.nn.Module, dict]:
    """The trained ResNet-20 and where it came from: ``--cifar-checkpoint``, the cache in ``--out``, or training."""
    model = cifar.resnet20()
    given = ctx.option("cifar_checkpoint")
    if given:
        state = torch.load(given, map_location="cpu", weights_only=True)
        info = {"source": str(given), "config": state.get("config") if isinstance(state, dict) else None}
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        model.load_state_dict(state)
        return model.eval(), info
    train_config = {k: cfg[k] for k in ("epochs", "lr", "batch_size", "limit_per_class", "seed")}
    cached = ctx.out / CHECKPOINT
    if cached.is_file():
        saved = torch.load(cached, map_location="cpu", weights_only=True)
        if saved.get("config") == train_config:
            model.load_state_dict(saved["state_dict"])
            return model.eval(), {"source": f"cached {cached}", "config": train_config,
                                  "train_seconds": saved.get("train_seconds")}
    torch.manual_seed(cfg["seed"])
    t0 = time.perf_counter()
    cifar.train(model, train_loader, cfg["epochs"], cfg["lr"], warmup_epochs=min(1.0, cfg["epochs"] / 10),
                desc="Train fp32")
    seconds = time.perf_counter() - t0
    torch.save({"state_dict": model.state_dict(), "config": train_config, "train_seconds": seconds}, cached)
    return model.eval(), {"source": f"trained in this run, saved to {cached}", "config": train_config,
                          "train_seconds": seconds}


def run(ctx: Context) -> dict:
    """Runs the section; returns ``{"data", "tables", "figures", "notes"}``."""
    set_threads()
    try:
        from examples.cifar10 import cifar
    except ImportError as err:
        data = missing(f"examples/cifar10/cifar.py does not import: {err}")
        return {"data": data, "tables": [Table("CIFAR-10", ["what", "value"], [["CIFAR-10", fmt(data)]])],
                "figures": [], "notes": []}
    from qdq.calibrate.evaluate import collect_logits

    from _common import logit_scores

    cfg = settings(ctx)
    torch.manual_seed(cfg["seed"])
    train_loader, test_loader = cifar.loaders(None, cfg["batch_size"], cfg["limit_per_class"], True, cfg["workers"])
    calib_loader, _ = cifar.loaders(None, cfg["calib_batch_size"], cfg["limit_per_class"], False, 0)
    model, source = _float_model(cifar, ctx, cfg, train_loader)
    ref, labels = collect_logits(model, test_loader, desc="CIFAR fp32")
    data: dict = {"settings": cfg, "fp32_source": source, "test_images": len(labels),
                  "fp32": logit_scores(ref, ref, labels), "ptq8": {}}
    for method in PTQ_METHODS:
        t0 = time.perf_counter()
        qmodel = cifar.ptq(model, calib_loader, method, cfg["calib_batches"])
        seconds = time.perf_counter() - t0
        logits, _ = collect_logits(qmodel, test_loader, desc=f"CIFAR PTQ int8 {method}")
        data["ptq8"][method] = {**logit_scores(ref, logits, labels), "calib_seconds": seconds}
    best = max(PTQ_METHODS, key=lambda m: (data["ptq8"][m]["top1"], data["ptq8"][m]["sqnr_db"]))
    data["best_method"] = best
    w4 = cifar.ptq(model, calib_loader, best, cfg["calib_batches"], weight_bits=4)
    logits, _ = collect_logits(w4, test_loader, desc="CIFAR PTQ w4")
    data["ptq_w4"] = logit_scores(ref, logits, labels)
    t0 = time.perf_counter()
    cifar.qat(w4, train_loader, cfg["qat_epochs"], None, original_lr=cfg["lr"], max_steps=cfg["qat_steps"])
    data["qat_seconds"] = time.perf_counter() - t0
    logits, _ = collect_logits(w4, test_loader, desc="CIFAR QAT w4")
    data["qat_w4"] = logit_scores(ref, logits, labels)
    fp32_top1 = data["fp32"]["top1"]
    data["targets"] = {
        "ptq_w4_drop_pt": fp32_top1 - data["ptq_w4"]["top1"],
        "qat_w4_drop_pt": fp32_top1 - data["qat_w4"]["top1"],
    }
    data["targets"]["met"] = data["targets"]["qat_w4_drop_pt"] <= 1.0 and data["targets"]["ptq_w4_drop_pt"] > 3.0
    return {"data": data, "tables": tables(data), "figures": figures(ctx, data), "notes": []}


def tables(data: dict) -> list[Table]:
    if is_missing(data):
        return [Table("CIFAR-10", ["what", "value"], [["CIFAR-10", fmt(data)]])]
    cfg = data["settings"]
    limit = f", {cfg['limit_per_class']} training images per class" if cfg["limit_per_class"] else ""
    t = Table(f"CIFAR-10 ResNet-20 ({data['test_images']} test images{limit}; fp32 trained {cfg['epochs']} epochs, "
              f"QAT {cfg['qat_epochs']} epoch{'s' if cfg['qat_epochs'] > 1 else ''}"
              f"{', ' + str(cfg['qat_steps']) + ' steps' if cfg['qat_steps'] else ''})",
              ["model", "top-1 %", "drop vs fp32 pt", "agreement %", "logit SQNR dB"])
    fp32 = data["fp32"]["top1"]

    def row(label: str, r: dict) -> list:
        return [label, fmt(r["top1"]), fmt(fp32 - r["top1"]), fmt(r["agreement"]), fmt(r["sqnr_db"])]

    t.rows.append(row("fp32", data["fp32"]))
    for method, r in data["ptq8"].items():
        t.rows.append(row(f"PTQ int8 ({method})", r))
    t.rows.append(row(f"PTQ 4-bit weights, 8-bit activations ({data['best_method']})", data["ptq_w4"]))
    t.rows.append(row("QAT 4-bit weights, 8-bit activations (from the PTQ model)", data["qat_w4"]))
    t.note = (f"fp32 weights: {data['fp32_source']['source']}. QAT took {data['qat_seconds']:.0f} s. "
              "Every layer, stem and classifier included, has 4-bit weights in the 4-bit rows.")
    return [t]


def figures(ctx: Context, data: dict) -> list[str]:
    labels = ["fp32"] + [f"PTQ int8 {m}" for m in data["ptq8"]] + ["PTQ w4a8", "QAT w4a8"]
    values = [data["fp32"]["top1"]] + [r["top1"] for r in data["ptq8"].values()] + [data["ptq_w4"]["top1"],
                                                                                    data["qat_w4"]["top1"]]
    path = bar_chart(ctx.out / "cifar_top1.png", labels, values, "CIFAR-10 ResNet-20 top-1", "top-1 %",
                     reference=data["fp32"]["top1"], reference_label="fp32")
    return [path.name] if path else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (checkpoint cache and cifar.json)")
    parser.add_argument("--quick", action="store_true", help="a small configuration, for smoke testing")
    parser.add_argument("--cifar-checkpoint", default=None, help="trained fp32 ResNet-20 weights to use")
    parser.add_argument("--cifar-epochs", type=int, default=None, help="fp32 training epochs (15; 1 with --quick)")
    parser.add_argument("--cifar-qat-epochs", type=int, default=None, help="QAT epochs (1)")
    parser.add_argument("--cifar-qat-steps", type=int, default=None, help="stop QAT after this many steps")
    parser.add_argument("--cifar-limit-per-class", type=int, default=None,
                        help="train and test on the first N images per class (all; 20 with --quick)")
    parser.add_argument("--cifar-batch-size", type=int, default=None, help="training batch size (256; 32 quick)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ctx = Context(Path(args.out), quick=args.quick, options=vars(args))
    ctx.out.mkdir(parents=True, exist_ok=True)
    write_json(ctx.out / "cifar.json", run(ctx)["data"])


if __name__ == "__main__":
    main()
