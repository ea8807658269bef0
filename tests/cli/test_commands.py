"""The qdq command line: every subcommand, and one-line errors for user mistakes."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from qdq.cli import main


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_check_exit_codes(tmp_path, capsys):
    import qdq

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    qdq.replace_to_quantization_module(model)
    qdq.calibrate_model(model, [torch.randn(2, 3, 8, 8)], progress=False)
    path = tmp_path / "m.onnx"
    qdq.export_onnx(model, torch.randn(1, 3, 8, 8), path)
    assert main(["check", str(path)]) == 0
    assert "0 errors" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.onnx: no such file" in err
    (tmp_path / "junk.onnx").write_text("not onnx")
    assert main(["check", str(tmp_path / "junk.onnx")]) == 2


def _image_folder(root, n=6):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(n // 2):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / cls / f"{i}.jpg")


@pytest.mark.slow
def test_ptq_end_to_end(tmp_path, capsys):
    _image_folder(tmp_path / "images")
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), weights)
    out = tmp_path / "r18.onnx"
    code = main(["ptq", "--model", "resnet18", "--weights", str(weights), "--num-classes", "5", "--data",
                 str(tmp_path / "images"), "--method", "percentile", "--num-batches", "2", "--batch-size", "2",
                 "--out", str(out), "--calib-table", str(tmp_path / "table.json")])
    text = capsys.readouterr().out
    assert code == 0, text
    assert out.is_file() and "0 errors" in text and "calibrated" in text
    # the 2 images after the 4 calibration images measure the quantized model against fp32
    line = next(ln for ln in text.splitlines() if ln.startswith("fidelity on 2 held-out images"))
    sqnr = float(line.split("SQNR ")[1].split(" dB")[0])
    agreement = float(line.split("fp32 ")[1].rstrip("%"))
    assert np.isfinite(sqnr) and agreement in (0.0, 50.0, 100.0)
    assert json.loads((tmp_path / "table.json").read_text())["method"] == "percentile"


@pytest.mark.parametrize("fmt, expected, extra", [
    ("fp8", "format fp8: 2 layers float, 19 layers fp8", []),  # the 3-channel stem and the 5-class head stay float
    ("fp8", "format fp8: 21 layers fp8", ["--fp8-fallback", "none"]),
    ("int4", "format int4: 20 layers int8, 1 layers int4", [])])
def test_ptq_formats(tmp_path, capsys, fmt, expected, extra):
    import onnx
    from onnx import TensorProto

    _image_folder(tmp_path / "images", n=2)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), weights)
    out = tmp_path / "r18.onnx"
    code = main(["ptq", "--model", "resnet18", "--weights", str(weights), "--num-classes", "5", "--data",
                 str(tmp_path / "images"), "--method", "max", "--num-batches", "1", "--batch-size", "2",
                 "--format", fmt, "--out", str(out), *extra])
    text = capsys.readouterr().out
    assert code == 0, text
    assert expected in text and "0 errors" in text
    assert "fidelity: no held-out images (the 2 images of --data were all used for calibration" in text
    types = {i.data_type for i in onnx.load(str(out)).graph.initializer}
    assert (TensorProto.FLOAT8E4M3FN if fmt == "fp8" else TensorProto.INT4) in types


@pytest.mark.parametrize("argv,message", [
    (["ptq", "--model", "resnet18", "--data", "/nope", "--out", "x.onnx"], "--data /nope: no such folder"),
    (["ptq", "--model", "nonet", "--data", "{images}", "--out", "x.onnx"], "unknown model 'nonet'"),
    (["ptq", "--model", "resnet18", "--data", "{images}", "--out", "x.onnx", "--method", "kl"], "unknown method 'kl'"),
    (["ptq", "--model", "resnet18", "--weights", "/nope.pth", "--data", "{images}", "--out", "x.onnx"],
     "--weights /nope.pth: no such file"),
    (["ptq", "--data", "{images}"], "ptq needs --model"),
    (["ptq", "--model", "resnet18", "--data", "{images}", "--out", "x.onnx", "--format", "fp8", "--method", "entropy"],
     "FP8 is calibrated with max, mse or percentile"),
])
def test_ptq_user_errors_are_one_line(argv, message, tmp_path, capsys):
    _image_folder(tmp_path / "images")
    argv = [a.replace("{images}", str(tmp_path / "images")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_list_models(capsys):
    assert main(["ptq", "--list-models"]) == 0
    names = capsys.readouterr().out.split()
    assert "efficientnet_lite0" in names and "resnet50" in names


@pytest.mark.slow
def test_demo_short_run(tmp_path):
    """The console script, as a user runs it (shortened training)."""
    result = subprocess.run([sys.executable, "-m", "qdq.cli", "demo", "--out", str(tmp_path), "--epochs", "2",
                             "--qat-epochs", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    for text in ("fp32 top-1", "kld+autotune", "W2A8", "TensorRT rule check", "Summary"):
        assert text in result.stdout
    data = json.loads((tmp_path / "demo.json").read_text())
    assert set(data["ptq"]) == {"max", "entropy", "mse", "percentile", "kld", "kld+autotune"}
    assert data["check"]["error"] == 0
    assert (tmp_path / "digits_qdq.onnx").is_file() and (tmp_path / "sensitivity.png").is_file()
