"""The folder sources: :class:`ImageFolderSource` (image files) and :class:`NumpyFolderSource` (``.npy``/``.npz``
files), and their base :class:`_Source`, which batches samples loaded one at a time.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from qdq.calibrate.data.files import (
    DataSourceError,
    IMAGE_EXTENSIONS,
    _PathLike,
    _apply,
    _check_layouts,
    _extensions,
    _key,
    _layout,
    _list_files,
    _load_npy,
    _load_npz,
    _names,
    _positive_int,
    _read_image,
)

__all__ = ["ImageFolderSource", "NumpyFolderSource"]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# the sources
# --------------------------------------------------------------------------------------------------------------------

_Sample = tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


class _Source:
    """A re-iterable sequence of batches built from samples loaded one at a time.

    Subclasses set ``batch_size``, ``_names``, ``_has_batch_dim``, ``_hint`` and implement :attr:`num_samples`,
    ``_load(index)`` (a tuple of tensors, or a dict) and ``_where(index)`` (the sample's files, for errors).
    """

    batch_size: int = 1
    _names: list[str] | None = None
    _has_batch_dim: bool = False
    _hint: str = ""

    @property
    def num_samples(self) -> int:
        """How many samples (files, or data-list lines) one pass yields."""
        raise NotImplementedError

    def _load(self, index: int) -> _Sample:
        raise NotImplementedError

    def _where(self, index: int) -> str:
        raise NotImplementedError

    def __len__(self) -> int:
        """The number of batches (the last one may be smaller)."""
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        n = self.num_samples
        for start in range(0, n, self.batch_size):
            indices = list(range(start, min(start + self.batch_size, n)))
            yield self._form(self._collate([self._load(i) for i in indices], indices))

    def sample(self, index: int) -> Any:
        """Sample ``index`` alone, in the form batches take but without the batch dimension they add (for inspection).

        With ``has_batch_dim=True`` the arrays keep the batch dimension their file holds.
        """
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"sample {index} of a source with {self.num_samples} samples")
        return self._form(self._load(index % self.num_samples))

    def _form(self, inputs: _Sample) -> Any:
        """Tensor, dict or ``((x1, x2),)``: the forms calibrate_model passes on to the model."""
        if isinstance(inputs, dict):
            return inputs
        if self._names is not None:
            return dict(zip(self._names, inputs))
        return inputs[0] if len(inputs) == 1 else (tuple(inputs),)

    def _collate(self, samples: list[_Sample], indices: list[int]) -> _Sample:
        first = samples[0]
        if isinstance(first, dict):
            return {k: self._join([s[k] for s in samples], indices, _key(k)) for k in first}
        return tuple(
            self._join([s[p] for s in samples], indices, f" input {p}" if len(first) > 1 else "")
            for p in range(len(first))
        )

    def _join(self, tensors: list[torch.Tensor], indices: list[int], label: str) -> torch.Tensor:
        ref = tensors[0]
        for t, i in zip(tensors[1:], indices[1:]):
            if self._has_batch_dim:
                same = t.shape[1:] == ref.shape[1:] and t.dim() == ref.dim()
            else:
                same = t.shape == ref.shape
            if not same or t.dtype != ref.dtype:
                raise DataSourceError(
                    f"cannot batch {self._where(i)}{label} ({_describe(t)}) with {self._where(indices[0])}{label} "
                    f"({_describe(ref)}){self._hint}"
                )
        if len(tensors) == 1 and self._has_batch_dim:
            return ref
        return torch.cat(tensors) if self._has_batch_dim else torch.stack(tensors)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_samples} samples, batch_size={self.batch_size}, {len(self)} batches)"


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


class ImageFolderSource(_Source):
    """Batches of images from a folder, read with PIL and made tensors by ``preprocess``.

    The folder is searched recursively, so a flat folder and an ImageNet-style tree (``n01440764/xxx.JPEG``) both
    work. Files are taken in sorted order of their path under ``root``; hidden files are skipped, other files
    ignored (both logged). Each image is converted to ``mode`` (RGB by default: ImageNet holds grayscale and CMYK
    JPEGs) and passed to ``preprocess``; a batch is the stacked results, ``[B, C, H, W]``. ``preprocess`` is what the
    model saw in training, typically::

        from torchvision import transforms
        preprocess = transforms.Compose([
            transforms.Resize(256),
            transforms.CenterCrop(224),                 # a fixed size, so that images stack into a batch
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ])
        # or, for a torchvision model: preprocess = torchvision.models.ResNet50_Weights.DEFAULT.transforms()

    Sorted order puts the files of one class together, so ``limit`` alone would calibrate on the first few classes
    of a class tree; pass ``seed`` to take a deterministic random subset instead.

    Args:
        root: the folder.
        preprocess: ``PIL.Image -> tensor`` (a tensor or a NumPy array).
        batch_size: images per batch (the last batch may be smaller).
        limit: use at most this many images (after the shuffle, when ``seed`` is given).
        extensions: file name endings read as images (case-insensitive).
        seed: shuffle the sorted file list with ``random.Random(seed)`` before ``limit``.
        mode: PIL mode images are converted to; ``None`` keeps each file's own.

    Raises:
        FileNotFoundError: ``root`` does not exist (``NotADirectoryError``: it is a file).
        DataSourceError: no image under ``root``; when iterating, an image that cannot be read or preprocessed, or
            preprocessed images of different shapes in one batch (each names the file).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> import numpy as np
        >>> import torch
        >>> tmp = tempfile.TemporaryDirectory()
        >>> for cls in ("cat", "dog"):
        ...     (Path(tmp.name) / cls).mkdir()
        ...     for i in range(3):
        ...         Image.new("RGB", (12, 10), (40 * i, 80, 120)).save(Path(tmp.name) / cls / f"{i}.png")
        >>> to_tensor = lambda image: torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
        >>> source = ImageFolderSource(tmp.name, to_tensor, batch_size=4)
        >>> len(source), [tuple(b.shape) for b in source]
        (2, [(4, 3, 10, 12), (2, 3, 10, 12)])
        >>> [p.relative_to(tmp.name).as_posix() for p in source.files[:4]]
        ['cat/0.png', 'cat/1.png', 'cat/2.png', 'dog/0.png']
        >>> tmp.cleanup()
    """

    def __init__(
        self,
        root: _PathLike,
        preprocess: Callable[[Any], torch.Tensor],
        batch_size: int = 32,
        limit: int | None = None,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
        *,
        seed: int | None = None,
        mode: str | None = "RGB",
    ):
        if not callable(preprocess):
            raise TypeError(f"ImageFolderSource: preprocess must be callable (PIL.Image -> tensor), got {preprocess!r}")
        self.root = Path(root)
        self.preprocess = preprocess
        self.batch_size = _positive_int(batch_size, "ImageFolderSource: batch_size")
        limit = _positive_int(limit, "ImageFolderSource: limit", allow_none=True)
        self.mode = mode
        exts = _extensions(extensions)
        files = _list_files(self.root, exts, "ImageFolderSource")
        if not files:
            raise DataSourceError(f"ImageFolderSource: no image files ({'/'.join(exts)}) under {self.root}")
        if seed is not None:
            random.Random(seed).shuffle(files)
        #: The image files, in the order they are read.
        self.files: list[Path] = files[:limit]
        self._hint = (
            ": preprocess must give every image the same shape to batch them (resize and crop to a fixed size), "
            "or use batch_size=1"
        )
        logger.info("ImageFolderSource: %d images under %s, %d batches", len(self.files), self.root, len(self))

    @property
    def num_samples(self) -> int:
        return len(self.files)

    def _where(self, index: int) -> str:
        return str(self.files[index])

    def _load(self, index: int) -> _Sample:
        path = self.files[index]
        return (_apply(self.preprocess, _read_image(path, self.mode), str(path), None),)


class NumpyFolderSource(_Source):
    """Batches from a folder of ``.npy`` files (one input each) or ``.npz`` files (several named inputs each).

    The layout of tpu-mlir's ``run_calibration.py --dataset``: one file per sample, inputs already preprocessed.
    ``.npy`` samples give tensor batches; ``.npz`` samples give dicts ``{key: tensor}``, the keyword arguments of a
    multi-input model (``np.savez(path, input_ids=..., attention_mask=...)``). The folder holds one kind of file;
    it is searched recursively and read in sorted order.

    Args:
        root: the folder.
        batch_size: samples per batch (the last batch may be smaller).
        names: for ``.npz`` files, the keys to use, in this order (default: every key, in the first file's order);
            for ``.npy`` files, one name, to get dicts ``{name: tensor}`` instead of tensors.
        has_batch_dim: each file already has a batch dimension (first), so files are concatenated along it instead
            of stacked; ``batch_size`` still counts files.
        dtype: cast floating-point arrays to this dtype (``torch.float32`` for float64 files); others are kept.
        limit: use at most this many files.

    Raises:
        FileNotFoundError: ``root`` does not exist (``NotADirectoryError``: it is a file).
        DataSourceError: no ``.npy``/``.npz`` file; both kinds mixed; a file that is not a NumPy file, or whose keys
            differ from the first file's (or lack one of ``names``); with ``batch_size > 1``, shapes or dtypes that
            differ between files. Each names the file.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import numpy as np
        >>> tmp = tempfile.TemporaryDirectory()
        >>> for i in range(3):
        ...     np.savez(Path(tmp.name) / f"{i}.npz", ids=np.arange(6) + i, mask=np.ones(6, dtype=np.float32))
        >>> batches = list(NumpyFolderSource(tmp.name, batch_size=2))
        >>> [{k: tuple(v.shape) for k, v in b.items()} for b in batches]
        [{'ids': (2, 6), 'mask': (2, 6)}, {'ids': (1, 6), 'mask': (1, 6)}]
        >>> list(NumpyFolderSource(tmp.name, names=["mask"]).sample(0))
        ['mask']
        >>> tmp.cleanup()
    """

    def __init__(
        self,
        root: _PathLike,
        batch_size: int = 1,
        names: Sequence[str] | None = None,
        *,
        has_batch_dim: bool = False,
        dtype: torch.dtype | None = None,
        limit: int | None = None,
    ):
        self.root = Path(root)
        self.batch_size = _positive_int(batch_size, "NumpyFolderSource: batch_size")
        limit = _positive_int(limit, "NumpyFolderSource: limit", allow_none=True)
        names = _names(names, "NumpyFolderSource: names")
        self._has_batch_dim = bool(has_batch_dim)
        self.dtype = dtype
        files = _list_files(self.root, (".npy", ".npz"), "NumpyFolderSource")
        if not files:
            raise DataSourceError(f"NumpyFolderSource: no .npy or .npz files under {self.root}")
        kinds = {p.suffix.lower() for p in files}
        if len(kinds) > 1:
            npy = next(p for p in files if p.suffix.lower() == ".npy")
            npz = next(p for p in files if p.suffix.lower() == ".npz")
            raise DataSourceError(
                f"NumpyFolderSource: {self.root} mixes .npy files ({npy}) and .npz files ({npz}); use .npy files for "
                "a single-input model, .npz files for several named inputs"
            )
        #: The files, in the order they are read.
        self.files: list[Path] = files[:limit]
        self._npz = kinds == {".npz"}
        if not self._npz and names is not None and len(names) != 1:
            raise ValueError(f"NumpyFolderSource: .npy files hold one input each, so names takes one name, got {names}")
        layouts = [_layout(p) for p in self.files]
        keys = _check_layouts(
            layouts, self._where, names if self._npz else None, self.batch_size > 1, self._has_batch_dim, dtype
        )
        self._keys = keys
        self._names = None if self._npz else names
        self._hint = ""
        logger.info("NumpyFolderSource: %d %s files under %s, %d batches",
                    len(self.files), ".npz" if self._npz else ".npy", self.root, len(self))

    @property
    def num_samples(self) -> int:
        return len(self.files)

    @property
    def input_names(self) -> list[str] | None:
        """The keys of dict batches, ``None`` for tensor batches."""
        return list(self._keys) if self._npz else self._names

    def _where(self, index: int) -> str:
        return str(self.files[index])

    def _load(self, index: int) -> _Sample:
        path = self.files[index]
        if self._npz:
            return _load_npz(path, self._keys, self.dtype)
        return (_load_npy(path, self.dtype),)
