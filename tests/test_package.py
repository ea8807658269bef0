"""The front door: ``import qdq`` and the command line's help and argument errors import no floor and no torch."""

import subprocess
import sys

import pytest

import qdq

PROBE = """
import sys
{code}
print("torch" in sys.modules, "qdq.tensor_quant" in sys.modules)
"""


def _imports(code: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE.format(code=code)], capture_output=True, text=True, timeout=120)
    return done.stdout.split()[-2:]


def test_import_qdq_imports_no_floor():
    assert _imports("import qdq; qdq.__version__") == ["False", "False"]


@pytest.mark.parametrize("argv", [["--help"], ["ptq", "--help"], ["ptq", "--num-batches", "0"], ["check"],
                                  ["ptq", "--model", "resnet18", "--data", "/nonexistent", "--out", "x.onnx"]])
def test_cli_answers_help_and_bad_arguments_without_torch(argv):
    code = f"from qdq.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert _imports(code) == ["False", "False"]


def test_public_api_is_all_and_every_name_resolves():
    assert sorted(dir(qdq)) == sorted(qdq.__all__)
    for name in qdq.__all__:
        assert getattr(qdq, name) is not None, name
    assert callable(qdq.adaround) and callable(qdq.equalize) and callable(qdq.bias_correction)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        qdq.nope  # noqa: B018


def test_private_names_stay_importable_for_pytorch_quantization_code():
    from qdq.calib import _Calibrator  # noqa: F401
    from qdq.quant_modules import _DEFAULT_QUANT_MAP, _quant_entry  # noqa: F401

    import qdq.calib
    import qdq.quant_modules

    assert "_Calibrator" not in qdq.calib.__all__ and "_DEFAULT_QUANT_MAP" not in qdq.quant_modules.__all__


def test_cli_tolerance_default_is_the_library_default():
    from qdq.cli.commands import _parser
    from qdq.onnx.parity import DEFAULT_OUTPUT_TOLERANCE_STEPS

    args = _parser().parse_args(["ptq", "--model", "m", "--data", "d", "--out", "o.onnx"])
    assert args.tolerance_steps == DEFAULT_OUTPUT_TOLERANCE_STEPS


def test_calibrate_package_answers_the_names_of_its_model_module():
    import qdq.calibrate
    import qdq.calibrate.model

    assert qdq.calibrate.__all__ == qdq.calibrate.model.__all__
    assert all(getattr(qdq.calibrate, n) is getattr(qdq.calibrate.model, n) for n in qdq.calibrate.__all__)
