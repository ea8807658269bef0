"""Hostile inputs to replace_to_quantization_module: ignore policies and TorchScript models."""

import logging
import re
import warnings

import pytest
import torch
from torch import nn

import qdq
from qdq.transform.ignore_policy import compile_ignore_policy, unmatched_ignore_patterns


def _model():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))


@pytest.mark.parametrize("policy", [5, 2.5, b"0", object()])
def test_an_ignore_policy_of_a_wrong_type_is_a_clear_type_error(policy):
    """Regression: ignore_policy=5 gave "'int' object is not iterable"."""
    with pytest.raises(TypeError, match=r"ignore_policy must be a layer name or regular expression.*got"):
        qdq.replace_to_quantization_module(_model(), ignore_policy=policy)


def test_a_mapping_policy_ignores_its_true_entries_only():
    """Regression: ignore_policy={"0": False} ignored layer 0 (a dict was read as the list of its keys)."""
    report = qdq.replace_to_quantization_module(_model(), ignore_policy={"0": False})
    assert report.ignored == [] and report.replaced == ["0", "2.0", "2.1"]
    report = qdq.replace_to_quantization_module(_model(), ignore_policy={"0": True, "2": False})
    assert report.ignored == ["0"] and report.replaced == ["2.0", "2.1"]
    # False entries carve exceptions out of True ones
    report = qdq.replace_to_quantization_module(_model(), ignore_policy={"2": True, "2.1": False})
    assert report.ignored == ["2.0"] and report.replaced == ["0", "2.1"]


def test_a_mapping_policy_with_a_non_bool_value_names_the_key():
    with pytest.raises(TypeError, match=r"ignore_policy\['0'\] must be True \(ignore\) or False \(quantize\), got 1"):
        compile_ignore_policy({"0": 1})


def test_ignore_entries_that_match_no_layer_are_reported(caplog):
    """Regression: an ignore_policy entry that matched no layer was not reported (config skip_layers errs)."""
    with caplog.at_level(logging.WARNING, logger="qdq.transform.replace"):
        report = qdq.replace_to_quantization_module(_model(), ignore_policy=["2.1", "head", re.compile("fc.*")])
    assert report.unmatched_ignore == ["head", "fc.*"] and report.ignored == ["2.1"]
    assert "'head', 'fc.*' match no quantizable layer" in caplog.text
    assert "ignore_policy entries matching no layer: 'head', 'fc.*'" in str(report)


def test_matching_entries_and_callables_are_not_reported():
    report = qdq.replace_to_quantization_module(_model(), ignore_policy=["2", lambda p: False])
    assert report.unmatched_ignore == [] and report.ignored == ["2.0", "2.1"]
    assert unmatched_ignore_patterns({"0": True, "x": False}, ["0", "1"]) == ["x"]
    assert unmatched_ignore_patterns(None, ["0"]) == []


def test_a_scripted_model_is_refused_clearly():
    """Regression: replace_to_quantization_module on a torch.jit.script'ed model replaced nothing, said nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(_model())
    with pytest.raises(TypeError, match=r"the model is a TorchScript module .*quantize the Python nn.Module before"):
        qdq.replace_to_quantization_module(scripted)


def test_a_scripted_submodule_is_reported_unsupported(caplog):
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model[2] = torch.jit.script(model[2])
    with caplog.at_level(logging.WARNING, logger="qdq.transform.replace"):
        report = qdq.replace_to_quantization_module(model)
    assert report.replaced == ["0"]
    assert [p for p, _ in report.unsupported] == ["2"] and "TorchScript" in report.unsupported[0][1]
    assert "not quantized: 2: a TorchScript module" in caplog.text


@pytest.mark.parametrize("model", [None, "resnet18", 5])
def test_replace_on_a_non_module(model):
    with pytest.raises(TypeError, match=r"replace_to_quantization_module takes an nn.Module"):
        qdq.replace_to_quantization_module(model)


@pytest.mark.parametrize("quant_map", [5, "Linear"])
def test_quant_map_of_a_wrong_type(quant_map):
    """Regression: quant_map=5 gave "'int' object is not iterable"."""
    with pytest.raises(TypeError, match=r"quant_map must be a mapping \{float class: quantized class\}"):
        qdq.replace_to_quantization_module(_model(), quant_map=quant_map)
