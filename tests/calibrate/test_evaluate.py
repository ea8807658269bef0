"""qdq.calibrate.evaluate: logits collected in eval mode, every module's own train/eval flag put back afterwards."""

import torch
from torch import nn

from qdq.calibrate.evaluate import collect_logits


def test_collect_logits_restores_each_modules_mode():
    """Regression: the flag was restored with model.train(was_training), which also switched a BatchNorm the user
    had frozen in eval mode back to training."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    model[1].eval()  # frozen statistics, as in QAT
    data = [(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    logits, labels = collect_logits(model, data, progress=False)
    with torch.no_grad():
        expected = torch.cat([model.eval()(x) for x, _ in data])
    assert torch.equal(logits, expected) and labels.shape == (16,)
    model.train()
    model[1].eval()
    collect_logits(model, data, progress=False)
    assert [m.training for m in model] == [True, False, True]
