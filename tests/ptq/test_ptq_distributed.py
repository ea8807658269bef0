"""AdaRound and bias correction under torch.distributed (2 gloo ranks, each with its own shard): the ranks end with
the same weights and biases, and AdaRound's weights are those of one process on all the data."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import qdq
from test_distributed import _launch, _save, _shard


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    qdq.replace_to_quantization_module(model)
    return model


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(4, 3, 6, 6, generator=g) for _ in range(4)]


def _ptq_worker(rank: int, world: int, out: Path) -> None:
    model = _model()
    data = _shard(_data(), rank, world)
    qdq.calibrate_model(model, data, progress=False)
    whole = copy.deepcopy(model)  # every sample optimised (holdout=0): the union of the shards' data
    qdq.adaround(whole, data, iterations=15, holdout=0, progress=False)
    qdq.adaround(model, data, iterations=15, batch_size=4, progress=False)
    qdq.bias_correction(model, data, progress=False)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update({f"whole.{k}": whole.get_submodule(k).weight.detach().clone() for k in ("0", "2")})
    _save(out, rank, state)


@pytest.mark.slow
def test_ranks_agree_after_adaround_and_bias_correction(tmp_path):
    ranks = _launch(_ptq_worker, 2, tmp_path)
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # the union of the data decides: the bias correction of one process on all batches adds the same shift
    single = _model()
    qdq.calibrate_model(single, _data(), progress=False)
    assert torch.equal(single[0].weight_quantizer.amax, ranks[0]["0._weight_quantizer._amax"])
    # AdaRound's quadratic objective summed over the ranks is the one of all the data: the same integers
    qdq.adaround(single, _data(), iterations=15, holdout=0, progress=False)
    for name in ("0", "2"):
        scale = single.get_submodule(name).weight_quantizer.amax / 127
        mine = torch.round(single.get_submodule(name).weight.detach() / scale)
        assert torch.equal(mine, torch.round(ranks[0][f"whole.{name}"] / scale)), name
