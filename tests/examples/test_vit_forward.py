"""The ViT example's forward timing (``examples.vit.vit.forward_ratio``), eager and under torch.compile: the
compiled fake-quant model computes what the eager one does."""

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.vit import vit  # noqa: E402


@pytest.mark.slow
def test_forward_ratio_compiled_matches_eager():
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = vit.small_vit().eval()
    images = torch.randn(4, 3, 32, 32)
    template, _ = vit.quantize(model, images[:1])
    qmodel = vit.ptq(template, [(images, torch.zeros(4, dtype=torch.long))], "max", 1)
    timing = vit.forward_ratio(model, qmodel, images, repeats=1, compiled=True)
    assert timing["compiled_max_diff"] < 1e-4
    for key in ("ratio", "ratio_to_composite", "ratio_compiled"):
        assert math.isfinite(timing[key]) and timing[key] > 0, key
