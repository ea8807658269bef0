"""qdq.onnx.check_attention: one hand-built attention graph per rule, and the clean form."""

import sys
from pathlib import Path

import numpy as np
import pytest

from qdq.onnx import check as check_module
from qdq.onnx.check import RULES, check_tensorrt
from qdq.onnx.check_attention import ATTENTION_RULES

sys.path.insert(0, str(Path(__file__).parent))  # the graph builder of the checker's tests
from test_check import Graph, kinds  # noqa: E402

S = 0.05


def attention(length=32, head=16, q_q=True, k_q=True, p_q=True, v_q=True, mask="float", score_q=False):
    """``q, k, v (1, 2, L, d) -> [Q/DQ] -> MatMul(q, Transpose(k)) -> Mul -> Add(mask) -> Softmax -> [Q/DQ] ->
    MatMul(., v)``; returns the model."""
    g = Graph()
    q = g.qdq("q", S, "q") if q_q else "q"
    k = g.op("Transpose", [g.qdq("k", S, "k") if k_q else "k"], "kt", perm=[0, 1, 3, 2])
    v = g.qdq("v", S, "v") if v_q else "v"
    scores = g.op("Mul", [g.op("MatMul", [q, k], "bmm1"), g.init("scale", np.float32(head ** -0.5))], "mul")
    if score_q:
        scores = g.qdq(scores, S, "scores")
    if mask == "float":
        scores = g.op("Add", [scores, "mask"], "mask_add")
    elif mask == "quantized":
        scores = g.op("Add", [scores, g.qdq("mask", S, "mask")], "mask_add")
    probs = g.op("Softmax", [scores], "softmax", axis=-1)
    probs = g.qdq(probs, 1 / 127, "probs") if p_q else probs
    g.op("MatMul", [probs, v], "bmm2")
    shape = [1, 2, length, head]
    inputs = {"q": shape, "k": shape, "v": shape}
    if mask != "none":
        inputs["mask"] = [1, 1, length, length]
    return g.model(inputs, ["bmm2"])


def attention_findings(model):
    return [f for f in check_tensorrt(model) if f.rule.startswith("attention-")]


def test_rules_are_in_the_checker():
    assert [r for r in ATTENTION_RULES if r not in RULES] == []


def test_clean_int8_attention():
    findings = check_tensorrt(attention())
    assert [f for f in findings if f.severity != "info"] == [], [str(f) for f in findings]


def test_both_float_is_fine():
    model = attention(q_q=False, k_q=False, p_q=False, v_q=False)
    assert attention_findings(model) == []


def test_bmm2_float_bmm1_quantized_is_a_pair_warning():
    findings = attention_findings(attention(p_q=False, v_q=False))
    assert kinds(findings) == [("warning", "attention-pair")]
    assert "BMM1 MatMul 'bmm1' is quantized, BMM2 MatMul 'bmm2' is float" in findings[0].message


def test_half_quantized_attention_matmul_is_an_error_and_a_pair_warning():
    findings = check_tensorrt(attention(v_q=False))
    assert ("error", "half-quantized") in kinds(findings)
    assert "bmm2" in [f for f in findings if f.rule == "half-quantized"][0].nodes
    pair = [f for f in findings if f.rule == "attention-pair"]
    assert len(pair) == 1 and "half-quantized" in pair[0].message


@pytest.mark.parametrize("form", ["mask", "scores"])
def test_quantized_mask_or_scores(form):
    model = attention(mask="quantized") if form == "mask" else attention(score_q=True)
    findings = attention_findings(model)
    assert kinds(findings) == [("warning", "attention-mask")]


@pytest.mark.parametrize("length,head,what", [(600, 16, "sequence length 600 > 512"), (32, 8, "head size 8")])
def test_shapes_outside_tensorrt_limits(length, head, what):
    findings = attention_findings(attention(length=length, head=head))
    assert kinds(findings) == [("warning", "attention-shape")]
    assert what in findings[0].message


def test_key_transposed_after_dq_counts_as_quantized():
    """K's DQ reaches BMM1 through a Transpose: BMM1 is quantized (no half-quantized finding)."""
    assert not [f for f in check_tensorrt(attention()) if f.rule == "half-quantized"]


def test_weight_transposed_before_its_q_is_a_weight():
    """A per-channel Q on Transpose(W) quantizes constant data, not an activation."""
    g = Graph()
    x = g.qdq("x", S, "x")
    wt = g.op("Transpose", [g.init("w", np.ones((8, 16), np.float32))], "wt", perm=[1, 0])
    w = g.qdq(wt, np.full(8, 0.01, np.float32), "w", axis=1)
    g.op("MatMul", [x, w], "mm")
    findings = check_tensorrt(g.model({"x": [2, 16]}, ["mm"]))
    assert [f for f in findings if f.severity != "info"] == [], [str(f) for f in findings]


def test_documented_in_both_tables():
    from qdq.onnx import check_attention

    for rule in ATTENTION_RULES:
        assert f"``{rule}``" in check_attention.__doc__ and f"``{rule}``" in check_module.__doc__
