"""ImageNet example: PTQ methods compared on EfficientNet-Lite0 or a torchvision classifier (see README.md)."""
