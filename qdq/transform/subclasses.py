"""Quantized subclasses: the class a subclass of a mapped layer becomes (``Quant<Sub>``), made on demand.

A subclass that keeps its parent's ``forward`` gets the quantized parent's ``forward``; a subclass with its own
``forward`` keeps it, run on the quantized input with the quantized weight in place of ``self.weight``
(:class:`_QuantizedWeight`). The generated classes live in no module; their instances pickle by the classes they are
made from.
"""

from __future__ import annotations

import functools
import inspect
import logging

from torch import nn

from qdq.nn.modules._utils import QuantMixin

logger = logging.getLogger(__name__)


def _weight_quantizers(module) -> list[tuple[str, str]]:
    """(parameter name, quantizer attribute) pairs a converted subclass forward must quantize."""
    if isinstance(module, QuantMixin) and hasattr(module, "_weight_quantizer") and "weight" in module._parameters:
        return [("weight", "_weight_quantizer")]
    return []


#: Instance attribute of a generated subclass with its own forward: the stack of ``{name: fake-quantized weight}`` of
#: its forwards now running (nested calls push their own). Not the weight's own name: nothing shadows the Parameter.
_VIEWS = "_qdq_weight_views"


class _QuantizedWeight:
    """Class attribute ``weight`` of a generated subclass with its own forward: inside that forward ``self.weight``
    is the fake-quantized weight (computed once per call, through the quantizer's eval-mode weight cache),
    everywhere else the layer's Parameter. The views live on the instance under :data:`_VIEWS`, a stack pushed and
    popped by the forward (plain attribute state, which ``torch.compile(fullgraph=True)`` and torch.export trace);
    the Parameter is never replaced.
    """

    def __init__(self, name: str):
        self.name = name

    def __get__(self, module, owner=None):
        if module is None:
            return self
        stack = module.__dict__.get(_VIEWS)
        if stack and self.name in stack[-1]:
            return stack[-1][self.name]
        if self.name in module.__dict__:  # a plain attribute set after the Parameter was deleted
            return module.__dict__[self.name]
        return nn.Module.__getattr__(module, self.name)  # the Parameter (or AttributeError, as nn.Module says)

    def __set__(self, module, value) -> None:  # reached only for values nn.Module.__setattr__ does not register
        module.__dict__[self.name] = value

    def __delete__(self, module) -> None:  # reached only when the name is no parameter, buffer or child
        if self.name not in module.__dict__:
            raise AttributeError(self.name)
        del module.__dict__[self.name]


def _subclass_forward(float_sub: type):
    """The forward of a converted subclass with its own forward: its forward on quantized operands.

    The input is the forward's first argument, by position or by name; the weight the forward reads as
    ``self.weight`` is fake-quantized (:class:`_QuantizedWeight`).
    """
    original = float_sub.forward
    input_name = _input_parameter(float_sub)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if args:
            args = (self._input_quantizer(args[0]),) + args[1:]
        elif input_name in kwargs:
            kwargs = {**kwargs, input_name: self._input_quantizer(kwargs[input_name])}
        else:
            raise TypeError(f"{type(self).__name__}.forward() got no input: quantized subclasses quantize the first "
                            f"argument of {float_sub.__qualname__}.forward ({input_name!r}), by position or name")
        views = {name: getattr(self, attr)(self._parameters[name]) for name, attr in _weight_quantizers(self)}
        if not views:
            return original(self, *args, **kwargs)
        stack = self.__dict__.setdefault(_VIEWS, [])
        stack.append(views)
        try:
            return original(self, *args, **kwargs)
        finally:
            stack.pop()

    return forward


def _input_parameter(float_sub: type) -> str:
    """The name of the input argument of ``float_sub.forward`` (its first parameter after ``self``)."""
    params = list(inspect.signature(float_sub.forward).parameters.values())[1:]
    if not params or params[0].kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
        raise NotImplementedError(f"{float_sub.__qualname__}.forward{inspect.signature(float_sub.forward)} takes no "
                                  "positional input; qdq cannot tell which argument to quantize: ignore the layer "
                                  "(ignore_policy) or quantize it by hand")
    return params[0].name


def _new_generated(float_sub: type, quant_cls: type, float_base: type) -> nn.Module:
    """An empty instance of the generated class for these three classes (made again if needed): what unpickling a
    quantized subclass calls before it restores the instance's state."""
    cls = _quant_subclass(float_sub, quant_cls, float_base)
    return cls.__new__(cls)


def _reduce_generated(self, protocol):
    """Pickles an instance of a generated class by the classes it is made from: the generated class itself lives in
    no module, so pickle could not find it by name (``torch.save(model)``, multiprocessing). A class derived from a
    generated one is pickled the usual way, by its own name."""
    if not vars(type(self)).get("_qdq_generated"):
        return object.__reduce_ex__(self, protocol)
    return _new_generated, type(self)._qdq_origin, self.__getstate__()


@functools.lru_cache(maxsize=None)
def _quant_subclass(float_sub: type, quant_cls: type, float_base: type) -> type:
    """``Quant<Sub>``: a class deriving from the quantized twin of ``float_base`` and from ``float_sub``."""
    own_forward = any("forward" in vars(c) for c in float_sub.__mro__[: float_sub.__mro__.index(float_base)])
    attrs = {
        "__module__": float_sub.__module__,
        "__doc__": f"Quantized {float_sub.__qualname__} (made by qdq).",
        "_qdq_generated": True,
        "_qdq_origin": (float_sub, quant_cls, float_base),
        "__reduce_ex__": _reduce_generated,
    }
    if own_forward:
        if issubclass(quant_cls, nn.RNNBase) or issubclass(quant_cls, nn.RNNCellBase):
            raise NotImplementedError(f"{float_sub.__qualname__} overrides forward; recurrent layers with their own "
                                      "forward cannot be quantized automatically")
        attrs["forward"] = _subclass_forward(float_sub)
        own_weight = any("weight" in vars(c) for c in float_sub.__mro__)  # e.g. a property: the class keeps it
        if issubclass(quant_cls, QuantMixin) and not own_weight:
            attrs["weight"] = _QuantizedWeight("weight")
        elif issubclass(quant_cls, QuantMixin):
            logger.warning("%s defines its own 'weight' attribute; its forward reads that, so its weight is not "
                           "fake-quantized there (ignore the layer, or quantize it by hand)", float_sub.__qualname__)
    return type(f"Quant{float_sub.__name__}", (quant_cls, float_sub), attrs)


def _quant_class_for(cls: type, mapping: dict[type, type]) -> type | None:
    if cls in mapping:
        return mapping[cls]
    for base in cls.__mro__[1:]:
        if base in mapping:
            return _quant_subclass(cls, mapping[base], base)
    return None
