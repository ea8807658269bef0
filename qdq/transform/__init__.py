"""Floor 4.1, converting the model: which layers and ops get quantizers, and how the model changes around them.

- :mod:`~qdq.transform.replace`: the in-place replacement of float layers by quantized ones
  (``replace_to_quantization_module``; :mod:`qdq.quant_modules` is pytorch_quantization's name for this and the next
  two);
- :mod:`~qdq.transform.module_map`: which quantized class each float layer type becomes, and pytorch_quantization's
  ``initialize()`` / ``deactivate()``;
- :mod:`~qdq.transform.ignore_policy`: which layer paths a conversion leaves in float;
- :mod:`~qdq.transform.subclasses`: the ``Quant<Sub>`` classes made for subclasses of mapped layers;
- :mod:`~qdq.transform.functional_weights`: layers whose parent uses their weights functionally (kept in float);
- :mod:`~qdq.transform.attention`: quantizers on the attention MatMuls of transformer blocks;
- :mod:`~qdq.transform.patching`: forward patches that give modules quantized ops (``ForwardPatch``);
- :mod:`~qdq.transform.op_sites`: quantizers on inline adds, concatenations and poolings;
- :mod:`~qdq.transform.fold_batchnorm`: BatchNorm folded into the layer before it;
- :mod:`~qdq.transform.switches`: enable, disable, save and restore quantizers model-wide;
- :mod:`~qdq.transform.layer_formats`: INT8, FP8, INT4 weight-only or float, per layer;
- :mod:`~qdq.transform.qat`: the quantization-aware training recipe and distillation.

Nothing here feeds data through the model: that is :mod:`qdq.calibrate` (floor 4.3, which imports this package,
never the reverse).
"""
