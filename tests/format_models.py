"""Small quantized models the tests of per-layer formats (tests/transform) and of the format search
(tests/calibrate) share."""

import torch

import qdq


def quantized_mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    qdq.replace_to_quantization_module(model)
    return model


def quantized_cnn() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4))
    qdq.replace_to_quantization_module(model)
    return model
