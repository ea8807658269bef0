"""pytorch_quantization's ``utils.quant_logging`` (``reset_logger_handler``), with qdq's verbosity switches.

>>> import logging
>>> from qdq.utils import quant_logging
>>> root = logging.getLogger()
>>> saved = list(root.handlers)
>>> quant_logging.reset_logger_handler()
>>> root.handlers
[]
>>> for handler in saved:
...     root.addHandler(handler)
"""

import logging

from qdq.quant_logging import DEBUG, ERROR, FATAL, INFO, WARNING, get_verbosity, set_verbosity

__all__ = ["reset_logger_handler", "set_verbosity", "get_verbosity", "DEBUG", "INFO", "WARNING", "ERROR", "FATAL"]


def reset_logger_handler() -> None:
    """Removes every handler of the root logger (for scripts whose other libraries install their own format)."""
    root = logging.getLogger()
    while root.handlers:
        root.removeHandler(root.handlers[0])
