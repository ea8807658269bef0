"""pytorch_quantization's ``quant_modules``, kept at its path: the module map and the in-place replacement.

The code lives in :mod:`qdq.transform` (:mod:`~qdq.transform.replace`, :mod:`~qdq.transform.module_map`,
:mod:`~qdq.transform.ignore_policy`); this module re-exports their public names and the private ones
pytorch_quantization code uses (``_DEFAULT_QUANT_MAP``, ``_quant_entry``), so ``from qdq import quant_modules`` and
``quant_modules.initialize()`` work as with pytorch_quantization. New code imports from :mod:`qdq.transform`.

>>> from qdq import quant_modules
>>> from qdq.transform import replace
>>> quant_modules.replace_to_quantization_module is replace.replace_to_quantization_module
True
"""

from qdq.transform import ignore_policy as _ignore_policy
from qdq.transform import module_map as _module_map
from qdq.transform import replace as _replace
from qdq.transform.ignore_policy import *  # noqa: F401,F403
from qdq.transform.module_map import *  # noqa: F401,F403
from qdq.transform.module_map import _DEFAULT_QUANT_MAP, _quant_entry  # noqa: F401
from qdq.transform.replace import *  # noqa: F401,F403
from qdq.transform.subclasses import _new_generated  # noqa: F401  (pickles written before the move name it here)

__all__ = [*_replace.__all__, *_ignore_policy.__all__, *_module_map.__all__]
