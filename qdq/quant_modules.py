"""pytorch_quantization's ``quant_modules``, kept at its path: the module map and the in-place replacement.

The code lives in :mod:`qdq.transform.replace`; this module re-exports its public names and the private ones
pytorch_quantization code uses (``_DEFAULT_QUANT_MAP``, ``_quant_entry``), so ``from qdq import quant_modules`` and
``quant_modules.initialize()`` work as with pytorch_quantization. New code imports from :mod:`qdq.transform`.

>>> from qdq import quant_modules
>>> from qdq.transform import replace
>>> quant_modules.replace_to_quantization_module is replace.replace_to_quantization_module
True
"""

from qdq.transform.replace import *  # noqa: F401,F403
from qdq.transform.replace import __all__  # noqa: F401
from qdq.transform.replace import _DEFAULT_QUANT_MAP, _new_generated, _quant_entry  # noqa: F401  (old pickles name _new_generated here)
