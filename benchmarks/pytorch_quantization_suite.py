"""Run NVIDIA's pytorch_quantization test suite against qdq, on CPU, and print pass/fail counts.

The suite is not ours and is not copied into this repository: give the path of its ``tests`` folder (the
``tools/pytorch-quantization/tests`` folder of the NVIDIA/TensorRT repository)::

    python benchmarks/pytorch_quantization_suite.py /path/to/pytorch-quantization/tests [--json out.json] [-- pytest args]

For the run:

* an import alias (a meta-path finder) makes ``pytorch_quantization`` and every ``pytorch_quantization.X`` resolve to
  ``qdq`` and ``qdq.X``: the suite's own imports are untouched;
* CUDA is made a no-op on CPU: ``Tensor.cuda()``/``Module.cuda()`` return the object on CPU, ``device="cuda"`` in
  factory functions and ``.to("cuda")`` become CPU, ``torch.set_default_tensor_type('torch.cuda.FloatTensor')``
  selects the CPU float tensor type and ``torch.cuda.device(i)`` is an empty context and ``torch.load`` maps to CPU;
* pytest runs on the folder (rooted at its parent, which the suite imports as ``tests.utils``/``tests.fixtures``).

It prints one line per failing test (nodeid and the last line of its error), then the counts and the pass rate
(passed over passed+failed+errors; skips are listed separately). docs/pytorch_quantization.md lists every test that
still fails against qdq and why. Exit code: 0 when the pass rate reaches ``--target`` (default 0.9), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path

ALIAS = "pytorch_quantization"
TARGET = "qdq"


class _AliasLoader(importlib.abc.Loader):
    """Hands out the already imported real module; importlib's spec on it is put back to the real one."""

    def __init__(self, real_name: str):
        self.real_name = real_name

    def create_module(self, spec):
        module = importlib.import_module(self.real_name)
        self.real_spec = module.__spec__
        return module

    def exec_module(self, module):  # the real module already ran; importlib just set the alias spec on it
        module.__spec__ = self.real_spec


class AliasFinder(importlib.abc.MetaPathFinder):
    """Resolves ``alias`` and ``alias.X`` to ``target`` and ``target.X`` (the same module objects)."""

    def __init__(self, alias: str = ALIAS, target: str = TARGET):
        self.alias, self.target = alias, target

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.alias and not fullname.startswith(self.alias + "."):
            return None
        real_name = self.target + fullname[len(self.alias):]
        real_spec = importlib.util.find_spec(real_name)
        if real_spec is None:
            return None
        is_package = real_spec.submodule_search_locations is not None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(real_name), is_package=is_package)


def install_alias(alias: str = ALIAS, target: str = TARGET) -> AliasFinder:
    """Put the alias finder first on ``sys.meta_path`` (before the path finder that could see a real install)."""
    for name in [n for n in sys.modules if n == alias or n.startswith(alias + ".")]:
        del sys.modules[name]
    finder = AliasFinder(alias, target)
    sys.meta_path.insert(0, finder)
    return finder


def _cpu(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, int):
        return "cpu"
    import torch

    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


@contextlib.contextmanager
def cuda_as_cpu():
    """CUDA calls become CPU ones for the duration (see the module docstring); everything is restored on exit."""
    import torch
    from torch.overrides import TorchFunctionMode

    class _CpuMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if "device" in kwargs:
                kwargs["device"] = _cpu(kwargs["device"])
            if func in (torch.Tensor.to,) and len(args) > 1:
                args = (args[0], _cpu(args[1])) + tuple(args[2:])
            return func(*args, **kwargs)

    saved = {
        (torch.Tensor, "cuda"): torch.Tensor.cuda,
        (torch.nn.Module, "cuda"): torch.nn.Module.cuda,
        (torch, "set_default_tensor_type"): torch.set_default_tensor_type,
        (torch.cuda, "device"): torch.cuda.device,
        (torch, "load"): torch.load,
    }
    set_default = torch.set_default_tensor_type

    def set_default_tensor_type(t):
        name = t if isinstance(t, str) else f"{t.__module__}.{t.__name__}"
        set_default(name.replace("torch.cuda.", "torch."))

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.set_default_tensor_type = set_default_tensor_type
    torch_load = torch.load

    class _NoDevice(torch.cuda.device):  # still a torch.cuda.device for torch's own isinstance checks
        def __init__(self, device=None):
            self.idx, self.prev_idx = -1, -1

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def load(*args, **kwargs):  # tensors saved on CUDA load on CPU
        kwargs["map_location"] = kwargs.get("map_location") or "cpu"
        return torch_load(*args, **kwargs)

    torch.cuda.device = _NoDevice
    torch.load = load
    mode = _CpuMode()
    mode.__enter__()
    try:
        yield
    finally:
        mode.__exit__(None, None, None)
        for (owner, name), value in saved.items():
            setattr(owner, name, value)
        set_default("torch.FloatTensor")


class _Counts:
    """pytest plugin: collects the outcome of every test (setup/call/teardown errors count as errors)."""

    def __init__(self):
        self.outcomes: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self.collect_errors: dict[str, str] = {}

    def pytest_runtest_logreport(self, report):
        nodeid = report.nodeid
        if report.when == "call":
            self.outcomes[nodeid] = report.outcome
        elif report.failed:
            self.outcomes[nodeid] = "error"
        elif report.skipped and report.when == "setup":
            self.outcomes[nodeid] = "skipped"
        if report.failed or (report.skipped and nodeid not in self.reasons):
            self.reasons[nodeid] = _last_line(report)

    def pytest_collectreport(self, report):
        if report.failed:
            self.collect_errors[report.nodeid] = _last_line(report)


def _last_line(report) -> str:
    text = str(report.longrepr) if report.longrepr is not None else ""
    if isinstance(report.longrepr, tuple):  # skip: (file, line, reason)
        text = str(report.longrepr[2])
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E ")]
    return (errors[-1] if errors else (lines[-1] if lines else "")).strip()[:300]


def run(tests_dir: str | Path, pytest_args: list[str] = ()) -> dict:
    """Run the suite at ``tests_dir`` against qdq; returns the counts, the pass rate and each failure's reason."""
    import pytest

    tests_dir = Path(tests_dir).resolve()
    if not (tests_dir / "__init__.py").exists() or not tests_dir.is_dir():
        raise SystemExit(f"{tests_dir} is not pytorch_quantization's tests folder (no __init__.py there)")
    root = tests_dir.parent
    importlib.import_module(TARGET)  # imported now, from wherever it is installed, before sys.path changes
    saved_path, saved_cwd = list(sys.path), os.getcwd()
    # the suite imports `tests.utils` and `examples.torchvision` from its own folder (the second without an
    # __init__.py): another regular `examples` or `tests` package on the path (this repository's) would win
    sys.path[:] = [str(root)] + [p for p in sys.path if not any(
        (Path(p or ".") / name / "__init__.py").exists() for name in ("examples", "tests"))]
    for name in [n for n in sys.modules if n.split(".")[0] in ("tests", "examples")]:
        del sys.modules[name]
    finder = install_alias()
    counts = _Counts()
    args = [str(tests_dir), "-q", "-p", "no:cacheprovider", "--rootdir", str(root), "-o", "addopts=",
            "-o", "testpaths=", "-W", "ignore::DeprecationWarning", "-W", "ignore::UserWarning", *pytest_args]
    os.chdir(root)  # the suite opens tests/quant_rnn_test_vectors.pt relative to its root
    try:
        with cuda_as_cpu():
            code = pytest.main(args, plugins=[counts])
        if code in (pytest.ExitCode.USAGE_ERROR, pytest.ExitCode.INTERNAL_ERROR):
            raise SystemExit(f"pytest could not run the suite (exit code {int(code)})")
    finally:
        os.chdir(saved_cwd)
        sys.path[:] = saved_path
        sys.meta_path.remove(finder)
    tally = {k: 0 for k in ("passed", "failed", "error", "skipped")}
    for outcome in counts.outcomes.values():
        tally[outcome] = tally.get(outcome, 0) + 1
    ran = tally["passed"] + tally["failed"] + tally["error"] + len(counts.collect_errors)
    return {
        "counts": tally,
        "collect_errors": counts.collect_errors,
        "pass_rate": tally["passed"] / ran if ran else 0.0,
        "failures": {k: counts.reasons.get(k, "") for k, v in sorted(counts.outcomes.items()) if v in ("failed", "error")},
        "skipped": {k: counts.reasons.get(k, "") for k, v in sorted(counts.outcomes.items()) if v == "skipped"},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests_dir", help="pytorch_quantization's tests folder (tools/pytorch-quantization/tests)")
    parser.add_argument("--target", type=float, default=0.9, help="pass rate the run must reach (default 0.9)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    result = run(args.tests_dir, extra)
    print()
    for nodeid, reason in result["collect_errors"].items():
        print(f"COLLECT ERROR {nodeid}: {reason}")
    for nodeid, reason in result["failures"].items():
        print(f"FAILED {nodeid}: {reason}")
    for nodeid, reason in result["skipped"].items():
        print(f"SKIPPED {nodeid}: {reason}")
    c = result["counts"]
    print(f"passed {c['passed']}  failed {c['failed']}  errors {c['error']}  collect errors "
          f"{len(result['collect_errors'])}  skipped {c['skipped']}  pass rate {result['pass_rate']:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["pass_rate"] >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
