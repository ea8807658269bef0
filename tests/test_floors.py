"""The floors of DESIGN.md, checked on the source: no module imports one on a higher floor, and every import names a
module that exists.

Every ``import`` statement counts, also the ones inside functions (an import deferred to call time is still a
dependency). The map below is the layout of the package (see the docstring of :mod:`qdq`); a new module or
subpackage must be given a floor here, or the test fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: module prefix -> floor. Floor 4 is ordered inside: converting the model (4.1) comes before the collectives (4.2),
#: which come before the steps that feed data through the model (4.3), which come before the PTQ algorithms and the
#: per-layer config files that use them (4.4).
FLOORS = {
    "qdq": 0,  # the lazy front door: imports nothing but qdq._version
    "qdq._files": 0,
    "qdq._json_keys": 0,
    "qdq._union_find": 0,
    "qdq._version": 0,
    "qdq.tensor_quant": 1,
    "qdq.math": 1,
    "qdq.cuda_ext": 1,  # pytorch_quantization's compiled kernels, answered by floor 1
    "qdq.quant_logging": 1,  # pytorch_quantization's absl-style logging calls
    "qdq.utils": 1,  # pytorch_quantization's utils (reduce_amax, quant_logging)
    "qdq.calib": 2,
    "qdq.nn": 3,
    "qdq.optim": 3,  # pytorch_quantization's optimizer helpers (the quantizers' parameters)
    "qdq.transform": 4.1,
    "qdq.quant_modules": 4.1,  # pytorch_quantization's path of qdq.transform
    "qdq.distributed": 4.2,
    "qdq.calibrate": 4.3,
    "qdq.ptq": 4.4,
    "qdq.config": 4.4,
    "qdq.onnx": 5,
    "qdq.cli": 6,
    "qdq.rules": 6,
}


def floor_of(module: str) -> float:
    """The floor of a dotted module name: that of its longest prefix in :data:`FLOORS` (``qdq`` alone is no prefix:
    a new top-level module needs its own entry)."""
    if module == "qdq":
        return FLOORS["qdq"]
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        prefix = ".".join(parts[:n])
        if prefix in FLOORS:
            return FLOORS[prefix]
    raise KeyError(f"{module} has no floor: add it to FLOORS in {Path(__file__).name}")


def _modules() -> dict[str, Path]:
    """Every module of the package, with qdq.rules read from rules/ (setup.py's package_dir)."""
    found = {}
    for base, package in ((ROOT / "qdq", "qdq"), (ROOT / "rules", "qdq.rules")):
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            if "rules" in rel.parts[:1] and package == "qdq":  # the qdq/rules link to rules/
                continue
            parts = [package, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def imports_of(module: str, source: str) -> list[tuple[int, str, list[str]]]:
    """``(line, imported module, names)`` for every qdq import of ``source`` (relative ones resolved)."""
    out = []
    package = module if module in PACKAGES else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "qdq"]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([target] if target else []))
            if target.split(".")[0] == "qdq":
                out.append((node.lineno, target, [a.name for a in node.names]))
    return out


def _imported_modules(target: str, names: list[str]) -> list[str]:
    """The modules an import statement reaches: ``from qdq import nn`` reaches qdq.nn, ``from qdq.nn import X``
    reaches qdq.nn (and qdq.nn.X when X is a submodule)."""
    reached = [target]
    reached += [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    return reached


def violations(module: str, source: str) -> list[str]:
    found = []
    mine = floor_of(module)
    for line, target, names in imports_of(module, source):
        for reached in _imported_modules(target, names):
            if reached == "qdq" and names:
                continue  # `from qdq import X`: X itself is checked (it is a submodule or a lazy name)
            if floor_of(reached) > mine:
                found.append(f"{module}:{line} (floor {mine}) imports {reached} (floor {floor_of(reached)})")
    return found


def missing_targets(module: str, source: str) -> list[str]:
    """Imports of qdq modules or names that do not exist (a module moved without its importers)."""
    found = []
    for line, target, names in imports_of(module, source):
        if target not in MODULES:
            found.append(f"{module}:{line} imports {target}, which is no module")
            continue
        if target == "qdq":
            continue  # lazy names: test_package checks every name of qdq.__all__ resolves
        defined = _top_level_names(target)
        for name in names:
            if name != "*" and name not in defined and f"{target}.{name}" not in MODULES:
                found.append(f"{module}:{line} imports {name!r} from {target}, which does not define it")
    return found


def _top_level_names(module: str) -> set[str]:
    """Names a module binds at its top level (definitions, assignments, imports; module __getattr__ names in
    ``__all__``)."""
    tree = ast.parse(MODULES[module].read_text())
    names = set()
    for node in tree.body:
        nodes = [node]
        if isinstance(node, (ast.If, ast.Try)):
            handlers = [s for h in getattr(node, "handlers", []) for s in h.body]
            nodes = [*node.body, *getattr(node, "orelse", []), *handlers]
        for n in nodes:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, (ast.Assign, ast.AnnAssign)):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                for t in targets:
                    names.update(x.id for x in ast.walk(t) if isinstance(x, ast.Name))
                if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                    try:
                        names.update(ast.literal_eval(n.value))
                    except ValueError:
                        pass
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                for a in n.names:
                    if a.name == "*":
                        names.update(_top_level_names(n.module)) if n.module in MODULES else None
                    else:
                        names.add((a.asname or a.name).split(".")[0])
    return names


def test_every_module_has_a_floor():
    assert [m for m in MODULES if _has_no_floor(m)] == []


def _has_no_floor(module: str) -> bool:
    try:
        floor_of(module)
    except KeyError:
        return True
    return False


def test_no_module_imports_a_higher_floor():
    assert [v for module, path in MODULES.items() for v in violations(module, path.read_text())] == []


def test_every_import_names_an_existing_module():
    assert [v for module, path in MODULES.items() for v in missing_targets(module, path.read_text())] == []


USERS = sorted(str(p.relative_to(ROOT)) for d in ("tests", "examples", "benchmarks") for p in (ROOT / d).rglob("*.py"))


def test_tests_examples_and_benchmarks_import_existing_modules():
    assert [v for path in USERS for v in missing_targets(path, (ROOT / path).read_text())] == []


def test_the_checks_catch_what_they_are_for():
    """Each check fails on the mistake it is for (so a passing run means something)."""
    assert violations("qdq.calib.max", "def f():\n    from qdq.nn import TensorQuantizer\n") == [
        "qdq.calib.max:2 (floor 2) imports qdq.nn (floor 3)"]
    assert violations("qdq.transform.switches", "from qdq.calibrate.model import calibrate_model\n") == [
        "qdq.transform.switches:1 (floor 4.1) imports qdq.calibrate.model (floor 4.3)"]
    assert violations("qdq.nn.functional", "from qdq import onnx\n") == [
        "qdq.nn.functional:1 (floor 3) imports qdq.onnx (floor 5)"]
    assert violations("qdq.onnx.export", "from qdq.transform.replace import name_quantizers\n") == []
    assert missing_targets("qdq.cli.commands", "from qdq.data import ImageFolderSource\n") == [
        "qdq.cli.commands:1 imports qdq.data, which is no module"]
    assert missing_targets("qdq.onnx.export", "from qdq.transform.replace import initialize\n") == [
        "qdq.onnx.export:1 imports 'initialize' from qdq.transform.replace, which does not define it"]
    with pytest.raises(KeyError, match="qdq.newfloor has no floor"):
        floor_of("qdq.newfloor")
