"""A stand-in for the ``absl.logging`` calls pytorch_quantization-era scripts make (``set_verbosity(ERROR)``).

qdq logs through the standard :mod:`logging` module under the ``"qdq"`` logger; this sets its level.

>>> from qdq import quant_logging
>>> quant_logging.set_verbosity(quant_logging.ERROR)
>>> quant_logging.set_verbosity(quant_logging.WARNING)
"""

import logging

DEBUG, INFO, WARNING, ERROR, FATAL = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL

__all__ = ["DEBUG", "INFO", "WARNING", "ERROR", "FATAL", "set_verbosity", "get_verbosity"]


def set_verbosity(level) -> None:
    """Sets the level of qdq's logger (a :mod:`logging` level or its name)."""
    logging.getLogger("qdq").setLevel(level.upper() if isinstance(level, str) else level)


def get_verbosity() -> int:
    return logging.getLogger("qdq").getEffectiveLevel()
