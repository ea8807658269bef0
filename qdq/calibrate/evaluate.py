"""Accuracy measures for comparing a quantized model with its float original.

Top-1 accuracy on a few hundred images moves by half a point from noise alone, so compare quantized models with
the float model too: how often they agree on the top-1 class, and the signal-to-quantization-noise ratio (SQNR) of
the logits.

Example:
    >>> import torch
    >>> ref = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    >>> test = ref + 0.01
    >>> round(sqnr_db(ref, test), 1), top1_agreement(ref, test), top1_accuracy(ref, torch.tensor([0, 1]))
    (44.0, 1.0, 0.5)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from qdq.transform.switches import preserved_modes

__all__ = ["sqnr_db", "top1_accuracy", "top1_agreement", "collect_logits"]


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """``10 log10(sum(ref^2) / sum((test - ref)^2))`` in dB (``inf`` when identical)."""
    reference, test = reference.double(), test.double()
    noise = float(((test - reference) ** 2).sum())
    signal = float((reference**2).sum())
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose largest logit is the label."""
    if len(logits) == 0:
        raise ValueError("no predictions to score")
    return float((logits.argmax(-1) == labels.to(logits.device)).float().mean())


def top1_agreement(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Fraction of rows where both models put the largest logit on the same class."""
    return float((reference.argmax(-1) == test.argmax(-1)).float().mean())


def collect_logits(
    model: nn.Module,
    data: Iterable,
    device: torch.device | str | None = None,
    preprocess: Callable[[Any], Any] | None = None,
    desc: str = "Evaluating",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs ``model`` (eval mode, no grad) over ``(inputs, labels)`` batches (or bare inputs); returns the
    concatenated logits and labels (``None`` without labels), on the CPU."""
    logits, labels = [], []
    with preserved_modes(model, quantizer_states=False), torch.no_grad():
        model.eval()
        for batch in tqdm(data, desc=desc, unit="batch", disable=not progress, leave=False):
            x, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) and len(batch) > 1 else (batch, None)
            if preprocess is not None:
                x = preprocess(x)
            if device is not None:
                x = x.to(device)
            logits.append(model(x).float().cpu())
            if y is not None:
                labels.append(torch.as_tensor(y).cpu())
    return torch.cat(logits), (torch.cat(labels) if labels else None)
