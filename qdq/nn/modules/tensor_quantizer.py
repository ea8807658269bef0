"""TensorQuantizer: the module that holds a quantizer's state and calls the math and the calibrator.

State: the ``_amax`` buffer (``None`` until calibrated or given; a ``Parameter`` when learned), the descriptor's
settings and four public switches. Work: :func:`qdq.math.fake_quant.fake_quantize_by_amax` for the numbers and a
calibrator from :mod:`qdq.calib` for the statistics.

=====================  ===========================================================================
switch                 effect on ``forward(x)``
=====================  ===========================================================================
``disable()``          returns ``x`` untouched (nothing else runs)
``enable_calib()``     the calibrator collects ``x``
``enable_clip()``      ``x`` is clamped to ``[-amax, amax]`` (``[0, amax]`` unsigned) before quantization
``enable_quant()``     ``x`` is fake-quantized (or quantized, with ``fake_quant=False``)
=====================  ===========================================================================

Calibration and quantization can run in the same forward. A quantizer with no amax quantizes each batch with its
own abs-max (dynamic quantization).

A weight (a ``Parameter``) quantized in a forward that records no gradient (eval, ``no_grad``) is fake-quantized
once and reused while neither it nor amax changed, as seen from their version counters and storage (host-side
metadata, no synchronisation); after writing a weight through ``.data``, call :meth:`TensorQuantizer.clear_cache`.

Example:
    >>> import torch
    >>> from qdq.nn import TensorQuantizer
    >>> from qdq.tensor_quant import QuantDescriptor
    >>> q = TensorQuantizer(QuantDescriptor(num_bits=8, calib_method="histogram"))
    >>> q.disable_quant(); q.enable_calib()
    >>> _ = q(torch.randn(1000))
    >>> q.load_calib_amax(method="percentile", percentile=99.9)
    >>> q.enable_quant(); q.disable_calib()
    >>> q
    TensorQuantizer(8bit fake per-tensor amax=... calibrator=HistogramCalibrator quant)
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch
from torch import nn

from qdq import calib
from qdq.math import formats
from qdq.calib.calibrator import NoDataCollectedError, ShapeChangedError
from qdq.nn.modules.fp8_export import fp8_qdq
from qdq.math.descriptor import QuantDescriptor
from qdq.math.fake_quant import (data_checks_enabled, fake_quant_params, fake_quantize_by_amax,
                                 fake_quantize_with_params, quantize_by_amax)
from qdq.math.quantize import affine_qparams, fake_affine_quant
from qdq.math.ranges import amax_problem, amax_to_scale, check_amax, maxbound, quant_range, reduce_amax, reduce_range

__all__ = ["TensorQuantizer"]

logger = logging.getLogger(__name__)


class TensorQuantizer(nn.Module):
    """Quantizes the tensors that pass through it, and calibrates its amax on them.

    Args:
        quant_desc: a :class:`~qdq.math.descriptor.QuantDescriptor` (8-bit per-tensor when omitted).
        disabled: start disabled (``forward`` returns its input).
        if_quant: quantize in ``forward``.
        if_clip: clamp to amax before quantizing.
        if_calib: collect calibration statistics in ``forward``.
    """

    def __init__(
        self,
        quant_desc: QuantDescriptor | None = None,
        disabled: bool = False,
        if_quant: bool = True,
        if_clip: bool = False,
        if_calib: bool = False,
    ):
        super().__init__()
        if quant_desc is None:
            quant_desc = QuantDescriptor()
        if not isinstance(quant_desc, QuantDescriptor):
            raise TypeError(f"TensorQuantizer needs a QuantDescriptor, got {type(quant_desc).__name__}")
        self._quant_desc = quant_desc
        self._num_bits = quant_desc.num_bits
        self._fake_quant = quant_desc.fake_quant
        self._axis = quant_desc.axis
        self._scale_amax = quant_desc.scale_amax
        self._learn_amax = quant_desc.learn_amax
        self._unsigned = quant_desc.unsigned
        self._narrow_range = quant_desc.narrow_range
        self._symmetric = quant_desc.symmetric
        self._block_size = quant_desc.block_size
        self.name: str | None = quant_desc.name

        self._disabled = bool(disabled)
        self._if_quant = bool(if_quant)
        self._if_clip = bool(if_clip)
        self._if_calib = bool(if_calib)
        self._export_mode = False
        self._collected = None  # (id, version) of the last Parameter collected
        self._scale: torch.Tensor | None = None
        self._device = torch.device("cpu")

        self._set_amax_buffer(None)
        self.register_buffer("_amin", None)  # lower bound of asymmetric quantization
        self.register_buffer("_pre_quant_scale", None)  # pytorch_quantization's per-channel input multiplier
        if quant_desc.amax is not None:
            self.amax = torch.tensor(quant_desc.amax, dtype=torch.float32)

        if quant_desc.calib_method != "max":  # "histogram", or a search by name: a histogram it will search
            self._calibrator = calib.HistogramCalibrator(self._num_bits, self._axis, self._unsigned,
                                                         num_bins=quant_desc.calib_args["num_bins"])
        else:  # an asymmetric unsigned quantizer takes negative data (its zero point moves), so calibrate signed
            axis = (0, 1) if self._block_size else self._axis  # blocked: per (row, block) of formats.block_view
            self._calibrator = calib.MaxCalibrator(self._num_bits, axis, self._unsigned and self._symmetric)

        if self._learn_amax and self._amax is not None:
            self.init_learn_amax()

    # ----------------------------------------------------------------------------------------------------------
    # read-only settings
    # ----------------------------------------------------------------------------------------------------------
    quant_desc = property(lambda self: self._quant_desc)
    num_bits = property(lambda self: self._num_bits, lambda self, v: self._set_setting("num_bits", v))
    unsigned = property(lambda self: self._unsigned, lambda self, v: self._set_setting("unsigned", v))
    narrow_range = property(lambda self: self._narrow_range, lambda self, v: self._set_setting("narrow_range", v))
    symmetric = property(lambda self: self._symmetric)
    axis = property(lambda self: self._axis)
    fake_quant = property(lambda self: self._fake_quant)
    scale_amax = property(lambda self: self._scale_amax)
    learn_amax = property(lambda self: isinstance(self._amax, nn.Parameter))
    block_size = property(lambda self: self._block_size)

    #: pytorch_quantization's class-wide export switch: while True (set on the class, as the YOLOv5 and BEVFusion
    #: export scripts do), ``forward`` is the export forward with each quantizer's own amax, which both of torch's
    #: ONNX exporters write as QuantizeLinear/DequantizeLinear. A quantizer without amax then raises, as
    #: :func:`qdq.export_onnx` does (inside the rules step every quantizer carries its tag scale instead).
    use_fb_fake_quant = False
    _enable_onnx_export = False  # set by qdq.transform.module_map.enable_onnx_export(), the same effect

    def _set_setting(self, key: str, value) -> None:
        """pytorch_quantization's setters of num_bits / unsigned / narrow_range: the descriptor follows."""
        self._quant_desc = self._quant_desc.replace(**{key: value})  # validates the value
        setattr(self, "_" + key, getattr(self._quant_desc, key))
        if self._calibrator is not None and hasattr(self._calibrator, "_" + key):
            setattr(self._calibrator, "_" + key, getattr(self._quant_desc, key))

    @property
    def maxbound(self) -> int:
        """The integer amax maps to (127 for signed 8 bit)."""
        return maxbound(self._num_bits, self._unsigned)

    @property
    def quant_range(self) -> tuple[int, int]:
        """``(qmin, qmax)``."""
        return quant_range(self._num_bits, self._unsigned, self._narrow_range)

    @property
    def is_enabled(self) -> bool:
        return not self._disabled

    # ----------------------------------------------------------------------------------------------------------
    # amax
    # ----------------------------------------------------------------------------------------------------------
    @property
    def amax(self) -> torch.Tensor | None:
        """The calibrated (or given, or learned) amax; ``None`` while not calibrated."""
        return self._amax

    @amax.setter
    def amax(self, value: Any) -> None:
        if value is None:
            self._set_amax_buffer(None)
            return
        value = _amax_tensor(value, self._label())
        check_amax(value, f"{self._label()}: amax")
        value = value.to(device=self._device, dtype=torch.float32)
        if isinstance(self._amax, nn.Parameter):
            if value.shape != self._amax.shape:
                raise ValueError(
                    f"{self._label()}: learned amax has shape {tuple(self._amax.shape)}, got {tuple(value.shape)}"
                )
            with torch.no_grad():
                self._amax.copy_(value)
        else:
            self._set_amax_buffer(value.clone())

    def _set_amax_buffer(self, value: torch.Tensor | None) -> None:
        """Stores amax as a plain buffer (undoing a learned Parameter, if any)."""
        self._parameters.pop("_amax", None)
        self._buffers.pop("_amax", None)
        self.register_buffer("_amax", value)

    @property
    def pre_quant_scale(self) -> torch.Tensor | None:
        """pytorch_quantization's ``pre_quant_scale`` (SmoothQuant/AWQ-style): when set, ``forward`` multiplies its
        input by it (broadcasting) before calibrating and quantizing; the export writes the multiplication too."""
        return self._pre_quant_scale

    @pre_quant_scale.setter
    def pre_quant_scale(self, value: Any) -> None:
        if value is None:
            self._pre_quant_scale = None
            return
        value = torch.as_tensor(value, dtype=torch.float32).detach()
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{self._label()}: pre_quant_scale must be finite")
        self._pre_quant_scale = value.to(self._device).clone()

    def effective_amax(self) -> torch.Tensor | None:
        """amax as used to quantize: multiplied by ``scale_amax`` when the descriptor sets it."""
        amax = self._amax
        if amax is not None and self._scale_amax is not None:
            amax = amax * self._scale_amax
        return amax

    @property
    def amin(self) -> torch.Tensor | None:
        """Lower bound of an asymmetric quantizer's range (``amax`` is the upper bound); ``None`` if symmetric."""
        return self._amin

    @amin.setter
    def amin(self, value: Any) -> None:
        if value is None:
            self._amin = None
            return
        if self._symmetric:
            raise ValueError(f"{self._label()}: amin is for asymmetric quantizers (QuantDescriptor(symmetric=False))")
        value = _amax_tensor(value, self._label(), "amin")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{self._label()}: amin must be finite")
        self._amin = value.to(device=self._device, dtype=torch.float32).clone()

    @property
    def scale(self) -> torch.Tensor | None:
        """The step size (ONNX's ``y_scale``): ``amax / maxbound``, or the affine scale when asymmetric; ``None``
        without amax."""
        amax = self.effective_amax()
        if amax is None:
            return None
        if not self._symmetric:
            return affine_qparams(self._amin, amax.detach(), self._num_bits, self._unsigned)[0]
        return amax_to_scale(amax.detach(), self._num_bits, self._unsigned)

    @property
    def zero_point(self) -> torch.Tensor | None:
        """The zero point (0 when symmetric); ``None`` without amax."""
        amax = self.effective_amax()
        if amax is None:
            return None
        if not self._symmetric:
            return affine_qparams(self._amin, amax.detach(), self._num_bits, self._unsigned)[1]
        return torch.zeros_like(amax)

    step_size = scale

    def load_calib_amax(self, *args: Any, strict: bool = True, **kwargs: Any) -> None:
        """Sets amax from the calibrator (arguments go to its ``compute_amax``, e.g. ``method="mse"``).

        Without a method, a histogram calibrator runs the search the descriptor names (``calib_method="entropy"``)
        with the descriptor's ``calib_args``; a method given here wins (with the descriptor's parameters only when it
        is the same search). A calibrator that collected nothing raises ``RuntimeError`` naming this quantizer; with
        ``strict=False`` it logs a warning and leaves amax as it was.
        """
        if self._calibrator is None:
            raise RuntimeError(f"{self._label()} has no calibrator")
        args, kwargs = self._search_arguments(args, kwargs)
        try:
            method = kwargs.get("method", args[0] if args else None)
            if formats.is_fp8(self._num_bits) and method in ("entropy", "kld"):
                raise ValueError(f"method {method!r} spreads the histogram over integer levels; FP8 is calibrated "
                                 "with 'max', 'mse' (on the FP8 grid) or 'percentile'")
            if self._symmetric:
                amax = self._calibrator.compute_amax(*args, **kwargs)
            else:
                amin, amax = self._calibrator.compute_range()
        except NoDataCollectedError:
            msg = (
                f"{self._label()}: its calibrator collected no data (pytorch_quantization: 'Calibrator returned "
                "None'), so there is no amax to load (did calibration data reach this layer?)"
            )
            if strict:
                raise RuntimeError(msg) from None
            logger.warning("%s; amax left unchanged", msg)
            return
        except ValueError as err:
            raise ValueError(f"{self._label()}: {err}") from None
        check_amax(amax, f"{self._label()}: calibrated amax")
        zero = int((amax == 0).sum())
        if zero:  # a zero channel (pruned or dead) quantizes to exact zeros: worth a note, worrying only per tensor
            level = logging.INFO if amax.numel() > 1 and zero < amax.numel() else logging.WARNING
            logger.log(level, "%s: calibrated amax is 0 for %d of %d values", self._label(), zero, amax.numel())
        if isinstance(self._amax, nn.Parameter) and self._amax.shape != amax.shape:
            self._set_amax_buffer(None)
        if not self._symmetric:
            self.amin = amin
            amax = amax.clamp(min=0)  # the upper bound: it may be below 0 where amin rules, the range contains 0
        self.amax = amax
        if self._learn_amax and not isinstance(self._amax, nn.Parameter):
            self.init_learn_amax()

    def _search_arguments(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``load_calib_amax``'s arguments completed from the descriptor's search, for a histogram calibrator."""
        search = self._quant_desc.search
        if search is None or not isinstance(self._calibrator, calib.HistogramCalibrator):
            return args, kwargs
        method = kwargs.get("method", args[0] if args else None)
        if method is not None and method != search:
            return args, kwargs
        params = {k: v for k, v in self._quant_desc.calib_args.items() if k != "num_bins"}
        if method is None:
            return args, {"method": search, **params, **kwargs}
        return args, {**params, **kwargs}

    @property
    def clip(self) -> "LearnedRange":
        """pytorch_quantization's learned range, ``quantizer.clip``, present only while amax is learned.

        ``clip.clip_value_max`` is the learned amax ``Parameter`` itself (reads, writes and gradients are amax's);
        ``clip.clip_value_min`` is ``-amax`` (qdq's learned range is symmetric), a read-only tensor: writing it
        raises. ``clip(x)`` clamps ``x`` to the range. Not a submodule: the checkpoint key stays ``_amax``.

        >>> q = TensorQuantizer(QuantDescriptor(amax=0.5, learn_amax=True))
        >>> q.clip.clip_value_min.item(), q.clip.clip_value_max is q.amax
        (-0.5, True)
        """
        if not isinstance(self._amax, nn.Parameter):  # (hasattr(q, "clip") is False, as in pytorch_quantization)
            raise AttributeError(f"{self._label()} has no learned range 'clip': its amax is not learned")
        return LearnedRange(self._amax)

    def init_learn_amax(self) -> None:
        """Makes amax a trainable ``Parameter`` (its gradient comes from the fake-quant function)."""
        if self._amax is None:
            raise RuntimeError(f"{self._label()}: cannot learn amax before it has a value; calibrate first")
        if not isinstance(self._amax, nn.Parameter):
            value = self._amax.detach().clone()
            self._buffers.pop("_amax", None)
            self.register_parameter("_amax", nn.Parameter(value))
        self._learn_amax = True

    # ----------------------------------------------------------------------------------------------------------
    # switches
    # ----------------------------------------------------------------------------------------------------------
    def enable(self) -> None:
        self._disabled = False

    def disable(self) -> None:
        self._disabled = True

    def enable_quant(self) -> None:
        self._if_quant = True

    def disable_quant(self) -> None:
        self._if_quant = False

    def enable_calib(self) -> None:
        if self._calibrator is None:
            raise RuntimeError(f"{self._label()} has no calibrator")
        self._if_calib = True

    def disable_calib(self) -> None:
        self._if_calib = False

    def enable_clip(self) -> None:
        self._if_clip = True

    def disable_clip(self) -> None:
        self._if_clip = False

    @property
    def calibrator(self):
        """The calibrator (``_calibrator`` in pytorch_quantization-era code)."""
        return self._calibrator

    def set_calibrator(self, calibrator) -> None:
        """Replaces the calibrator (a :mod:`qdq.calib` calibrator, or ``None`` for none)."""
        if calibrator is not None and not isinstance(calibrator, calib._Calibrator):
            raise TypeError(f"{self._label()}: a calibrator must derive from qdq.calib's _Calibrator")
        self._calibrator = calibrator

    def reset_calib(self) -> None:
        """Forgets what the calibrator collected."""
        self._collected = None
        if self._calibrator is not None:
            self._calibrator.reset()

    def state(self) -> dict[str, bool]:
        """The switches, for code that saves and restores them."""
        return {
            "disabled": self._disabled,
            "if_quant": self._if_quant,
            "if_calib": self._if_calib,
            "if_clip": self._if_clip,
        }

    def set_state(self, state: dict[str, bool]) -> None:
        """Restores switches saved by :meth:`state`."""
        missing = [k for k in ("disabled", "if_quant", "if_calib", "if_clip") if k not in state]
        if missing:
            raise KeyError(f"{self._label()}: the saved state lacks {missing} (save it with state())")
        self._disabled = bool(state["disabled"])
        self._if_quant = bool(state["if_quant"])
        self._if_calib = bool(state["if_calib"])
        self._if_clip = bool(state["if_clip"])

    # ----------------------------------------------------------------------------------------------------------
    # forward
    # ----------------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._disabled:
            return x
        if self._pre_quant_scale is not None:
            x = x * self._pre_quant_scale.to(x.dtype)
        if self._export_mode:
            return self._export_forward(x)
        if TensorQuantizer.use_fb_fake_quant or TensorQuantizer._enable_onnx_export:
            return self._fb_fake_quant_forward(x)
        if self._if_calib:
            # a weight (a Parameter) seen again unchanged adds nothing: collect it once per version
            key = (id(x), x._version) if isinstance(x, nn.Parameter) else None
            if key is None or key != self._collected:
                try:
                    self._calibrator.collect(formats.block_view(x, self._block_size) if self._block_size else x)
                except ShapeChangedError as err:  # keeps its class: both ValueError and RuntimeError
                    raise ShapeChangedError(f"{self._label()}: {err}") from None
                except ValueError as err:  # negative data for an unsigned quantizer, an axis beyond x's dims
                    raise ValueError(f"{self._label()}: {err}") from None
                self._collected = key
        if self._if_quant and isinstance(x, nn.Parameter) and self._cacheable(x):
            return self._cached_quant_forward(x)
        if self._if_clip:
            x = self._clip(x)
        if self._if_quant:
            x = self._quant_forward(x)
        return x

    # a weight seen again unchanged, in a forward that records no gradient, is fake-quantized once ------------------
    def _cacheable(self, x: torch.Tensor) -> bool:
        amax = self._amax
        return not (
            amax is None
            or not self._symmetric
            or not self._fake_quant
            or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (x.requires_grad or amax.requires_grad))
        )

    def _cached_quant_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quantized weight, reused while neither the weight nor amax changed.

        Changes are seen through the tensors' version counters (bumped by every in-place write: optimizer steps,
        ``copy_``, ``load_state_dict``), their storage (``.to()``, ``.half()``, ``param.data = ...``) and identity,
        all host-side metadata: no synchronisation. Writes through ``param.data`` (``w.data.mul_(2)``) bypass the
        version counter; :meth:`clear_cache` forgets the cached weight after such a write.
        """
        amax = self._amax
        key = (x._version, x.data_ptr(), x.dtype, x.device, amax._version, amax.data_ptr(), amax.device,
               torch.is_inference_mode_enabled(), self._if_clip, self._num_bits, self._unsigned, self._narrow_range,
               self._axis, self._scale_amax)
        cache = self.__dict__.get("_weight_cache")
        if cache is not None and cache[0] is x and cache[1] is amax and cache[2] == key:
            return cache[3]
        out = self._quant_forward(self._clip(x) if self._if_clip else x)
        self.__dict__["_weight_cache"] = (x, amax, key, out)
        return out

    def clear_cache(self) -> None:
        """Forgets the cached fake-quantized weight and scale (needed only after writing a weight or amax through
        ``.data``)."""
        self.__dict__.pop("_weight_cache", None)
        self.__dict__.pop("_params_cache", None)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_weight_cache", None)
        state.pop("_params_cache", None)
        return state

    def _params_for(self, x: torch.Tensor):
        """The scale of a calibrated integer fake quantizer in a forward that records no gradient, computed once
        per amax (same host-side change detection as the weight cache); ``None`` where the general path runs
        (dynamic amax, blocks, FP8, real quantization, :func:`~qdq.tensor_quant.data_checks`, tracing or
        compiling, or a forward that records a gradient)."""
        amax = self._amax
        if (amax is None or not self._fake_quant or self._block_size or formats.is_fp8(self._num_bits)
                or data_checks_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing()
                or (torch.is_grad_enabled() and (x.requires_grad or amax.requires_grad))):
            return None
        key = (amax._version, amax.data_ptr(), amax.device, torch.is_inference_mode_enabled(), self._num_bits,
               self._unsigned, self._narrow_range, self._scale_amax)
        cache = self.__dict__.get("_params_cache")
        if cache is not None and cache[0] is amax and cache[1] == key:
            return cache[2]
        params = fake_quant_params(self.effective_amax(), self._num_bits, self._unsigned, self._narrow_range)
        self.__dict__["_params_cache"] = (amax, key, params)
        return params

    def _amax_for(self, x: torch.Tensor) -> torch.Tensor:
        amax = self.effective_amax()
        if amax is None:
            if not getattr(self, "_logged_dynamic", False):
                self._logged_dynamic = True
                _warn_dynamic(self._label())
            if self._block_size:
                return formats.blocked_amax(x, self._block_size)
            try:
                amax = reduce_amax(x, self._axis, keepdims=True)
            except ValueError as err:  # an axis beyond x's dimensions
                raise ValueError(f"{self._label()}: {err}") from None
            return amax if self._scale_amax is None else amax * self._scale_amax
        return amax

    def _get_amax(self, inputs: torch.Tensor) -> torch.Tensor:
        """pytorch_quantization's private ``_get_amax``: the float32 amax ``forward`` quantizes ``inputs`` with.

        The calibrated (or given, or learned) amax, or, without one, the abs-max of ``inputs`` per kept channel (the
        dynamic quantization ``forward`` warns about); times ``scale_amax`` when set; detached.

        >>> q = TensorQuantizer(QuantDescriptor(amax=2.0, scale_amax=0.5))
        >>> q._get_amax(torch.ones(3))
        tensor(1.)
        """
        return self._amax_for(inputs).detach().float()

    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        amax = self.effective_amax()
        if amax is None:
            raise RuntimeError(f"{self._label()}: clipping needs an amax; calibrate first")
        amax = amax.to(x.dtype)
        return torch.clamp(x, min=torch.zeros_like(amax) if self._unsigned else -amax, max=amax)

    def _quant_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._symmetric:
            return self._affine_forward(x)
        params = self._params_for(x)
        try:
            if params is not None:
                return fake_quantize_with_params(x, params)
        except ValueError as err:
            raise ValueError(f"{self._label()}: {err}") from None
        amax = self._amax_for(x)
        try:
            if self._block_size:
                return formats.fake_blocked_quant(x, amax, self._num_bits, self._block_size, self._narrow_range)
            if self._fake_quant:
                return fake_quantize_by_amax(x, amax, self._num_bits, self._unsigned, self._narrow_range)
            q, self._scale = quantize_by_amax(x, amax, self._num_bits, self._unsigned, self._narrow_range)
            return q
        except ValueError as err:
            raise ValueError(f"{self._label()}: {err}") from None

    def _affine_forward(self, x: torch.Tensor) -> torch.Tensor:
        amax = self.effective_amax()
        if amax is None or self._amin is None:
            amin, amax = reduce_range(x, self._axis)
        else:
            amin = self._amin
        try:
            return fake_affine_quant(x, amin, amax, self._num_bits, self._unsigned)
        except ValueError as err:
            raise ValueError(f"{self._label()}: {err}") from None

    def _fb_fake_quant_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``use_fb_fake_quant``: the export forward with this quantizer's amax (no calibration, no clip)."""
        if not self._if_quant:
            return x
        self.set_export_mode(True)
        try:
            return self._export_forward(x)
        finally:
            self.set_export_mode(False)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward traced by the ONNX export: the fused fake-quant op alone, no custom gradient.

        Both of torch's exporters turn it into QuantizeLinear -> DequantizeLinear. The scale and zero point were
        computed when export mode was switched on and are plain tensors (not buffers), so the exporters take them as
        constants instead of tracing the arithmetic that made them.
        """
        scale, zero_point, axis, (qmin, qmax) = self._export_qparams
        if self.__dict__.get("_export_fp8"):  # FP8 with its real scale: the FP8 Q/DQ pair (fp8_export)
            return fp8_qdq(x, scale, axis)
        if self._narrow_range and not self._unsigned and self._symmetric:
            # ONNX's int8 saturates at -128: clamp at -127 * scale first (a Clip for activations, folded for weights)
            x = torch.maximum(x, (scale.reshape(self._export_shape) * qmin).to(x.dtype))
            qmin -= 1
        xf = x if x.dtype == torch.float32 else x.float()
        if axis is None:
            out = torch.fake_quantize_per_tensor_affine(xf, scale, zero_point, qmin, qmax)
        else:
            out = torch.fake_quantize_per_channel_affine(xf, scale, zero_point, axis, qmin, qmax)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @property
    def export_mode(self) -> bool:
        """In export mode ``forward`` is the plain fused fake-quant op that the ONNX exporters translate."""
        return self._export_mode

    @export_mode.setter
    def export_mode(self, on: bool) -> None:
        self.set_export_mode(on)

    def set_export_mode(self, on: bool, scale: float | None = None) -> None:
        """Switches export mode on (computing the constant scale and zero point the exporters will write) or off.

        ``scale`` overrides the amax-derived scale with one per-tensor value: the scale-matching rules export the
        model with a distinct scale per quantizer to recognise each quantizer's QuantizeLinear in the graph.
        """
        if not on:
            self.__dict__.pop("_export_qparams", None)
            self.__dict__.pop("_export_fp8", None)
            self._export_mode = False
            return
        zero_point = None
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
                raise ValueError(f"{self._label()}: an export scale must be a finite number > 0, got {scale!r}")
            scale_t = torch.tensor(float(scale), dtype=torch.float32, device=self._device)
        else:
            amax = self.effective_amax()
            if amax is None or (not self._symmetric and self._amin is None):
                raise RuntimeError(f"{self._label()} has no amax; calibrate it (or disable it) before export")
            if self._symmetric:
                scale_t = amax_to_scale(amax.detach(), self._num_bits, self._unsigned)
            else:
                scale_t, zero_point = affine_qparams(self._amin, amax.detach(), self._num_bits, self._unsigned)
                scale_t, zero_point = torch.broadcast_tensors(scale_t, zero_point)
        varying = [d for d, n in enumerate(scale_t.shape) if n > 1]
        if len(varying) > 1:
            raise RuntimeError(f"{self._label()}: amax varies along {len(varying)} dimensions; ONNX Q/DQ take one axis")
        axis = varying[0] if varying else None
        flat = scale_t.reshape(-1).clone() if axis is not None else scale_t.reshape(()).clone()
        self._export_shape = tuple(scale_t.shape) if axis is not None else ()
        zp = torch.zeros_like(flat, dtype=torch.int32) if zero_point is None else (
            zero_point.reshape(flat.shape).to(torch.int32).clone())
        # a scale override is a tag (only the graph's structure matters): the 8-bit range every exporter takes, also
        # for FP8 and 4-bit quantizers, whose Q/DQ qdq.onnx.export_formats writes afterwards
        qrange = self.quant_range if scale is None else ((0, 255) if self._unsigned else (-128, 127))
        self._export_qparams = (flat, zp, axis, qrange)
        self.__dict__["_export_fp8"] = scale is None and formats.is_fp8(self._num_bits)
        self._export_mode = True

    # ----------------------------------------------------------------------------------------------------------
    # device and state_dict
    # ----------------------------------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        self.clear_cache()
        self._device = fn(torch.empty(0, device=self._device)).device
        out = super()._apply(fn, recurse)
        if self._amax is not None and self._amax.dtype != torch.float32:  # amax stays float32 under .half()
            if isinstance(self._amax, nn.Parameter):
                self._amax.data = self._amax.data.float()
            else:
                self._amax = self._amax.float()
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        key = prefix + "_amax"
        if key in state_dict:
            value = state_dict[key]
            problem = amax_problem(value, nonnegative=self._symmetric)
            if problem:
                errors.append(f"{key} ({self._label()}): the checkpoint's amax {problem}")
                return
            layout = self._amax_layout_error(tuple(value.shape))
            if layout:
                errors.append(f"{key} ({self._label()}): {layout}")
                return
            if self._amax is None:
                self._amax = torch.empty_like(value, dtype=torch.float32, device=self._device)
            elif self._amax.shape != value.shape:
                kind = "learned amax" if isinstance(self._amax, nn.Parameter) else "amax"
                errors.append(
                    f"{key} ({self._label()}): the checkpoint's amax has shape {tuple(value.shape)}, this {kind} "
                    f"{tuple(self._amax.shape)}"
                )
                return
        elif strict and self._amax is None and local_metadata and self._needs_amax():
            # the checkpoint was saved from a model with this quantizer (its metadata is there) but holds no amax:
            # loading it would leave the quantizer on per-batch amax without a word
            missing_keys.append(key)
        key = prefix + "_pre_quant_scale"
        if key in state_dict and (self._pre_quant_scale is None or self._pre_quant_scale.shape != state_dict[key].shape):
            self._pre_quant_scale = torch.empty_like(state_dict[key], dtype=torch.float32, device=self._device)
        key = prefix + "_amin"
        if key in state_dict and (self._amin is None or self._amin.shape != state_dict[key].shape):
            self._amin = torch.empty_like(state_dict[key], dtype=torch.float32, device=self._device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        if self._learn_amax and self._amax is not None and not isinstance(self._amax, nn.Parameter):
            self.init_learn_amax()  # a learned amax loads back as a trainable Parameter

    def _needs_amax(self) -> bool:
        """Whether ``forward`` would quantize with this quantizer's amax (so a missing amax matters)."""
        return not self._disabled and self._if_quant and not self._if_calib

    def _amax_layout_error(self, shape: tuple[int, ...]) -> str | None:
        """Why an amax of ``shape`` cannot belong to this quantizer (its axis), or None."""
        numel = math.prod(shape)
        if self._axis is None:
            if numel == 1 or (self._amax is not None and tuple(self._amax.shape) == shape):
                return None  # (a descriptor may give a per-tensor quantizer a broadcasting amax of its own)
            return f"a per-tensor quantizer takes one amax, the checkpoint's has shape {shape}"
        if numel == 1:
            return None
        axes = (self._axis,) if isinstance(self._axis, int) else tuple(self._axis)
        if any(not -len(shape) <= a < len(shape) for a in axes):
            return f"amax of shape {shape} has no dimension {self._axis} (this quantizer's axis)"
        kept = {a % len(shape) for a in axes}
        if self._block_size and len(shape) >= 2:  # blocked: (rows, blocks, 1), one amax per row and block
            kept.add(len(shape) - 2)
        wrong = [d for d, n in enumerate(shape) if n > 1 and d not in kept]
        if wrong:
            return (f"amax of shape {shape} varies along dimension(s) {wrong}, this quantizer keeps axis "
                    f"{self._axis} (a per-channel amax of another layout)")
        return None

    def __setstate__(self, state):
        # a quantizer pickled on one device and unpickled with map_location elsewhere: its device is where its
        # tensors now are (CPU without CUDA), never the device it was saved from
        super().__setstate__(state)
        self._buffers.setdefault("_pre_quant_scale", None)  # pickled before the buffer existed
        tensors = [t for t in (self._buffers.get("_amax"), self._parameters.get("_amax"), self._buffers.get("_amin"))
                   if t is not None]
        if tensors:
            self._device = tensors[0].device
        elif self._device.type == "cuda" and not torch.cuda.is_available():
            self._device = torch.device("cpu")

    # ----------------------------------------------------------------------------------------------------------
    # printing
    # ----------------------------------------------------------------------------------------------------------
    def _label(self) -> str:
        return f"TensorQuantizer {self.name!r}" if self.name else "TensorQuantizer (unnamed)"

    def extra_repr(self) -> str:
        parts = [f"{self._num_bits}bit" if isinstance(self._num_bits, int) else formats.format_name(self._num_bits)]
        if self._block_size:
            parts.append(f"block={self._block_size}")
        if self._unsigned:
            parts.append("unsigned")
        if self._narrow_range:
            parts.append("narrow")
        if not self._symmetric:
            parts.append("asymmetric")
            if self._amin is not None:
                parts.append(f"amin={self._amin.min().item():.4f}")
        parts.append("fake" if self._fake_quant else "real")
        parts.append("per-tensor" if self._axis is None else f"axis={self._axis}")
        amax = self._amax
        if amax is None:
            parts.append("amax=dynamic")
        elif amax.numel() == 1:
            parts.append(f"amax={amax.item():.4f}")
        else:
            parts.append(f"amax=[{amax.min().item():.4f}, {amax.max().item():.4f}]({amax.numel()})")
        if self.learn_amax:
            parts.append("learned")
        if self._scale_amax is not None:
            parts.append(f"scale_amax={self._scale_amax}")
        parts.append(f"calibrator={type(self._calibrator).__name__}" if self._calibrator is not None else "no calibrator")
        if self._disabled:
            parts.append("disabled")
        else:
            parts.extend(flag for flag, on in (("quant", self._if_quant), ("calib", self._if_calib), ("clip", self._if_clip)) if on)
        return " ".join(parts)

    def __repr__(self) -> str:  # one line, as users print quantizers in loops
        return f"TensorQuantizer({self.extra_repr()})"

    def __prepare_scriptable__(self):
        """torch.jit.script calls this on every submodule first: fail here, with the way out, not deep in its
        compiler."""
        raise RuntimeError(
            f"{self._label()}: a quantized model cannot be compiled by torch.jit.script (its quantizers hold Python "
            "state TorchScript does not type); export it with qdq.export_onnx, or use torch.jit.trace, torch.export "
            "or torch.compile"
        )


class _ReadOnlyBound(torch.Tensor):
    """``-amax`` as :attr:`TensorQuantizer.clip` gives it: any in-place write (also through ``.data``) raises."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.endswith("__")) or name in ("__setitem__", "__set__", "__iadd__",
                                                                        "__isub__", "__imul__", "__itruediv__"):
            raise RuntimeError("clip.clip_value_min is -amax (the learned range is symmetric) and cannot be written; "
                               "write clip.clip_value_max or amax instead")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if name == "__get__" and isinstance(out, torch.Tensor):  # .data of the bound: still read-only
            return out.as_subclass(cls)
        return out


class LearnedRange:
    """pytorch_quantization's ``Clip`` of a learned amax, as a view of qdq's learned amax (see
    :attr:`TensorQuantizer.clip`)."""

    def __init__(self, amax: nn.Parameter):
        self.clip_value_max = amax
        with torch.no_grad():
            self.clip_value_min = (-amax.detach()).as_subclass(_ReadOnlyBound)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        amax = self.clip_value_max.to(inputs.dtype)
        return torch.clamp(inputs, min=-amax, max=amax)

    def __repr__(self) -> str:
        return f"LearnedRange(clip_value_max=amax {tuple(self.clip_value_max.shape)}, clip_value_min=-amax)"


def _amax_tensor(value: Any, label: str, what: str = "amax") -> torch.Tensor:
    """A user's amax (number, nested list, array, tensor) as a float32 tensor; ``TypeError`` naming the quantizer."""
    bad = isinstance(value, (str, bytes, bool)) or (isinstance(value, torch.Tensor) and (
        value.dtype == torch.bool or value.is_complex()))
    if not bad:
        try:
            value = torch.as_tensor(value, dtype=torch.float32).detach()
        except (TypeError, ValueError, RuntimeError):
            bad = True
    if bad:
        raise TypeError(f"{label}: {what} must be a number, a nested list of numbers or a real tensor, got {value!r}")
    if value.numel() == 0:
        raise ValueError(f"{label}: {what} is empty (shape {tuple(value.shape)}); set None for no {what}")
    return value


def _warn_dynamic(label: str) -> None:
    """The per-batch fallback of a quantizer without amax: another numerics path, so it is said out loud (once)."""
    msg = (f"{label} has no amax: quantizing each batch with its own abs-max (dynamic quantization); calibrate it "
           "or set its amax for static quantization as the export writes it")
    logger.warning(msg)  # in the log (pytorch_quantization users look there) and as a filterable warning
    warnings.warn(msg, DynamicAmaxWarning, stacklevel=4)


class DynamicAmaxWarning(UserWarning):
    """A quantizer without amax quantized a batch with the batch's own abs-max."""
