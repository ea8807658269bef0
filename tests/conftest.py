import logging
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the modules tests share: the NumPy reference, format_models
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # examples/ is not installed; tests import it from the checkout
    sys.path.insert(0, str(ROOT))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _qdq_log_level():
    """Each test finds qdq's logger at the level the previous one found it (pytorch_quantization-style code calls
    ``quant_logging.set_verbosity(ERROR)``, which would silence the warnings later tests check for)."""
    logger = logging.getLogger("qdq")
    level = logger.level
    yield
    logger.setLevel(level)


def require_shared_data(name: str) -> Path:
    """Path of a file in ../shared/data; skips where it is absent, fails under CI (where it must exist)."""
    path = SHARED_DATA / name
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{path} is missing; CI always has ../shared/data")
        pytest.skip(f"{path} is not available")
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs and large models (deselect with -m 'not slow')")
