"""The straight-through mask as float arithmetic (qdq.math._masks) against the comparisons it replaces."""

from __future__ import annotations

import pytest
import torch

from qdq.math._masks import float_mask_route, inside_as_float


def _edge_values(hi: torch.Tensor) -> torch.Tensor:
    inf = torch.tensor(float("inf"), dtype=hi.dtype)
    near = torch.stack([torch.nextafter(hi, inf), torch.nextafter(hi, -inf), hi])
    tiny = torch.tensor([torch.finfo(hi.dtype).tiny, 2.0 ** -149 if hi.dtype == torch.float32 else 2.0 ** -24],
                        dtype=hi.dtype)
    values = torch.cat([near, -near, tiny, -tiny, torch.tensor([0.0, -0.0, float("inf"), -float("inf")],
                                                               dtype=hi.dtype)])
    return torch.cat([values, torch.randn(200, dtype=torch.float32).to(hi.dtype) * hi * 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hi", [1.0, 3.7, 2.0 ** -126, 2.0 ** -149, 0.0])
def test_symmetric_mask_is_the_comparison(dtype, hi):
    hi_t = torch.tensor(hi, dtype=torch.float32)
    x = _edge_values(hi_t.to(dtype)).to(dtype)
    expected = (x.abs() <= hi_t).to(torch.float32)
    got = inside_as_float(x, hi_t)
    assert got.dtype == torch.result_type(x, hi_t)
    assert torch.equal(got.float(), expected)


def test_interval_mask_is_the_comparison():
    lo, hi = torch.tensor(-0.5), torch.tensor(2.0)
    x = torch.cat([_edge_values(hi), _edge_values(lo.abs()) * -1, torch.nextafter(lo, torch.tensor(-1.0))[None]])
    expected = ((x >= lo) & (x <= hi)).float()
    assert torch.equal(inside_as_float(x, hi, lo), expected)


def test_per_channel_mask_broadcasts():
    hi = torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1)
    x = torch.randn(3, 50) * 2
    assert torch.equal(inside_as_float(x, hi), (x.abs() <= hi).float())


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_nan_passes_the_gradient(compiled):
    """torch.sign(NaN) is 0, eager and in inductor's scalar and vectorized code: the mask is 1."""
    f = torch.compile(inside_as_float) if compiled else inside_as_float
    x = torch.full((37,), float("nan"))
    assert torch.equal(f(x, torch.tensor(1.0)), torch.ones(37))
    assert torch.equal(f(x, torch.tensor(1.0), torch.tensor(-1.0)), torch.ones(37))


def test_route_is_taken_only_when_compiling_for_the_cpu():
    x = torch.ones(3)
    assert not float_mask_route(x)
    seen = []

    @torch.compile(backend="eager", fullgraph=True)
    def f(t):
        seen.append(float_mask_route(t))
        return t + 1

    torch._dynamo.reset()
    f(x)
    assert seen == [True]
