"""apply_patch with arguments of the wrong kind."""

import pytest
from torch import nn

from qdq.transform.patching import apply_patch


@pytest.mark.parametrize("model,patch", [(nn.Linear(2, 2), 5), (None, None)])
def test_apply_patch_argument_types(model, patch):
    """Regression: apply_patch(model, 5) gave "'int' object has no attribute 'matches'"."""
    with pytest.raises(TypeError, match=r"apply_patch takes an nn.Module and a ForwardPatch"):
        apply_patch(model, patch)
