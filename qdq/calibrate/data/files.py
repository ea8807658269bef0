"""Reading calibration files: listing folders, ``.npy``/``.npz`` headers and arrays, images, and the checks shared by
the sources (counts, names, extensions, shapes and dtypes agreeing across samples).
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

__all__ = ["IMAGE_EXTENSIONS", "DataSourceError"]

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
