"""The ViT example's formats beyond INT8 (``examples.vit.vit.format_model``): which quantizers each format leaves
on, strict calibration, and outputs close to the float model's."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import qdq  # noqa: E402
from examples.vit import vit  # noqa: E402
from qdq import nn as quant_nn  # noqa: E402
from qdq.calibrate.evaluate import sqnr_db  # noqa: E402


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = vit.small_vit().eval()
    template, _ = vit.quantize(model, torch.randn(1, 3, 32, 32))
    return model, template


def _enabled(model):
    return [q for q in model.modules() if isinstance(q, quant_nn.TensorQuantizer) and q.is_enabled]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", vit.FORMATS)
def test_format_model_quantizers_and_calibration(models, fmt):
    model, template = models
    qmodel = vit.format_model(template, fmt)
    enabled = _enabled(qmodel)
    assert enabled and all(q.name for q in enabled)
    if fmt == "fp8":
        assert all(q.num_bits == (4, 3) for q in enabled)  # nothing left in INT8
        attention = [m for m in qmodel.modules() if isinstance(m, quant_nn.QuantScaledDotProductAttention)]
        assert attention and all(q.is_enabled and q.num_bits == (4, 3) for a in attention for q in a.quantizers())
        assert not qmodel.conv_proj.weight_quantizer.is_enabled and not qmodel.heads.head.weight_quantizer.is_enabled
    else:
        assert all(q.num_bits == 4 and q.block_size == 64 for q in enabled)  # weights only
        kinds = (quant_nn.QuantLinear, quant_nn.QuantMultiheadAttention)
        linears = [m for m in qmodel.modules() if isinstance(m, kinds)]
        assert len(enabled) == len(linears) == 4 * 4 + 1
        assert all(m.weight_quantizer.is_enabled and not m.input_quantizer.is_enabled for m in linears)
    assert all(q.is_enabled for q in _enabled(template))  # the template is left as it was
    images = torch.randn(8, 3, 32, 32)
    qdq.calibrate_model(qmodel, [images[:4]], method="max", strict=True, progress=False)
    with torch.no_grad():
        assert sqnr_db(model(images), qmodel(images)) > 15


def test_format_model_refuses_an_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'int2'"):
        vit.format_model(torch.nn.Linear(2, 2), "int2")
