"""Floor 1, the math: quantization descriptors and pure quantization functions.

Nothing here holds state. The quantizer module (:class:`qdq.nn.TensorQuantizer`), the calibrators and the ONNX
export all build on the functions below, so the numbers PyTorch computes during QAT are the numbers the exported
QuantizeLinear/DequantizeLinear pair computes.

The arithmetic, once for all of qdq::

    scale     = max(amax, AMAX_EPS) / maxbound            # the ONNX y_scale (a step size), float32
    q         = clamp(round_half_even(x * (1 / scale)), qmin, qmax)
    x_hat     = q * scale                                 # fake quantization = dequantize(quantize(x))

with ``maxbound = 2 ** (num_bits - 1 + unsigned) - 1`` (127 for signed 8 bit) and ``[qmin, qmax]``:

=====================  ====================  ======================
signedness             ``narrow_range=False``  ``narrow_range=True``
=====================  ====================  ======================
signed                 ``[-128, 127]``       ``[-127, 127]``
unsigned               ``[0, 255]``          ``[0, 255]``
=====================  ====================  ======================

``narrow_range=False`` is the default: it is what ONNX QuantizeLinear and TensorRT's IQuantizeLayer saturate to.

Fake quantization runs PyTorch's fused kernels (``torch.fake_quantize_per_tensor_affine`` and
``torch.fake_quantize_per_channel_affine``) in eager GPU code, under the exporters (both ONNX exporters turn them into
QuantizeLinear/DequantizeLinear) and where autograd records through them. In eager CPU code (QAT's forward included),
where those kernels run a scalar loop, the same arithmetic runs as vectorized tensor ops (3-30x faster there), and so
it does under ``torch.compile``, which fuses those ops and has no lowering of the fused kernels. Both multiply by the float32 reciprocal of the scale and round half to even, so both give identical numbers for finite
inputs. ONNX defines QuantizeLinear with a division,
which can differ from the reciprocal product by one ulp and so, on an exact rounding tie, by one quantization step:
that is why exported models are compared with ONNX Runtime to the step, not bit for bit.

FP8 E4M3 (``num_bits=(4, 3)``) and blocked INT4 (``block_size``) have their arithmetic in :mod:`qdq.formats`;
the functions here dispatch to it (``fake_tensor_quant(x, amax, num_bits=(4, 3))``).

Differences from pytorch_quantization, on purpose:

* ``scale`` is the step size ``amax / maxbound`` (ONNX's ``y_scale``), not its reciprocal. :func:`quantize_by_amax`
  returns it, and ``q * scale`` dequantizes.
* ``narrow_range`` defaults to ``False`` everywhere, in qdq's functions as in the descriptor.
* ``amax`` below :data:`AMAX_EPS` is raised to :data:`AMAX_EPS` instead of producing a zero scale, so the exported
  scale stays positive (TensorRT and ONNX Runtime require it) and PyTorch computes what the export computes.
* The functions never read a tensor's value on the host (pytorch_quantization checked amax with
  ``bool(tensor.any())`` on every call, a GPU synchronisation): amax is validated where it is set (the quantizer's
  ``amax`` setter, calibration, ``load_state_dict``, export); a learned amax that goes negative quantizes as
  ``AMAX_EPS``; unsigned quantization clamps negative data to 0. :func:`data_checks` turns per-call checks on for
  debugging. So ``torch.compile(fullgraph=True)`` traces QAT whole, learned amax included.
* Under ``no_grad`` (eval, calibration) fake quantization computes no clipping mask for the gradient.

Example:
    >>> import torch
    >>> from qdq.tensor_quant import fake_quantize_by_amax, quantize_by_amax
    >>> x = torch.tensor([-1.0, -0.004, 0.5, 2.0])
    >>> q, scale = quantize_by_amax(x, torch.tensor(1.0))
    >>> q
    tensor([-127.,   -1.,   64.,  127.])
    >>> torch.equal(fake_quantize_by_amax(x, torch.tensor(1.0)), q * scale)
    True
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np
import torch

from qdq import formats as _formats

__all__ = [
    "AMAX_EPS",
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
    "maxbound",
    "quant_range",
    "amax_to_scale",
    "quantize",
    "dequantize",
    "fake_quantize",
    "tensor_quant",
    "fake_tensor_quant",
    "TensorQuantFunction",
    "FakeTensorQuantFunction",
    "amax_problem",
    "check_amax",
    "reduce_amax",
    "reduce_range",
    "affine_qparams",
    "fake_affine_quant",
    "data_checks",
    "data_checks_enabled",
    "quantize_by_amax",
    "fake_quantize_by_amax",
    "FakeQuantParams",
    "fake_quant_params",
    "fake_quantize_with_params",
    "legacy_fake_tensor_quant",
    "fake_affine_tensor_quant",
    "scaled_e4m3",
]

logger = logging.getLogger(__name__)

#: amax values below this are treated as this value (2**-24, the smallest fp16 subnormal).
AMAX_EPS = 2.0**-24
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A Python int or float (bool excluded: ``True`` is an int)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


MIN_BITS, MAX_BITS = 2, 16


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
            mantissa bits; see :mod:`qdq.formats`).
        name: optional label, shown in logs and errors.
        fake_quant: ``True`` returns dequantized floats (QAT, export); ``False`` returns the integer values.
        axis: ``None`` for one amax for the whole tensor; an int or a tuple of ints for the dimensions that keep
            their own amax (``axis=0`` is per output channel for a conv weight), as in pytorch_quantization.
        amax: a fixed amax (number, or nested list matching the kept dimensions); ``None`` means "not calibrated".
        learn_amax: make amax a trainable parameter (its gradient comes from :func:`fake_quantize_by_amax`).
        scale_amax: multiply the calibrated amax by this factor.
        block_size: quantize a 2-D weight in blocks of this many consecutive input features (its last dimension),
            one amax per row and block (INT4 weight-only for Linear/MatMul: 32, 64 or 128); see :mod:`qdq.formats`.
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
    """The FP8 and blocked-INT4 constraints of a descriptor (see :mod:`qdq.formats`)."""
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


# --------------------------------------------------------------------------------------------------------------------
# Ranges and scales
# --------------------------------------------------------------------------------------------------------------------


def _check_bits(num_bits: int) -> None:
    if not _is_int(num_bits) or not MIN_BITS <= num_bits <= MAX_BITS:
        raise ValueError(f"num_bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {num_bits!r}")


def maxbound(num_bits: int = 8, unsigned: bool = False) -> int:
    """The integer that amax maps to: ``2**(num_bits - 1 + unsigned) - 1`` (127 for signed 8 bit).

    >>> maxbound(8), maxbound(8, unsigned=True), maxbound(4), maxbound((4, 3))
    (127, 255, 7, 448)
    """
    if _formats.is_fp8(num_bits):
        return int(_formats.FP8_E4M3_MAX)
    _check_bits(num_bits)
    return 2 ** (num_bits - 1 + int(unsigned)) - 1


def quant_range(num_bits: int = 8, unsigned: bool = False, narrow_range: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)`` of the integer grid.

    >>> quant_range(8), quant_range(8, narrow_range=True), quant_range(8, unsigned=True)
    ((-128, 127), (-127, 127), (0, 255))
    """
    if _formats.is_fp8(num_bits):
        return -int(_formats.FP8_E4M3_MAX), int(_formats.FP8_E4M3_MAX)
    qmax = maxbound(num_bits, unsigned)
    if unsigned:
        return 0, qmax
    return (-qmax if narrow_range else -qmax - 1), qmax


def amax_to_scale(amax: torch.Tensor, num_bits: int = 8, unsigned: bool = False) -> torch.Tensor:
    """The float32 step size ``max(amax, AMAX_EPS) / maxbound`` (ONNX QuantizeLinear's ``y_scale``).

    >>> amax_to_scale(torch.tensor([127.0, 0.0]))
    tensor([1.0000e+00, 4.6933e-10])
    """
    amax = torch.as_tensor(amax, dtype=torch.float32)
    if _formats.is_fp8(num_bits):
        return _formats.fp8_scale(amax)
    return amax.to(torch.float32).clamp(min=AMAX_EPS) / maxbound(num_bits, unsigned)


def amax_problem(amax: torch.Tensor | float, *, nonnegative: bool = True) -> str | None:
    """What makes ``amax`` (a tensor or a Python number) invalid, or ``None``: not a number, NaN, infinite or, with
    ``nonnegative``, negative. One device sync for a tensor. The one amax check: :func:`check_amax` raises with it.

    >>> amax_problem(torch.tensor([1.0, -2.0, float("nan")]))
    'must be finite and >= 0; got [-2.0, nan] among its values'
    >>> amax_problem(-1.0, nonnegative=False) is None, amax_problem("1")
    (True, 'must be a number, got str')
    """
    rule = "finite and >= 0" if nonnegative else "finite"
    if isinstance(amax, torch.Tensor):
        bad = ~torch.isfinite(amax)
        if nonnegative:
            bad |= amax < 0
        if bool(bad.any()):
            return f"must be {rule}; got {amax[bad].flatten()[:4].tolist()} among its values"
        return None
    if not _is_number(amax):
        return f"must be a number, got {type(amax).__name__}"
    if not math.isfinite(amax) or (nonnegative and amax < 0):
        return f"must be {rule}; got {amax!r}"
    return None


def check_amax(amax: torch.Tensor | float, what: str = "amax", *, nonnegative: bool = True,
               error: type[Exception] = ValueError) -> None:
    """Raises ``error`` (``ValueError``) naming ``what`` (e.g. the quantizer's amax) when :func:`amax_problem`
    finds one.

    >>> check_amax(torch.tensor(-1.0), "TensorQuantizer 'conv1._input_quantizer': amax")
    Traceback (most recent call last):
        ...
    ValueError: TensorQuantizer 'conv1._input_quantizer': amax must be finite and >= 0; got [-1.0] among its values
    """
    problem = amax_problem(amax, nonnegative=nonnegative)
    if problem is not None:
        raise error(f"{what} {problem}")


def reduce_amax(x: torch.Tensor, axis: int | tuple[int, ...] | None = None, keepdims: bool = True) -> torch.Tensor:
    """abs-max of ``x`` over every dimension except ``axis`` (the kept ones); float32, a scalar for ``axis=None``.

    >>> reduce_amax(torch.tensor([[1.0, -3.0], [0.5, 2.0]]), axis=0).flatten().tolist()
    [3.0, 2.0]
    """
    if axis is None:
        return x.detach().abs().amax().float()
    kept = _kept_dims(axis, x.dim())
    dims = [d for d in range(x.dim()) if d not in kept]
    if not dims:
        return x.detach().abs().float()
    return x.detach().abs().amax(dim=dims, keepdim=keepdims).float()


def reduce_range(x: torch.Tensor, axis: int | tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of ``x`` over every dimension except ``axis``, keepdims, float32 (scalars when ``axis=None``).

    >>> [t.flatten().tolist() for t in reduce_range(torch.tensor([[1.0, -3.0], [0.5, 2.0]]), axis=0)]
    [[-3.0, 0.5], [1.0, 2.0]]
    """
    x = x.detach()
    if axis is None:
        low, high = torch.aminmax(x)
        return low.float(), high.float()
    kept = _kept_dims(axis, x.dim())
    dims = [d for d in range(x.dim()) if d not in kept]
    if not dims:
        return x.float(), x.float()
    return x.amin(dim=dims, keepdim=True).float(), x.amax(dim=dims, keepdim=True).float()


def _kept_dims(axis: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    kept = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
        kept.append(a % ndim)
    return tuple(sorted(kept))


# --------------------------------------------------------------------------------------------------------------------
# Quantize / dequantize / fake-quantize with explicit scale
# --------------------------------------------------------------------------------------------------------------------


def _channel_axis(scale: torch.Tensor, x: torch.Tensor) -> int | None:
    """The one dimension along which ``scale`` varies, or None if it is a single value.

    Raises if ``scale`` does not broadcast to ``x`` or varies along more than one dimension (those cases are
    handled by the caller's plain-math path).
    """
    if scale.numel() == 1:
        return None
    if scale.dim() > x.dim():
        raise ValueError(f"scale/amax of shape {tuple(scale.shape)} has more dimensions than the tensor {tuple(x.shape)}")
    shape = [1] * (x.dim() - scale.dim()) + list(scale.shape)
    for d, (s, n) in enumerate(zip(shape, x.shape)):
        if s not in (1, n):
            raise ValueError(
                f"amax of shape {tuple(scale.shape)} does not match the tensor of shape {tuple(x.shape)}: "
                f"dimension {d} has {s} values for {n} channels"
            )
    varying = [d for d, s in enumerate(shape) if s != 1]
    return varying[0] if len(varying) == 1 else -1


_EAGER_TYPES = (torch.Tensor, torch.nn.Parameter)


def _tensor_ops_path(x: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
    """Whether :func:`fake_quantize` runs as vectorized tensor ops on one buffer instead of PyTorch's fused kernels.

    It does where autograd records nothing through the call (as inside :class:`FakeTensorQuantFunction`, whose
    forward runs without it) and

    * in eager execution on CPU, outside any tracing: the fused kernels' CPU loop is scalar, 3-30x slower on one
      core, the more the smaller the tensor (``benchmarks/core_ops.py``);
    * under ``torch.compile`` (not an export): inductor has no lowering of the fused kernels and would call them as
      opaque kernels; the tensor ops fuse with the clipping mask and the neighbouring ops into one loop.

    For finite inputs the numbers are the same (tested, ties included); a NaN stays NaN here, where the fused kernel
    gives ``qmin * scale``. Under the exporters (jit tracing, torch.export, both ONNX exporters), on other devices in
    eager execution and when autograd records through the call, the fused kernels run: the exporters turn them into
    QuantizeLinear/DequantizeLinear, and their gradient is the straight-through one.
    """
    if torch.is_grad_enabled() and (x.requires_grad or (scale is not None and scale.requires_grad)):
        return False
    if torch.compiler.is_compiling():
        return not torch.compiler.is_exporting()
    return type(x) in _EAGER_TYPES and x.device.type == "cpu" and not torch.jit.is_tracing()


def _fake_quantize_eager(x, scale, zero_point, qmin: int, qmax: int, out: torch.Tensor | None = None,
                         inv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The fused kernels' arithmetic in tensor ops: ``(clamp(round_half_even(x * (1 / scale)) + zp) - zp) * scale``
    (float32; ``zero_point`` None for 0), written into ``out`` if given (a float32 buffer of ``x``'s shape);
    ``inv_scale`` is ``torch.reciprocal(scale)``, computed here when None."""
    if inv_scale is None:
        inv_scale = torch.reciprocal(scale)
    q = (torch.mul(x, inv_scale) if out is None else torch.mul(x, inv_scale, out=out)).round_()
    if zero_point is None:
        return q.clamp_(qmin, qmax).mul_(scale)
    return q.add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


_logged_plain_paths: set[str] = set()


def _log_plain_path(reason: str) -> None:
    if reason not in _logged_plain_paths:
        _logged_plain_paths.add(reason)
        logger.info("fake quantization uses plain tensor math instead of the fused kernel: %s", reason)


def _quantize_plain(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int):
    inv_scale = torch.reciprocal(scale)
    return torch.clamp(torch.round(x * inv_scale) + zero_point, qmin, qmax)


def _resolve_range(qmin: int | None, qmax: int | None, num_bits: int, unsigned: bool, narrow_range: bool):
    """``(qmin, qmax)``: the ones given, the others from ``quant_range(num_bits, unsigned, narrow_range)``."""
    if qmin is None or qmax is None:
        low, high = quant_range(num_bits, unsigned, narrow_range)
        qmin, qmax = (low if qmin is None else qmin), (high if qmax is None else qmax)
    if qmin > qmax:
        raise ValueError(f"qmin {qmin} is above qmax {qmax}")
    return qmin, qmax


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | int = 0,
    qmin: int | None = None,
    qmax: int | None = None,
    *,
    num_bits: int = 8,
    unsigned: bool = False,
    narrow_range: bool = False,
) -> torch.Tensor:
    """Integer values ``clamp(round_half_even(x * (1 / scale)) + zero_point, qmin, qmax)`` as float32.

    ``scale`` (and ``zero_point``) broadcast against ``x``. Computed in float32 whatever ``x``'s dtype. ``qmin`` and
    ``qmax`` default to :func:`quant_range` of ``num_bits``, ``unsigned`` and ``narrow_range`` (the signed 8-bit
    ``[-128, 127]`` by default), so a 4-bit scale saturates on the 4-bit grid when ``num_bits=4`` is passed.

    >>> quantize(torch.tensor([0.25, 0.75, 300.0]), torch.tensor(0.5))
    tensor([  0.,   2., 127.])
    >>> quantize(torch.tensor([0.25, 0.75, 300.0]), amax_to_scale(torch.tensor(3.5), 4), num_bits=4)
    tensor([0., 2., 7.])
    """
    qmin, qmax = _resolve_range(qmin, qmax, num_bits, unsigned, narrow_range)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    zero_point = torch.as_tensor(zero_point, dtype=torch.float32, device=x.device)
    return _quantize_plain(x.float(), scale, zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int = 0) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32.

    >>> dequantize(torch.tensor([0.0, 2.0, 127.0]), torch.tensor(0.5))
    tensor([ 0.0000,  1.0000, 63.5000])
    """
    scale = torch.as_tensor(scale, dtype=torch.float32, device=q.device)
    zero_point = torch.as_tensor(zero_point, dtype=torch.float32, device=q.device)
    return (q.float() - zero_point) * scale


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | int = 0,
    qmin: int | None = None,
    qmax: int | None = None,
    *,
    num_bits: int = 8,
    unsigned: bool = False,
    narrow_range: bool = False,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` through PyTorch's fused kernels; float32 result, no custom gradient.

    This is the op the ONNX export traces: both exporters turn the fused kernels into QuantizeLinear ->
    DequantizeLinear. ``scale`` is a single value or varies along exactly one dimension of ``x``; anything else
    (several kept dimensions) is computed with the same math in plain tensor ops, and logged once.

    ``qmin``/``qmax`` default to the grid of ``num_bits``, ``unsigned`` and ``narrow_range``, as in :func:`quantize`.

    >>> fake_quantize(torch.tensor([0.25, 0.75, 300.0]), torch.tensor(0.5))
    tensor([ 0.0000,  1.0000, 63.5000])
    >>> fake_quantize(torch.tensor([300.0]), torch.tensor(0.5), num_bits=4)
    tensor([3.5000])
    """
    qmin, qmax = _resolve_range(qmin, qmax, num_bits, unsigned, narrow_range)
    x = x.float()
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if _tensor_ops_path(x, scale):
        _channel_axis(scale, x)  # the shape check, with its message
        zp = None
        if isinstance(zero_point, torch.Tensor):
            zp = torch.broadcast_to(zero_point.to(x.device).float().round(), scale.shape)
        elif zero_point != 0:
            zp = torch.full((), float(round(zero_point)), dtype=torch.float32, device=x.device)
        return _fake_quantize_eager(x, scale, zp, qmin, qmax)
    if isinstance(zero_point, torch.Tensor):
        zero_point = zero_point.to(x.device)
    else:  # a fill on the device, not a copy from the host (which would synchronise a GPU)
        zero_point = torch.full((), zero_point, dtype=torch.float32, device=x.device)
    axis = _channel_axis(scale, x)
    if axis is None:
        zp = zero_point.reshape(()).round().to(torch.int32)
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zp, qmin, qmax)
    if axis >= 0:
        zp = torch.broadcast_to(zero_point, scale.shape).reshape(-1).round().to(torch.int32)
        return torch.fake_quantize_per_channel_affine(x, scale.reshape(-1), zp, axis, qmin, qmax)
    _log_plain_path("scale varies along several dimensions")
    zp = zero_point.float()
    return (_quantize_plain(x, scale, zp, qmin, qmax) - zp) * scale


def affine_qparams(
    amin: torch.Tensor, amax: torch.Tensor, num_bits: int = 8, unsigned: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` of asymmetric quantization mapping ``[amin, amax]`` onto ``[qmin, qmax]``.

    The range is first widened to contain 0 (so that zero, e.g. padding, is exact); then
    ``scale = (amax - amin) / (qmax - qmin)`` (at least ``AMAX_EPS / (qmax - qmin)``) and
    ``zero_point = clamp(round_half_even(qmin - amin / scale), qmin, qmax)``, as a float32 tensor of integers.

    >>> scale, zp = affine_qparams(torch.tensor(-1.0), torch.tensor(3.0), unsigned=True)
    >>> round(scale.item(), 6), zp.item()
    (0.015686, 64.0)
    """
    qmin, qmax = quant_range(num_bits, unsigned, False)
    amin = torch.as_tensor(amin, dtype=torch.float32).clamp(max=0)
    amax = torch.as_tensor(amax, dtype=torch.float32).clamp(min=0)
    scale = (amax - amin).clamp(min=AMAX_EPS) / (qmax - qmin)
    zero_point = torch.clamp(torch.round(qmin - amin / scale), qmin, qmax)
    return scale, zero_point


class FakeAffineQuantFunction(torch.autograd.Function):
    """Asymmetric fake quantization; straight-through gradient inside ``[amin, amax]``, none for the range."""

    @staticmethod
    def forward(ctx, x, amin, amax, num_bits=8, unsigned=False):
        _check_bits(num_bits)
        amin = torch.as_tensor(amin, dtype=torch.float32, device=x.device)
        amax = torch.as_tensor(amax, dtype=torch.float32, device=x.device)
        _channel_axis(amax, x)
        if not bool(torch.isfinite(amin).all() & torch.isfinite(amax).all() & (amin <= amax).all()):
            raise ValueError("amin and amax must be finite with amin <= amax")
        scale, zero_point = affine_qparams(amin, amax, num_bits, unsigned)
        qmin, qmax = quant_range(num_bits, unsigned, False)
        xd = x.detach()
        ctx.save_for_backward((xd >= amin.clamp(max=0)) & (xd <= amax.clamp(min=0)))
        return fake_quantize(x, scale, zero_point, qmin, qmax).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (inside,) = ctx.saved_tensors
        zero = torch.zeros((), dtype=grad_out.dtype, device=grad_out.device)
        return torch.where(inside, grad_out, zero), None, None, None, None


def fake_affine_quant(
    x: torch.Tensor, amin: torch.Tensor, amax: torch.Tensor, num_bits: int = 8, unsigned: bool = False
) -> torch.Tensor:
    """Asymmetric fake quantization of ``x`` over ``[amin, amax]`` (see :func:`affine_qparams`).

    >>> fake_affine_quant(torch.tensor([-1.0, 0.0, 0.5, 3.0, 9.0]), torch.tensor(-1.0), torch.tensor(3.0),
    ...                   unsigned=True)
    tensor([-1.0039,  0.0000,  0.5020,  2.9961,  2.9961])
    """
    return FakeAffineQuantFunction.apply(x, amin, amax, num_bits, unsigned)


def _register_missing_fake_kernels() -> None:
    """torch ships no fake (meta) kernel for the op behind ``fake_quantize_per_tensor_affine`` with tensor scale,
    so torch.export / torch.compile cannot trace fake quantization with dynamic shapes. Register one: it only
    describes output shapes and dtypes; the numbers still come from torch's kernel."""
    try:

        @torch.library.register_fake("aten::_fake_quantize_per_tensor_affine_cachemask_tensor_qparams")
        def _(x, scale, zero_point, fake_quant_enabled, quant_min, quant_max):
            return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)

    except (RuntimeError, ValueError) as err:  # torch already has one: nothing to do
        logger.debug("fake kernel not registered: %s", err)


_register_missing_fake_kernels()


# --------------------------------------------------------------------------------------------------------------------
# amax-based functions with gradients (QAT)
# --------------------------------------------------------------------------------------------------------------------


# Checks of the values of amax and of the data cost a device-to-host synchronisation on every call (``bool(t)``), so
# the hot path does not run them: amax is validated where it is set (the quantizer's setter, calibration, state_dict
# loading, export), a learned amax is clamped to ``AMAX_EPS`` by :func:`amax_to_scale`, and unsigned quantization
# clamps negative data to 0. ``data_checks()`` turns the per-call checks back on, for debugging.
_DATA_CHECKS = [False]


def data_checks_enabled() -> bool:
    """Whether the quantization functions check amax and the data on every call (see :func:`data_checks`)."""
    return _DATA_CHECKS[0]


@contextlib.contextmanager
def data_checks(enabled: bool = True) -> Iterator[None]:
    """Within the block, every quantization call checks its amax (finite, ``>= 0``) and, when unsigned, that the
    data has no negative value, raising ``ValueError``; the previous setting is restored on exit.

    Off by default: each check is a device-to-host synchronisation per call, which stalls a GPU and breaks
    ``torch.compile(fullgraph=True)``. Without the checks a negative amax quantizes as ``AMAX_EPS`` and unsigned
    quantization clamps negative values to 0.

    >>> fake_quantize_by_amax(torch.tensor([-0.5, 1.0]), torch.tensor(1.0), unsigned=True)
    tensor([0., 1.])
    >>> with data_checks():
    ...     fake_quantize_by_amax(torch.tensor([-0.5, 1.0]), torch.tensor(1.0), unsigned=True)
    Traceback (most recent call last):
    ...
    ValueError: unsigned quantization of negative data (min -0.5); use a signed quantizer for this tensor
    """
    previous = _DATA_CHECKS[0]
    _DATA_CHECKS[0] = bool(enabled)
    try:
        yield
    finally:
        _DATA_CHECKS[0] = previous


def _prepare(x: torch.Tensor, amax: torch.Tensor, num_bits: int, unsigned: bool, narrow_range: bool):
    """amax as a tensor on ``x``'s device and ``(qmin, qmax)``; host-side checks only (bits, shapes, a Python
    number amax), the value checks when :func:`data_checks` is on."""
    _check_bits(num_bits)
    if not isinstance(amax, torch.Tensor):
        check_amax(amax)
        amax = torch.full((), float(amax), dtype=torch.float32, device=x.device)
    if amax.device != x.device:
        amax = amax.to(x.device)
    _channel_axis(amax, x)  # shape check with a clear message
    if _DATA_CHECKS[0]:
        check_amax(amax.detach())
        if unsigned and x.numel() and bool((x.detach().amin() < 0)):
            raise ValueError(
                f"unsigned quantization of negative data (min {x.detach().amin().item():.6g}); "
                "use a signed quantizer for this tensor"
            )
    qmin, qmax = quant_range(num_bits, unsigned, narrow_range)
    return amax, qmin, qmax


def _fake_tensor_quant_nograd(x, amax, num_bits, unsigned, narrow_range):
    """The forward of :class:`FakeTensorQuantFunction` alone, for calls that record no gradient (eval, no_grad):
    no mask of the clipped values is computed or kept."""
    amax_t, qmin, qmax = _prepare(x, amax, num_bits, unsigned, narrow_range)
    scale = amax_to_scale(amax_t.detach(), num_bits, unsigned)
    out = fake_quantize(x, scale, 0, qmin, qmax)
    return out if out.dtype == x.dtype else out.to(x.dtype)


class FakeTensorQuantFunction(torch.autograd.Function):
    """Fake quantization with a straight-through gradient and an LSQ-style gradient for amax.

    Backward:

    * ``d x_hat / d x`` is 1 where ``|x| <= amax`` and 0 elsewhere (pytorch_quantization's straight-through
      estimator);
    * ``d x_hat / d amax``, when amax requires grad, is ``(q - x / scale) / maxbound`` where ``|x| <= amax`` and
      ``q / maxbound`` where the input is clipped (q the clamped integer), summed over the elements that share an
      amax: the learned step size gradient of LSQ expressed for amax.
    """

    @staticmethod
    def forward(ctx, x, amax, num_bits=8, unsigned=False, narrow_range=False):
        amax_t, qmin, qmax = _prepare(x, amax, num_bits, unsigned, narrow_range)
        amax_f = amax_t.detach().float()
        scale = amax_to_scale(amax_f, num_bits, unsigned)
        xd = x.detach()
        if xd.dtype == torch.float32 and _tensor_ops_path(xd, scale) and not torch.compiler.is_compiling():
            # eager CPU: |x| and then the output go into one buffer, a large allocation fewer per call
            _channel_axis(scale, xd)
            out = torch.abs(xd)
            inside = out <= amax_f
            out = _fake_quantize_eager(xd, scale, None, qmin, qmax, out=out)
        else:
            out = fake_quantize(x, scale, 0, qmin, qmax)
            inside = xd.abs() <= amax_f
        if isinstance(amax, torch.Tensor) and amax.requires_grad:
            ctx.save_for_backward(inside, x, scale, amax_t)
            ctx.bounds = (qmin, qmax, maxbound(num_bits, unsigned))
        else:
            ctx.save_for_backward(inside)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        inside = ctx.saved_tensors[0]
        grad_x = torch.where(inside, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device))
        grad_amax = None
        if len(ctx.saved_tensors) > 1:
            _, x, scale, amax = ctx.saved_tensors
            qmin, qmax, mb = ctx.bounds
            xs = x.float() * torch.reciprocal(scale)
            q = torch.clamp(torch.round(xs), qmin, qmax)
            dscale = torch.where(inside, q - xs, q)
            g = (grad_out.float() * dscale) / mb
            # sum over the broadcast dimensions down to amax's shape
            lead = g.dim() - amax.dim()
            if lead:
                g = g.sum(dim=tuple(range(lead)))
            dims = tuple(d for d, s in enumerate(amax.shape) if s == 1 and g.shape[d] != 1)
            if dims:
                g = g.sum(dim=dims, keepdim=True)
            grad_amax = g.reshape(amax.shape).to(amax.dtype)
        return grad_x, grad_amax, None, None, None


class TensorQuantFunction(torch.autograd.Function):
    """Real quantization: returns ``(q, scale)``, q the integer values in float32 (exact for every supported bit
    width, which fp16/bf16 are not); straight-through gradient."""

    @staticmethod
    def forward(ctx, x, amax, num_bits=8, unsigned=False, narrow_range=False):
        amax_t, qmin, qmax = _prepare(x, amax, num_bits, unsigned, narrow_range)
        amax_f = amax_t.detach().float()
        scale = amax_to_scale(amax_f, num_bits, unsigned)
        ctx.save_for_backward(x.detach().abs() <= amax_f)
        q = _quantize_plain(x.float(), scale, torch.zeros((), device=x.device), qmin, qmax)
        ctx.mark_non_differentiable(scale)
        return q, scale

    @staticmethod
    def backward(ctx, grad_q, grad_scale):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad_q, torch.zeros((), dtype=grad_q.dtype, device=grad_q.device)), None, None, None, None


def fake_quantize_by_amax(
    x: torch.Tensor,
    amax: torch.Tensor,
    num_bits: int = 8,
    unsigned: bool = False,
    narrow_range: bool = False,
) -> torch.Tensor:
    """Fake-quantizes ``x`` with the given ``amax`` (a scalar, or keepdims-shaped for per-channel).

    fp16/bf16 inputs are computed in float32 and returned in their dtype. See :class:`FakeTensorQuantFunction`
    for the gradients.

    >>> x = torch.tensor([-2.0, -1.0, 0.3, 1.0], requires_grad=True)
    >>> y = fake_quantize_by_amax(x, torch.tensor(1.0))
    >>> y.sum().backward()
    >>> x.grad
    tensor([0., 1., 1., 1.])
    """
    if _formats.is_fp8(num_bits):
        return _formats.fake_fp8_quant(x, amax)
    if torch.is_grad_enabled() and (x.requires_grad or (isinstance(amax, torch.Tensor) and amax.requires_grad)):
        return FakeTensorQuantFunction.apply(x, amax, num_bits, unsigned, narrow_range)
    return _fake_tensor_quant_nograd(x, amax, num_bits, unsigned, narrow_range)


class FakeQuantParams(NamedTuple):
    """What symmetric integer fake quantization with one amax needs, computed once by :func:`fake_quant_params`:
    the float32 step ``scale`` (:func:`amax_to_scale`), its reciprocal and the integer range."""

    scale: torch.Tensor
    inv_scale: torch.Tensor
    qmin: int
    qmax: int


def fake_quant_params(amax: torch.Tensor, num_bits: int = 8, unsigned: bool = False,
                      narrow_range: bool = False) -> FakeQuantParams:
    """The :class:`FakeQuantParams` of ``amax`` (a tensor: a scalar or keepdims-shaped per channel; detached) for
    :func:`fake_quantize_with_params`. Integer formats only (FP8 has its own path, :mod:`qdq.formats`).

    >>> p = fake_quant_params(torch.tensor(1.0), num_bits=4)
    >>> round(p.scale.item(), 6), p.qmin, p.qmax
    (0.142857, -8, 7)
    """
    if _formats.is_fp8(num_bits):
        raise ValueError("fake_quant_params: integer formats only; FP8 quantizes through qdq.formats")
    _check_bits(num_bits)
    scale = amax_to_scale(torch.as_tensor(amax).detach(), num_bits, unsigned)
    qmin, qmax = quant_range(num_bits, unsigned, narrow_range)
    return FakeQuantParams(scale, torch.reciprocal(scale), qmin, qmax)


def fake_quantize_with_params(x: torch.Tensor, params: FakeQuantParams) -> torch.Tensor:
    """:func:`fake_quantize_by_amax` with the scale computed ahead (:func:`fake_quant_params`): the same numbers,
    in ``x``'s dtype, without recomputing the scale on every call. For forwards that record no gradient (eval,
    ``no_grad``): training goes through :func:`fake_quantize_by_amax` (its straight-through and amax gradients).
    The per-call value checks of :func:`data_checks` are not made here.

    >>> x = torch.tensor([-2.0, 0.3, 1.0])
    >>> p = fake_quant_params(torch.tensor(1.0))
    >>> torch.equal(fake_quantize_with_params(x, p), fake_quantize_by_amax(x, torch.tensor(1.0)))
    True
    """
    scale = params.scale
    if scale.device != x.device:
        scale = scale.to(x.device)
    xf = x.float()
    if _tensor_ops_path(xf, scale):
        _channel_axis(scale, xf)  # the shape check, with its message
        out = _fake_quantize_eager(xf, scale, None, params.qmin, params.qmax,
                                   inv_scale=params.inv_scale if params.inv_scale.device == x.device else None)
    else:
        out = fake_quantize(xf, scale, 0, params.qmin, params.qmax)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def quantize_by_amax(
    x: torch.Tensor,
    amax: torch.Tensor,
    num_bits: int = 8,
    unsigned: bool = False,
    narrow_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes ``x``: returns the integer values (in a float tensor) and the float32 step ``scale``.

    >>> q, scale = quantize_by_amax(torch.tensor([0.5, -3.0]), torch.tensor(2.0), num_bits=4)
    >>> q, scale
    (tensor([ 2., -8.]), tensor(0.2857))
    """
    if _formats.is_fp8(num_bits):  # the FP8 values (as float32) and the scale
        amax = torch.as_tensor(amax, dtype=torch.float32, device=x.device)
        scale = _formats.fp8_scale(amax.detach())
        return _formats.quantize_fp8(x, scale).float(), scale
    return TensorQuantFunction.apply(x, amax, num_bits, unsigned, narrow_range)


# --------------------------------------------------------------------------------------------------------------------
# pytorch_quantization's functions, under their names, with their arguments and results
# --------------------------------------------------------------------------------------------------------------------
# Code written for pytorch_quantization calls these; qdq itself calls quantize_by_amax / fake_quantize_by_amax. The
# numbers come from the same helpers; what differs is pytorch_quantization's conventions: narrow_range=True by
# default, the scale returned as maxbound / amax (``q / scale`` dequantizes), amax <= 2**-24 quantizing to exactly 0
# (scale 1), TypeError for negative unsigned data, ValueError when a half tensor's scale overflows fp16.
# docs/pytorch_quantization.md lists every difference.

_PQ_EPS = 2.0**-24


def _pq_check(inputs: torch.Tensor, amax, unsigned: bool) -> torch.Tensor:
    if not isinstance(amax, torch.Tensor):
        amax = torch.tensor(amax, dtype=torch.float32, device=inputs.device)
    if unsigned and inputs.numel() and bool(inputs.detach().min() < 0):
        raise TypeError("Negative values encountered in unsigned quantization.")
    if amax.numel() and bool(amax.detach().min() < 0):
        raise ValueError("Negative values in amax")
    return amax


def fake_tensor_quant(inputs: torch.Tensor, amax, num_bits: int = 8, unsigned: bool = False,
                      narrow_range: bool = True) -> torch.Tensor:
    """pytorch_quantization's ``fake_tensor_quant``: ``narrow_range=True`` by default, amax <= 2**-24 gives 0.

    The numbers are those of :func:`fake_quantize_by_amax` (round half to even, computed in float32, returned in the
    input's dtype), on every device; the straight-through gradient for ``inputs`` is the same, and amax gets none
    (qdq's learned amax uses :func:`fake_quantize_by_amax`).

    >>> x = torch.tensor([-2.0, -1.0, 0.5, 1.0])
    >>> fake_tensor_quant(x, torch.tensor(1.0)).tolist()[0]       # narrow range: clipped to -127 steps
    -1.0
    >>> fake_tensor_quant(x, torch.tensor(0.0)).tolist()
    [0.0, 0.0, 0.0, 0.0]
    """
    amax = _pq_check(inputs, amax, unsigned).detach()  # as in pytorch_quantization, amax gets no gradient here
    out = fake_quantize_by_amax(inputs, amax, num_bits, unsigned, narrow_range)
    tiny = amax.detach() <= _PQ_EPS
    return torch.where(tiny.to(out.device), torch.zeros((), dtype=out.dtype, device=out.device), out)


#: pytorch_quantization's CPU reference of :func:`fake_tensor_quant`; the same function here.
legacy_fake_tensor_quant = fake_tensor_quant


def tensor_quant(inputs: torch.Tensor, amax, num_bits: int = 8, unsigned: bool = False,
                 narrow_range: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """pytorch_quantization's ``tensor_quant``: ``(q, scale)`` with ``scale = maxbound / amax`` in the input's
    dtype (``q / scale`` dequantizes) and q in the input's dtype; ``narrow_range=True`` by default.

    qdq's own :func:`quantize_by_amax` returns the step ``amax / maxbound`` instead (ONNX's ``y_scale``).

    >>> q, scale = tensor_quant(torch.tensor([0.5, -3.0]), torch.tensor(2.0), num_bits=4)
    >>> q.tolist(), round(scale.item(), 4)
    ([2.0, -7.0], 3.5)
    """
    amax = _pq_check(inputs, amax, unsigned).detach()
    q, _ = quantize_by_amax(inputs, amax, num_bits, unsigned, narrow_range)
    amax_f = amax.detach().float().to(q.device)
    tiny = amax_f <= _PQ_EPS
    scale = torch.where(tiny, torch.ones((), device=q.device), maxbound(num_bits, unsigned) / amax_f.clamp_min(_PQ_EPS))
    q = torch.where(tiny, torch.zeros((), dtype=q.dtype, device=q.device), q)
    if inputs.dtype == torch.half and bool(scale.max() > 65504):
        raise ValueError(f"scale is too large for FP16 with amax={amax}")
    return q.to(inputs.dtype), scale.to(inputs.dtype)


class _FakeAffineTensorQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, min_range, max_range, num_bits=8):
        ctx.save_for_backward(inputs, min_range, max_range)
        step = (max_range - min_range) / (2.0**num_bits - 1)
        min_bound, max_bound = -(2.0 ** (num_bits - 1)), 2.0 ** (num_bits - 1) - 1
        quant_zero = torch.round(min_range / step) - min_bound
        quantized = torch.clamp(torch.round(inputs / step) - quant_zero, min_bound, max_bound)
        return (quantized + quant_zero) * step

    @staticmethod
    def backward(ctx, grad_out):
        inputs, min_range, max_range = ctx.saved_tensors
        inside = (inputs <= max_range) & (inputs >= min_range)
        return torch.where(inside, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device)), None, None, None


def fake_affine_tensor_quant(inputs: torch.Tensor, min_range: torch.Tensor, max_range: torch.Tensor,
                             num_bits: int = 8) -> torch.Tensor:
    """pytorch_quantization's gemmlowp-style affine fake quantization (per tensor, scalar ``min_range``/``max_range``).

    qdq's own asymmetric quantization is :func:`fake_affine_quant` (zero point from :func:`affine_qparams`).

    >>> x = torch.tensor([0.0, 0.5, 1.0])
    >>> [round(v * 255, 3) for v in fake_affine_tensor_quant(x, x.min(), x.max()).tolist()]
    [0.0, 127.0, 255.0]
    """
    return _FakeAffineTensorQuant.apply(inputs, min_range, max_range, num_bits)


class _ScaledE4M3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, amax=None, E=4, M=3):
        if (E, M) != (4, 3):
            raise NotImplementedError(f"scaled_e4m3: only E=4, M=3 is supported, got E={E}, M={M}")
        bound = torch.tensor(_formats.FP8_E4M3_MAX, device=inputs.device)
        amax_t = bound if amax is None else torch.as_tensor(amax, dtype=torch.float32, device=inputs.device)
        ctx.save_for_backward(inputs, amax_t)
        # qdq's one FP8 arithmetic (that of TensorQuantizer(num_bits=(4, 3)) and of the exported Q/DQ)
        y = _formats.fake_quantize_fp8(inputs, _formats.fp8_scale(amax_t.detach()))
        return torch.where(inputs.abs() < _PQ_EPS, torch.zeros((), device=inputs.device), y).to(inputs.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        inputs, amax = ctx.saved_tensors
        inside = inputs.abs() <= amax
        return torch.where(inside, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device)), None, None, None


def scaled_e4m3(inputs: torch.Tensor, amax: torch.Tensor | None = None, E: int = 4, M: int = 3) -> torch.Tensor:
    """pytorch_quantization's ``scaled_e4m3``: fake FP8 E4M3 with ``amax`` mapped to 448 (``None``: no scaling),
    saturating at +-448, magnitudes below 2**-24 set to 0; torch's float8_e4m3fn cast does the rounding.

    The arithmetic is :func:`qdq.formats.fake_quantize_fp8` with ``scale = amax / 448`` (divide, cast, multiply, as
    ONNX's FP8 QuantizeLinear/DequantizeLinear compute), so an FP8 :class:`~qdq.nn.TensorQuantizer` gives exactly
    ``scaled_e4m3(x, quantizer._get_amax(x))``. pytorch_quantization multiplied by ``448 / amax`` and divided by it:
    results can differ from it by one float32 ulp.

    >>> scaled_e4m3(torch.tensor([0.3, 500.0, -1e-9])).tolist()
    [0.3125, 448.0, 0.0]
    """
    return _ScaledE4M3.apply(inputs, amax, E, M)
