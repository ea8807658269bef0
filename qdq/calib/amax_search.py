"""Pure amax searches over a histogram of magnitudes.

Every search has one signature, ``search(counts, edges, *, num_bits, unsigned, **params) -> amax``:

* ``counts``: ``[..., n]`` bin counts of ``|x|`` (integers, any dtype), one histogram per leading index
  (per channel, or a single one);
* ``edges``: ``[..., n + 1]`` increasing bin edges, ``edges[..., 0] == 0``; bin ``b`` holds values in
  ``[edges[b], edges[b + 1])`` and the last bin also holds its right edge;
* result: float32 amax of shape ``counts.shape[:-1]``.

One convention for all searches: cutting the histogram after ``i`` bins means ``amax = edges[i]``, the right edge of
the last kept bin. The candidates are ``i in range(start_bin, n + 1, stride)``, so the full range is always one.
Where a histogram has fewer than ``start_bin`` bins of data, the candidates start at ``n``'s first bin instead.

All searches are vectorised over candidates (no Python loop over bins); they run on the histogram's device.

Example:
    >>> import torch
    >>> counts = torch.tensor([[90, 5, 3, 1, 1]])
    >>> edges = torch.linspace(0, 5, 6)[None]
    >>> percentile_amax(counts, edges, percentile=95.0)
    tensor([2.])
    >>> {"entropy", "mse", "percentile", "max"} <= set(search_names())
    True
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from qdq.math.formats import fake_quantize_fp8, is_fp8
from qdq.math.descriptor import register_calib_method
from qdq.math.quantize import quantize
from qdq.math.ranges import amax_to_scale, quant_range

__all__ = [
    "entropy_amax",
    "mse_amax",
    "percentile_amax",
    "max_amax",
    "register_search",
    "get_search",
    "search_names",
    "search_keywords",
    "check_search_keywords",
]

_SEARCHES: dict[str, Callable[..., torch.Tensor]] = {}


def register_search(name: str, fn: Callable[..., torch.Tensor] | None = None):
    """Registers ``fn`` as the amax search called ``name`` (usable as a decorator).

    The name becomes a ``calib_method`` of :class:`~qdq.math.descriptor.QuantDescriptor` too, whose ``calib_args``
    take the search's keyword-only parameters (their defaults as the function declares them).
    """

    def deco(f):
        if name in _SEARCHES and _SEARCHES[name] is not f:
            raise ValueError(f"an amax search called {name!r} is already registered")
        register_calib_method(name, _declared_defaults(f))
        _SEARCHES[name] = f
        return f

    return deco(fn) if fn is not None else deco


def _declared_defaults(fn: Callable[..., torch.Tensor]) -> dict[str, object]:
    """The keyword-only parameters of a search with their defaults, besides ``num_bits`` and ``unsigned``."""
    import inspect

    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in ("num_bits", "unsigned") and p.default is not p.empty}


def search_names() -> tuple[str, ...]:
    """Names of the registered searches."""
    return tuple(_SEARCHES)


def search_keywords(name: str | None = None) -> tuple[str, ...]:
    """The keyword arguments the search ``name`` declares (of every registered search when ``None``), besides
    ``num_bits`` and ``unsigned``, which the calibrator passes itself.

    >>> search_keywords("percentile"), search_keywords("mse")
    (('percentile',), ('start_bin', 'stride'))
    """
    import inspect

    keys: list[str] = []
    for fn in ([get_search(name)] if name is not None else list(_SEARCHES.values())):
        for p in inspect.signature(fn).parameters.values():
            if p.kind is p.KEYWORD_ONLY and p.name not in ("num_bits", "unsigned") and p.name not in keys:
                keys.append(p.name)
    return tuple(keys)


def check_search_keywords(given: Iterable[str], what: str = "") -> None:
    """``TypeError`` naming keyword arguments that no registered search takes: a misspelt ``percentil=`` would
    otherwise be ignored in silence (every search takes ``**_`` to share one signature).

    >>> check_search_keywords(["percentil"])
    Traceback (most recent call last):
    ...
    TypeError: unknown keyword arguments ['percentil'] for the amax search; the searches take percentile, start_bin, stride
    """
    known = set(search_keywords(None)) | {"percentile", "start_bin", "stride"}
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"{what}unknown keyword arguments {unknown} for the amax search; the searches take "
                        f"{', '.join(sorted(known))}")


def get_search(name: str) -> Callable[..., torch.Tensor]:
    """The search called ``name``; ``ValueError`` listing the known ones otherwise."""
    try:
        return _SEARCHES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown calibration method {name!r}; choose one of {', '.join(search_names())}") from None


def _as_2d(counts: torch.Tensor, edges: torch.Tensor):
    counts = torch.as_tensor(counts)
    edges = torch.as_tensor(edges, device=counts.device)
    if counts.dim() == 0 or edges.shape[:-1] != counts.shape[:-1] or edges.shape[-1] != counts.shape[-1] + 1:
        raise ValueError(
            f"histogram shapes do not match: counts {tuple(counts.shape)} needs edges {tuple(counts.shape[:-1])}"
            f" + ({counts.shape[-1] + 1},), got {tuple(edges.shape)}"
        )
    lead = counts.shape[:-1]
    return counts.reshape(-1, counts.shape[-1]), edges.reshape(-1, edges.shape[-1]).double(), lead


def _candidates(n: int, start_bin: int, stride: int, device) -> torch.Tensor:
    if start_bin < 1 or stride < 1:
        raise ValueError(f"start_bin and stride must be >= 1, got start_bin={start_bin}, stride={stride}")
    start = min(start_bin, n)
    return torch.arange(start, n + 1, stride, device=device)


def _pick(edges: torch.Tensor, cand: torch.Tensor, best: torch.Tensor, lead) -> torch.Tensor:
    idx = cand[best]
    return edges.gather(1, idx[:, None])[:, 0].float().reshape(lead)


def tolerant_argmin(values: torch.Tensor, ties: str = "first") -> torch.Tensor:
    """Index of the minimum along the last dim, values within a relative 1e-12 of it (floating noise) counting as
    ties; ``ties="first"`` or ``"last"`` says which of the tied positions wins.

    >>> v = torch.tensor([[3.0, 1.0, 1.0 + 1e-15, 2.0]], dtype=torch.float64)
    >>> tolerant_argmin(v, "first").tolist(), tolerant_argmin(v, "last").tolist()
    ([1], [2])
    """
    if ties not in ("first", "last"):
        raise ValueError(f"tolerant_argmin: ties must be 'first' or 'last', got {ties!r}")
    mins = values.min(dim=-1, keepdim=True).values
    hit = values <= mins + (mins.abs() * 1e-12 + 1e-300)
    pos = torch.arange(values.shape[-1], device=values.device).expand_as(values)
    if ties == "last":
        return torch.where(hit, pos, -1).max(dim=-1).values
    return torch.where(hit, pos, values.shape[-1]).min(dim=-1).values


@register_search("entropy")
def entropy_amax(
    counts: torch.Tensor,
    edges: torch.Tensor,
    *,
    num_bits: int = 8,
    unsigned: bool = False,
    start_bin: int = 128,
    stride: int = 1,
    **_: object,
) -> torch.Tensor:
    """TensorRT's entropy calibration: the cut that minimises KL(P || Q).

    For a cut after ``i`` bins, P is the first ``i`` bins with every count beyond them added to bin ``i - 1``.
    Q spreads the first ``i`` bins over ``2**(num_bits - 1 + unsigned)`` levels (bin ``j`` goes to level
    ``floor(j * levels / i)``), each level's mass shared equally by its non-empty bins, empty bins staying empty.
    As in TensorRT, the zero bin (dominated by ReLU zeros) is given the count of bin 1 first. Ties go to the larger
    cut. An empty last bin under clipped outliers makes KL infinite for that cut.

    >>> c = torch.tensor([[0, 60, 50, 40, 30, 20, 10, 5] + [0] * 22 + [1, 1]])
    >>> e = torch.linspace(0, 32, 33)[None]
    >>> entropy_amax(c, e, num_bits=3, start_bin=4)   # the two outliers at 30..32 are clipped
    tensor([8.])
    """
    c, e, lead = _as_2d(counts, edges)
    c = c.double().clone()
    n = c.shape[1]
    if n > 1:
        c[:, 0] = c[:, 1]
    levels = 1 << (num_bits - 1 + int(unsigned))
    cand = _candidates(n, start_bin, stride, c.device)
    zero = torch.zeros_like(c[:, :1])
    csum = torch.cat([zero, c.cumsum(1)], 1)  # csum[:, j] = sum of bins < j
    nz = (c > 0).double()
    nzsum = torch.cat([zero, nz.cumsum(1)], 1)
    clogc = torch.cat([zero, torch.special.xlogy(c, c).cumsum(1)], 1)
    total = csum[:, -1:]  # [B, 1]

    # bounded memory: process candidates in chunks of about 2M group entries
    out = []
    chunk = max(1, (1 << 21) // max(1, levels * c.shape[0]))
    k = torch.arange(levels + 1, device=c.device, dtype=torch.int64)
    for part in cand.split(chunk):
        i = part[None, :, None]  # [1, K, 1]
        bounds = (k[None, None, :] * i + levels - 1) // levels  # group starts ceil(k*i/levels), [1, K, L+1]
        b = bounds.expand(c.shape[0], -1, -1).reshape(c.shape[0], -1)
        g = csum.gather(1, b).reshape(c.shape[0], part.numel(), levels + 1).diff(dim=2)  # group mass
        m = nzsum.gather(1, b).reshape(c.shape[0], part.numel(), levels + 1).diff(dim=2)  # non-empty bins
        g_log_q = torch.where(m > 0, torch.special.xlogy(g, g / m.clamp(min=1)), torch.zeros_like(g)).sum(2)
        ii = part[None, :].expand(c.shape[0], -1)
        inside = csum.gather(1, ii)  # mass of the first i bins, [B, K]
        outliers = total - inside
        last = c.gather(1, ii - 1)  # count of bin i - 1
        # q of bin i-1: its group's mass over the group's non-empty bins
        kk = ((part - 1) * levels // part)[None, :, None].expand(c.shape[0], -1, 1)
        last_group = g.gather(2, kk)[..., 0]
        last_m = m.gather(2, kk)[..., 0]
        q_last = torch.where(last_m > 0, last_group / last_m.clamp(min=1), torch.zeros_like(last_group))
        p_log_p = clogc.gather(1, ii - 1) + torch.special.xlogy(last + outliers, last + outliers)
        p_log_q = g_log_q + torch.special.xlogy(outliers, q_last)
        kl = (p_log_p - p_log_q) / total - torch.log(total) + torch.log(inside)
        infinite = ((outliers > 0) & (last == 0)) | (inside <= 0)
        out.append(torch.where(infinite, torch.full_like(kl, math.inf), kl))
    kl = torch.cat(out, 1)
    best = tolerant_argmin(kl, "last")
    return _pick(e, cand, best, lead)


@register_search("mse")
def mse_amax(
    counts: torch.Tensor,
    edges: torch.Tensor,
    *,
    num_bits: int = 8,
    unsigned: bool = False,
    start_bin: int = 128,
    stride: int = 1,
    **_: object,
) -> torch.Tensor:
    """The cut whose fake quantization of the bin centers has the least count-weighted squared error.

    The centers are fake-quantized with the arithmetic of :func:`qdq.math.fake_quant.fake_quantize_by_amax`
    (``quantize(x) * scale``), for every candidate at once; with ``num_bits=(4, 3)`` on the FP8 E4M3 grid
    (:func:`qdq.math.formats.fake_quantize_fp8`).

    >>> c = torch.tensor([[0, 60, 50, 40, 30, 20, 10, 5] + [0] * 22 + [1, 1]])
    >>> e = torch.linspace(0, 32, 33)[None]
    >>> mse_amax(c, e, num_bits=3, start_bin=4)
    tensor([12.])
    """
    c, e, lead = _as_2d(counts, edges)
    c = c.float()
    n = c.shape[1]
    cand = _candidates(n, start_bin, stride, c.device)
    qmin, qmax = quant_range(num_bits, unsigned)
    centers = ((e[:, 1:] + e[:, :-1]) / 2).float()  # [B, n]
    best = []
    chunk = max(1, (1 << 22) // max(1, n))
    for b in range(c.shape[0]):
        errs = []
        for part in cand.split(chunk):
            scale = amax_to_scale(e[b, part].float(), num_bits, unsigned)[:, None]  # [K, 1]
            if is_fp8(num_bits):  # the FP8 grid of qdq.math.formats
                err = fake_quantize_fp8(centers[b][None, :], scale).sub_(centers[b]).square_()
            else:  # quantize(x) * scale, in place: the arithmetic of fake_quantize, without a [K, n] copy per step
                err = quantize(centers[b][None, :], scale, 0, qmin, qmax)
                err.mul_(scale).sub_(centers[b]).square_()
            errs.append(err @ c[b])
        best.append(tolerant_argmin(torch.cat(errs)[None].double(), "last"))
    return _pick(e, cand, torch.cat(best), lead)


@register_search("percentile")
def percentile_amax(
    counts: torch.Tensor,
    edges: torch.Tensor,
    *,
    percentile: float = 99.99,
    **_: object,
) -> torch.Tensor:
    """The smallest edge with at least ``percentile`` percent of the counts at or below it.

    >>> percentile_amax(torch.tensor([[1, 1, 1, 1]]), torch.linspace(0, 4, 5)[None], percentile=50)
    tensor([2.])
    """
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
        raise ValueError(f"percentile must be a number in the range (0, 100], got {percentile!r}")
    c, e, lead = _as_2d(counts, edges)
    cum = c.double().cumsum(1)
    # the share is decimal (99.9 %); forgive its binary rounding so an exact share counts as reached
    need = cum[:, -1:] * (float(percentile) / 100.0) * (1.0 - 1e-12)
    idx = torch.searchsorted(cum, need).clamp(max=c.shape[1] - 1)  # first bin reaching the share
    return e.gather(1, idx + 1)[:, 0].float().reshape(lead)


@register_search("max")
def max_amax(counts: torch.Tensor, edges: torch.Tensor, **_: object) -> torch.Tensor:
    """The right edge of the last non-empty bin (the histogram's view of the maximum).

    >>> max_amax(torch.tensor([[3, 0, 2, 0]]), torch.linspace(0, 4, 5)[None])
    tensor([3.])
    """
    c, e, lead = _as_2d(counts, edges)
    n = c.shape[1]
    pos = torch.arange(1, n + 1, device=c.device).expand_as(c)
    last = torch.where(c > 0, pos, 0).max(dim=1).values
    return e.gather(1, last[:, None])[:, 0].float().reshape(lead)
