"""Calibration data from files: image folders, folders of NumPy arrays and data lists.

:func:`qdq.calibrate_model` takes any iterable of batches. The sources here turn the usual calibration sets into
such iterables, reading a batch at a time (never the whole set) and starting over on every ``iter()``, so one
source can serve several calibrations:

======================================  =============================================================================
source                                  what one sample is
======================================  =============================================================================
:class:`ImageFolderSource`              an image file, read with PIL and turned into a tensor by ``preprocess``
                                        (flat folders and ImageNet-style ``class/xxx.jpg`` trees alike)
:class:`NumpyFolderSource`              an ``.npy`` file (one input) or an ``.npz`` file (several named inputs), as
                                        tpu-mlir's ``run_calibration.py --dataset``
:class:`DataListSource`                 a line of a text file: comma-separated paths, one per model input, as
                                        tpu-mlir's ``--data_list``
======================================  =============================================================================

Batches come in the forms :func:`qdq.calibrate_model` passes on to the model:

* one input per sample: a tensor ``[B, ...]``, passed as the single argument;
* named inputs (an ``.npz`` file, or ``names=`` / ``input_names=``): a dict ``{name: tensor [B, ...]}``, passed as
  keyword arguments;
* several unnamed inputs (``a.npy,b.npy`` lines): a 1-tuple ``((x1, x2),)``. ``calibrate_model`` takes the first
  item of a tuple as the model input and passes a tuple input as positional arguments, so this is ``model(x1, x2)``.

Samples are stacked along a new first dimension. Files that already hold a batch dimension - tpu-mlir's inputs are
saved at the model's input shape, ``[1, 3, H, W]`` - take ``has_batch_dim=True`` and are concatenated along it.

Everything that can be checked before the first batch is: folders exist and hold files of one kind, data-list paths
exist and every line has as many inputs as the first, ``.npz`` files share their keys, and, when samples are batched
(``batch_size > 1``), array shapes and dtypes agree (read from the file headers, without loading the data). With
``batch_size=1`` shapes may vary between samples (dynamic-shape models). Errors name the file, and for data lists
the line, at fault. :func:`check_inputs` and :func:`match_model_inputs` compare a batch with the model's ``forward``
signature before any calibration work is done.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> import torch
    >>> from qdq import calibrate_model, quant_modules
    >>> from qdq.calibrate.data import DataListSource, NumpyFolderSource, match_model_inputs
    >>> tmp = tempfile.TemporaryDirectory()
    >>> root = Path(tmp.name)
    >>> for i in range(5):
    ...     np.save(root / f"sample_{i}.npy", np.random.rand(3, 8, 8).astype(np.float32))
    >>> source = NumpyFolderSource(root, batch_size=2)
    >>> len(source), [tuple(b.shape) for b in source]
    (3, [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)])
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    >>> _ = quant_modules.replace_to_quantization_module(model)
    >>> _ = match_model_inputs(model, source)            # one argument, one input: fine
    >>> calibrate_model(model, source, progress=False).batches
    3
    >>> _ = (root / "list.txt").write_text("# sample, one per line\\nsample_0.npy\\n\\nsample_3.npy\\n")
    >>> [tuple(b.shape) for b in DataListSource(root / "list.txt", batch_size=2)]
    [(2, 3, 8, 8)]
    >>> tmp.cleanup()
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import random
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from qdq.calibrate.feeding import model_inputs

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataSourceError",
    "ImageFolderSource",
    "NumpyFolderSource",
    "DataListSource",
    "check_inputs",
    "match_model_inputs",
]

logger = logging.getLogger(__name__)

#: File name endings :class:`ImageFolderSource` and :class:`DataListSource` read as images (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

_PathLike = str | os.PathLike


class DataSourceError(ValueError):
    """Calibration data that cannot be read or batched; the message names the file (and line) at fault."""


# --------------------------------------------------------------------------------------------------------------------
# small checks and file helpers
# --------------------------------------------------------------------------------------------------------------------


def _positive_int(value: Any, what: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return value


def _names(value: Sequence[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(n, str) and n for n in value):
        raise TypeError(f"{what} must be a list of non-empty strings, got {value!r}")
    value = list(value)
    if not value:
        raise ValueError(f"{what} is empty; give at least one name, or None")
    if len(set(value)) != len(value):
        raise ValueError(f"{what} repeats a name: {value}")
    return value


def _extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    out = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if not out:
        raise ValueError("extensions is empty")
    return out


def _list_files(root: Path, extensions: tuple[str, ...], what: str) -> list[Path]:
    """Files under ``root`` (recursively, symlinked folders followed once) ending in ``extensions``, sorted.

    Hidden files and folders (names starting with ``.``, such as macOS's ``._x.jpg``) are skipped; what is skipped
    is logged.
    """
    if not root.is_dir():
        if root.exists():
            raise NotADirectoryError(f"{what}: {root} is not a folder")
        raise FileNotFoundError(f"{what}: {root} does not exist")
    found, hidden, other, seen = [], 0, 0, set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add(real)
        hidden += sum(d.startswith(".") for d in dirs)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                hidden += 1
            elif name.lower().endswith(extensions):
                found.append(Path(folder, name))
            else:
                other += 1
    if hidden:
        logger.info("%s: skipped %d hidden files and folders under %s", what, hidden, root)
    if other:
        logger.info("%s: ignored %d files under %s that do not end in %s", what, other, root, "/".join(extensions))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_header(f: Any) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype from an open .npy stream, reading the header only (``None`` for a format it cannot read)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        return None
    return tuple(shape), dtype


def _layout(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{key: (shape, dtype)}`` of an .npz file, or ``{"": (shape, dtype)}`` of an .npy file, from the headers."""
    try:
        if path.suffix.lower() == ".npz":
            out = {}
            with zipfile.ZipFile(path) as zf:
                for member in zf.namelist():
                    if not member.endswith(".npy"):
                        raise DataSourceError(f"{path}: member {member!r} is not an array (.npy); not an np.savez file")
                    with zf.open(member) as f:
                        header = _read_header(f)
                    if header is None:
                        with np.load(path, allow_pickle=False) as z:
                            array = z[member[:-4]]
                        header = (array.shape, array.dtype)
                    out[member[:-4]] = header
            if not out:
                raise DataSourceError(f"{path} holds no arrays")
        else:
            with open(path, "rb") as f:
                header = _read_header(f)
            if header is None:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
                header = (array.shape, array.dtype)
            out = {"": header}
    except DataSourceError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataSourceError(f"{path} is not a readable NumPy {path.suffix} file: {err}") from err
    for key, (_, dtype) in out.items():
        if dtype.hasobject:
            label = f"{path} [{key!r}]" if key else str(path)
            raise DataSourceError(f"{label} holds Python objects; save plain numeric arrays (no pickles)")
    return out


def _torch_dtype(dtype: np.dtype, cast: torch.dtype | None, where: str) -> torch.dtype:
    """The dtype a NumPy array of ``dtype`` becomes (floating types cast to ``cast`` when given)."""
    try:
        out = torch.from_numpy(np.empty(0, dtype=dtype.newbyteorder("="))).dtype
    except TypeError as err:
        raise DataSourceError(f"{where}: NumPy dtype {dtype} has no torch equivalent") from err
    return cast if cast is not None and out.is_floating_point else out


def _to_tensor(array: Any, cast: torch.dtype | None, where: str) -> torch.Tensor:
    if isinstance(array, np.ndarray):
        if array.dtype.hasobject:
            raise DataSourceError(f"{where} holds Python objects; save plain numeric arrays")
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        try:
            tensor = torch.from_numpy(np.ascontiguousarray(array))
        except TypeError as err:
            raise DataSourceError(f"{where}: NumPy dtype {array.dtype} has no torch equivalent") from err
    elif isinstance(array, torch.Tensor):
        tensor = array
    else:
        raise TypeError(f"{where} gave a {type(array).__name__}; expected a torch.Tensor or a numpy.ndarray")
    if cast is not None and tensor.is_floating_point() and tensor.dtype != cast:
        tensor = tensor.to(cast)
    return tensor


def _load_npy(path: Path, cast: torch.dtype | None) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist (it did when the source was made)") from None
    except (OSError, ValueError, EOFError) as err:
        raise DataSourceError(f"cannot read {path}: {err}") from err
    return _to_tensor(array, cast, str(path))


def _load_npz(path: Path, keys: Sequence[str], cast: torch.dtype | None) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataSourceError(f"{path} has no array {missing[0]!r} (it has {', '.join(z.files)})")
            arrays = {k: z[k] for k in keys}
    except DataSourceError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist (it did when the source was made)") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataSourceError(f"cannot read {path}: {err}") from err
    return {k: _to_tensor(a, cast, f"{path} [{k!r}]") for k, a in arrays.items()}


def _read_image(path: Path, mode: str | None) -> Any:
    from PIL import Image  # noqa: PLC0415 - only image sources need Pillow

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode) if mode is not None and image.mode != mode else image.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist (it did when the source was made)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataSourceError(f"cannot read image {path}: {err}") from err


def _apply(preprocess: Callable[[Any], Any], obj: Any, where: str, cast: torch.dtype | None) -> torch.Tensor:
    try:
        out = preprocess(obj)
    except Exception as err:
        raise DataSourceError(f"preprocess failed on {where}: {err}") from err
    if not isinstance(out, (torch.Tensor, np.ndarray)):
        raise TypeError(
            f"preprocess gave a {type(out).__name__} for {where}; it must return a tensor "
            "(end a torchvision pipeline with transforms.ToTensor() or PILToTensor())"
        )
    return _to_tensor(out, cast, where)


def _check_layouts(
    layouts: Sequence[dict[str, tuple[tuple[int, ...], np.dtype]]],
    where: Callable[[int], str],
    keys: Sequence[str] | None,
    batched: bool,
    has_batch_dim: bool,
    cast: torch.dtype | None,
) -> list[str]:
    """Checks that samples agree in keys, and in shapes and dtypes when they will be batched; returns the keys.

    ``keys=None`` asks every sample for the first sample's keys; given keys must be in every sample.
    """
    first = layouts[0]
    wanted = list(first) if keys is None else list(keys)
    for i, layout in enumerate(layouts):
        missing = [k for k in wanted if k not in layout]
        extra = [k for k in layout if k not in wanted] if keys is None else []
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {', '.join(map(repr, missing))}")
            if extra:
                parts.append(f"has {', '.join(map(repr, extra))} in addition")
            raise DataSourceError(
                f"{where(i)} {' and '.join(parts)}: every sample needs the same inputs "
                f"({', '.join(map(repr, wanted))}, as {where(0)})"
            )
    varying = False
    for key in wanted:
        shape0, dtype0 = first[key]
        torch0 = _torch_dtype(dtype0, cast, where(0))
        if has_batch_dim and not shape0:
            raise DataSourceError(f"{where(0)}{_key(key)} is a scalar; has_batch_dim=True needs a batch dimension")
        for i, layout in enumerate(layouts[1:], start=1):
            shape, dtype = layout[key]
            same = shape[1:] == shape0[1:] and len(shape) == len(shape0) if has_batch_dim else shape == shape0
            if not same or _torch_dtype(dtype, cast, where(i)) != torch0:
                if batched:
                    raise DataSourceError(
                        f"{where(i)}{_key(key)} is {dtype}{list(shape)} but {where(0)}{_key(key)} is "
                        f"{dtype0}{list(shape0)}: samples batched together need one shape and dtype "
                        "(use batch_size=1 for inputs whose shape varies)"
                    )
                varying = True
    if varying:
        logger.info("samples differ in shape or dtype; fine with batch_size=1, as here")
    return wanted


def _key(key: str | int) -> str:
    """How errors name an array: ``[key]`` of an .npz file, ``input p`` of a data-list line, nothing for .npy."""
    if isinstance(key, int):
        return f" input {key}"
    return f" [{key!r}]" if key else ""


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


class DataListSource(_Source):
    """Batches from a text file listing one sample per line, as tpu-mlir's ``run_calibration.py --data_list``.

    A line holds the sample's input files, separated by commas (so paths cannot contain commas), one per model
    input: image files (read with PIL and passed through ``preprocess``), ``.npy`` files, or a single ``.npz`` file
    holding all inputs by name. Relative paths are relative to the list file's folder; blank lines and lines
    starting with ``#`` are skipped. Every line must have the inputs of the first, of the same kinds::

        # val_list.txt: an image and a preprocessed mask per sample
        images/0001.jpg, masks/0001.npy
        images/0002.jpg, masks/0002.npy

    Batches are tensors for one input per line, dicts for ``.npz`` lines and for ``input_names``, and
    ``((x1, x2),)`` for several unnamed inputs (see the module docstring).

    Args:
        list_file: the text file (UTF-8).
        loader: ``path -> tensor or array`` reading every path in place of the built-in readers (for other file
            formats); its output goes through ``preprocess`` when that is given.
        batch_size: samples (lines) per batch; the last batch may be smaller.
        input_names: names for the inputs of a line, in order, to get dict batches (keyword arguments); their
            number must match the inputs per line. For ``.npz`` lines, the keys to use (default: all).
        preprocess: ``PIL.Image -> tensor`` for image files (required when there are any).
        has_batch_dim: array files already have a batch dimension (first), so they are concatenated along it.
        dtype: cast floating-point arrays to this dtype; others are kept.
        image_mode: PIL mode images are converted to; ``None`` keeps each file's own.
        limit: use at most this many lines.

    Raises:
        FileNotFoundError: the list file, or a file it names, does not exist (with the line number and path).
        DataSourceError: an empty list; a line whose number or kinds of inputs differ from the first line's; an
            ``.npz`` file next to other files; a file type with no reader; ``.npz`` keys or (with
            ``batch_size > 1``) array shapes that differ between lines. Each names the line.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import numpy as np
        >>> tmp = tempfile.TemporaryDirectory()
        >>> root = Path(tmp.name)
        >>> (root / "arrays").mkdir()
        >>> for i in range(3):
        ...     np.save(root / "arrays" / f"a{i}.npy", np.full((2, 4), i, dtype=np.float32))
        ...     np.save(root / "arrays" / f"b{i}.npy", np.full((5,), i, dtype=np.float32))
        >>> lines = ["arrays/a0.npy, arrays/b0.npy", "# skipped", "", "arrays/a2.npy,arrays/b2.npy"]
        >>> _ = (root / "list.txt").write_text("\\n".join(lines))
        >>> source = DataListSource(root / "list.txt", batch_size=2)
        >>> (x, y), = next(iter(source))
        >>> tuple(x.shape), tuple(y.shape), x[:, 0, 0].tolist()
        ((2, 2, 4), (2, 5), [0.0, 2.0])
        >>> named = DataListSource(root / "list.txt", input_names=["image", "mask"])
        >>> {k: tuple(v.shape) for k, v in next(iter(named)).items()}
        {'image': (1, 2, 4), 'mask': (1, 5)}
        >>> tmp.cleanup()
    """

    def __init__(
        self,
        list_file: _PathLike,
        loader: Callable[[Path], Any] | None = None,
        batch_size: int = 1,
        input_names: Sequence[str] | None = None,
        *,
        preprocess: Callable[[Any], torch.Tensor] | None = None,
        has_batch_dim: bool = False,
        dtype: torch.dtype | None = None,
        image_mode: str | None = "RGB",
        limit: int | None = None,
    ):
        self.list_file = Path(list_file)
        if loader is not None and not callable(loader):
            raise TypeError(f"DataListSource: loader must be callable (path -> tensor), got {loader!r}")
        if preprocess is not None and not callable(preprocess):
            raise TypeError(f"DataListSource: preprocess must be callable (PIL.Image -> tensor), got {preprocess!r}")
        self.loader, self.preprocess = loader, preprocess
        self.batch_size = _positive_int(batch_size, "DataListSource: batch_size")
        limit = _positive_int(limit, "DataListSource: limit", allow_none=True)
        input_names = _names(input_names, "DataListSource: input_names")
        self._has_batch_dim = bool(has_batch_dim)
        self.dtype, self.image_mode = dtype, image_mode

        #: ``(line number, input paths)`` of each sample, in the order they are read.
        self.entries: list[tuple[int, tuple[Path, ...]]] = self._parse()[:limit]
        self._kinds = self._check_kinds(self.entries)
        self._npz = self._kinds == ("npz",)
        if not self._npz and input_names is not None and len(input_names) != len(self._kinds):
            raise ValueError(
                f"DataListSource: {len(input_names)} input_names ({', '.join(input_names)}) for lines of "
                f"{len(self._kinds)} inputs ({self._where(0)})"
            )
        self._names = None if self._npz else input_names
        self._keys: list[str] = []
        array_positions = [p for p, kind in enumerate(self._kinds) if kind in ("npy", "npz")]
        if array_positions:
            layouts = [
                {(p if len(self._kinds) > 1 else k): v for p in array_positions for k, v in _layout(paths[p]).items()}
                for _, paths in self.entries
            ]
            keys = input_names if self._npz else None
            self._keys = _check_layouts(layouts, self._where, keys, self.batch_size > 1, self._has_batch_dim, dtype)
        self._hint = (
            ": images batched together need one shape (make preprocess resize and crop to a fixed size) or use "
            "batch_size=1" if "image" in self._kinds or "loader" in self._kinds else ""
        )
        logger.info("DataListSource: %d samples of %d inputs from %s, %d batches",
                    len(self.entries), len(self._kinds), self.list_file, len(self))

    def _parse(self) -> list[tuple[int, tuple[Path, ...]]]:
        try:
            text = self.list_file.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise FileNotFoundError(f"DataListSource: the list file {self.list_file} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise DataSourceError(f"DataListSource: cannot read the list file {self.list_file}: {err}") from err
        base = self.list_file.parent
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            items = [item.strip() for item in line.split(",")]
            if "" in items:
                raise DataSourceError(f"{self.list_file}, line {number}: an empty path in {line!r}")
            paths = []
            for item in items:
                path = Path(item).expanduser()
                path = path if path.is_absolute() else base / path
                if not path.is_file():
                    what = "is not a file" if path.exists() else "does not exist"
                    raise FileNotFoundError(f"{self.list_file}, line {number}: {item!r} ({path}) {what}")
                paths.append(path)
            entries.append((number, tuple(paths)))
        if not entries:
            raise DataSourceError(f"DataListSource: {self.list_file} lists no samples (only blank lines and comments)")
        return entries

    def _kind(self, number: int, path: Path) -> str:
        if self.loader is not None:
            return "loader"
        suffix = path.suffix.lower()
        if suffix in (".npy", ".npz"):
            return suffix[1:]
        if suffix in IMAGE_EXTENSIONS:
            if self.preprocess is None:
                raise ValueError(
                    f"{self.list_file}, line {number}: {path.name} is an image; pass preprocess= (PIL.Image -> tensor)"
                )
            return "image"
        raise DataSourceError(
            f"{self.list_file}, line {number}: no reader for {path.name!r} (images, .npy and .npz are read; pass "
            "loader= for other files)"
        )

    def _check_kinds(self, entries: list[tuple[int, tuple[Path, ...]]]) -> tuple[str, ...]:
        first_number, first_paths = entries[0]
        kinds = tuple(self._kind(first_number, p) for p in first_paths)
        if "npz" in kinds and len(kinds) > 1:
            raise DataSourceError(
                f"{self.list_file}, line {first_number}: an .npz file holds all inputs of a sample, so it must be "
                f"alone on its line (found {len(kinds)} paths)"
            )
        for number, paths in entries[1:]:
            if len(paths) != len(kinds):
                raise DataSourceError(
                    f"{self.list_file}, line {number}: {len(paths)} inputs, but line {first_number} has {len(kinds)}"
                )
            line_kinds = tuple(self._kind(number, p) for p in paths)
            if line_kinds != kinds:
                raise DataSourceError(
                    f"{self.list_file}, line {number}: inputs of kinds ({', '.join(line_kinds)}), but line "
                    f"{first_number} has ({', '.join(kinds)})"
                )
        return kinds

    @property
    def num_samples(self) -> int:
        return len(self.entries)

    @property
    def input_names(self) -> list[str] | None:
        """The keys of dict batches, ``None`` for tensor or tuple batches."""
        return list(self._keys) if self._npz else self._names

    def _where(self, index: int) -> str:
        number, paths = self.entries[index]
        return f"{self.list_file}, line {number} ({', '.join(str(p) for p in paths)})"

    def _load(self, index: int) -> _Sample:
        number, paths = self.entries[index]
        if self._npz:
            return _load_npz(paths[0], self._keys, self.dtype)
        inputs = []
        for path, kind in zip(paths, self._kinds):
            where = f"{self.list_file}, line {number}: {path}"
            if kind == "npy":
                inputs.append(_load_npy(path, self.dtype))
            elif kind == "image":
                inputs.append(_apply(self.preprocess, _read_image(path, self.image_mode), where, self.dtype))
            else:
                try:
                    obj = self.loader(path)
                except Exception as err:
                    raise DataSourceError(f"loader failed on {where}: {err}") from err
                if self.preprocess is not None:
                    inputs.append(_apply(self.preprocess, obj, where, self.dtype))
                else:
                    inputs.append(_to_tensor(obj, self.dtype, f"loader on {where}"))
        return tuple(inputs)


# --------------------------------------------------------------------------------------------------------------------
# does the data fit the model?
# --------------------------------------------------------------------------------------------------------------------


def _describe_inputs(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor{tuple(obj.shape)}"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{k!r}: {_describe_inputs(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "(" + ", ".join(_describe_inputs(v) for v in obj) + ")"
    return type(obj).__name__


def check_inputs(
    model: nn.Module | Callable[..., Any] | inspect.Signature,
    batch: Any,
    *,
    preprocess: Callable[[Any], Any] | None = None,
) -> inspect.BoundArguments:
    """Checks that ``batch`` fits ``model``'s ``forward`` signature, as :func:`qdq.calibrate_model` would call it.

    The batch is turned into the model's input as ``calibrate_model`` does (``preprocess``, or the first item of a
    tuple), then bound to the signature: a tensor is one positional argument, a tuple or list several, a dict
    keyword arguments. Nothing runs, so shapes are not checked - only the number and names of the inputs.

    Args:
        model: a module (its ``forward`` is checked), another callable, or an ``inspect.Signature``.
        batch: one batch, as the data yields it.
        preprocess: the ``preprocess`` given to ``calibrate_model``, if any.

    Returns:
        The bound arguments (``.arguments`` maps each parameter name to its input).

    Raises:
        TypeError: the inputs do not fit the signature; the message shows both.

    Example:
        >>> import torch
        >>> class TwoInputs(torch.nn.Module):
        ...     def forward(self, image, mask=None):
        ...         return image
        >>> list(check_inputs(TwoInputs(), {"image": torch.zeros(1, 3), "mask": torch.ones(1, 3)}).arguments)
        ['image', 'mask']
        >>> check_inputs(TwoInputs(), {"img": torch.zeros(1, 3)})
        Traceback (most recent call last):
        ...
        TypeError: the inputs {'img': Tensor(1, 3)} do not fit TwoInputs.forward(image, mask=None): missing ... 'image'
    """
    if isinstance(model, inspect.Signature):
        signature, label = model, "the signature "
    else:
        function = model.forward if isinstance(model, nn.Module) else model
        if not callable(function):
            raise TypeError(f"check_inputs: expected a module, a callable or an inspect.Signature, got {model!r}")
        signature = inspect.signature(function)
        label = f"{type(model).__name__}.forward" if isinstance(model, nn.Module) else getattr(model, "__name__", "")
    inputs = preprocess(batch) if preprocess is not None else model_inputs(batch)
    if isinstance(inputs, dict):
        args, kwargs = (), inputs
    elif isinstance(inputs, (list, tuple)):
        args, kwargs = tuple(inputs), {}
    else:
        args, kwargs = (inputs,), {}
    try:
        return signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"the inputs {_describe_inputs(inputs)} do not fit {label}{signature}: {err}") from None


def match_model_inputs(
    model: nn.Module | Callable[..., Any] | inspect.Signature,
    data: Iterable[Any],
    *,
    preprocess: Callable[[Any], Any] | None = None,
) -> inspect.BoundArguments:
    """Checks the first batch of ``data`` against ``model``'s inputs (see :func:`check_inputs`) before calibrating.

    Only the first batch is read; sources are re-iterable, so ``data`` can then go to ``calibrate_model`` whole.

    Raises:
        TypeError: the first batch does not fit the model's ``forward``.
        ValueError: ``data`` yields no batch.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> _ = match_model_inputs(model, [torch.zeros(2, 4)])
        >>> match_model_inputs(model, [((torch.zeros(2, 4), torch.zeros(2, 4)),)])
        Traceback (most recent call last):
        ...
        TypeError: the inputs (Tensor(2, 4), Tensor(2, 4)) do not fit Linear.forward(...: too many positional arguments
    """
    for batch in data:
        return check_inputs(model, batch, preprocess=preprocess)
    raise ValueError("match_model_inputs: the data yields no batch")
