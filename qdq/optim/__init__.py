"""pytorch_quantization's ``optim``: parameter grouping for optimizers and in-place weight quantization."""

from qdq.optim import helper

__all__ = ["helper"]
