"""Children whose weight the parent's forward uses functionally (never calling the child), read from the source."""

import torch
import torch.nn.functional as F
from torch import nn

from qdq import quant_modules
from qdq.transform.functional_weights import functional_weight_users


class UsesWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x):
        return F.linear(x, self.qkv.weight, self.qkv.bias)


class ReadsMetadata(nn.Module):
    """As transformers' T5 and timm's EdgeNeXt: the weight's type, dtype and device are read, then the child runs."""

    def __init__(self):
        super().__init__()
        self.wo = nn.Linear(4, 4)

    def forward(self, x):
        if isinstance(self.wo.weight, torch.Tensor) and x.dtype != self.wo.weight.dtype:
            x = x.to(self.wo.weight.dtype)
        x = x.to(self.wo.weight.device)
        assert self.wo.weight.size(1) == x.shape[-1] and self.wo.weight.shape[0] == 4
        return self.wo(x)


def test_functional_use_is_found_and_metadata_reads_are_not():
    model = nn.Sequential(UsesWeight(), ReadsMetadata())
    assert functional_weight_users(model) == {"0.qkv": ("0", "UsesWeight")}
    report = quant_modules.replace_to_quantization_module(model)
    assert report.replaced == ["1.wo"] and [p for p, _ in report.unsupported] == ["0.qkv"]
    assert model[1](torch.randn(2, 4)).shape == (2, 4)  # the converted child runs
