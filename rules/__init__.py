"""Model-family recipes (installed as ``qdq.rules``): which adds and concats get quantizers, which share a scale."""
