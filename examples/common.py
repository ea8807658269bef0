"""Helpers the examples and benchmarks share: where the shared data is, extracting it, ImageNet sample labels, and
the pieces every example's command line and report repeat (usage errors, presets, tables, export and checks).

The real data lives outside the repository (``../shared/data`` beside the checkout, or a folder you give with
``--data``); archives are extracted once into a cache folder (``$QDQ_DATA_CACHE``, default
``<system temp>/qdq-data``), never into the repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from qdq.onnx.parity import DEFAULT_OUTPUT_TOLERANCE_STEPS

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]

__all__ = ["shared_data_dir", "extract", "cifar10_root", "imagenet_sample", "ImagenetSample", "cache_dir",
           "first_per_class", "UsageError", "positive", "add_run_arguments", "resolve_defaults", "run_main", "fmt",
           "print_table", "finish", "export_summary", "histograms_without_zeros", "export_and_check"]


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
        raise FileNotFoundError(f"{path} does not exist (the shared data lives in ../shared/data beside the "
                                "repository)")
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


def first_per_class(dataset, limit: int | None):
    """The first ``limit`` images of each class of an ImageFolder-like ``dataset`` (its ``samples`` order), as a
    ``Subset``; the dataset itself when ``limit`` is ``None``."""
    if limit is None:
        return dataset
    taken: dict[int, int] = {}
    keep = []
    for index, (_, label) in enumerate(dataset.samples):
        if taken.get(label, 0) < limit:
            taken[label] = taken.get(label, 0) + 1
            keep.append(index)
    return torch.utils.data.Subset(dataset, keep)


def imagenet_sample(transform: Callable, calib: int = 100, batch_size: int = 25,
                    root: str | os.PathLike | None = None, offset: int = 0) -> tuple[DataLoader, DataLoader]:
    """``(calibration loader, evaluation loader)`` over the ImageNet sample: after a fixed shuffle (the files are
    sorted by class, and the classes by kind), the ``calib`` images from ``offset`` on calibrate and the others
    evaluate (``offset`` 0, 100, ... gives disjoint calibration folds)."""
    folder = Path(root) if root else extract("imagenet-sample-500.tar") / "imagenet-sample-500"
    files = list(ImagenetSample(folder, transform).files)
    random.Random(0).shuffle(files)
    if not 0 <= offset <= len(files) - calib:
        raise ValueError(f"imagenet_sample: offset {offset} with {calib} calibration images does not fit the "
                         f"{len(files)} images")
    calib_set = ImagenetSample(folder, transform, files[offset:offset + calib])
    eval_set = ImagenetSample(folder, transform, files[:offset] + files[offset + calib:])
    return (DataLoader(calib_set, batch_size=batch_size), DataLoader(eval_set, batch_size=batch_size))



# ----------------------------------------------------------------------------------------------------------------
# command lines
# ----------------------------------------------------------------------------------------------------------------
class UsageError(Exception):
    """A mistake in the command line or the data paths; the example scripts print it as one line (exit code 2)."""


def trained_float_model(model: nn.Module, args: argparse.Namespace, cached: Path, config: dict,
                        fit: Callable[[nn.Module], None], train_images: int, what: str) -> nn.Module:
    """The trained float ``model``: the weights of ``--checkpoint``, the checkpoint cached at ``cached`` when it was
    trained with the same ``config`` (and ``--retrain`` is not given), or ``fit(model)`` once, cached afterwards.
    ``what`` names the weights in the error for a checkpoint that does not fit."""
    if args.checkpoint is not None:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise UsageError(f"--checkpoint {args.checkpoint} does not hold {what}: "
                             f"{str(err).splitlines()[0]}") from None
        logger.info("loaded float weights from %s", args.checkpoint)
        return model.eval()
    if cached.is_file() and not args.retrain:
        saved = torch.load(cached, map_location="cpu", weights_only=True)
        if saved.get("config") == config:
            model.load_state_dict(saved["state_dict"])
            print(f"float model: reusing {cached} (trained with the same settings; --retrain to train again)")
            return model.eval()
        logger.info("%s was trained with other settings (%s); training again", cached, saved.get("config"))
    t0 = time.perf_counter()
    fit(model)
    seconds = time.perf_counter() - t0
    print(f"float model: trained {args.epochs} epochs on {train_images} images in {seconds:.0f} s")
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "config": config, "train_seconds": seconds}, cached)
    print(f"saved {cached}")
    return model.eval()


def positive(kind: type = int) -> Callable[[str], Any]:
    """An argparse ``type=`` that accepts numbers of ``kind`` above zero.

    Example:
        >>> positive(int)("3")
        3
        >>> positive(float)("0")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: '0' must be > 0
    """

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    return parse


def _default_out(name: str) -> Path:
    return Path(tempfile.gettempdir()) / "qdq-examples" / name


def add_run_arguments(parser: argparse.ArgumentParser, name: str, outputs: str, tiny: str,
                      seed: str = "random seed (0)") -> None:
    """Adds the options every example has: ``--out`` (``outputs`` says what goes there), ``--seed``, ``--tiny``
    (``tiny`` says what the preset sets) and ``-v``. See :func:`resolve_defaults` for their defaults."""
    out = _default_out(name)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder: {outputs} (default: {out}, or {out}-tiny with --tiny)")
    parser.add_argument("--seed", type=int, default=0, help=seed)
    parser.add_argument("--tiny", action="store_true", help=f"smoke-test preset: {tiny} (explicit flags still win)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def resolve_defaults(args: argparse.Namespace, name: str, defaults: dict, tiny: dict, files: Sequence[str] = (),
                     folders: Sequence[str] = ()) -> argparse.Namespace:
    """Fills the options left at ``None``: from the ``tiny`` preset with ``--tiny``, else from ``defaults`` (flags given
    on the command line win); ``--out`` defaults to ``<system temp>/qdq-examples/<name>`` (``<name>-tiny`` with
    ``--tiny``) and must be a folder if it exists. The options named in ``files`` and ``folders``, when given, must
    be an existing file or folder.

    Example:
        >>> args = resolve_defaults(argparse.Namespace(tiny=True, out=None, epochs=None, lr=0.5), "demo",
        ...                         {"epochs": 15, "lr": 0.2}, {"epochs": 1})
        >>> args.epochs, args.lr, args.out.name
        (1, 0.5, 'demo-tiny')
    """
    preset = tiny if args.tiny else {}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, value))
    if args.out is None:
        args.out = _default_out(f"{name}-tiny" if args.tiny else name)
    args.out = Path(args.out)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")
    for key in files:
        if getattr(args, key) is not None and not Path(getattr(args, key)).is_file():
            raise UsageError(f"--{key.replace('_', '-')} {getattr(args, key)} does not exist")
    for key in folders:
        if getattr(args, key) is not None and not Path(getattr(args, key)).is_dir():
            raise UsageError(f"--{key.replace('_', '-')} {getattr(args, key)} is not a folder")
    return args


def run_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any],
             resolve: Callable[[argparse.Namespace], argparse.Namespace], argv: Sequence[str] | None,
             errors: tuple[type[BaseException], ...] = ()) -> int:
    """The body of every example's ``main``: parse, set up logging (``-v`` for debug), ``run(resolve(args))``.

    A :class:`UsageError`, a missing file or one of ``errors`` ends the program with its message on one line and
    exit code 2, the way argparse reports a bad flag; anything else is a bug and keeps its traceback.
    """
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in (run.__module__, __name__):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        run(resolve(args))
    except (UsageError, FileNotFoundError, NotADirectoryError, *errors) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# reports
# ----------------------------------------------------------------------------------------------------------------
def fmt(value: Any, spec: str = ".2f") -> str:
    """A table cell: ``-`` for a missing value, ``inf`` for an infinite one, ``str`` when ``spec`` is empty."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec) if spec else str(value)


def print_table(title: str, rows: list[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    """Prints ``rows`` under a blank line and ``title``; ``columns`` are ``(key, header, format spec)``, the first
    left-aligned, the others right-aligned.

    Example:
        >>> print_table("PTQ", [{"m": "max", "t": 75.8}, {"m": "mse", "t": None}],
        ...             [("m", "method", ""), ("t", "top-1 %", ".2f")])
        <BLANKLINE>
        PTQ
        method  top-1 %
        max       75.80
        mse           -
    """
    cells = [[fmt(r.get(key), spec) for key, _, spec in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(columns)]
    print(f"\n{title}")
    for line in [[h for _, h, _ in columns]] + cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))


def finish(out: Path, results: dict, summary: Sequence[tuple[str, str]]) -> dict:
    """Prints the closing ``summary`` (label, value) lines aligned, with the total time from ``results["seconds"]``,
    writes ``results`` to ``out/results.json`` and returns them.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = finish(Path(d), {"seconds": 3.2}, [("fp32 top-1", "84.58%"), ("ONNX Runtime parity", "OK")])
        <BLANKLINE>
        summary
          fp32 top-1           84.58%
          ONNX Runtime parity  OK
          total time           3 s
        wrote .../results.json
    """
    rows = list(summary) + [("total time", f"{results['seconds']:.0f} s")]
    width = max(len(label) for label, _ in rows)
    print("\nsummary")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    path = Path(out) / "results.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {path}")
    return results


def export_summary(export: dict) -> list[tuple[str, str]]:
    """The summary lines of an :func:`export_and_check` result: the file, the parity and the TensorRT check."""
    return [("ONNX", export["onnx"]), ("ONNX Runtime parity", "OK" if export["verify_ok"] else "MISMATCH"),
            ("TensorRT check", f"{export['trt_errors']} errors, {export['trt_warnings']} warnings")]


# ----------------------------------------------------------------------------------------------------------------
# quantization steps the examples share
# ----------------------------------------------------------------------------------------------------------------
def histograms_without_zeros(qmodel: nn.Module) -> int:
    """Gives every enabled per-tensor symmetric quantizer a histogram calibrator that leaves exact zeros out; returns
    how many.

    tpu-mlir's KLD search (``method="kld"``) is defined on a histogram collected without exact zeros; the examples
    collect it that way to follow tpu-mlir. Since the search lets the zero bin take bin 1's count
    (:mod:`qdq.calib.kld`), the spike of zeros of ReLU outputs hardly matters: on the CIFAR-10 ResNet-20 of
    ``examples/cifar10`` kld gave 82.55% top-1 without the zeros and 82.69% with them (fp32 84.58%).
    """
    import qdq
    from qdq.calib import HistogramCalibrator

    count = 0
    for _, q in qdq.quantizers(qmodel):
        if q.is_enabled and q.axis is None and q.symmetric:
            q.set_calibrator(HistogramCalibrator(q.num_bits, None, q.unsigned, skip_zeros=True))
            count += 1
    return count


def export_and_check(qmodel: nn.Module, images: torch.Tensor, path: Path,
                     tolerance_steps: float = DEFAULT_OUTPUT_TOLERANCE_STEPS) -> dict:
    """Exports ``qmodel`` to QDQ ONNX at ``path`` (dynamic batch), compares ONNX Runtime with PyTorch on ``images``
    and runs the TensorRT rule checker; prints what it found and returns it.

    The outputs of a deep network differ between the runtimes by a few output steps (the two runtimes' float
    convolutions differ in their last bits, a value on a rounding boundary then rounds one step apart, and such flips
    compound with depth): they are accepted within ``tolerance_steps`` steps, while every QuantizeLinear of the file
    must agree with qdq's arithmetic within one step.
    """
    from qdq.onnx import check_tensorrt, export_onnx, verify
    from qdq.onnx.check import format_findings

    info = export_onnx(qmodel, images[:1], path, dynamic_batch=True)
    print(f"exported {info.path} ({info.num_qdq_pairs} Q/DQ pairs, opset {info.opset})")
    report = verify(qmodel, path, images, output_tolerance_steps=tolerance_steps)
    out = report.outputs[0]
    print(f"ONNX Runtime vs PyTorch on {len(images)} images: max |diff| {out.max_abs_error:.3g} = "
          f"{out.max_error_steps:.2f} output steps (tolerance {tolerance_steps:g}), {out.num_beyond_one_step} of "
          f"{out.num_elements} beyond one step; QuantizeLinear rounding: {report.rounding.num_differing} of "
          f"{report.rounding.num_elements} values one step apart -> {'OK' if report.ok else 'MISMATCH'}")
    findings = check_tensorrt(path)
    print("TensorRT rule check:")
    print(format_findings(findings, show_info=False))
    counts = {s: sum(f.severity == s for f in findings) for s in ("error", "warning", "info")}
    return {"onnx": str(info.path), "qdq_pairs": info.num_qdq_pairs, "verify_ok": report.ok,
            "max_error_steps": out.max_error_steps, "rounding_differing": report.rounding.num_differing,
            "trt_errors": counts["error"], "trt_warnings": counts["warning"], "trt_info": counts["info"],
            "trt_findings": [str(f) for f in findings if f.severity != "info"]}
