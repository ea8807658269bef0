"""Data lists: a text file whose lines name one sample each (comma-separated paths, one per model input), as
tpu-mlir's ``--data_list``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from qdq.calibrate.data.files import (
    DataSourceError,
    IMAGE_EXTENSIONS,
    _PathLike,
    _apply,
    _check_layouts,
    _layout,
    _load_npy,
    _load_npz,
    _names,
    _positive_int,
    _read_image,
    _to_tensor,
)
from qdq.calibrate.data.sources import _Sample, _Source

__all__ = ["DataListSource"]

logger = logging.getLogger(__name__)


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
