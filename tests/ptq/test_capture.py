"""PausedForwards: one forward per batch that pauses at each watched module gives what feeding the model from the
start (run_until) gives, sees changes to the layers it has not reached yet, and names what went wrong."""

import threading

import pytest
import torch
from torch import nn

from qdq.ptq.capture import PausedForwards, run_until


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 3, 1)
        self.c = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        y = x + self.b(torch.relu(self.a(x)))  # x is kept alive across a and b
        return self.c(y)


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, 3, 5, 5, generator=g) for n in (4, 3, 2)]


def _fresh(model, module, data, keep):
    seen = []
    run_until(model, module, data, lambda args, kwargs, out: seen.append(args[0] if keep == "input" else out),
              progress=False)
    return seen


@pytest.mark.parametrize("at", ["input", "output"])
def test_matches_feeding_from_the_start_and_sees_later_changes(at):
    torch.manual_seed(0)
    model, data = _Residual().eval(), _data()
    layers = [model.a, model.b, model.c]
    with PausedForwards(model, layers, data, at=at) as forwards:
        for i, layer in enumerate(layers):
            got = [args[0] if at == "input" else out for args, _, out in forwards.advance(layer)]
            expected = _fresh(model, layer, data, at)
            assert len(got) == len(data)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=0, atol=0)
            # a change to a layer the forwards have not run yet (paused before this one, or after it and before the
            # next) is seen by them: the next comparison with a fresh feed checks it
            changed = layer if at == "input" else layers[(i + 1) % len(layers)]
            with torch.no_grad():
                changed.weight.mul_(0.5)
    assert not [t for t in threading.enumerate() if t.name.startswith("qdq-forward-")]


def test_calls_from_the_callers_thread_pass_through():
    model, data = _Residual().eval(), _data()
    with PausedForwards(model, [model.a, model.c], data) as forwards:
        forwards.advance(model.a)
        out = model.a(torch.zeros(1, 3, 5, 5))  # would deadlock if it paused
        assert out.shape == (1, 4, 5, 5)
        assert len(forwards.advance(model.c)) == 3


def test_context_is_entered_around_each_resumption():
    model, data = _Residual().eval(), _data()
    states = []

    class Flag:
        def __enter__(self):
            states.append("in")

        def __exit__(self, *exc):
            states.append("out")

    with PausedForwards(model, [model.b], data, context=Flag) as forwards:
        forwards.advance(model.b)
    assert states == ["in", "out"] * 3


def test_errors_name_the_module_and_the_batch():
    model, data = _Residual().eval(), _data()
    names = {id(model.a): "a", id(model.b): "b", id(model.c): "c"}
    with PausedForwards(model, [model.a, model.b, model.c], data, names=names) as forwards:
        with pytest.raises(RuntimeError, match="b did not run in calibration batch 0 where expected: a ran before"):
            forwards.advance(model.b)
    with PausedForwards(model, [model.a, model.c], data, names=names) as forwards:
        forwards.advance(model.a)
        forwards.advance(model.c)
        with pytest.raises(RuntimeError, match="a asked for after a later module"):
            forwards.advance(model.a)
    with PausedForwards(model, [model.a], data, names=names) as forwards:
        with pytest.raises(ValueError, match="not watched"):
            forwards.advance(model.c)
    bad = [torch.randn(2, 5, 5, 5)]  # wrong channel count: the model's own error, naming the batch
    with PausedForwards(model, [model.c], bad, names=names) as forwards:
        with pytest.raises(RuntimeError, match="calibration batch 0"):
            forwards.advance(model.c)
    assert not [t for t in threading.enumerate() if t.name.startswith("qdq-forward-")]


def test_a_module_that_does_not_run_is_an_error():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            x = self.a(x)
            return self.b(x) if x.shape[0] > 2 else x

    model = Skips().eval()
    with PausedForwards(model, [model.a, model.b], [torch.randn(4, 3), torch.randn(2, 3)],
                        names={id(model.b): "b"}) as forwards:
        forwards.advance(model.a)
        with pytest.raises(RuntimeError, match="b did not run in calibration batch 1"):
            forwards.advance(model.b)
