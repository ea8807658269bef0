"""Model-family recipes (installed as ``qdq.rules``): which adds and concats get quantizers, which share a scale.

Each recipe is a :class:`~qdq.transform.patching.ForwardPatch`: it gives the matching blocks a :class:`~qdq.nn.QuantAdd` or
:class:`~qdq.nn.QuantConcat` and a forward that uses it. Patches are per instance, reversible and idempotent.

- :mod:`qdq.rules.yolov5` - YOLOv5 ``Bottleneck`` adds (both inputs, one scale), ``C3``/``SPPF``/neck ``Concat``
  concatenations (one shared quantizer): :func:`apply_yolov5_rules`, :func:`remove_yolov5_rules`.
- :mod:`qdq.rules.torchvision_resnet` - torchvision ``BasicBlock``/``Bottleneck`` residual adds (skip input only,
  so the add fuses into the conv): :func:`apply_resnet_rules`, :func:`remove_resnet_rules`.

Use after building the model, before calibration::

    from qdq import quant_modules, calibrate_model
    from qdq.rules import apply_resnet_rules

    quant_modules.replace_to_quantization_module(model)
    apply_resnet_rules(model)
    calibrate_model(model, loader, num_batches=25)
"""

from .torchvision_resnet import apply_resnet_rules, remove_resnet_rules, resnet_patches
from .yolov5 import apply_yolov5_rules, remove_yolov5_rules, yolov5_patches

__all__ = [
    "apply_yolov5_rules",
    "remove_yolov5_rules",
    "yolov5_patches",
    "apply_resnet_rules",
    "remove_resnet_rules",
    "resnet_patches",
]
