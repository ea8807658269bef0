"""qdq.onnx.check: a clean graph, one hand-built graph per TensorRT rule, the report and the command line."""

import math
import runpy
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdq.onnx.check as check_module
from qdq.onnx.check import RULES, Finding, ModelReadError, check_tensorrt, format_findings, main, quantize_groups


def f32(value):
    """A scale as the checker reports it: the float32 value, widened."""
    return float(np.float32(value))


class Graph:
    """A small ONNX graph builder: each node's output tensor is named after the node, initializers come from NumPy
    arrays, and every Q/DQ gets its own scale and zero-point initializers (``<node>.scale``, ``<node>.zp``)."""

    def __init__(self):
        self.nodes, self.inits = [], {}

    def init(self, name, value):
        if isinstance(value, onnx.TensorProto):
            value = onnx.TensorProto.FromString(value.SerializeToString())
            value.name = name
        self.inits[name] = value if isinstance(value, onnx.TensorProto) else np.asarray(value)
        return name

    def op(self, op_type, inputs, name, outputs=None, **attrs):
        outputs = outputs or [name]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, **attrs))
        return outputs[0]

    def _qparams(self, name, scale, zp, scale_dtype):
        scale = np.asarray(scale, scale_dtype)
        inputs = [self.init(f"{name}.scale", scale)]
        if isinstance(zp, onnx.TensorProto):
            inputs.append(self.init(f"{name}.zp", zp))
        elif zp is not None:
            zp = np.asarray(zp)
            zp = zp if zp.shape == scale.shape else np.full(scale.shape, zp, zp.dtype)
            inputs.append(self.init(f"{name}.zp", zp))
        return inputs

    def q(self, x, scale, name, zp=np.int8(0), axis=None, scale_dtype=np.float32, **attrs):
        if axis is not None:
            attrs["axis"] = axis
        return self.op("QuantizeLinear", [x, *self._qparams(name, scale, zp, scale_dtype)], name, **attrs)

    def dq(self, x, scale, name, zp=np.int8(0), axis=None, scale_dtype=np.float32, **attrs):
        if axis is not None:
            attrs["axis"] = axis
        return self.op("DequantizeLinear", [x, *self._qparams(name, scale, zp, scale_dtype)], name, **attrs)

    def qdq(self, x, scale, name, **kw):
        """``x -> Q (<name>_q) -> DQ (<name>_dq)``; returns the DQ output."""
        return self.dq(self.q(x, scale, f"{name}_q", **kw), scale, f"{name}_dq", **kw)

    def int8_conv(self, x, name, cin=4, cout=4, scale=0.05):
        """``x -> Q/DQ -> Conv`` with per-channel int8 weights feeding a DQ (the deploy form)."""
        xd = self.qdq(x, scale, f"{name}_in")
        w = self.init(f"{name}.w", np.ones((cout, cin, 1, 1), np.int8))
        return self.op("Conv", [xd, self.dq(w, np.full(cout, 0.01), f"{name}_w_dq", axis=0)], name)

    def model(self, inputs, outputs, opset=13, dtypes=None):
        """``inputs``: name -> shape; ``outputs``: names, or name -> shape; ``dtypes``: name -> elem type (float)."""
        dtypes = dtypes or {}
        outputs = outputs if isinstance(outputs, dict) else dict.fromkeys(outputs)
        ins = [helper.make_tensor_value_info(n, dtypes.get(n, TensorProto.FLOAT), s) for n, s in inputs.items()]
        outs = [helper.make_tensor_value_info(n, dtypes.get(n, TensorProto.FLOAT), s) for n, s in outputs.items()]
        inits = [v if isinstance(v, onnx.TensorProto) else numpy_helper.from_array(v, k) for k, v in self.inits.items()]
        graph = helper.make_graph(self.nodes, "test", ins, outs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 10  # what the installed onnxruntime reads (opset 21 needs IR 10)
        return model


def kinds(findings):
    return [(f.severity, f.rule) for f in findings]


def only(findings, severity, rule):
    """The one finding of ``findings``, checked to be ``(severity, rule)``."""
    assert kinds(findings) == [(severity, rule)], [str(f) for f in findings]
    return findings[0]


# ------------------------------------------------------------------------------------------------------------------
# the clean graph
# ------------------------------------------------------------------------------------------------------------------
def clean_model():
    """Input and per-channel weight Q/DQ on two Convs (deploy and QAT form), a residual Add in the recommended form,
    a MaxPool and a Concat whose Q/DQ all share the branch's scale, a third Conv reading the concat."""
    rng = np.random.default_rng(0)
    g = Graph()
    xd = g.qdq("x", 0.05, "x")
    w1 = g.init("w1", rng.integers(-127, 128, (4, 4, 3, 3)).astype(np.int8))
    w1d = g.dq(w1, np.linspace(0.01, 0.04, 4), "w1_dq", axis=0)
    relu1 = g.op("Relu", [g.op("Conv", [xd, w1d, g.init("b1", np.zeros(4, np.float32))], "conv1", pads=[1] * 4)],
                 "relu1")
    w2 = g.init("w2", rng.standard_normal((4, 4, 3, 3)).astype(np.float32))
    w2d = g.qdq(w2, np.linspace(0.02, 0.05, 4), "w2", axis=0)
    conv2 = g.op("Conv", [g.qdq(relu1, 0.04, "relu1"), w2d], "conv2", pads=[1] * 4)
    relu2 = g.op("Relu", [g.op("Add", [conv2, xd], "add")], "relu2")
    branch = g.qdq(relu2, 0.1, "branch")
    pool = g.op("MaxPool", [branch], "pool", kernel_shape=[3, 3], pads=[1] * 4)
    cat = g.op("Concat", [branch, pool], "cat", axis=1)
    w3 = g.init("w3", rng.integers(-127, 128, (2, 8, 1, 1)).astype(np.int8))
    g.op("Conv", [g.qdq(cat, 0.1, "cat"), g.dq(w3, [0.02, 0.03], "w3_dq", axis=0)], "conv3")
    return g.model({"x": [1, 4, 8, 8]}, {"conv3": [1, 2, 8, 8]})


def test_clean_graph_has_no_findings():
    model = clean_model()
    onnx.checker.check_model(model, full_check=True)
    assert check_tensorrt(model) == []


def test_clean_graph_runs_in_onnxruntime():
    """The clean graph is a real model (per-channel axes and shapes valid), not only one the checker likes."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(clean_model().SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.random.default_rng(0).standard_normal((1, 4, 8, 8), np.float32)})
    assert y.shape == (1, 2, 8, 8) and np.isfinite(y).all()


def test_external_data_is_read_from_the_model_folder(tmp_path):
    path = tmp_path / "clean.onnx"
    onnx.save(clean_model(), path, save_as_external_data=True, location="clean.data", size_threshold=0)
    assert (tmp_path / "clean.data").exists()
    assert check_tensorrt(path) == []
    assert check_tensorrt(str(path)) == []


# ------------------------------------------------------------------------------------------------------------------
# rules 1, 2: opset and integer ops
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [10, 12])
def test_opset_below_13(opset):
    g = Graph()
    g.int8_conv("x", "conv")
    finding = only(check_tensorrt(g.model({"x": [1, 4, 2, 2]}, ["conv"], opset=opset)), "error", "opset")
    assert f"opset {opset}" in finding.message and finding.nodes == ()


def test_no_default_opset():
    model = Graph().model({"x": [1]}, ["x"])
    model.opset_import[0].domain = "com.example"
    findings = check_tensorrt(model)
    assert kinds(findings) == [("error", "opset"), ("info", "no-qdq")]
    assert "no default-domain" in findings[0].message


@pytest.mark.parametrize("op_type", ["QLinearConv", "QLinearMatMul", "QLinearAdd", "ConvInteger", "MatMulInteger",
                                     "DynamicQuantizeLinear"])
def test_integer_ops(op_type):
    g = Graph()
    g.op(op_type, ["x"], "bad")
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["bad"])), "error", "unsupported-quant-op")
    assert finding.nodes == ("bad",) and op_type in finding.message


def test_qdq_outside_the_onnx_domain():
    g = Graph()
    g.nodes.append(helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="ms_q", domain="com.microsoft"))
    g.init("s", np.float32(0.1))
    g.init("zp", np.int8(0))
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["xq"])), "error", "unsupported-quant-op")
    assert finding.nodes == ("ms_q",) and "com.microsoft" in finding.message


# ------------------------------------------------------------------------------------------------------------------
# rule 3: Q/DQ pairing
# ------------------------------------------------------------------------------------------------------------------
def test_q_read_by_a_non_dq_node():
    g = Graph()
    g.op("Relu", [g.q("x", 0.1, "q")], "relu")
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["relu"])), "error", "q-without-dq")
    assert finding.nodes == ("q", "relu") and "Relu 'relu'" in finding.message


def test_q_as_graph_output():
    g = Graph()
    g.q("x", 0.1, "q")
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["q"])), "error", "q-without-dq")
    assert finding.nodes == ("q",) and "graph output" in finding.message


def test_q_never_read():
    g = Graph()
    g.q("x", 0.1, "q")
    g.op("Relu", ["x"], "relu")
    assert only(check_tensorrt(g.model({"x": [1, 4]}, ["relu"])), "info", "unused-q").nodes == ("q",)


def test_dq_scale_differs_from_its_q():
    g = Graph()
    g.op("Relu", [g.dq(g.q("x", 0.1, "q"), 0.2, "dq")], "relu")
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["relu"])), "error", "qdq-mismatch")
    assert finding.nodes == ("q", "dq") and finding.scales == (f32(0.1), f32(0.2))
    assert "scale 0.1 (float) vs 0.2 (float)" in finding.message


def test_dq_zero_point_differs_from_its_q():
    """Reported once, as a mismatch: the DQ's own zero point is not also reported as asymmetric."""
    g = Graph()
    g.op("Relu", [g.dq(g.q("x", 0.1, "q"), 0.1, "dq", zp=np.int8(1))], "relu")
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["relu"])), "error", "qdq-mismatch")
    assert "zero point 0 (int8) vs 1 (int8)" in finding.message and finding.nodes == ("q", "dq")


def test_dq_axis_differs_from_its_q():
    g = Graph()
    w = g.init("w", np.ones((4, 4, 1, 1), np.float32))
    wd = g.dq(g.q(w, np.full(4, 0.1), "w_q", axis=0), np.full(4, 0.1), "w_dq", axis=1)
    g.op("Conv", [g.qdq("x", 0.1, "x"), wd], "conv")
    findings = check_tensorrt(g.model({"x": [1, 4, 2, 2]}, ["conv"]))
    assert kinds(findings) == [("error", "qdq-mismatch"), ("error", "per-channel-axis")]
    assert "axis 0 vs 1" in findings[0].message


def test_dq_without_zero_point_matches_a_zero_q_zero_point():
    g = Graph()
    g.op("Relu", [g.dq(g.q("x", 0.1, "q"), 0.1, "dq", zp=None)], "relu")
    assert check_tensorrt(g.model({"x": [1, 4]}, ["relu"])) == []


@pytest.mark.parametrize("source", ["graph input", "relu"])
def test_dq_input_neither_q_nor_constant(source):
    g = Graph()
    data = "x" if source == "graph input" else g.op("Relu", ["x"], "relu")
    g.op("Relu", [g.dq(data, 0.1, "dq")], "out")
    model = g.model({"x": [1, 4]}, ["out"], dtypes={"x": TensorProto.INT8})
    finding = only(check_tensorrt(model), "error", "dq-input")
    assert finding.nodes == ("dq",)
    assert ("graph input 'x'" if source == "graph input" else "from Relu 'relu'") in finding.message


def test_dq_of_a_constant_node_is_deploy_form():
    g = Graph()
    g.nodes.append(helper.make_node("Constant", [], ["w"], name="const",
                                    value=numpy_helper.from_array(np.ones((4, 4), np.int8))))
    g.op("MatMul", [g.qdq("x", 0.1, "x"), g.dq("w", np.full(4, 0.1), "w_dq", axis=1)], "mm")
    assert check_tensorrt(g.model({"x": [2, 4]}, ["mm"])) == []


# ------------------------------------------------------------------------------------------------------------------
# rules 4, 5: zero points and scales
# ------------------------------------------------------------------------------------------------------------------
def test_scale_not_constant():
    g = Graph()
    g.nodes += [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
                helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["y"], name="dq")]
    g.init("zp", np.int8(0))
    findings = check_tensorrt(g.model({"x": [1, 4], "s": []}, ["y"]))
    assert kinds(findings) == [("error", "qparam-not-constant")] * 2
    assert [f.nodes for f in findings] == [("q",), ("dq",)]
    assert "graph input 's'" in findings[0].message


def test_zero_point_not_constant():
    g = Graph()
    g.nodes.append(helper.make_node("DequantizeLinear", ["w", "s", "zp"], ["y"], name="dq"))
    g.init("w", np.ones(4, np.int8))
    g.init("s", np.float32(0.1))
    model = g.model({"zp": []}, ["y"], dtypes={"zp": TensorProto.INT8})
    assert "zero point graph input 'zp'" in only(check_tensorrt(model), "error", "qparam-not-constant").message


def test_q_with_int8_output_dtype_needs_no_zero_point():
    g = Graph()
    g.op("Relu", [g.qdq("x", 0.1, "x", zp=None, output_dtype=TensorProto.INT8)], "relu")
    assert check_tensorrt(g.model({"x": [1, 4]}, ["relu"], opset=21)) == []


def test_sparse_constant_scale_is_not_a_dense_constant():
    g = Graph()
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([0.1], np.float32)),
                                       numpy_helper.from_array(np.array([0], np.int64)), [1])
    g.nodes.append(helper.make_node("Constant", [], ["s"], name="const", sparse_value=sparse))
    g.nodes += [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
                helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["y"], name="dq")]
    g.init("zp", np.int8(0))
    findings = check_tensorrt(g.model({"x": [1, 4]}, ["y"]))
    assert kinds(findings) == [("error", "qparam-not-constant")] * 2
    assert "scale 's' from Constant 'const' is not a dense constant" in findings[0].message


def test_zero_point_missing():
    g = Graph()
    g.op("Relu", [g.qdq("x", 0.1, "x", zp=None)], "relu")
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["relu"])), "error", "zero-point-missing")
    assert finding.nodes == ("x_q",) and "uint8" in finding.message


def test_uint8_zero_point():
    g = Graph()
    g.op("Relu", [g.qdq("x", 0.1, "x", zp=np.uint8(0))], "relu")
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["relu"])), "error", "zero-point-dtype")
    assert finding.nodes == ("x_q",) and "uint8" in finding.message


def test_int4_activation_zero_point_is_an_error():
    g = Graph()
    zp = helper.make_tensor("zp", TensorProto.INT4, [], [0])
    g.op("Relu", [g.qdq("x", 0.1, "x", zp=zp)], "relu")
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["relu"], opset=21)), "error", "zero-point-dtype")
    assert finding.nodes == ("x_q",) and "int4" in finding.message


def test_int4_weight_only_is_a_warning():
    """An int4 weight DQ on a MatMul whose activation stays float is weight-only quantization, not half-quantized."""
    g = Graph()
    w = g.init("w", helper.make_tensor("w", TensorProto.INT4, [4, 3], [1, -2, 3] * 4))
    zp = helper.make_tensor("zp", TensorProto.INT4, [3], [0, 0, 0])
    g.op("MatMul", ["x", g.dq(w, np.full(3, 0.1), "w_dq", zp=zp, axis=1)], "mm")
    finding = only(check_tensorrt(g.model({"x": [2, 4]}, ["mm"], opset=21)), "warning", "zero-point-dtype")
    assert finding.nodes == ("w_dq",) and "weight-only int4 needs TensorRT 10 and MatMul/Gemm" in finding.message


def test_asymmetric_zero_point():
    g = Graph()
    g.op("Relu", [g.qdq("x", 0.1, "x", zp=np.int8(3))], "relu")
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["relu"])), "error", "zero-point-nonzero")
    assert finding.nodes == ("x_q",) and "'x_q.zp' is 3" in finding.message


@pytest.mark.parametrize("dtype,name,severity", [(np.float16, "float16", "warning"), (np.float64, "double", "error")])
def test_scale_dtype(dtype, name, severity):
    g = Graph()
    g.op("Relu", [g.qdq("x", 0.5, "x", scale_dtype=dtype)], "relu")
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["relu"])), severity, "scale-dtype")
    assert finding.nodes == ("x_q",) and finding.scales == (0.5,) and f"is {name};" in finding.message


@pytest.mark.parametrize("scale", [0.0, -0.1, math.inf, math.nan])
def test_bad_scale_value(scale):
    g = Graph()
    g.op("Relu", [g.qdq("x", scale, "x")], "relu")
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["relu"])), "error", "scale-value")
    assert finding.nodes == ("x_q",) and len(finding.scales) == 1
    assert finding.scales[0] == f32(scale) or math.isnan(scale) and math.isnan(finding.scales[0])


def test_bad_per_channel_scale_value_counts_the_bad_ones():
    g = Graph()
    g.int8_conv("x", "conv")
    g.inits["conv_w_dq.scale"] = np.array([0.01, 0.0, 0.01, 0.01], np.float32)
    finding = only(check_tensorrt(g.model({"x": [1, 4, 2, 2]}, ["conv"])), "error", "scale-value")
    assert finding.nodes == ("conv_w_dq",) and finding.scales == (0.0,) and "(1 of 4 values)" in finding.message


def test_per_channel_activation():
    g = Graph()
    g.op("Relu", [g.qdq("x", np.full(4, 0.1), "x", axis=1)], "relu")
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["relu"])), "error", "per-channel-activation")
    assert finding.nodes == ("x_q",) and "4 scales (axis 1)" in finding.message


# ------------------------------------------------------------------------------------------------------------------
# rule 6: per-channel weights
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scales,axis,expected", [(3, 0, "3 scales for 4 channels along axis 0"),
                                                  (4, 4, "axis 4 is outside the weight's rank 4")])
def test_per_channel_shape(scales, axis, expected):
    g = Graph()
    w = g.init("w", np.ones((4, 4, 3, 3), np.int8))
    g.op("Conv", [g.qdq("x", 0.1, "x"), g.dq(w, np.full(scales, 0.1), "w_dq", axis=axis)], "conv")
    finding = only(check_tensorrt(g.model({"x": [1, 4, 3, 3]}, ["conv"])), "error", "per-channel-shape")
    assert finding.nodes == ("w_dq",) and expected in finding.message


def weight_model(op_type, shape, axis, **attrs):
    """A quantized ``op_type`` whose per-channel int8 weight of ``shape`` is quantized along ``axis``."""
    g = Graph()
    w = g.init("w", np.ones(shape, np.int8))
    wd = g.dq(w, np.full(shape[axis], 0.1), "w_dq", axis=axis)
    g.op(op_type, [g.qdq("x", 0.1, "x"), wd], "layer", **attrs)
    return g.model({"x": [1, 4, 2, 2] if "Conv" in op_type else [2, 4]}, ["layer"])


@pytest.mark.parametrize("op_type,shape,axis,attrs,severity", [
    ("Conv", (2, 4, 1, 1), 1, {}, "error"),
    ("ConvTranspose", (4, 2, 1, 1), 1, {}, "error"),
    ("Gemm", (3, 4), 1, {"transB": 1}, "warning"),
    ("Gemm", (4, 3), 0, {"transB": 0}, "warning"),
    ("MatMul", (4, 3), 0, {}, "warning"),
])
def test_per_channel_axis(op_type, shape, axis, attrs, severity):
    finding = only(check_tensorrt(weight_model(op_type, shape, axis, **attrs)), severity, "per-channel-axis")
    assert finding.nodes == ("w_dq", "layer") and f"along axis {axis}, expected axis {1 - axis}" in finding.message
    if op_type == "ConvTranspose":
        assert "reject axis 1" in finding.message


@pytest.mark.parametrize("op_type,shape,axis,attrs", [
    ("Conv", (2, 4, 1, 1), 0, {}),
    ("ConvTranspose", (4, 2, 1, 1), 0, {}),
    ("Gemm", (3, 4), 0, {"transB": 1}),
    ("Gemm", (4, 3), 1, {}),
    ("MatMul", (4, 3), 1, {}),
    ("MatMul", (4, 3), -1, {}),
])
def test_per_channel_axis_accepted(op_type, shape, axis, attrs):
    assert check_tensorrt(weight_model(op_type, shape, axis, **attrs)) == []


def test_blocked_quantization_is_not_shape_checked():
    g = Graph()
    w = g.init("w", np.ones((8, 4), np.int8))
    g.op("MatMul", [g.qdq("x", 0.1, "x"), g.dq(w, np.full((2, 4), 0.1), "w_dq", axis=0, block_size=4)], "mm")
    finding = only(check_tensorrt(g.model({"x": [2, 8]}, ["mm"], opset=21)), "info", "blocked-quantization")
    assert finding.nodes == ("w_dq",) and "block_size=4" in finding.message


# ------------------------------------------------------------------------------------------------------------------
# rule 7: quantized layers
# ------------------------------------------------------------------------------------------------------------------
def test_conv_with_float_weight_is_half_quantized():
    g = Graph()
    g.op("Conv", [g.qdq("x", 0.1, "x"), g.init("w", np.ones((4, 4, 1, 1), np.float32))], "conv")
    finding = only(check_tensorrt(g.model({"x": [1, 4, 2, 2]}, ["conv"])), "error", "half-quantized")
    assert finding.nodes == ("conv",) and "constant 'w'" in finding.message


def test_matmul_with_float_activation_is_half_quantized():
    g = Graph()
    g.op("MatMul", ["x", g.dq(g.init("w", np.ones((4, 3), np.int8)), np.full(3, 0.1), "w_dq", axis=1)], "mm")
    finding = only(check_tensorrt(g.model({"x": [2, 4]}, ["mm"])), "error", "half-quantized")
    assert finding.nodes == ("mm",) and "graph input 'x'" in finding.message


def test_dq_through_transpose_counts_as_quantized():
    """TensorRT moves a DQ forward through Transpose, so DQ(weight) -> Transpose -> MatMul is quantized."""
    g = Graph()
    wd = g.dq(g.init("w", np.ones((3, 4), np.int8)), np.full(3, 0.1), "w_dq", axis=0)
    g.op("MatMul", [g.qdq("x", 0.1, "x"), g.op("Transpose", [wd], "wt", perm=[1, 0])], "mm")
    assert check_tensorrt(g.model({"x": [2, 4]}, ["mm"])) == []


def test_float_layer_in_a_quantized_model():
    g = Graph()
    conv = g.int8_conv("x", "conv")
    g.op("Conv", [conv, g.init("w2", np.ones((4, 4, 1, 1), np.float32))], "float_conv")
    assert only(check_tensorrt(g.model({"x": [1, 4, 2, 2]}, ["float_conv"])), "info", "float-layer").nodes == (
        "float_conv",)


# ------------------------------------------------------------------------------------------------------------------
# rules 8, 9: scale groups and fan-out
# ------------------------------------------------------------------------------------------------------------------
def branches(g, scales):
    """One Q/DQ'd Relu branch of ``x`` per scale; returns the DQ outputs (DQ nodes ``b<i>_dq``)."""
    return [g.qdq(g.op("Relu", ["x"], f"relu{i}"), s, f"b{i}") for i, s in enumerate(scales)]


def test_concat_scale_mismatch():
    g = Graph()
    cat = g.op("Concat", branches(g, [0.1, 0.2]), "cat", axis=1)
    g.op("Relu", [g.qdq(cat, 0.1, "cat")], "out")
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["out"])), "warning", "scale-mismatch")
    assert finding.nodes == ("b0_dq", "b1_dq", "cat_q")
    assert finding.scales == (f32(0.1), f32(0.2), f32(0.1))
    assert "Concat 'cat'" in finding.message and "2 scales" in finding.message


def test_nested_concats_form_one_group():
    g = Graph()
    a, b, c = branches(g, [0.1, 0.1, 0.2])
    inner = g.op("Concat", [a, b], "inner", axis=1)
    outer = g.op("Concat", [inner, c], "outer", axis=1)
    g.op("Relu", [g.qdq(outer, 0.1, "cat")], "out")
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["out"])), "warning", "scale-mismatch")
    assert finding.nodes == ("b0_dq", "b1_dq", "b2_dq", "cat_q")
    assert "Concat 'inner', Concat 'outer'" in finding.message


def test_maxpool_scale_mismatch():
    g = Graph()
    (branch,) = branches(g, [0.1])
    pool = g.op("MaxPool", [branch], "pool", kernel_shape=[1, 1])
    g.op("Relu", [g.qdq(pool, 0.3, "pool")], "out")
    finding = only(check_tensorrt(g.model({"x": [1, 4, 2, 2]}, ["out"])), "warning", "scale-mismatch")
    assert finding.nodes == ("b0_dq", "pool_q") and "MaxPool 'pool'" in finding.message


def test_scales_within_relative_tolerance_are_one_scale():
    g = Graph()
    cat = g.op("Concat", branches(g, [0.1, 0.1 * (1 + 2e-7)]), "cat", axis=1)
    g.op("Relu", [g.qdq(cat, 0.1, "cat")], "out")
    assert check_tensorrt(g.model({"x": [1, 4]}, ["out"])) == []


@pytest.mark.parametrize("op_type,extra,attrs", [
    ("Pad", {"pads": np.zeros(4, np.int64), "value": np.float32(1.0)}, {}),
    ("Resize", {"roi": np.zeros(0, np.float32), "scales": np.ones(4, np.float32)}, {"mode": "linear"}),
    ("AveragePool", {}, {"kernel_shape": [1, 1]}),
])
def test_ops_that_change_values_join_no_group(op_type, extra, attrs):
    """A Pad with a non-zero value, a linear Resize or an AveragePool needs its own Q/DQ: no group, no finding."""
    g = Graph()
    (branch,) = branches(g, [0.1])
    out = g.op(op_type, [branch, *(g.init(k, v) for k, v in extra.items())], "op", **attrs)
    g.op("Relu", [g.qdq(out, 0.3, "op")], "out")
    assert check_tensorrt(g.model({"x": [1, 4, 2, 2]}, ["out"])) == []


@pytest.mark.parametrize("op_type,extra,attrs", [
    ("Pad", {"pads": np.zeros(4, np.int64)}, {}),
    ("Pad", {"pads": np.zeros(4, np.int64), "value": np.float32(0.0)}, {}),
    ("Resize", {"roi": np.zeros(0, np.float32), "scales": np.ones(4, np.float32)}, {"mode": "nearest"}),
    ("Flatten", {}, {}),
    ("Transpose", {}, {"perm": [0, 1, 3, 2]}),
])
def test_scale_preserving_ops_join_a_group(op_type, extra, attrs):
    g = Graph()
    (branch,) = branches(g, [0.1])
    out = g.op(op_type, [branch, *(g.init(k, v) for k, v in extra.items())], "op", **attrs)
    g.op("Relu", [g.qdq(out, 0.3, "op")], "out")
    finding = only(check_tensorrt(g.model({"x": [1, 4, 2, 2]}, ["out"])), "warning", "scale-mismatch")
    assert finding.nodes == ("b0_dq", "op_q") and f"{op_type} 'op'" in finding.message


def test_fanout_scale():
    g = Graph()
    relu = g.op("Relu", ["x"], "relu")
    outs = [g.qdq(relu, 0.1, "a"), g.qdq(relu, 0.2, "b"), g.qdq(relu, 0.1, "c")]
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, outs)), "warning", "fanout-scale")
    assert finding.nodes == ("a_q", "b_q", "c_q") and finding.scales == (f32(0.1), f32(0.2), f32(0.1))
    assert "tensor 'relu' is read by 3 QuantizeLinear" in finding.message


def test_fanout_inside_a_group_is_reported_once_by_the_group():
    g = Graph()
    cat = g.op("Concat", branches(g, [0.1, 0.1]), "cat", axis=1)
    outs = [g.qdq(cat, 0.1, "c1"), g.qdq(cat, 0.2, "c2")]
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, outs)), "warning", "scale-mismatch")
    assert finding.nodes == ("b0_dq", "b1_dq", "c1_q", "c2_q")


# ------------------------------------------------------------------------------------------------------------------
# rule 10: residual adds
# ------------------------------------------------------------------------------------------------------------------
def test_add_of_two_scales():
    g = Graph()
    g.op("Add", branches(g, [0.1, 0.2]), "add")
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["add"])), "warning", "add-scale-mismatch")
    assert finding.nodes == ("add", "b0_dq", "b1_dq") and finding.scales == (f32(0.1), f32(0.2))


def test_add_of_equal_scales_is_clean():
    g = Graph()
    g.op("Add", branches(g, [0.1, 0.1]), "add")
    assert check_tensorrt(g.model({"x": [1, 4]}, ["add"])) == []


def test_add_with_one_dq_and_a_non_conv_input():
    g = Graph()
    (branch,) = branches(g, [0.1])
    g.op("Add", [branch, g.op("Sigmoid", ["x"], "sig")], "add")
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["add"])), "info", "add-one-side")
    assert finding.nodes == ("add",) and "Sigmoid 'sig'" in finding.message


def test_add_with_one_dq_and_a_conv_through_batchnorm_is_the_recommended_form():
    g = Graph()
    conv = g.int8_conv("x", "conv")
    bn = g.op("BatchNormalization", [conv, *(g.init(k, np.ones(4, np.float32)) for k in "sbmv")], "bn")
    g.op("Add", [g.qdq("x", 0.05, "skip"), bn], "add")
    assert check_tensorrt(g.model({"x": [1, 4, 2, 2]}, ["add"])) == []


def test_add_in_float_in_a_quantized_model():
    g = Graph()
    conv = g.int8_conv("x", "conv")
    g.op("Add", [g.op("Relu", [conv], "relu"), conv], "add")
    finding = only(check_tensorrt(g.model({"x": [1, 4, 2, 2]}, ["add"])), "warning", "add-float")
    assert finding.nodes == ("add",) and "'relu' and 'conv'" in finding.message


def test_add_with_a_constant_is_not_residual():
    g = Graph()
    g.op("Add", [g.int8_conv("x", "conv"), g.init("bias", np.ones((1, 4, 1, 1), np.float32))], "add")
    assert check_tensorrt(g.model({"x": [1, 4, 2, 2]}, ["add"])) == []


def test_adds_of_what_constants_and_shapes_compute_are_not_residual():
    """A bias the forward edits (Swin V2 zeroes part of its qkv bias: ScatterND of constants) and a mask built
    from the input's shape (``x.new_zeros`` and the slices added to it) are folded by TensorRT: no add-float. The
    same graph with both inputs computed from the input's values keeps the warning."""
    g = Graph()
    conv = g.int8_conv("x", "conv")
    bias = g.op("ScatterND", [g.init("b", np.ones((1, 4, 1, 1), np.float32)),
                              g.init("idx", np.array([[0, 1, 0, 0]], np.int64)),
                              g.init("upd", np.zeros(1, np.float32))], "edit_bias")
    g.op("Add", [conv, bias], "bias_add")
    shape = g.op("Shape", [conv], "shape")
    zeros = g.op("ConstantOfShape", [shape], "zeros", value=numpy_helper.from_array(np.zeros(1, np.float32)))
    mask = g.op("Add", [zeros, g.op("Relu", [zeros], "mask_relu")], "mask_add")  # both inputs from shapes only
    g.op("Add", ["bias_add", mask], "masked")
    assert check_tensorrt(g.model({"x": [1, 4, 2, 2]}, ["masked"])) == []

    g = Graph()
    conv = g.int8_conv("x", "conv")
    g.op("Add", [conv, g.op("Relu", [conv], "relu")], "add")  # an activation on both sides
    only(check_tensorrt(g.model({"x": [1, 4, 2, 2]}, ["add"])), "warning", "add-float")


# ------------------------------------------------------------------------------------------------------------------
# coverage, order, findings
# ------------------------------------------------------------------------------------------------------------------
def test_model_without_qdq():
    g = Graph()
    g.op("Add", [g.op("Relu", ["x"], "relu"), "x"], "add")
    g.op("Conv", ["add", g.init("w", np.ones((4, 4, 1, 1), np.float32))], "conv")
    assert kinds(check_tensorrt(g.model({"x": [1, 4, 2, 2]}, ["conv"]))) == [("info", "no-qdq")]


def test_subgraphs_are_named():
    g = Graph()
    branch = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "b", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    g.op("If", ["cond"], "if", then_branch=branch, else_branch=branch)
    g.op("Relu", [g.qdq("x", 0.1, "x")], "relu")
    model = g.model({"x": [1, 4], "cond": []}, ["if", "relu"], dtypes={"cond": TensorProto.BOOL})
    assert only(check_tensorrt(model), "info", "subgraph").nodes == ("if",)


def test_unnamed_nodes_get_a_display_name():
    g = Graph()
    g.op("Relu", [g.q("x", 0.1, "q")], "relu")
    model = g.model({"x": [1, 4]}, ["relu"])
    model.graph.node[1].name = ""
    assert only(check_tensorrt(model), "error", "q-without-dq").nodes == ("q", "<Relu #1>")


def test_errors_then_warnings_then_info_in_rule_then_graph_order():
    g = Graph()
    relu = g.op("Relu", ["x"], "relu")
    outs = [g.qdq(relu, 0.1, "a"), g.qdq(relu, 0.2, "b")]              # fanout-scale warning
    g.op("Relu", [g.q("x", 0.1, "bad2")], "r2")                        # q-without-dq error
    g.op("Relu", [g.q("x", 0.1, "bad1")], "r1")                        # q-without-dq error, later in the graph
    g.q(relu, 0.1, "dead")                                             # unused-q info
    g.op("Relu", [g.qdq("x", 0.0, "zero")], "r3")                      # scale-value error (rule after q-without-dq)
    findings = check_tensorrt(g.model({"x": [1, 4]}, [*outs, "r1", "r2", "r3"]))
    assert kinds(findings) == [("error", "q-without-dq"), ("error", "q-without-dq"), ("error", "scale-value"),
                               ("warning", "fanout-scale"), ("info", "unused-q")]
    assert [f.nodes[0] for f in findings[:2]] == ["bad2", "bad1"]
    assert check_tensorrt(g.model({"x": [1, 4]}, [*outs, "r1", "r2", "r3"])) == findings


def test_every_rule_is_documented():
    doc = check_module.__doc__
    table = doc[doc.index("Rules"):doc.index("How the rules read the graph")]
    assert [rule for rule in RULES if f"``{rule}``" not in table] == []


def test_a_large_graph_is_checked():
    """A chain of 1,000 quantized convs with residual adds (about 5,000 nodes) is clean."""
    g = Graph()
    x = "x"
    for i in range(1000):
        x = g.op("Add", [g.int8_conv(x, f"conv{i}"), f"conv{i}_in_dq"], f"add{i}")
    assert check_tensorrt(g.model({"x": [1, 4, 2, 2]}, [x])) == []


def test_finding_str_and_validation():
    finding = Finding("error", "scale-value", "Q 'q' scale 's' is 0", ["q"], [np.float32(0.0)])
    assert str(finding) == "ERROR   scale-value: Q 'q' scale 's' is 0"
    assert finding.nodes == ("q",) and finding.scales == (0.0,) and type(finding.scales[0]) is float
    with pytest.raises(ValueError, match="severity"):
        Finding("severe", "opset", "x")


def test_format_findings_summary():
    findings = [Finding("error", "opset", "e"), Finding("warning", "fanout-scale", "w1"),
                Finding("warning", "fanout-scale", "w2"), Finding("info", "no-qdq", "i")]
    assert format_findings(findings).splitlines() == [
        "ERROR   opset: e", "WARNING fanout-scale: w1", "WARNING fanout-scale: w2", "INFO    no-qdq: i",
        "1 error, 2 warnings, 1 info"]
    assert "INFO" not in format_findings(findings, show_info=False)
    assert format_findings([]) == "0 errors, 0 warnings, 0 info"


# ------------------------------------------------------------------------------------------------------------------
# files and the command line
# ------------------------------------------------------------------------------------------------------------------
def error_model():
    g = Graph()
    g.op("Relu", [g.q("x", 0.1, "q")], "relu")
    return g.model({"x": [1, 4]}, ["relu"])


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        check_tensorrt(tmp_path / "nope.onnx")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        check_tensorrt(tmp_path)


def test_file_that_is_not_onnx_names_the_path(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\xff\xfe not a protobuf")
    with pytest.raises(ModelReadError, match="junk.onnx"):
        check_tensorrt(path)
    with pytest.raises(TypeError, match="path or an onnx.ModelProto"):
        check_tensorrt(42)


def test_cli_exit_codes(tmp_path, capsys):
    clean, bad = tmp_path / "clean.onnx", tmp_path / "bad.onnx"
    onnx.save(clean_model(), clean)
    onnx.save(error_model(), bad)
    assert main([str(clean)]) == 0
    assert capsys.readouterr().out.strip() == "0 errors, 0 warnings, 0 info"
    assert main([str(bad)]) == 1
    out = capsys.readouterr().out
    assert "q-without-dq" in out and out.strip().endswith("1 error, 0 warnings, 0 info")
    assert main([str(tmp_path / "missing.onnx")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and "missing.onnx" in captured.err


def test_cli_quiet_hides_info(tmp_path, capsys):
    path = tmp_path / "float.onnx"
    onnx.save(Graph().model({"x": [1]}, ["x"]), path)
    assert main([str(path), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == "0 errors, 0 warnings, 1 info (hidden)"
    assert main([str(path)]) == 0
    assert "no-qdq" in capsys.readouterr().out


def test_cli_usage_error_returns_2(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_python_dash_m_bad_path(tmp_path, monkeypatch, capsys):
    """``python -m qdq.onnx.check`` runs :func:`main` and exits with its code (run in-process: a fresh interpreter
    would spend seconds importing torch)."""
    missing = tmp_path / "missing.onnx"
    monkeypatch.setattr(sys, "argv", ["check", str(missing)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(check_module.__file__, run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: ONNX model {str(missing)!r} does not exist"]


def test_split_outputs_keep_the_scale_of_its_input():
    """Regression: a dynamo export writes chunk as Split; the scale groups (and quantize_groups) stopped there."""
    g = Graph()
    x = g.qdq("x", 0.05, "in")
    g.op("Split", [x], "split", outputs=["a", "b"], axis=1, num_outputs=2)
    g.qdq("a", 0.05, "qa")
    g.qdq("b", 0.07, "qb")
    finding = only(check_tensorrt(g.model({"x": [1, 4]}, ["qb_dq", "qa_dq"], opset=18)), "warning", "scale-mismatch")
    assert set(finding.nodes) == {"in_dq", "qa_q", "qb_q"}
    assert quantize_groups(g.model({"x": [1, 4]}, ["qb_dq", "qa_dq"], opset=18)) == [["in_q", "qa_q", "qb_q"]]


# ------------------------------------------------------------------------------------------------------------------
# FP8 and INT4 formats
# ------------------------------------------------------------------------------------------------------------------
def _fp8_zp():
    return helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])


@pytest.mark.parametrize("opset, expected", [(19, []), (17, [("error", "zero-point-dtype")] * 2)])
def test_fp8_zero_points_need_opset_19(opset, expected):
    g = Graph()
    w = g.init("w", np.ones((4, 3), np.float32))
    g.op("MatMul", [g.qdq("x", 0.1, "x", zp=_fp8_zp()), g.qdq(w, 0.01, "w", zp=_fp8_zp())], "mm")
    findings = check_tensorrt(g.model({"x": [2, 4]}, ["mm"], opset=opset))
    assert kinds([f for f in findings if f.severity == "error"]) == expected
    if expected:  # one for each QuantizeLinear (x_q, w_q)
        assert [f.nodes for f in findings if f.severity == "error"] == [("x_q",), ("w_q",)]
        assert "opset 19" in findings[0].message


def test_fp8_data_and_int8_weights_are_a_format_mix():
    g = Graph()
    w = g.init("w", np.ones((4, 3), np.float32))
    g.op("MatMul", [g.qdq("x", 0.1, "x", zp=_fp8_zp()), g.qdq(w, 0.01, "w")], "mm")
    finding = only(check_tensorrt(g.model({"x": [2, 4]}, ["mm"], opset=19)), "error", "format-mix")
    assert finding.nodes == ("mm",) and "float8e4m3fn" in finding.message and "int8" in finding.message


def test_int4_weights_on_a_convolution_are_an_error():
    g = Graph()
    w = g.init("w", helper.make_tensor("w", TensorProto.INT4, [4, 4, 1, 1], [1] * 16))
    zp = helper.make_tensor("zp", TensorProto.INT4, [4], [0] * 4)
    g.op("Conv", ["x", g.dq(w, np.full(4, 0.1), "w_dq", zp=zp, axis=0)], "conv")
    finding = only(check_tensorrt(g.model({"x": [1, 4, 2, 2]}, ["conv"], opset=21)), "error", "zero-point-dtype")
    assert finding.nodes == ("w_dq",) and "MatMul/Gemm only" in finding.message and "Conv 'conv'" in finding.message


def test_blocked_scale_of_the_wrong_shape_is_an_error():
    g = Graph()
    w = g.init("w", np.ones((8, 4), np.int8))
    g.op("MatMul", [g.qdq("x", 0.1, "x"), g.dq(w, np.full((4, 4), 0.1), "w_dq", axis=0, block_size=4)], "mm")
    finding = only(check_tensorrt(g.model({"x": [2, 8]}, ["mm"], opset=21)), "error", "blocked-quantization")
    assert "needs a scale of shape [2, 4], it is [4, 4]" in finding.message


def test_bias_through_identity_is_a_constant():
    """Regression: TorchScript writes a shared bias as Identity(initializer); its Add was taken for a float residual add."""
    g = Graph()
    bias = g.op("Identity", [g.init("b", np.ones((1, 4, 1, 1), np.float32))], "bias")
    g.op("Add", [g.int8_conv("x", "conv"), bias], "add")
    assert check_tensorrt(g.model({"x": [1, 4, 2, 2]}, ["add"])) == []
