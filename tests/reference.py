"""Small NumPy reference implementations the tests compare against (exactly, where the math is exact)."""

from collections import Counter

import numpy as np

AMAX_EPS = np.float32(2.0**-24)


def qrange(num_bits, unsigned, narrow_range):
    qmax = 2 ** (num_bits - 1 + int(unsigned)) - 1
    if unsigned:
        return 0, qmax
    return (-qmax if narrow_range else -qmax - 1), qmax


def scale(amax, num_bits=8, unsigned=False):
    """float32 step: max(amax, eps) / maxbound."""
    amax = np.maximum(np.asarray(amax, dtype=np.float32), AMAX_EPS)
    return (amax / np.float32(2 ** (num_bits - 1 + int(unsigned)) - 1)).astype(np.float32)


def quantize(x, amax, num_bits=8, unsigned=False, narrow_range=False):
    """Integer values, float32: clip(rint(x * (1/scale)), qmin, qmax), all in float32."""
    s = scale(amax, num_bits, unsigned)
    inv = (np.float32(1.0) / s).astype(np.float32)
    qmin, qmax = qrange(num_bits, unsigned, narrow_range)
    prod = (np.asarray(x, dtype=np.float32) * inv).astype(np.float32)
    return np.clip(np.rint(prod), qmin, qmax).astype(np.float32), s


def fake_quant(x, amax, num_bits=8, unsigned=False, narrow_range=False):
    q, s = quantize(x, amax, num_bits, unsigned, narrow_range)
    return (q * s).astype(np.float32)


def amax_grad(x, amax, grad_out, num_bits=8, unsigned=False, narrow_range=False):
    """LSQ-style d/d amax: (q - x/s)/maxbound inside |x| <= amax, q/maxbound outside; summed to amax's shape."""
    q, s = quantize(x, amax, num_bits, unsigned, narrow_range)
    mb = np.float64(2 ** (num_bits - 1 + int(unsigned)) - 1)
    xs = x.astype(np.float64) * (np.float64(1.0) / s.astype(np.float64))
    inside = np.abs(x) <= amax
    d = np.where(inside, q - xs, q) / mb * grad_out
    amax = np.asarray(amax)
    axes = tuple(i for i, n in enumerate(amax.shape) if n == 1 and x.shape[i] != 1) if amax.ndim else None
    return d.sum(axis=axes, keepdims=True).reshape(amax.shape) if amax.ndim else d.sum()


def entropy_loop(calib_hist, edges, num_bits=8, unsigned=False, stride=1, start_bin=128):
    """TensorRT's entropy search as pytorch_quantization writes it: a loop per candidate cut.

    Returns (amax, divergences). The zero bin takes bin 1's count; ties go to the larger cut.
    """
    from scipy.stats import entropy

    bins = np.asarray(calib_hist, dtype=np.float64).copy()
    bins[0] = bins[1]
    levels = 1 << (num_bits - 1 + int(unsigned))
    divergences = []
    for i in range(start_bin, len(bins) + 1, stride):
        space = np.linspace(0, i, num=levels + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        counts = np.zeros(levels)
        for idx, d in enumerate(digitized):
            if d != -1:
                counts[d] += bins[idx]
        for key, val in Counter(digitized).items():
            if key != -1:
                counts[key] /= val
        q = np.zeros(i)
        for idx, d in enumerate(digitized):
            if d != -1:
                q[idx] = counts[d]
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        divergences.append(entropy(p, q))
    divergences = np.array(divergences)
    last = len(divergences) - 1 - np.argmin(divergences[::-1])
    return edges[last * stride + start_bin], divergences


def mse_loop(calib_hist, edges, num_bits=8, unsigned=False, stride=1, start_bin=128):
    """The mse search written as a loop: for each cut i, amax = edges[i], error of the fake-quantized centers."""
    edges = np.asarray(edges, dtype=np.float32)
    centers = ((edges[1:].astype(np.float64) + edges[:-1]) / 2).astype(np.float32)
    errs = []
    cands = list(range(start_bin, len(calib_hist) + 1, stride))
    for i in cands:
        fq = fake_quant(centers, edges[i], num_bits, unsigned)
        errs.append(float(((fq - centers).astype(np.float32) ** 2).astype(np.float64) @ calib_hist))
    errs = np.array(errs)
    best = len(errs) - 1 - np.argmin(errs[::-1])
    return edges[cands[best]], errs


def affine_qparams(amin, amax, num_bits=8, unsigned=False):
    """Asymmetric scale and zero point, float32: range widened to contain 0."""
    qmin, qmax = qrange(num_bits, unsigned, False)
    amin = np.minimum(np.asarray(amin, dtype=np.float32), np.float32(0))
    amax = np.maximum(np.asarray(amax, dtype=np.float32), np.float32(0))
    s = (np.maximum((amax - amin).astype(np.float32), AMAX_EPS) / np.float32(qmax - qmin)).astype(np.float32)
    zp = np.clip(np.rint((np.float32(qmin) - (amin / s).astype(np.float32)).astype(np.float32)), qmin, qmax)
    return s, zp.astype(np.float32)


def fake_affine(x, amin, amax, num_bits=8, unsigned=False):
    s, zp = affine_qparams(amin, amax, num_bits, unsigned)
    qmin, qmax = qrange(num_bits, unsigned, False)
    inv = (np.float32(1.0) / s).astype(np.float32)
    q = np.clip(np.rint((np.asarray(x, np.float32) * inv).astype(np.float32)) + zp, qmin, qmax)
    return ((q - zp).astype(np.float32) * s).astype(np.float32)
