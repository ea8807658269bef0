"""YOLOv5 recipes: the residual adds and the concatenations of a YOLOv5 model, quantized the way TensorRT fuses them.

:func:`~qdq.transform.replace.replace_to_quantization_module` quantizes the convolutions; the adds and concatenations a
YOLOv5 block writes as ``x + y`` and ``torch.cat`` need the block's forward rewritten. These recipes are
:class:`~qdq.transform.patching.ForwardPatch` objects (per instance, reversible, applying twice patches once):

=====================  ===========================  ==========================================================
recipe (patch name)    block                        op added and forward
=====================  ===========================  ==========================================================
yolov5.bottleneck_add  ``Bottleneck`` with ``add``  ``addop = QuantAdd(shared=True)``; ``addop(x, cv2(cv1(x)))``
yolov5.c3_concat       ``C3``                       ``catop = QuantConcat(dim=1)``; ``cv3(catop(m(cv1(x)), cv2(x)))``
yolov5.sppf_concat     ``SPPF``                     ``catop = QuantConcat(dim=1, num_inputs=4)`` on x, y1, y2, y3
yolov5.concat          ``Concat`` (neck)            ``catop = QuantConcat(dim=d)`` on the list of inputs
=====================  ===========================  ==========================================================

Why these quantizers:

- **Bottleneck add, both inputs with one scale.** For YOLOv5, NVIDIA's QAT guide quantizes both inputs of the
  bottleneck's add, with equal scales (its rules even give them the quantizer of the bottleneck's ``cv1`` input,
  since ``x`` feeds both). TensorRT then runs the add in INT8 and fuses it with its neighbours instead of inserting
  reformat layers. ``QuantAdd(shared=True)`` gives equal scales by construction: one quantizer, calibrated on both
  inputs, reachable as ``addop._input0_quantizer`` and ``addop._input1_quantizer``. Bottlenecks without ``add``
  (the neck's, built with ``shortcut=False``) have no add and are left alone.
- **C3, SPPF and neck concatenations, one shared quantizer.** TensorRT concatenates INT8 tensors without
  requantizing only when all inputs have one scale, so each concat gets a :class:`~qdq.nn.QuantConcat` with a single
  ``_input_quantizer``. The neck's concatenations (after ``nn.Upsample``) are :class:`Concat` modules in the model,
  as in YOLOv5's own code, so they are patched like any block; a model that writes them inline with ``torch.cat``
  needs a recipe of its own for the enclosing module.
- **SPPF's max-pool chain stays as it is.** Max pooling commutes with a per-tensor quantizer
  (``maxpool(Q(x)) == Q(maxpool(x))``), so TensorRT runs the chain in INT8 when the tensors before and after each
  pool share a scale. With the shared concat quantizer x, y1, y2 and y3 are all quantized with one scale, which is
  exactly that condition. The ONNX-driven scale-matching rules are the general form of the same condition (as
  NVIDIA's recipe writes them: the quantizer after a MaxPool takes the scale of the quantizers reading the pool's
  input, and the quantizers on both sides of a Concat share one), for models quantized without these recipes; after
  them, such rules can still tie ``catop``'s quantizer to the input quantizer of the conv that follows the concat.

Which modules match. A module matches a recipe when it is an instance of the recipe's class (subclasses included,
so ``C3x``-like subclasses that keep ``C3.forward`` are patched) and has the attributes the forward uses. The
classes come from ``classes``: a Python module holding them (``examples.yolov5.model``, YOLOv5's
``models.common``) or a ``{"Bottleneck": cls, ...}`` mapping; by default from the module that defines the model's
own class. With ``by_name=True`` the match is on the class *name* instead (the class or a base class is called
``Bottleneck``, ``C3``, ``SPPF`` or ``Concat``), for model code that defines its own classes with these names. A
matching class that overrides ``forward`` is skipped with a warning (the recipe's forward would replace its own).

Order: before or after :func:`~qdq.transform.replace.replace_to_quantization_module`, either works (the added ops are
not in the module map), but before calibration.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Bottleneck(nn.Module):          # a user's own block, matched by name
    ...     def __init__(self, c, add=True):
    ...         super().__init__()
    ...         self.cv1, self.cv2, self.add = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 3, padding=1), add
    ...     def forward(self, x):
    ...         return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))
    >>> model = nn.Sequential(Bottleneck(4), Bottleneck(4, add=False))
    >>> done = apply_yolov5_rules(model, by_name=True)
    >>> done["yolov5.bottleneck_add"]            # the block without add is left alone
    ['0']
    >>> model[0].addop._input0_quantizer is model[0].addop._input1_quantizer
    True
    >>> model(torch.randn(1, 4, 8, 8)).shape
    torch.Size([1, 4, 8, 8])
    >>> remove_yolov5_rules(model)["yolov5.bottleneck_add"], hasattr(model[0], "addop")
    (['0'], False)
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Callable, Mapping

import torch
from torch import nn

from qdq.nn import QuantAdd, QuantConcat
from qdq.transform.patching import ForwardPatch, apply_patch, patched_modules, remove_patch
from qdq.math.descriptor import QuantDescriptor

__all__ = [
    "BLOCK_NAMES",
    "PATCH_NAMES",
    "bottleneck_forward",
    "c3_forward",
    "sppf_forward",
    "concat_forward",
    "yolov5_patches",
    "apply_yolov5_rules",
    "remove_yolov5_rules",
]

logger = logging.getLogger(__name__)

#: The YOLOv5 block classes the recipes know, by name.
BLOCK_NAMES: tuple[str, ...] = ("Bottleneck", "C3", "SPPF", "Concat")

#: Patch name of each block's recipe.
PATCH_NAMES: dict[str, str] = {
    "Bottleneck": "yolov5.bottleneck_add",
    "C3": "yolov5.c3_concat",
    "SPPF": "yolov5.sppf_concat",
    "Concat": "yolov5.concat",
}

# the attributes each recipe's forward uses
_REQUIRED: dict[str, tuple[str, ...]] = {
    "Bottleneck": ("cv1", "cv2", "add"),
    "C3": ("cv1", "cv2", "cv3", "m"),
    "SPPF": ("cv1", "cv2", "m"),
    "Concat": ("d",),
}

Classes = types.ModuleType | Mapping[str, type]


# ----------------------------------------------------------------------------------------------------------------
# the patched forwards
# ----------------------------------------------------------------------------------------------------------------
def bottleneck_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Bottleneck.forward`` with the residual add through ``self.addop`` (a block without ``add`` is unchanged)."""
    y = self.cv2(self.cv1(x))
    return self.addop(x, y) if self.add else y


def c3_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``C3.forward`` with the concatenation through ``self.catop``."""
    return self.cv3(self.catop((self.m(self.cv1(x)), self.cv2(x))))


def sppf_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``SPPF.forward`` with the four-way concatenation through ``self.catop``; the max-pool chain is unchanged."""
    x = self.cv1(x)
    y1 = self.m(x)
    y2 = self.m(y1)
    return self.cv2(self.catop((x, y1, y2, self.m(y2))))


def concat_forward(self: nn.Module, x: list[torch.Tensor]) -> torch.Tensor:
    """``Concat.forward`` through ``self.catop``."""
    return self.catop(x)


_FORWARDS: dict[str, Callable] = {
    "Bottleneck": bottleneck_forward,
    "C3": c3_forward,
    "SPPF": sppf_forward,
    "Concat": concat_forward,
}


# ----------------------------------------------------------------------------------------------------------------
# matching
# ----------------------------------------------------------------------------------------------------------------
def _resolve_classes(classes: Classes) -> dict[str, type]:
    """``{block name: class}`` from a Python module or a mapping; only the block names found."""
    if isinstance(classes, types.ModuleType):
        found = {name: getattr(classes, name) for name in BLOCK_NAMES if isinstance(getattr(classes, name, None), type)}
        where = f"module {classes.__name__}"
    elif isinstance(classes, Mapping):
        unknown = sorted(set(classes) - set(BLOCK_NAMES))
        if unknown:
            raise ValueError(f"classes: unknown block names {unknown}; the YOLOv5 recipes know {list(BLOCK_NAMES)}")
        found = dict(classes)
        where = "the classes mapping"
    else:
        raise TypeError(f"classes must be a Python module or a {{name: class}} mapping, got {type(classes).__name__}")
    for name, cls in found.items():
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"classes[{name!r}] is {cls!r}, not an nn.Module subclass")
    if not found:
        raise ValueError(f"{where} defines none of {list(BLOCK_NAMES)}; pass classes= or by_name=True")
    missing = [name for name in BLOCK_NAMES if name not in found]
    if missing:
        logger.info("%s has no %s: those recipes are not used", where, ", ".join(missing))
    return found


def _block_matcher(role: str, cls: type | None) -> Callable[[str, nn.Module], bool]:
    """``(path, module) -> bool`` for one recipe: by class when ``cls`` is given, else by class name."""

    def base_of(module_cls: type) -> type | None:
        if cls is not None:
            return cls if issubclass(module_cls, cls) else None
        return next((c for c in module_cls.__mro__ if c.__name__ == role), None)

    def match(path: str, module: nn.Module) -> bool:
        base = base_of(type(module))
        if base is None:
            return False
        where = path or type(module).__name__
        if type(module).forward is not base.forward:
            logger.warning("%s: %s overrides %s.forward; recipe %s not applied", where, type(module).__qualname__,
                           base.__qualname__, PATCH_NAMES[role])
            return False
        missing = [a for a in _REQUIRED[role] if not hasattr(module, a)]
        if missing:
            logger.warning("%s: %s has no attribute %s, so it is not a YOLOv5 %s; recipe %s not applied", where,
                           type(module).__qualname__, ", ".join(missing), role, PATCH_NAMES[role])
            return False
        if role == "Bottleneck" and not module.add:
            logger.debug("%s: Bottleneck without add; left alone", where)
            return False
        return True

    return match


def yolov5_patches(
    classes: Classes | None = None,
    *,
    by_name: bool = False,
    quant_desc: QuantDescriptor | None = None,
) -> list[ForwardPatch]:
    """The YOLOv5 recipes as :class:`~qdq.transform.patching.ForwardPatch` objects (see the module docstring).

    Args:
        classes: where the block classes come from: a Python module or a ``{"Bottleneck": cls, ...}`` mapping
            (blocks not given get no recipe). Modules match with ``isinstance``.
        by_name: match on the class name instead (``classes`` must then be ``None``).
        quant_desc: descriptor of the added quantizers (default: ``QuantAdd``'s / ``QuantConcat``'s class default).

    Returns:
        One patch per block class, in :data:`BLOCK_NAMES` order.

    >>> [p.name for p in yolov5_patches(by_name=True)]
    ['yolov5.bottleneck_add', 'yolov5.c3_concat', 'yolov5.sppf_concat', 'yolov5.concat']
    """
    if by_name and classes is not None:
        raise ValueError("yolov5_patches: give classes= or by_name=True, not both")
    if not by_name and classes is None:
        raise ValueError("yolov5_patches: give classes= (a module or a mapping of the block classes) or by_name=True")
    found: dict[str, type | None] = {name: None for name in BLOCK_NAMES} if by_name else _resolve_classes(classes)
    ops: dict[str, Callable[[nn.Module], nn.Module | None]] = {
        "Bottleneck": lambda m: QuantAdd(shared=True, quant_desc_input=quant_desc) if m.add else None,
        "C3": lambda m: QuantConcat(dim=1, quant_desc_input=quant_desc),
        "SPPF": lambda m: QuantConcat(dim=1, num_inputs=4, quant_desc_input=quant_desc),
        "Concat": lambda m: QuantConcat(dim=m.d, quant_desc_input=quant_desc),
    }
    attr = {"Bottleneck": "addop", "C3": "catop", "SPPF": "catop", "Concat": "catop"}
    return [
        ForwardPatch(
            PATCH_NAMES[role],
            match=_block_matcher(role, found[role]),
            forward=_FORWARDS[role],
            ops={attr[role]: ops[role]},
        )
        for role in BLOCK_NAMES
        if role in found
    ]


def apply_yolov5_rules(
    model: nn.Module,
    classes: Classes | None = None,
    *,
    by_name: bool = False,
    quant_desc: QuantDescriptor | None = None,
) -> dict[str, list[str]]:
    """Applies every YOLOv5 recipe to ``model`` (see the module docstring).

    Args:
        model: the model (float or already converted by ``replace_to_quantization_module``).
        classes: a Python module or mapping holding the block classes; default: the module that defines
            ``type(model)`` (so ``YOLOv5`` from ``examples.yolov5.model``, or a YOLOv5 ``DetectionModel`` whose module
            imports ``models.common``).
        by_name: match the blocks by class name instead of by class.
        quant_desc: descriptor of the added quantizers.

    Returns:
        ``{patch name: [paths patched by this call]}``; blocks patched by an earlier call are not listed again.
    """
    if classes is None and not by_name:
        classes = sys.modules.get(type(model).__module__)
        if classes is None:
            raise ValueError(f"cannot find the module of {type(model).__qualname__}; pass classes= or by_name=True")
        logger.info("YOLOv5 recipes: block classes taken from module %s", classes.__name__)
    patches = yolov5_patches(classes, by_name=by_name, quant_desc=quant_desc)
    done = {patch.name: apply_patch(model, patch) for patch in patches}
    carried = sum(len(patched_modules(model, patch)) for patch in patches)
    if carried == 0:
        logger.warning("apply_yolov5_rules: %s has no YOLOv5 block to patch (matching %s)", type(model).__qualname__,
                       "by class name" if by_name else "by class")
    else:
        logger.info("YOLOv5 recipes: %s", ", ".join(f"{name}: {len(paths)} new" for name, paths in done.items()))
    return done


def remove_yolov5_rules(model: nn.Module) -> dict[str, list[str]]:
    """Undoes :func:`apply_yolov5_rules`: ``{patch name: [paths restored]}``.

    >>> remove_yolov5_rules(nn.Sequential())
    {'yolov5.bottleneck_add': [], 'yolov5.c3_concat': [], 'yolov5.sppf_concat': [], 'yolov5.concat': []}
    """
    return {patch.name: remove_patch(model, patch) for patch in yolov5_patches(by_name=True)}
