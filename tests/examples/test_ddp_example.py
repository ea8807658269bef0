import pytest
"""The DDP QAT example runs under torchrun on the CPU (2 gloo processes) as its README says, in its tiny mode.

The command is the block after ``<!-- smoke test -->`` in ``examples/ddp_qat/README.md`` (the convention of
``tests/examples/test_examples.py``), run from the repository root with this interpreter, the shared CIFAR-10
archive and ``--out`` set to a temporary folder.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import require_shared_data

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "examples" / "ddp_qat" / "README.md"
SMOKE = re.compile(r"<!-- smoke test -->\s*\n```(?:bash|sh|shell)?\n(.*?)```", re.S)


def _smoke_argv() -> list[str]:
    blocks = SMOKE.findall(README.read_text(encoding="utf-8"))
    assert len(blocks) == 1, "examples/ddp_qat/README.md needs exactly one block after '<!-- smoke test -->'"
    lines = [line for line in re.sub(r"\\\n\s*", " ", blocks[0]).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0])
    assert argv[:3] == ["python", "-m", "torch.distributed.run"] and "--nproc_per_node=2" in argv and "--tiny" in argv
    return [sys.executable] + argv[1:]


@pytest.mark.slow
def test_readme_smoke_command_runs_on_two_cpu_processes(tmp_path):
    archive = require_shared_data("cifar10-jpeg.tar.gz")
    command = _smoke_argv() + ["--data", str(archive), "--out", str(tmp_path), "--timeout", "120"]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for line in (
        "2 ranks, backend gloo, device cpu",
        "amax identical on 2 ranks",
        "models identical on 2 ranks",
        "saved on rank 0, loaded on 2 ranks",
        "check_tensorrt: 0 errors",
    ):
        assert line in out, out
    assert re.search(r"rules: \d+ quantizer pairs share a scale", out), out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qat_checkpoint.pt", "resnet_qdq.onnx"]
    assert not list(ROOT.glob("*.onnx")) and not list(ROOT.glob("*.pt")), "the example wrote into the repository"
