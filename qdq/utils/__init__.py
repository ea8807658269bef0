"""pytorch_quantization's ``utils``: :func:`reduce_amax` and :mod:`~qdq.utils.quant_logging`.

>>> import torch
>>> from qdq import utils as quant_utils
>>> quant_utils.reduce_amax(torch.tensor([[1.0, -3.0], [0.5, 2.0]]), axis=1).flatten().tolist()
[3.0, 2.0]
"""

from qdq.utils import quant_logging
from qdq.utils.reduce_amax import reduce_amax

__all__ = ["reduce_amax", "quant_logging"]
