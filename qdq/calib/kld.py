"""The KLD threshold search of tpu-mlir, registered as the amax search ``"kld"``.

The search keeps the first ``i`` bins of the ``|x|`` histogram, asks how well ``2**(num_bits - 1)`` integer levels
(128 for signed 8 bit) describe them, and picks the cut whose quantized distribution is closest to the float one in
Kullback-Leibler divergence. It is TensorRT's entropy calibration on a coarse grid of cuts, and that grid is what sets
it apart from :func:`~qdq.calib.amax_search.entropy_amax`, which tries every bin from 128 on.

Use it like any other histogram search::

    calibrate_model(model, loader, method="kld")            # quantizers with histogram calibrators
    quantizer.load_calib_amax(method="kld")                 # one quantizer

and refine the result with :func:`qdq.calibrate.autotune.autotune`.

The algorithm, as tpu-mlir's calibration documentation gives it in pseudocode, for a histogram of ``n`` bins
(``n = 2048`` in tpu-mlir) over ``[0, R]``:

1. ``step = n // 16``; the cuts are ``i in range(step, n, step)``: 128, 256, ..., 1920 for ``n = 2048``, exactly the
   pseudocode's ``range(128, 2048, 128)``. The full range ``i = n`` is not a cut (the pseudocode's ``range`` stops
   before it); where the full range is wanted, :func:`~qdq.calibrate.autotune.autotune` explores up to the maximum. For ``n``
   not divisible by 16 the grid is the same rule (``n = 600``: ``step = 37``, cuts 37, 74, ..., 592). At least 16
   bins are needed.
2. P: the first ``i`` bins, with every count beyond them (the clipped outliers, bins ``i .. n-1``) added to bin
   ``i - 1``; normalised to sum 1.
3. Q: the first ``i`` bins (without the outliers) quantized into ``levels`` levels, bin ``j`` going to level
   ``j * levels // i``. For ``i`` a multiple of ``levels`` (every cut when ``n = 2048``) these are the pseudocode's
   runs of ``i / levels`` neighbouring bins; for ``i < levels`` each bin is its own level. Each level is expanded back
   to its bins the way tpu-mlir and TensorRT do: the level's mass is shared equally by its *non-empty* bins and empty
   bins stay empty (an empty bin is a value the float tensor never takes, so the quantized one should not either).
   Normalised to sum 1.
4. ``KL(P || Q) = sum_j p_j * log(p_j / q_j)`` over ``p_j > 0``. The only place where ``q_j = 0 < p_j`` is bin
   ``i - 1`` when it is empty and outliers were folded into it; there ``q_j`` is taken as ``1e-30``, a large but
   finite penalty, as tpu-mlir's implementation does, so every cut stays comparable. On the coarse grid this
   penalty often outweighs the smoothing of a sparse tail, so outliers within a few cuts of the bulk tend to be kept;
   far outliers are clipped.
5. The cut with the smallest divergence wins; ties (to a relative ``1e-12``, floating noise) go to the smaller cut,
   the first minimum of the pseudocode's loop.
6. The threshold is the middle of bin ``i``, the first clipped bin: ``(i + 0.5) * R / n``, the pseudocode's
   ``(i + 0.5) * absmax / 2048``.
7. Data that fits the grid is never clipped: when no level of the full range ``i = n`` holds more than one non-empty
   bin (low-cardinality data: a constant, a few distinct values), quantizing the full range loses nothing
   (``KL = 0`` there) and the threshold is the top edge ``R``. tpu-mlir's grid never tries ``i = n`` and would clip
   a constant tensor of 3.0 at the first cut, 0.19.

``levels`` is ``2**(num_bits - 1)`` for signed quantizers: the histogram holds ``|x|`` and the positive half of the
signed grid has that many levels. For unsigned quantizers the histogram holds ``x >= 0`` itself and all
``2**num_bits`` levels describe it, so ``levels = 2**num_bits`` (tpu-mlir only calibrates symmetric tensors; this is
the same rule as :func:`~qdq.calib.amax_search.entropy_amax`).

Differences from tpu-mlir worth knowing:

* tpu-mlir's histogram spans ``[0, absmax]``. A :class:`~qdq.calib.HistogramCalibrator` spans ``[0, R]`` with ``R``
  at least the largest magnitude seen (its range grows by merging bins), so the threshold is computed from the bin
  width of the edges given, and :meth:`~qdq.calib.HistogramCalibrator.compute_amax` then clamps it to the exact
  maximum seen.
* tpu-mlir builds its histogram without exact zeros. The search uses the histogram as given; collect with
  ``HistogramCalibrator(..., skip_zeros=True)`` to leave zeros (the ReLU spike) out as tpu-mlir does.
* The divergence is computed in float64 with natural logarithms (tpu-mlir: float32, base 10; the base only scales
  the divergences).
* ``start_bin`` and ``stride``, which the calibrator passes to every search, do not apply: the cuts are the grid
  above.

Example:
    >>> import torch
    >>> counts = torch.tensor([100, 80, 60, 50, 40, 30, 20, 10] + [0] * 22 + [1, 1])
    >>> edges = torch.linspace(0, 32, 33)
    >>> kld_amax(counts, edges, num_bits=3)          # 4 levels; the two outliers at 30..32 are clipped
    tensor(8.5000)
    >>> cuts, kl = kld_divergence(counts, edges, num_bits=3)
    >>> cuts.tolist()[:4], int(kl.argmin())
    ([2, 4, 6, 8], 3)
"""

from __future__ import annotations

import logging

import torch

from qdq.calib.amax_search import _as_2d, register_search, tolerant_argmin
from qdq.math.descriptor import KLD_DIVISIONS  # the grid of cuts: n // KLD_DIVISIONS bins between cuts

__all__ = ["kld_amax", "kld_divergence", "kld_cuts", "KLD_EPS", "KLD_DIVISIONS", "fits_grid"]

logger = logging.getLogger(__name__)

#: The probability given to an empty quantized bin that holds float mass (bin ``i - 1`` under folded outliers).
KLD_EPS = 1e-30
_CHUNK = 1 << 21  # dense [rows, cuts, bins] entries per step, to bound memory on large batches of histograms


def kld_cuts(num_bins: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The candidate cuts (numbers of kept bins) for a histogram of ``num_bins`` bins: ``range(step, n, step)``.

    >>> kld_cuts(2048).tolist() == list(range(128, 2048, 128))
    True
    >>> kld_cuts(600)[:3].tolist(), len(kld_cuts(600))
    ([37, 74, 111], 16)
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < KLD_DIVISIONS:
        raise ValueError(f"the kld search needs a histogram of at least {KLD_DIVISIONS} bins, got {num_bins!r}")
    step = num_bins // KLD_DIVISIONS
    return torch.arange(step, num_bins, step, device=device)


def _levels(num_bits: int, unsigned: bool) -> int:
    if isinstance(num_bits, bool) or not isinstance(num_bits, int) or num_bits < 2:
        raise ValueError(f"num_bits must be an int >= 2, got {num_bits!r}")
    return 1 << (num_bits - 1 + int(bool(unsigned)))


def _divergence_rows(c: torch.Tensor, cuts: torch.Tensor, levels: int) -> torch.Tensor:
    """KL(P || Q) of every cut for rows of float64 counts ``c`` ``[B, n]``: ``[B, K]``."""
    b, n = c.shape
    k = cuts.numel()
    j = torch.arange(n, device=c.device)
    i = cuts[:, None]  # [K, 1]
    inside = j[None, :] < i  # [K, n]
    # level of bin j for cut i; bins past the cut go to a spare level that is never read
    level = torch.where(inside, j[None, :] * levels // i, levels).expand(b, k, n)
    kept = torch.where(inside, c[:, None, :], 0.0)  # first i bins of every cut, [B, K, n]
    nonempty = (kept > 0).double()
    mass = torch.zeros(b, k, levels + 1, dtype=c.dtype, device=c.device).scatter_add_(2, level, kept)
    count = torch.zeros_like(mass).scatter_add_(2, level, nonempty)
    # Q: each level's mass shared by its non-empty bins, then normalised
    q = torch.where(kept > 0, mass.gather(2, level) / count.gather(2, level).clamp(min=1.0), 0.0)
    q_sum = q.sum(2, keepdim=True)
    q = torch.where(q_sum > 0, q / torch.where(q_sum > 0, q_sum, 1.0), 0.0)
    # P: the kept bins with the outliers folded into bin i - 1, normalised
    total = c.sum(1)[:, None]  # [B, 1]
    outliers = (total - kept.sum(2))[..., None]  # [B, K, 1]
    p = kept.scatter_add(2, (cuts - 1)[None, :, None].expand(b, k, 1), outliers)
    p_sum = p.sum(2, keepdim=True)
    p = torch.where(p_sum > 0, p / torch.where(p_sum > 0, p_sum, 1.0), 0.0)
    q = torch.where(q > 0, q, KLD_EPS)
    terms = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0) / q), 0.0)
    return terms.sum(2)


def kld_divergence(
    counts: torch.Tensor,
    edges: torch.Tensor,
    *,
    num_bits: int = 8,
    unsigned: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cuts tried by the kld search and the divergence ``KL(P || Q)`` of each.

    Args:
        counts: ``[..., n]`` bin counts of ``|x|`` (of ``x`` when unsigned).
        edges: ``[..., n + 1]`` bin edges, ``edges[..., 0] == 0`` (only their shape is used here).
        num_bits, unsigned: the quantizer's; they set the number of levels (see the module docstring).

    Returns:
        ``(cuts, kl)``: int64 ``[K]`` numbers of kept bins and float64 ``[..., K]`` divergences.

    >>> cuts, kl = kld_divergence(torch.tensor([[5, 4, 3, 2] * 8]), torch.linspace(0, 32, 33)[None], num_bits=2)
    >>> cuts.tolist()[:3], kl.shape
    ([2, 4, 6], torch.Size([1, 15]))
    """
    c, _, lead = _as_2d(counts, edges)
    cuts = kld_cuts(c.shape[1], c.device)
    levels = _levels(num_bits, unsigned)
    c = c.double().clone()
    # The zero bin holds the exact zeros of ReLU outputs (often most of the tensor), which tpu-mlir's calibration
    # leaves out; with them, P's spike at zero dominates every cut and the search clips at the first one. As in
    # TensorRT's entropy calibration, the zero bin takes the count of bin 1.
    c[:, 0] = c[:, 1]
    rows = max(1, _CHUNK // (cuts.numel() * c.shape[1]))
    kl = torch.cat([_divergence_rows(part, cuts, levels) for part in c.split(rows)]) if c.shape[0] else c[:, :0]
    return cuts, kl.reshape(*lead, cuts.numel())


@register_search("kld")
def kld_amax(
    counts: torch.Tensor,
    edges: torch.Tensor,
    *,
    num_bits: int = 8,
    unsigned: bool = False,
    **_: object,
) -> torch.Tensor:
    """tpu-mlir's KLD threshold: the middle of the first clipped bin of the cut with the smallest ``KL(P || Q)``.

    Same signature as the other searches of :mod:`qdq.calib.amax_search` (``start_bin``, ``stride`` and the other
    searches' keywords are accepted and do not apply). Batched over the leading dimensions, vectorised over bins and
    cuts; runs on the histogram's device.

    Args:
        counts: ``[..., n]`` bin counts, ``n >= 16``.
        edges: ``[..., n + 1]`` increasing bin edges with ``edges[..., 0] == 0``.
        num_bits: bits of the quantizer (``2**(num_bits - 1)`` levels when signed).
        unsigned: the quantizer is unsigned (``2**num_bits`` levels).

    Returns:
        float32 threshold of shape ``counts.shape[:-1]``: ``(edges[i] + edges[i + 1]) / 2`` for the chosen cut
        ``i``, which is ``(i + 0.5) * bin_width`` for equal bins.

    >>> c = torch.tensor([[100, 80, 60, 50, 40, 30, 20, 10] + [0] * 22 + [1, 1]] * 2)
    >>> kld_amax(c, torch.linspace(0, 32, 33).expand(2, 33), num_bits=3)
    tensor([8.5000, 8.5000])
    """
    cuts, kl = kld_divergence(counts, edges, num_bits=num_bits, unsigned=unsigned)
    c, e, lead = _as_2d(counts, edges)
    best = cuts[tolerant_argmin(kl.reshape(-1, cuts.numel()), "first")]  # [B]
    low = e.gather(1, best[:, None])[:, 0]
    high = e.gather(1, best[:, None] + 1)[:, 0]
    amax = (low + high) / 2
    # Data that fits the grid: at most one non-empty bin per level over the whole range, so quantizing the full range
    # describes it exactly (KL = 0 at the full range, a cut the grid does not try). Low-cardinality data (all 3.0,
    # two values) keeps its range instead of being clipped at the first cut.
    fits = fits_grid(c, _levels(num_bits, unsigned))
    return torch.where(fits, e[:, -1], amax).float().reshape(lead)


def fits_grid(counts: torch.Tensor, levels: int) -> torch.Tensor:
    """Per row of ``[B, n]`` counts: whether no level of the full-range grid (bin ``j`` to level ``j * levels // n``)
    holds more than one non-empty bin, i.e. quantizing the whole range keeps every populated bin apart.

    >>> fits_grid(torch.tensor([[0, 0, 0, 9], [5, 4, 3, 2]]), levels=2)
    tensor([ True, False])
    """
    b, n = counts.shape
    level = (torch.arange(n, device=counts.device) * levels // n).expand(b, n)
    per_level = torch.zeros(b, levels, dtype=torch.int64, device=counts.device)
    per_level.scatter_add_(1, level, (counts > 0).long())
    return (per_level <= 1).all(dim=1) & (counts > 0).any(dim=1)
