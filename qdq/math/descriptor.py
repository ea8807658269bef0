"""Quantization descriptors: :class:`QuantDescriptor` (validated, immutable), the predefined descriptors, and the
``calib_method`` names a descriptor takes (:func:`calib_methods`, :func:`register_calib_method`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from qdq.math import formats as _formats
from qdq.math.ranges import MAX_BITS, MIN_BITS, _is_int, _is_number, _is_real

__all__ = [
    "CALIB_METHODS",
    "calib_methods",
    "register_calib_method",
    "QuantDescriptor",
    "ScaledQuantDescriptor",
    "QUANT_DESC_8BIT_PER_TENSOR",
    "QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR",
    "QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW",
]

#: The collectors a descriptor can name as in pytorch_quantization: a running max, or a histogram whose search is
#: chosen when amax is computed. A descriptor may also name the search itself (:func:`calib_methods`).
CALIB_METHODS = ("max", "histogram")


#: Histogram bins of every histogram calibration, unless ``calib_args`` says otherwise (TensorRT's 2048).
DEFAULT_NUM_BINS = 2048


#: The histogram searches a descriptor can name, with their parameters and defaults (those of the functions in
#: :mod:`qdq.calib.amax_search`, a test holds them equal); :func:`register_calib_method` adds more.
_SEARCH_ARGS: dict[str, dict[str, Any]] = {
    "entropy": {"start_bin": 128, "stride": 1},
    "mse": {"start_bin": 128, "stride": 1},
    "percentile": {"percentile": 99.99},
    "kld": {},
}


#: The KLD search tries ``num_bins // KLD_DIVISIONS`` bins between cuts (:mod:`qdq.calib.kld`, 2048 // 16 = 128 as in
#: tpu-mlir), so a kld descriptor needs at least that many bins.
KLD_DIVISIONS = 16


def calib_methods() -> tuple[str, ...]:
    """Every ``calib_method`` a descriptor takes: ``"max"``, ``"histogram"`` and the histogram searches by name.

    >>> calib_methods()[:6]
    ('max', 'histogram', 'entropy', 'mse', 'percentile', 'kld')
    """
    return CALIB_METHODS + tuple(_SEARCH_ARGS)


def register_calib_method(name: str, defaults: Mapping[str, Any]) -> None:
    """Lets descriptors name the histogram search ``name`` (``defaults``: its parameters and their defaults).

    :func:`qdq.calib.register_search` calls it; a search registered there is a ``calib_method`` like the built-in
    ones.
    """
    if name in CALIB_METHODS:
        return  # "max" is also a search over a histogram (its exact max); as a calib_method it is the max collector
    if name in _SEARCH_ARGS and _SEARCH_ARGS[name] != dict(defaults):
        raise ValueError(f"calib_method {name!r} is registered already, with parameters {_SEARCH_ARGS[name]}")
    _SEARCH_ARGS[name] = dict(defaults)


def _check_calib_args(calib_method: str, args: Any) -> tuple[tuple[str, Any], ...]:
    """``calib_args`` checked against ``calib_method`` and completed with the defaults, as sorted items."""
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise TypeError(f"QuantDescriptor: calib_args must be a mapping of parameters, got {args!r}")
    if calib_method == "max":
        if args:
            raise ValueError(f"QuantDescriptor: calib_args {sorted(args)} apply to histogram calibration; "
                             "calib_method 'max' takes none")
        return ()
    allowed = {"num_bins": DEFAULT_NUM_BINS, **_SEARCH_ARGS.get(calib_method, {})}
    unknown = sorted(str(k) for k in args if k not in allowed)
    if unknown:
        raise ValueError(f"QuantDescriptor: calib_args {unknown} do not apply to calib_method {calib_method!r}, "
                         f"which takes {', '.join(allowed)}")
    out = {**allowed, **args}
    checks = {
        "num_bins": (lambda v: _is_int(v) and v >= 2, "an int >= 2"),
        "start_bin": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
        "stride": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
        "percentile": (lambda v: _is_real(v) and 0 < v <= 100, "a number in (0, 100]"),
    }
    for key, value in out.items():
        test, wanted = checks.get(key, (lambda v: _is_real(v) or isinstance(v, (bool, str)), "a number"))
        if not test(value):
            raise ValueError(f"QuantDescriptor: calib_args[{key!r}] must be {wanted}, got {value!r}")
    if calib_method == "kld" and out["num_bins"] < KLD_DIVISIONS:
        raise ValueError(f"QuantDescriptor: calib_method 'kld' needs at least {KLD_DIVISIONS} bins, "
                         f"got calib_args['num_bins']={out['num_bins']}")
    if "percentile" in out:
        out["percentile"] = float(out["percentile"])
    return tuple(sorted(out.items()))


# --------------------------------------------------------------------------------------------------------------------
# Descriptor
# --------------------------------------------------------------------------------------------------------------------


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"QuantDescriptor: {key} must be a bool, got {value!r}")
    return value


def _normalize_axis(axis: Any) -> int | tuple[int, ...] | None:
    if axis is None:
        return None
    if _is_int(axis):
        return axis
    if isinstance(axis, (list, tuple)) and all(_is_int(a) for a in axis):
        if not axis:
            raise ValueError("QuantDescriptor: axis=() is ambiguous; use axis=None for per-tensor quantization")
        if len(set(axis)) != len(axis):
            raise ValueError(f"QuantDescriptor: axis {tuple(axis)} repeats a dimension")
        return axis[0] if len(axis) == 1 else tuple(axis)
    raise TypeError(f"QuantDescriptor: axis must be None, an int or a tuple of ints, got {axis!r}")


def _normalize_amax(amax: Any) -> float | tuple | None:
    """Turns a user amax (number, list, array, tensor) into an immutable float or nested tuple, checked.

    The values are rounded to float32, the precision every quantizer holds amax in (as pytorch_quantization's
    descriptor does), so a descriptor and the quantizer built from it hold the same numbers.
    """
    if amax is None:
        return None
    if isinstance(amax, torch.Tensor):
        amax = amax.detach().cpu().tolist()
    elif hasattr(amax, "tolist"):  # numpy arrays and scalars
        amax = amax.tolist()

    def freeze(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return tuple(freeze(e) for e in v)
        if not _is_number(v):
            raise TypeError(f"QuantDescriptor: amax must be float, list or ndarray (a number, a nested list of "
                            f"numbers, an array or a tensor), got {v!r}")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"QuantDescriptor: amax must be finite and >= 0, got {v!r}")
        v32 = float(np.float32(v))
        if not math.isfinite(v32):
            raise ValueError(f"QuantDescriptor: amax {v!r} overflows float32")
        return v32

    return freeze(amax)


class QuantDescriptor:
    """How one tensor is quantized: validated, immutable data.

    Args:
        num_bits: bits of the integer type, 2..16 (8 for TensorRT INT8), or ``(4, 3)`` for FP8 E4M3 (exponent and
            mantissa bits; see :mod:`qdq.math.formats`).
        name: optional label, shown in logs and errors.
        fake_quant: ``True`` returns dequantized floats (QAT, export); ``False`` returns the integer values.
        axis: ``None`` for one amax for the whole tensor; an int or a tuple of ints for the dimensions that keep
            their own amax (``axis=0`` is per output channel for a conv weight), as in pytorch_quantization.
        amax: a fixed amax (number, or nested list matching the kept dimensions); ``None`` means "not calibrated".
        learn_amax: make amax a trainable parameter (its gradient comes from :func:`fake_quantize_by_amax`).
        scale_amax: multiply the calibrated amax by this factor.
        block_size: quantize a 2-D weight in blocks of this many consecutive input features (its last dimension),
            one amax per row and block (INT4 weight-only for Linear/MatMul: 32, 64 or 128); see :mod:`qdq.math.formats`.
        calib_method: how amax is calibrated. ``"max"`` (a running max) or ``"histogram"`` (a histogram; the search
            is chosen when amax is computed, ``load_calib_amax("percentile", ...)``), as in pytorch_quantization; or
            the search by name, ``"entropy"``, ``"mse"``, ``"percentile"``, ``"kld"`` (and any search registered
            with :func:`qdq.calib.register_search`): a histogram whose amax that search computes.
        calib_args: parameters of a histogram calibration: ``num_bins`` (2048), and those of the named search
            (``percentile`` 99.99; ``start_bin`` 128 and ``stride`` 1 for entropy and mse). Completed with the
            defaults, so ``calib_args`` always shows every parameter in use; ``calib_method="max"`` takes none.
        unsigned: quantize to ``[0, 2**num_bits - 1]``; negative inputs are an error.
        narrow_range: signed range ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` instead of ``[-2**(b-1), 2**(b-1) - 1]``.
        symmetric: ``False`` for asymmetric (affine) quantization with a zero point: the range ``[amin, amax]``
            from a min/max calibration maps onto the integer range (see :func:`affine_qparams`). ONNX Runtime runs
            it; TensorRT does not (its Q/DQ zero points must be 0).

    Unknown keyword arguments raise ``TypeError`` naming them.

    Example:
        >>> d = QuantDescriptor(num_bits=4, axis=(0), calib_method="histogram")
        >>> d.axis, d.num_bits
        (0, 4)
        >>> QuantDescriptor(calib_method="percentile", calib_args={"percentile": 99.9}).calib_args
        {'num_bins': 2048, 'percentile': 99.9}
        >>> QuantDescriptor.from_dict(d.dict()) == d
        True
        >>> QuantDescriptor(num_bit=8)
        Traceback (most recent call last):
        ...
        TypeError: QuantDescriptor got unknown keys ['num_bit']; valid keys are ...
    """

    _FIELDS = (
        "num_bits",
        "name",
        "fake_quant",
        "axis",
        "amax",
        "learn_amax",
        "scale_amax",
        "calib_method",
        "unsigned",
        "narrow_range",
        "symmetric",
        "block_size",
        "calib_args",
    )
    __slots__ = tuple("_" + f for f in _FIELDS)
    #: Version of the dict form written by :meth:`dict`.
    VERSION = 1

    def __init__(self, num_bits: int = 8, name: str | None = None, **kwargs: Any):
        unknown = sorted(set(kwargs) - set(self._FIELDS))
        if unknown:
            raise TypeError(
                f"QuantDescriptor got unknown keys {unknown}; valid keys are {', '.join(self._FIELDS)}"
            )
        num_bits = _formats.check_num_bits(num_bits, MIN_BITS, MAX_BITS)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"QuantDescriptor: name must be a str or None, got {name!r}")
        calib_method = kwargs.get("calib_method", "max")
        if not isinstance(calib_method, str) or calib_method not in calib_methods():
            raise ValueError(
                f"QuantDescriptor: calib_method must be one of {calib_methods()}, got {calib_method!r} ('max' and "
                "'histogram' name the collector; a search's name means a histogram that search computes amax on)"
            )
        calib_args = _check_calib_args(calib_method, kwargs.get("calib_args"))
        scale_amax = kwargs.get("scale_amax")
        if scale_amax is not None:
            if not _is_number(scale_amax):
                raise TypeError(f"QuantDescriptor: scale_amax must be a number, got {scale_amax!r}")
            if not math.isfinite(scale_amax) or scale_amax <= 0:
                raise ValueError(f"QuantDescriptor: scale_amax must be finite and > 0, got {scale_amax!r}")
            scale_amax = float(scale_amax)
        values = {
            "num_bits": num_bits,
            "name": name,
            "fake_quant": _check_bool("fake_quant", kwargs.get("fake_quant", True)),
            "axis": _normalize_axis(kwargs.get("axis")),
            "amax": _normalize_amax(kwargs.get("amax")),
            "learn_amax": _check_bool("learn_amax", kwargs.get("learn_amax", False)),
            "scale_amax": scale_amax,
            "calib_method": calib_method,
            "unsigned": _check_bool("unsigned", kwargs.get("unsigned", False)),
            "narrow_range": _check_bool("narrow_range", kwargs.get("narrow_range", False)),
            "symmetric": _check_bool("symmetric", kwargs.get("symmetric", True)),
            "block_size": kwargs.get("block_size"),
            "calib_args": calib_args,
        }
        _check_format(values)
        if not values["symmetric"]:
            if calib_method != "max":
                raise ValueError("QuantDescriptor: asymmetric quantization is calibrated with min/max "
                                 "(calib_method='max'); histograms of |x| cannot place a zero point")
            if values["learn_amax"]:
                raise ValueError("QuantDescriptor: learn_amax is not supported with asymmetric quantization")
            if values["narrow_range"]:
                raise ValueError("QuantDescriptor: narrow_range has no meaning for asymmetric quantization")
        for key, value in values.items():
            object.__setattr__(self, "_" + key, value)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"QuantDescriptor is immutable; build a new one with .replace({key}=...)")

    def __delattr__(self, key: str) -> None:
        raise AttributeError("QuantDescriptor is immutable")

    # read-only fields --------------------------------------------------------------------------------------------
    num_bits = property(lambda self: self._num_bits)
    name = property(lambda self: self._name)
    fake_quant = property(lambda self: self._fake_quant)
    axis = property(lambda self: self._axis)

    @property
    def amax(self) -> np.ndarray | None:
        """The fixed amax as a read-only float32 array (as pytorch_quantization gives it), ``None`` if not set.

        >>> QuantDescriptor(amax=[1.3, 1.4]).amax
        array([1.3, 1.4], dtype=float32)
        """
        if self._amax is None:
            return None
        value = np.array(self._amax, dtype=np.float32)
        value.flags.writeable = False  # the descriptor is immutable: a change goes through replace(amax=...)
        return value

    learn_amax = property(lambda self: self._learn_amax)
    scale_amax = property(lambda self: self._scale_amax)
    calib_method = property(lambda self: self._calib_method)
    unsigned = property(lambda self: self._unsigned)
    narrow_range = property(lambda self: self._narrow_range)
    symmetric = property(lambda self: self._symmetric)
    block_size = property(lambda self: self._block_size)
    calib_args = property(lambda self: dict(self._calib_args), doc="The calibration's parameters (a copy).")

    @property
    def search(self) -> str | None:
        """The histogram search this descriptor names (``None`` for ``"max"`` and ``"histogram"``)."""
        return None if self._calib_method in CALIB_METHODS else self._calib_method

    def dict(self) -> dict[str, Any]:
        """Every field, as plain Python values (``from_dict(d.dict()) == d``); amax as a float or nested tuple."""
        return {f: self._amax if f == "amax" else getattr(self, f) for f in self._FIELDS}

    to_dict = dict

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantDescriptor":
        """Builds a descriptor from :meth:`dict` output; unknown keys raise ``TypeError``."""
        if not isinstance(data, Mapping):
            raise TypeError(f"QuantDescriptor.from_dict takes a mapping of fields, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", cls.VERSION)
        if version != cls.VERSION:
            raise ValueError(f"QuantDescriptor: unsupported descriptor version {version!r} (this is {cls.VERSION})")
        return cls(**data)

    def to_yaml(self) -> str:
        """The descriptor as YAML (pytorch_quantization's method; needs PyYAML): the fields that differ from their
        defaults, with ``num_bits`` and ``name`` always written.

        >>> d = QuantDescriptor(num_bits=4, axis=(1, 2), amax=0.5)
        >>> print(d.to_yaml().strip())
        amax: 0.5
        axis:
        - 1
        - 2
        name: null
        num_bits: 4
        >>> QuantDescriptor.from_yaml(d.to_yaml()) == d
        True
        """
        yaml = _import_yaml("QuantDescriptor.to_yaml")
        defaults = QuantDescriptor().dict()
        data = {k: _plain(v) for k, v in self.dict().items() if k in ("num_bits", "name") or v != defaults[k]}
        return yaml.safe_dump(data, width=120)

    @classmethod
    def from_yaml(cls, text: str) -> "QuantDescriptor":
        """Builds a descriptor from :meth:`to_yaml` output (or any YAML mapping of its fields); needs PyYAML."""
        yaml = _import_yaml("QuantDescriptor.from_yaml")
        data = yaml.safe_load(text)
        if not isinstance(data, Mapping):
            raise TypeError(f"QuantDescriptor.from_yaml: the YAML must be a mapping of fields, got "
                            f"{type(data).__name__}")
        data = dict(data)
        for key in ("axis", "num_bits"):  # YAML has lists only; these fields are tuples
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "QuantDescriptor":
        """A copy with some fields changed (the descriptor itself never changes). A new ``calib_method`` without
        ``calib_args`` starts from its own defaults, keeping only the settings it takes (``num_bins`` for every
        histogram method).

        >>> QuantDescriptor(calib_method="entropy").replace(calib_method="percentile").calib_args
        {'num_bins': 2048, 'percentile': 99.99}
        """
        fields = self.dict()
        method = changes.get("calib_method", self._calib_method)
        if method != self._calib_method and "calib_args" not in changes:
            allowed = {} if method == "max" else {"num_bins", *_SEARCH_ARGS.get(method, {})}
            fields["calib_args"] = {k: v for k, v in fields["calib_args"].items() if k in allowed}
        return type(self).from_dict({**fields, **changes})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuantDescriptor) and self.dict() == other.dict()

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, "_" + f) for f in self._FIELDS))

    def __repr__(self) -> str:
        defaults = QuantDescriptor().dict()
        fields = ", ".join(f"{k}={v!r}" for k, v in self.dict().items() if k == "num_bits" or v != defaults[k])
        return f"QuantDescriptor({fields})"

    __str__ = __repr__

    def __reduce__(self):
        return (_descriptor_from_dict, (self.dict(),))


def _plain(value: Any) -> Any:
    """Tuples (also nested) as lists, for YAML."""
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def _import_yaml(what: str):
    try:
        import yaml
    except ImportError:
        raise ImportError(f"{what} needs PyYAML (pip install pyyaml); QuantDescriptor.dict()/from_dict() need "
                          "nothing") from None
    return yaml


def _check_format(values: dict) -> None:
    """The FP8 and blocked-INT4 constraints of a descriptor (see :mod:`qdq.math.formats`)."""
    block_size = values["block_size"]
    if _formats.is_fp8(values["num_bits"]):
        bad = [k for k in ("unsigned", "narrow_range", "learn_amax") if values[k]] + (
            [] if values["symmetric"] else ["symmetric=False"])
        if bad or block_size is not None:
            raise ValueError(f"QuantDescriptor: FP8 E4M3 is symmetric and signed with a fixed amax; it does not take "
                             f"{', '.join(bad + (['block_size'] if block_size is not None else []))}")
    if block_size is None:
        return
    if not _is_int(block_size) or block_size < 1:
        raise ValueError(f"QuantDescriptor: block_size must be an int >= 1, got {block_size!r}")
    if values["axis"] not in (None, 0):
        raise ValueError(f"QuantDescriptor: block_size quantizes 2-D weights in blocks along their last dimension "
                         f"(one amax per row and block); axis must be 0 or None, got {values['axis']!r}")
    if values["calib_method"] != "max" or not values["symmetric"] or values["unsigned"]:
        raise ValueError("QuantDescriptor: blocked quantization is symmetric, signed and max-calibrated "
                         "(calib_method='max')")


def _descriptor_from_dict(data: dict) -> QuantDescriptor:
    return QuantDescriptor.from_dict(data)


#: pytorch_quantization's name for the same class.
ScaledQuantDescriptor = QuantDescriptor


QUANT_DESC_8BIT_PER_TENSOR = QuantDescriptor(num_bits=8)


QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR = QuantDescriptor(num_bits=8, unsigned=True)


QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=0)


QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=0)


QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=0)


QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW = QuantDescriptor(num_bits=8, axis=0)


# A transposed conv weight is (in_channels, out_channels / groups, *kernel). TensorRT's deconvolution kernels take
# per-channel weight scales along the *input* channels (axis 0) and do not support per-output-channel scales
# (TensorRT issues #1694 and #2380), so axis 0 is the one that builds and runs correctly there.
QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=0)


QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=0)


QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=0)
