"""Floor 4a, converting the model: which layers and ops get quantizers, and how the model changes around them.

- :mod:`~qdq.transform.replace`: the module map and the in-place replacement of float layers by quantized ones
  (``replace_to_quantization_module``; :mod:`qdq.quant_modules` is pytorch_quantization's name for it);
- :mod:`~qdq.transform.functional_weights`: layers whose parent uses their weights functionally (kept in float);
- :mod:`~qdq.transform.attention`: quantizers on the attention MatMuls of transformer blocks;
- :mod:`~qdq.transform.patching`: forward patches that give modules quantized ops (``ForwardPatch``);
- :mod:`~qdq.transform.op_sites`: quantizers on inline adds, concatenations and poolings;
- :mod:`~qdq.transform.fold_batchnorm`: BatchNorm folded into the layer before it;
- :mod:`~qdq.transform.switches`: enable, disable, save and restore quantizers model-wide;
- :mod:`~qdq.transform.layer_formats`: INT8, FP8, INT4 weight-only or float, per layer;
- :mod:`~qdq.transform.qat`: the quantization-aware training recipe and distillation.

Nothing here feeds data through the model: that is :mod:`qdq.calibrate` (floor 4b, which imports this package,
never the reverse).
"""
