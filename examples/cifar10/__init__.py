"""CIFAR-10 example: train a ResNet-20, compare PTQ methods, 4-bit weights PTQ vs QAT, export (see README.md)."""
