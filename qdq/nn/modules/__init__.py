"""Quantized modules (floor 3)."""
