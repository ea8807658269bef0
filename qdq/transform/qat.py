"""Quantization-aware training helpers: distillation from the float model, and the usual recipe.

After PTQ, fine-tuning with fake quantization in the loop (QAT) wins back most of what quantization lost. The
gradients are straight-through (see :func:`qdq.math.fake_quant.fake_quantize_by_amax`), so the user's own training loop
works unchanged. What helps:

* start from a calibrated model (PTQ first), never from random amax;
* a small learning rate: about 1% of the original training's initial rate, decayed (cosine) to zero;
* a short schedule: a few epochs, or about 10% of the original one, are usually enough;
* keep BatchNorm statistics frozen near the end (:func:`freeze_bn_stats`), since TensorRT folds BN with the final
  running statistics;
* without labels, or when the task loss is noisy, distil: the student (quantized model) matches the outputs of chosen
  blocks of the teacher (the same model in float), as NVIDIA's YOLO QAT recipe does. :class:`Distiller` does this.

Example:
    >>> import torch
    >>> import qdq
    >>> torch.manual_seed(0) is not None
    True
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> _ = qdq.replace_to_quantization_module(model)
    >>> _ = qdq.calibrate_model(model, [torch.randn(64, 8)], progress=False)
    >>> distiller = Distiller(model, layers=["1", "2"])     # match the ReLU output and the logits
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    >>> for _ in range(3):
    ...     out, loss = distiller(torch.randn(32, 8))
    ...     optimizer.zero_grad()
    ...     loss.backward()
    ...     optimizer.step()
    >>> distiller.remove()
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qdq.transform.switches import quantizers

__all__ = ["Distiller", "make_teacher", "freeze_bn_stats", "qat_learning_rate"]

logger = logging.getLogger(__name__)


def make_teacher(model: nn.Module) -> nn.Module:
    """A float copy of ``model``: every quantizer disabled, eval mode, no gradients."""
    teacher = copy.deepcopy(model)
    for _, q in quantizers(teacher):
        q.disable()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def freeze_bn_stats(model: nn.Module) -> int:
    """Puts every BatchNorm of ``model`` in eval mode (running statistics frozen, affine parameters still trained).

    Call it after ``model.train()``; returns the number of BatchNorm layers frozen.
    """
    count = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            count += 1
    return count


def qat_learning_rate(original_lr: float, fraction: float = 0.01) -> float:
    """The usual starting learning rate for QAT fine-tuning: ``fraction`` (1%) of the original initial rate."""
    if not original_lr > 0 or original_lr == float("inf") or not 0 < fraction <= 1:  # NaN fails both tests
        raise ValueError(f"need original_lr > 0 and 0 < fraction <= 1, got {original_lr}, {fraction}")
    return original_lr * fraction


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        tensors = [_first_tensor(o) for o in out]
        tensors = [t for t in tensors if t is not None]
        return torch.cat([t.flatten(1) if t.dim() > 1 else t.flatten() for t in tensors], -1) if tensors else None
    return None


class Distiller:
    """Runs teacher and student side by side and returns the student's output and the distillation loss.

    Args:
        student: the quantized model being trained.
        teacher: the float model (default: :func:`make_teacher` of the student, taken now, i.e. after calibration).
        layers: dotted names of modules whose outputs are matched (present in both models); empty means the model
            outputs.
        loss_fn: ``(student_tensor, teacher_tensor) -> loss`` (MSE by default).
        weights: one weight per layer (default 1 each).

    ``distiller(*inputs, **kwargs)`` runs the teacher under ``no_grad`` and the student normally and returns
    ``(student_output, loss)``; add a task loss on the output if you have labels. Call :meth:`remove` when done.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        layers: Sequence[str] = (),
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
        weights: Sequence[float] | None = None,
    ):
        if not isinstance(student, nn.Module) or not (teacher is None or isinstance(teacher, nn.Module)):
            raise TypeError(f"Distiller takes nn.Module student and teacher, got {type(student).__name__} and "
                            f"{type(teacher).__name__}")
        if isinstance(layers, str):
            raise TypeError(f"layers must be a list of module paths, got the string {layers!r} (write [{layers!r}])")
        self.student = student
        self.teacher = teacher if teacher is not None else make_teacher(student)
        self.layers = list(layers)
        self.loss_fn = loss_fn
        self.weights = list(weights) if weights is not None else [1.0] * len(self.layers)
        if len(self.weights) != len(self.layers):
            raise ValueError(f"{len(self.weights)} weights for {len(self.layers)} layers")
        self._captured: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self._handles = []
        for role, model in (("student", self.student), ("teacher", self.teacher)):
            named = dict(model.named_modules())
            for layer in self.layers:
                if layer not in named:
                    raise ValueError(f"the {role} model has no module {layer!r}")
                self._handles.append(named[layer].register_forward_hook(self._hook(role, layer)))

    def _hook(self, role: str, layer: str):
        def capture(module, inputs, output):
            tensor = _first_tensor(output)
            if tensor is None:
                raise TypeError(f"{role} module {layer!r} returned no tensor to distil")
            self._captured[role][layer] = tensor

        return capture

    def __call__(self, *inputs: Any, **kwargs: Any) -> tuple[Any, torch.Tensor]:
        self._captured = {"student": {}, "teacher": {}}
        with torch.no_grad():
            teacher_out = self.teacher(*inputs, **kwargs)
        student_out = self.student(*inputs, **kwargs)
        if not self.layers:
            return student_out, self.loss_fn(_first_tensor(student_out), _first_tensor(teacher_out).detach())
        loss = None
        for layer, weight in zip(self.layers, self.weights):
            s, t = self._captured["student"].get(layer), self._captured["teacher"].get(layer)
            if s is None or t is None:
                raise RuntimeError(f"module {layer!r} did not run in the forward pass")
            term = weight * self.loss_fn(s, t.detach())
            loss = term if loss is None else loss + term
        return student_out, loss

    def remove(self) -> None:
        """Removes the hooks (the teacher is dropped by the caller)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
