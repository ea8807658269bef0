"""Command line of the ViT example: ``python -m examples.vit.train [--tiny] [--help]``.

Trains a small ViT on CIFAR-10, quantizes it to INT8 with its attention MatMuls (PTQ with each calibration method,
then QAT), exports, verifies and checks it; then a BERT-style encoder (see README.md beside this file and
:mod:`examples.vit.vit`).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python examples/vit/train.py): import from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.vit.vit import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
