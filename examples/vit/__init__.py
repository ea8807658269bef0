"""ViT example: a small ViT on CIFAR-10 in INT8 with its attention MatMuls, PTQ methods, QAT, export; a BERT-style encoder (see README.md)."""
