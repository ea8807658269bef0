"""torchvision ResNet recipes: the residual add of ``BasicBlock`` and ``Bottleneck`` with TensorRT's Q/DQ placement.

A ResNet block ends with ``out += identity`` then ReLU. TensorRT fuses a convolution with a following residual add
(and the ReLU) into one INT8 kernel when the add's *skip* input is quantized and the conv branch's output is not:
the conv writes its output straight into the add. The recipes therefore give each block
``addop = QuantAdd(quantize=(1,))`` and a forward that reproduces torchvision's forward exactly, with the add
written as ``addop(out, identity)``: input 0 (the conv branch) is left alone, input 1 (the identity, or the
downsample branch's output) goes through ``addop._input1_quantizer``.

=========================  ==============================================  ==========================
recipe (patch name)        block                                           op added
=========================  ==============================================  ==========================
resnet.basic_block_add     ``torchvision.models.resnet.BasicBlock``        ``addop = QuantAdd(quantize=(1,))``
resnet.bottleneck_add      ``torchvision.models.resnet.Bottleneck``        ``addop = QuantAdd(quantize=(1,))``
=========================  ==============================================  ==========================

Blocks match with ``isinstance`` (subclasses included); a subclass that overrides ``forward`` is skipped with a
warning, since the recipe's forward would replace its own. The patches are per instance and reversible
(:func:`remove_resnet_rules`), and applying them twice patches once.

Example:
    >>> import torch, torchvision
    >>> from qdq import quant_modules
    >>> model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    >>> _ = quant_modules.replace_to_quantization_module(model)
    >>> done = apply_resnet_rules(model)
    >>> len(done["resnet.basic_block_add"])
    8
    >>> add = model.layer1[0].addop
    >>> hasattr(add, "_input0_quantizer"), hasattr(add, "_input1_quantizer")
    (False, True)
    >>> model(torch.randn(1, 3, 32, 32)).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from qdq.nn import QuantAdd
from qdq.transform.patching import ForwardPatch, apply_patch, patched_modules, remove_patch
from qdq.math.descriptor import QuantDescriptor

__all__ = [
    "basic_block_forward",
    "bottleneck_forward",
    "resnet_patches",
    "BASIC_BLOCK_ADD",
    "BOTTLENECK_ADD",
    "apply_resnet_rules",
    "remove_resnet_rules",
]

logger = logging.getLogger(__name__)


def basic_block_forward(self: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``BasicBlock.forward`` with ``out += identity`` as ``self.addop(out, identity)``."""
    identity = x

    out = self.conv1(x)
    out = self.bn1(out)
    out = self.relu(out)

    out = self.conv2(out)
    out = self.bn2(out)

    if self.downsample is not None:
        identity = self.downsample(x)

    out = self.addop(out, identity)
    out = self.relu(out)

    return out


def bottleneck_forward(self: Bottleneck, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``Bottleneck.forward`` with ``out += identity`` as ``self.addop(out, identity)``."""
    identity = x

    out = self.conv1(x)
    out = self.bn1(out)
    out = self.relu(out)

    out = self.conv2(out)
    out = self.bn2(out)
    out = self.relu(out)

    out = self.conv3(out)
    out = self.bn3(out)

    if self.downsample is not None:
        identity = self.downsample(x)

    out = self.addop(out, identity)
    out = self.relu(out)

    return out


def _matcher(cls: type, patch_name: str) -> Callable[[str, nn.Module], bool]:
    """Instances of ``cls`` (subclasses too) that keep ``cls.forward``; the others are skipped with a warning."""

    def match(path: str, module: nn.Module) -> bool:
        if not isinstance(module, cls):
            return False
        if type(module).forward is not cls.forward:
            logger.warning("%s: %s overrides %s.forward; recipe %s not applied", path or type(module).__name__,
                           type(module).__qualname__, cls.__qualname__, patch_name)
            return False
        return True

    return match


def resnet_patches(quant_desc: QuantDescriptor | None = None) -> tuple[ForwardPatch, ForwardPatch]:
    """The two recipes, with ``quant_desc`` for the skip-input quantizers (default: ``QuantAdd``'s class default).

    >>> [p.name for p in resnet_patches()]
    ['resnet.basic_block_add', 'resnet.bottleneck_add']
    """

    def residual_add(block: nn.Module) -> QuantAdd:
        return QuantAdd(quantize=(1,), quant_desc_input=quant_desc)

    return (
        ForwardPatch("resnet.basic_block_add", match=_matcher(BasicBlock, "resnet.basic_block_add"),
                     forward=basic_block_forward, ops={"addop": residual_add}),
        ForwardPatch("resnet.bottleneck_add", match=_matcher(Bottleneck, "resnet.bottleneck_add"),
                     forward=bottleneck_forward, ops={"addop": residual_add}),
    )


#: The recipes with the default descriptor.
BASIC_BLOCK_ADD, BOTTLENECK_ADD = resnet_patches()


def apply_resnet_rules(model: nn.Module, quant_desc: QuantDescriptor | None = None) -> dict[str, list[str]]:
    """Gives every torchvision ``BasicBlock`` / ``Bottleneck`` of ``model`` its quantized residual add.

    Args:
        model: the model (float or already converted by ``replace_to_quantization_module``).
        quant_desc: descriptor of the skip-input quantizers.

    Returns:
        ``{patch name: [paths patched by this call]}``; blocks patched by an earlier call are not listed again.
    """
    patches = resnet_patches(quant_desc) if quant_desc is not None else (BASIC_BLOCK_ADD, BOTTLENECK_ADD)
    done = {patch.name: apply_patch(model, patch) for patch in patches}
    if not any(patched_modules(model, patch) for patch in patches):
        logger.warning("apply_resnet_rules: %s has no torchvision BasicBlock or Bottleneck to patch",
                       type(model).__qualname__)
    else:
        logger.info("ResNet recipes: %s", ", ".join(f"{name}: {len(paths)} new" for name, paths in done.items()))
    return done


def remove_resnet_rules(model: nn.Module) -> dict[str, list[str]]:
    """Undoes :func:`apply_resnet_rules`: ``{patch name: [paths restored]}``."""
    return {patch.name: remove_patch(model, patch) for patch in (BASIC_BLOCK_ADD, BOTTLENECK_ADD)}
