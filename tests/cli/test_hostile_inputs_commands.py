"""Hostile command lines: one line on stderr and exit code 2 for every user mistake; a parity mismatch fails."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from qdq.cli import main


def _image_folder(root, n=4):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(n // 2):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / cls / f"{i}.jpg")


@pytest.fixture
def files(tmp_path):
    _image_folder(tmp_path / "images")
    (tmp_path / "corrupt.pth").write_bytes(b"\x00garbage, not a torch file")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "r18.pth")
    (tmp_path / "folder.onnx").mkdir()
    return tmp_path


BASE = ["ptq", "--model", "resnet18", "--data", "{d}/images", "--out", "{d}/x.onnx"]


@pytest.mark.parametrize("extra,message", [
    (["--num-batches", "0"], "argument --num-batches: must be an integer >= 1, got 0"),
    (["--num-batches", "-2"], "argument --num-batches: must be an integer >= 1, got -2"),
    (["--num-batches", "abc"], "argument --num-batches: must be an integer >= 1, got 'abc'"),
    (["--batch-size", "-3"], "argument --batch-size: must be an integer >= 1, got -3"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["--num-classes", "0"], "argument --num-classes: must be an integer >= 1, got 0"),
    (["--percentile", "0"], "argument --percentile: must be a number in (0, 100], got 0"),
    (["--percentile", "101"], "argument --percentile: must be a number in (0, 100], got 101"),
    (["--percentile", "nan"], "argument --percentile: must be a number in (0, 100], got nan"),
    (["--tolerance-steps", "-1"], "argument --tolerance-steps: must be a finite number >= 0, got -1"),
    (["--weights", "{d}/corrupt.pth"], "corrupt.pth is not a readable torch state_dict file"),
    (["--weights", "{d}/list.pth"], "list.pth holds a list, not a state_dict"),
    (["--weights", "{d}/r18.pth"], "r18.pth does not hold resnet18 weights"),  # 5 classes, 1000 expected
    (["--ignore", "layer9"], "--ignore 'layer9' matches no quantizable layer of resnet18"),
    (["--ignore", "(unclosed"], "--ignore: ignore_policy: '(unclosed' is not a valid regular expression"),
    (["--out", "{d}/folder.onnx"], "folder.onnx: is a folder"),
    (["--calib-table", "{d}"], "--calib-table"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_ptq_user_errors_are_one_line_exit_2(extra, message, files, capsys):
    """Regression: --num-batches 0, --batch-size -3 and a corrupt --weights printed tracebacks with exit code 1."""
    code = _run([a.replace("{d}", str(files)) for a in BASE + extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def _run(argv):
    """main()'s exit code, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exited:
        return exited.code


def test_demo_counts_are_checked(capsys):
    code = _run(["demo", "--epochs", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "argument --epochs: must be an integer >= 1, got 0" in err and err.count("\n") == 1


def test_console_script_prints_one_line(files):
    """As a user runs it: no traceback, one line, exit 2."""
    result = subprocess.run([sys.executable, "-m", "qdq.cli", "ptq", "--model", "resnet18", "--data",
                             str(files / "images"), "--out", str(files / "x.onnx"), "--batch-size", "-3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "qdq ptq: error: argument --batch-size: must be an integer >= 1, got -3" in result.stderr


@pytest.mark.slow
def test_ptq_exits_non_zero_on_a_parity_mismatch_unless_allowed(files, capsys):
    """Regression: qdq ptq printed an ONNX Runtime comparison that failed its tolerance and exited 0."""
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), files / "r18.pth")
    argv = [a.replace("{d}", str(files)) for a in BASE] + [
        "--weights", str(files / "r18.pth"), "--num-classes", "5", "--num-batches", "1", "--batch-size", "2",
        "--method", "max", "--tolerance-steps", "0"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "MISMATCH: ONNX Runtime against PyTorch, tolerance 0 output step(s)" in captured.out
    assert "qdq ptq: error: ONNX Runtime and PyTorch differ beyond 0 output step(s)" in captured.err
    assert main(argv + ["--allow-mismatch"]) == 0
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.out and "--allow-mismatch: exit code unchanged" in captured.out
    assert captured.err.strip() == "" or "error" not in captured.err
