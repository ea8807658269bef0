"""Switches on something that is not a module: a TypeError saying what is expected."""

import pytest

from qdq.transform.switches import disable_quantization, enable_quantization, have_quantizer, quantizers


@pytest.mark.parametrize("thing", [None, 5, "model"])
def test_switches_need_a_module(thing):
    """Regression: quantizers(None) / disable_quantization(5) gave "has no attribute 'named_modules'"."""
    with pytest.raises(TypeError, match=r"expected an nn.Module"):
        list(quantizers(thing))
    with pytest.raises(TypeError, match=r"expected an nn.Module"):
        have_quantizer(thing)
    for switch in (disable_quantization, enable_quantization):
        with pytest.raises(TypeError, match=rf"{switch.__name__} takes an nn.Module"):
            switch(thing)
