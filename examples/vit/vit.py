"""A small Vision Transformer on CIFAR-10 in INT8 with its attention MatMuls quantized, and a BERT-style encoder.

The pieces are importable (``from examples.vit import vit``) and :func:`run` chains them the way
``examples/vit/train.py`` does:

1. train a small torchvision ``VisionTransformer`` (32x32 images, 4x4 patches: 65 tokens; 4 layers, 4 heads of
   32, width 128) with AdamW, or load ``--checkpoint``; the weights are cached in ``--out`` and reused by the next
   run with the same training settings;
2. INT8 PTQ with each calibration method: every Linear (per-row weights) and, in each attention block, the input
   and output projections and both attention MatMuls (Q @ K^T and softmax @ V, placed for TensorRT's fused
   attention); LayerNorm, softmax and the residual adds in float. Reported: top-1, agreement with the float model,
   SQNR of the logits, calibration time;
3. formats beyond INT8 (:func:`format_model`): FP8 E4M3 everywhere and INT4 weight-only Linear weights, each
   with max calibration;
4. QAT: fine-tuning of the best PTQ model with fake quantization in the loop;
5. export of the QAT model to QDQ ONNX, parity with ONNX Runtime and the TensorRT rule check (attention rules
   included), and the fake-quant forward time against the float forward, measured side by side;
6. a BERT-style encoder (HuggingFace ``BertModel`` from a small config, random weights, random token ids):
   quantized with its attention MatMuls, calibrated, exported, verified and checked.

Example:
    >>> import torch
    >>> model = small_vit().eval()
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> sum(p.numel() for p in model.parameters())
    546186
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import qdq
from examples.cifar10.cifar import data_root, loaders
from examples.common import (add_run_arguments, export_and_check, export_summary, finish, positive,
                             print_table, resolve_defaults, run_main, trained_float_model)
from qdq import nn as quant_nn
from qdq.calibrate.evaluate import collect_logits, sqnr_db, top1_accuracy, top1_agreement
from qdq.transform.qat import qat_learning_rate

__all__ = ["METHODS", "FORMATS", "small_vit", "train", "quantize", "ptq", "format_model", "attention_summary",
           "forward_ratio", "bert_encoder", "quantize_bert", "build_parser", "run", "main"]

logger = logging.getLogger(__name__)

#: The calibration methods compared by default.
METHODS = ("max", "entropy", "mse", "percentile")
#: The formats beyond INT8 compared by default (see :func:`format_model`), each calibrated with max.
FORMATS = ("fp8", "int4")
CHECKPOINT_NAME = "vit_fp32.pt"


def small_vit(num_classes: int = 10) -> nn.Module:
    """torchvision's VisionTransformer for 32x32 images: 4x4 patches (64 + 1 tokens), 4 layers, 4 heads of 32."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=128, mlp_dim=256,
                             num_classes=num_classes)


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float, weight_decay: float = 0.05,
          max_steps: int | None = None, desc: str = "Train") -> list[float]:
    """AdamW with a linear warm-up (the first tenth) and a cosine decay to zero, label smoothing 0.1; returns the
    mean loss of each epoch. Works the same on a quantized model (straight-through gradients)."""
    total = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    warmup = max(1, total // 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - warmup))))))
    losses, step = [], 0
    model.train()
    for epoch in range(epochs):
        seen, loss_sum = 0, 0.0
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", unit="batch", leave=False)
        for images, labels in bar:
            if step >= total:
                break
            loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            seen += len(labels)
            loss_sum += loss.item() * len(labels)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        bar.close()
        if seen:
            losses.append(loss_sum / seen)
            logger.info("%s epoch %d/%d: loss %.4f", desc, epoch + 1, epochs, losses[-1])
        if step >= total:
            break
    model.eval()
    return losses


def quantize(model: nn.Module, example_input: torch.Tensor) -> tuple[nn.Module, "qdq.transform.replace.ReplacementReport"]:
    """A quantized (uncalibrated) deep copy: the README flow (replace, then the scale-sharing rules step)."""
    qmodel = copy.deepcopy(model).eval()
    report = qdq.replace_to_quantization_module(qmodel)
    qdq.apply_custom_rules_to_quantizer(qmodel, example_input)
    return qmodel, report


def ptq(template: nn.Module, calib_loader: DataLoader, method: str, num_batches: int) -> nn.Module:
    """A calibrated copy of the quantized ``template`` (``strict=True``: every quantizer must see data)."""
    qmodel = copy.deepcopy(template)
    qdq.calibrate_model(qmodel, calib_loader, num_batches=num_batches, method=method, strict=True)
    return qmodel


def _swap_quantizers(model: nn.Module, make) -> None:
    """Replaces every quantizer ``q`` of ``model`` for which ``make(q)`` returns one (a quantizer shared by several
    modules stays shared); the new quantizers keep the old names."""
    new_of: dict[int, nn.Module] = {}
    for module in list(model.modules()):
        for attr, child in list(module._modules.items()):  # not named_children(): it skips a second name of one child
            if not isinstance(child, quant_nn.TensorQuantizer):
                continue
            if id(child) not in new_of:
                new = make(child)
                if new is not None:
                    new.name = child.name
                new_of[id(child)] = new
            if new_of[id(child)] is not None:
                setattr(module, attr, new_of[id(child)])


def format_model(template: nn.Module, fmt: str, block_size: int = 64) -> nn.Module:
    """An uncalibrated copy of the quantized ``template`` (the INT8 flow of :func:`quantize`) in format ``fmt``:

    * ``"fp8"``: FP8 E4M3 everywhere through ``qdq.set_model_format(model, "fp8")`` (per-channel weights; the layers
      TensorRT has no FP8 kernel for - here the 3-channel patch embedding and the 10-class head - stay float), and
      the quantizers that are not a layer's (both attention MatMuls, the residual-add inputs) in FP8 too: nothing is
      left in INT8;
    * ``"int4"``: INT4 weight-only: every Linear weight (``qdq.set_model_format(model, "int4")``, and the packed
      q/k/v input projection of each attention block, which ``nn.MultiheadAttention`` holds as a weight) 4-bit
      symmetric in blocks of ``block_size`` input features; every activation, the attention MatMuls and the patch
      embedding in float.
    """
    model = copy.deepcopy(template)
    if fmt == "fp8":
        qdq.set_model_format(model, "fp8")
        _swap_quantizers(model, lambda q: quant_nn.TensorQuantizer(q.quant_desc.replace(
            num_bits=(4, 3), unsigned=False, narrow_range=False, learn_amax=False, amax=None))
            if q.is_enabled and q.num_bits == 8 else None)
    elif fmt == "int4":
        qdq.set_model_format(model, "int4", block_size=block_size)
        for mha in model.modules():
            if isinstance(mha, quant_nn.QuantMultiheadAttention):
                name = mha.weight_quantizer.name
                mha._weight_quantizer = quant_nn.TensorQuantizer(qdq.QuantDescriptor(4, axis=0, block_size=block_size))
                mha.weight_quantizer.name = name
        for q in model.modules():
            if isinstance(q, quant_nn.TensorQuantizer) and not (q.num_bits == 4 and q.block_size):
                q.disable()
    else:
        raise ValueError(f"format_model: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return model


def attention_summary(qmodel: nn.Module) -> tuple[int, int]:
    """``(attention blocks with both MatMuls in INT8, attention blocks)``."""
    blocks = [m for m in qmodel.modules() if isinstance(m, quant_nn.QuantScaledDotProductAttention)]
    return sum(not b.float_reason and all(q.is_enabled for q in b.quantizers()) for b in blocks), len(blocks)


def forward_ratio(model: nn.Module, qmodel: nn.Module, images: torch.Tensor, repeats: int = 10,
                  threads: int | None = 1, compiled: bool = False) -> dict:
    """The fake-quant forward time over the float forward, measured side by side (interleaved round by round, best
    of ``repeats``) so that the machine's load hits both; on ``threads`` intra-op threads (one by default: on a
    shared machine a multi-threaded op waits for its slowest thread, which a model of many small ops pays most).

    Two float baselines: ``fp32`` as torch runs ``nn.MultiheadAttention`` in eval under ``no_grad`` (its fused
    ``_native_multi_head_attention`` fast path: the strict baseline) and ``fp32_composite``, the same module with the
    fast path off (``torch.backends.mha.set_fastpath_enabled(False)``: the composite ops, as in training).

    With ``compiled``, both models also run under ``torch.compile`` (inductor, which fuses each fake quantization
    with its neighbours into one loop): ``int8_compiled_ms``, ``fp32_compiled_ms``, ``ratio_compiled`` (compiled
    over compiled) and ``compiled_max_diff``, the largest difference between the compiled and the eager fake-quant
    outputs.
    """
    def composite():
        previous = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            model(images)
        finally:
            torch.backends.mha.set_fastpath_enabled(previous)

    runs = {"fp32": lambda: model(images), "fp32_composite": composite, "int8": lambda: qmodel(images)}
    saved_threads = torch.get_num_threads()
    extra: dict = {}
    try:
        if threads:
            torch.set_num_threads(threads)
        with torch.no_grad():
            if compiled:
                fp32_c, int8_c = torch.compile(model), torch.compile(qmodel)
                extra["compiled_max_diff"] = float((int8_c(images) - qmodel(images)).abs().max())
                runs.update({"fp32_compiled": lambda: fp32_c(images), "int8_compiled": lambda: int8_c(images)})
            times: dict[str, list[float]] = {k: [] for k in runs}
            for run in runs.values():
                run()  # warm-up
            for _ in range(repeats):
                for key, run in runs.items():
                    t0 = time.perf_counter()
                    run()
                    times[key].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved_threads)
    best = {k: min(v) for k, v in times.items()}
    if compiled:
        extra.update({"fp32_compiled_ms": 1e3 * best["fp32_compiled"], "int8_compiled_ms": 1e3 * best["int8_compiled"],
                      "ratio_compiled": best["int8_compiled"] / best["fp32_compiled"]})
    return {"fp32_ms": 1e3 * best["fp32"], "fp32_composite_ms": 1e3 * best["fp32_composite"],
            "int8_ms": 1e3 * best["int8"], "ratio": best["int8"] / best["fp32"],
            "ratio_to_composite": best["int8"] / best["fp32_composite"], "threads": threads or saved_threads,
            "repeats": repeats, "images": len(images), **extra}


class _LastHiddenState(nn.Module):
    """A BertModel returning ``last_hidden_state`` only (the exporters take tensors, not model-output objects)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).last_hidden_state


def bert_encoder(layers: int = 2, hidden: int = 128, heads: int = 4, vocab: int = 1000) -> nn.Module:
    """A small HuggingFace ``BertModel`` (random weights, built from a config: no download) returning
    ``last_hidden_state``."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=512)
    return _LastHiddenState(BertModel(config)).eval()


def quantize_bert(out: Path, seq_len: int, batches: int, method: str) -> dict:
    """The BERT-style encoder through the flow: replace, calibrate (strict), export, verify, check."""
    torch.manual_seed(0)
    model = bert_encoder()
    vocab = model.bert.config.vocab_size
    calib = [torch.randint(0, vocab, (8, seq_len)) for _ in range(batches)]
    test = torch.randint(0, vocab, (8, seq_len))
    qmodel, report = quantize(model, test[:1])
    qdq.calibrate_model(qmodel, calib, method=method, strict=True, progress=False)
    with torch.no_grad():
        sqnr = sqnr_db(model(test), qmodel(test))
    quantized, blocks = attention_summary(qmodel)
    print(f"\nBERT-style encoder ({len(model.bert.encoder.layer)} layers, hidden {model.bert.config.hidden_size}, "
          f"sequence length {seq_len}): {len(report.replaced)} layers quantized, attention MatMuls in INT8 in "
          f"{quantized} of {blocks} blocks; SQNR of last_hidden_state {sqnr:.1f} dB ({method})")
    export = export_and_check(qmodel, test, out / "bert_int8_qdq.onnx", tolerance_steps=8.0)
    return {"layers_quantized": len(report.replaced), "attention_int8": quantized, "attention_blocks": blocks,
            "sqnr_db": sqnr, "export": export}


def _compare(model, loader, ref_logits, labels, desc) -> dict[str, float]:
    logits, _ = collect_logits(model, loader, desc=desc)
    return {"top1": 100.0 * top1_accuracy(logits, labels), "agreement": 100.0 * top1_agreement(ref_logits, logits),
            "sqnr_db": sqnr_db(ref_logits, logits)}


def _float_model(args: argparse.Namespace, root: Path, train_loader: DataLoader) -> nn.Module:
    """The trained float ViT: ``--checkpoint``, the cached checkpoint in ``--out`` or a new training run."""
    config = {"model": "small_vit", "data": str(root), "epochs": args.epochs, "batch_size": args.batch_size,
              "lr": args.lr, "limit_per_class": args.limit_per_class, "seed": args.seed}
    return trained_float_model(
        small_vit(), args, Path(args.out) / CHECKPOINT_NAME, config,
        lambda m: train(m, train_loader, args.epochs, args.lr, desc="Train fp32"),
        len(train_loader.dataset), "this ViT's weights")


def run(args: argparse.Namespace) -> dict:
    """The whole example (see the module docstring); returns the results also written to ``--out``/results.json."""
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    root = data_root(args.data, args.limit_per_class)
    train_loader, test_loader = loaders(args.data, args.batch_size, args.limit_per_class, True, 0, 250)
    calib_loader, _ = loaders(args.data, args.calib_batch_size, args.limit_per_class, False, 0)
    print(f"data: {root} ({len(train_loader.dataset)} training, {len(test_loader.dataset)} test images)")

    model = _float_model(args, root, train_loader)
    ref_logits, labels = collect_logits(model, test_loader, desc="Evaluate fp32")
    fp32_top1 = 100.0 * top1_accuracy(ref_logits, labels)
    print(f"float ViT: top-1 {fp32_top1:.2f}% on {len(labels)} test images")
    results: dict[str, Any] = {"config": vars(args) | {"data": str(root)}, "fp32_top1": fp32_top1, "ptq8": {}}

    example = test_loader.dataset[0][0].unsqueeze(0)
    template, report = quantize(model, example)
    quantized, blocks = attention_summary(template)
    print(f"quantized {len(report.replaced)} layers, attention MatMuls in {blocks} blocks; layers left in float: "
          f"{len(report.unsupported)}")
    rows = [{"method": "fp32", "top1": fp32_top1, "agreement": None, "sqnr_db": None, "calib_s": None}]
    models = {}
    for method in args.methods:
        t0 = time.perf_counter()
        models[method] = ptq(template, calib_loader, method, args.calib_batches)
        calib_s = time.perf_counter() - t0
        row = {"method": method, **_compare(models[method], test_loader, ref_logits, labels, f"Evaluate {method}"),
               "calib_s": calib_s}
        rows.append(row)
        results["ptq8"][method] = {k: v for k, v in row.items() if k != "method"}
    print_table(f"PTQ int8 of the ViT (per-row weights, per-tensor activations, attention MatMuls in INT8), "
                f"{len(labels)} test images, {args.calib_batches} x {args.calib_batch_size} calibration images", rows,
                [("method", "method", ""), ("top1", "top-1 %", ".2f"), ("agreement", "agree %", ".2f"),
                 ("sqnr_db", "SQNR dB", ".1f"), ("calib_s", "calib s", ".1f")])
    if args.formats:
        results["formats"] = {}
        frows = [{"format": "fp32", "top1": fp32_top1, "agreement": None, "sqnr_db": None, "calib_s": None}]
        for fmt in args.formats:
            qmodel = format_model(template, fmt, args.block_size)
            t0 = time.perf_counter()
            qdq.calibrate_model(qmodel, calib_loader, num_batches=args.calib_batches, method="max", strict=True,
                                progress=False)
            calib_s = time.perf_counter() - t0
            counts = {}
            for q in qmodel.modules():
                if isinstance(q, quant_nn.TensorQuantizer):
                    kind = "float" if not q.is_enabled else "fp8" if q.num_bits == (4, 3) else f"int{q.num_bits}"
                    counts[kind] = counts.get(kind, 0) + 1
            row = {"format": fmt, **_compare(qmodel, test_loader, ref_logits, labels, f"Evaluate {fmt}"),
                   "calib_s": calib_s}
            frows.append(row)
            results["formats"][fmt] = {k: v for k, v in row.items() if k != "format"} | {"quantizers": counts}
            print(f"{fmt}: quantizers by format {counts}")
            del qmodel
        print_table(f"Formats beyond INT8, max calibration (fp8: FP8 E4M3 everywhere, patch embedding and head in "
                    f"float; int4: INT4 weight-only, blocks of {args.block_size}, every Linear weight, activations "
                    f"float), {len(labels)} test images", frows,
                    [("format", "format", ""), ("top1", "top-1 %", ".2f"), ("agreement", "agree %", ".2f"),
                     ("sqnr_db", "SQNR dB", ".1f"), ("calib_s", "calib s", ".1f")])

    best = max(args.methods, key=lambda m: (results["ptq8"][m]["top1"], results["ptq8"][m]["sqnr_db"]))
    results["best_method"] = best
    quantized, blocks = attention_summary(models[best])
    print(f"attention MatMuls in INT8: {quantized} of {blocks} blocks")

    qmodel = copy.deepcopy(models[best])
    t0 = time.perf_counter()
    lr = args.qat_lr if args.qat_lr is not None else qat_learning_rate(args.lr)
    train(qmodel, train_loader, args.qat_epochs, lr, weight_decay=0.0, max_steps=args.qat_steps, desc="QAT")
    qat_row = {"model": f"QAT int8 (from PTQ {best})",
               **_compare(qmodel, test_loader, ref_logits, labels, "Evaluate QAT"), "seconds": time.perf_counter() - t0}
    print_table("QAT", [{"model": "fp32", "top1": fp32_top1}, {"model": f"PTQ int8 ({best})", **results["ptq8"][best]},
                        qat_row],
                [("model", "model", ""), ("top1", "top-1 %", ".2f"), ("agreement", "agree %", ".2f"),
                 ("sqnr_db", "SQNR dB", ".1f")])
    results["qat"] = qat_row

    images = next(iter(test_loader))[0][: args.verify_images]
    timing = forward_ratio(model, qmodel, images, compiled=args.compiled_timing)
    print(f"\nfake-quant forward {timing['int8_ms']:.1f} ms / fp32 forward {timing['fp32_ms']:.1f} ms (torch's fused "
          f"attention) on {len(images)} images = {timing['ratio']:.2f}x; / fp32 composite attention "
          f"{timing['fp32_composite_ms']:.1f} ms = {timing['ratio_to_composite']:.2f}x (side by side, best of "
          f"{timing['repeats']}, {timing['threads']} thread{'s' if timing['threads'] > 1 else ''})")
    if args.compiled_timing:
        print(f"under torch.compile: fake-quant {timing['int8_compiled_ms']:.1f} ms / fp32 "
              f"{timing['fp32_compiled_ms']:.1f} ms = {timing['ratio_compiled']:.2f}x (largest difference from "
              f"the eager fake-quant output {timing['compiled_max_diff']:.2g})")
    results["forward"] = timing

    print("\nexport of the QAT model")
    results["export"] = export_and_check(qmodel, images, out / "vit_int8_qdq.onnx", tolerance_steps=8.0)
    results["bert"] = quantize_bert(out, args.bert_seq_len, args.calib_batches, best)
    results["seconds"] = time.perf_counter() - t_start
    return finish(out, results, [
        ("fp32 top-1", f"{fp32_top1:.2f}%"),
        (f"best int8 PTQ ({best})", f"{results['ptq8'][best]['top1']:.2f}%"),
        ("int8 QAT", f"{qat_row['top1']:.2f}%"),
        *[(f"{fmt} PTQ (max)", f"{row['top1']:.2f}%") for fmt, row in results.get("formats", {}).items()],
        ("attention MatMuls in INT8", f"{quantized} of {blocks} blocks"),
        ("fake-quant / fp32 forward", f"{timing['ratio']:.2f}x"),
        *export_summary(results["export"]),
        ("BERT encoder", f"SQNR {results['bert']['sqnr_db']:.1f} dB, parity "
                         f"{'OK' if results['bert']['export']['verify_ok'] else 'MISMATCH'}, "
                         f"{results['bert']['export']['trt_errors']} errors"),
    ])


#: What ``--tiny`` sets: a smoke run that finishes in about a minute on 2 CPU cores.
TINY = {"limit_per_class": 20, "epochs": 1, "qat_epochs": 1, "qat_steps": 3, "batch_size": 32, "calib_batches": 1,
        "calib_batch_size": 32, "verify_images": 8, "methods": ["max", "mse"], "bert_seq_len": 32}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``examples/vit/train.py``."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.vit.train",
        description="Train a small ViT on CIFAR-10, quantize it to INT8 with its attention MatMuls (PTQ with each "
                    "calibration method, then QAT), export it to QDQ ONNX, verify it with ONNX Runtime and check "
                    "it against TensorRT's rules; then the same for a small BERT-style encoder.")
    parser.add_argument("--data", type=Path, default=None,
                        help="ImageFolder root with train/<class>/ and test/<class>/ (default: the CIFAR-10 images "
                             "of ../shared/data, extracted once to a cache folder)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="float ViT weights to start from")
    parser.add_argument("--retrain", action="store_true", help="train again even if --out holds a checkpoint")
    parser.add_argument("--epochs", type=positive(int), default=None, help="float training epochs (default 30)")
    parser.add_argument("--lr", type=positive(float), default=1e-3, help="AdamW peak learning rate (1e-3)")
    parser.add_argument("--batch-size", type=positive(int), default=None, help="training batch size (default 128)")
    parser.add_argument("--limit-per-class", type=positive(int), default=None,
                        help="use only the first N images of each class in each split (quick runs)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="calibration methods to compare (default: all; max and mse with --tiny)")
    parser.add_argument("--formats", nargs="*", choices=FORMATS, default=None,
                        help="formats beyond INT8 to compare, each with max calibration (default: fp8 int4; none: "
                             "--formats with no value)")
    parser.add_argument("--block-size", type=int, choices=(32, 64, 128), default=64,
                        help="INT4 weight-only block size along the input features (64)")
    parser.add_argument("--calib-batches", type=positive(int), default=None, help="calibration batches (default 8)")
    parser.add_argument("--calib-batch-size", type=positive(int), default=None,
                        help="calibration batch size (default 64)")
    parser.add_argument("--qat-epochs", type=positive(int), default=None, help="QAT epochs (default 1)")
    parser.add_argument("--qat-steps", type=positive(int), default=None, help="stop QAT after this many steps")
    parser.add_argument("--qat-lr", type=positive(float), default=None, help="QAT learning rate (1%% of --lr)")
    parser.add_argument("--verify-images", type=positive(int), default=None,
                        help="test images ONNX Runtime runs for the parity check (default 32)")
    parser.add_argument("--bert-seq-len", type=positive(int), default=None,
                        help="sequence length of the BERT-style encoder (default 128)")
    parser.add_argument("--compiled-timing", action="store_true",
                        help="also time both forwards under torch.compile (inductor; about a minute of compiling)")
    add_run_arguments(parser, "vit", "checkpoint, ONNX files, results.json",
                      "20 images per class, 1 epoch, 3 QAT steps, one calibration batch, two methods")
    return parser


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    defaults = {"epochs": 30, "qat_epochs": 1, "qat_steps": None, "batch_size": 128, "calib_batches": 8,
                "calib_batch_size": 64, "verify_images": 32, "limit_per_class": None, "methods": list(METHODS),
                "formats": list(FORMATS),
                "bert_seq_len": 128}
    return resolve_defaults(args, "vit", defaults, TINY, files=["checkpoint"], folders=["data"])


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for a usage or data error, with a one-line message)."""
    return run_main(build_parser(), run, _resolve, argv)
