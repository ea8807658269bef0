"""Helpers the examples and benchmarks share: where the shared data is, extracting it, ImageNet sample labels.

The real data lives outside the repository (``../shared/data`` beside the checkout, or a folder you give with
``--data``); archives are extracted once into a cache folder (``$QDQ_DATA_CACHE``, default
``<system temp>/qdq-data``), never into the repository.
"""

from __future__ import annotations

import os
import random
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["shared_data_dir", "extract", "cifar10_root", "imagenet_sample", "ImagenetSample", "cache_dir"]


def shared_data_dir() -> Path:
    """``../shared/data`` beside the repository (``QDQ_SHARED_DATA`` overrides it)."""
    return Path(os.environ.get("QDQ_SHARED_DATA", ROOT.parent / "shared" / "data"))


def cache_dir() -> Path:
    path = Path(os.environ.get("QDQ_DATA_CACHE", Path(tempfile.gettempdir()) / "qdq-data"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def extract(archive: str | os.PathLike, keep: Callable[[str], bool] | None = None, tag: str = "all") -> Path:
    """Extracts ``archive`` (a path, or a file name in :func:`shared_data_dir`) into the cache, once.

    ``keep(member_name)`` selects members (a partial extraction gets its own ``tag``). Returns the extraction folder.
    """
    path = Path(archive)
    if not path.is_absolute() and not path.exists():
        path = shared_data_dir() / path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (the shared data lives in ../shared/data beside the repository)")
    dest = cache_dir() / f"{path.name.split('.')[0]}-{tag}"
    done = dest / ".complete"
    if done.exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if (m.isdir() or m.isfile()) and (keep is None or keep(m.name))]
        tar.extractall(dest, members=members, filter="data")
    done.touch()
    return dest


def cifar10_root(limit_per_class: int | None = None) -> Path:
    """The extracted CIFAR-10 ImageFolder root (``.../cifar10`` with ``train/`` and ``test/``).

    ``limit_per_class`` keeps only the first images of each class and split (for quick runs).
    """
    if limit_per_class is None:
        return extract("cifar10-jpeg.tar.gz") / "cifar10"

    def keep(name: str) -> bool:
        parts = name.split("/")
        return len(parts) < 4 or int(Path(parts[3]).stem) < limit_per_class

    return extract("cifar10-jpeg.tar.gz", keep, tag=f"first{limit_per_class}") / "cifar10"


class ImagenetSample(Dataset):
    """The 500 ImageNet sample images with their class indices (the line of the wnid in ``wnids_1000_sorted.txt``)."""

    def __init__(self, root: Path, transform: Callable, files: Iterable[Path] | None = None):
        wnids = (root / "wnids_1000_sorted.txt").read_text().split()
        self.index = {w: i for i, w in enumerate(wnids)}
        self.files = list(files) if files is not None else sorted(root.glob("*.JPEG"))
        if not self.files:
            raise FileNotFoundError(f"no .JPEG images in {root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.files[i]
        label = self.index[path.name.split("_", 1)[0]]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def imagenet_sample(transform: Callable, calib: int = 100, batch_size: int = 25,
                    root: str | os.PathLike | None = None) -> tuple[DataLoader, DataLoader]:
    """``(calibration loader, evaluation loader)`` over the ImageNet sample: after a fixed shuffle (the files are
    sorted by class, and the classes by kind), the first ``calib`` images calibrate and the others evaluate."""
    folder = Path(root) if root else extract("imagenet-sample-500.tar") / "imagenet-sample-500"
    files = list(ImagenetSample(folder, transform).files)
    random.Random(0).shuffle(files)
    calib_set = ImagenetSample(folder, transform, files[:calib])
    eval_set = ImagenetSample(folder, transform, files[calib:])
    return (DataLoader(calib_set, batch_size=batch_size), DataLoader(eval_set, batch_size=batch_size))


def seed_everything(seed: int = 0) -> None:
    torch.manual_seed(seed)
