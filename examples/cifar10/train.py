"""Command line of the CIFAR-10 example: ``python -m examples.cifar10.train [--tiny] [--help]``.

Trains a ResNet-20, compares the 8-bit PTQ calibration methods, 4-bit weights PTQ against QAT, and exports the best
8-bit model to QDQ ONNX (see README.md beside this file and :mod:`examples.cifar10.cifar`).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python examples/cifar10/train.py): import from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.cifar10.cifar import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
