"""The QAT and calibration hot path: no host synchronisation per call, torch.compile, autocast, channels_last.

pytorch_quantization checked amax (and unsigned data) with ``bool(tensor.any())`` in every fake-quant call: a
device-to-host synchronisation that stalls a GPU and breaks ``torch.compile(fullgraph=True)``. These tests prove the
hot path free of them on the CPU (full-graph compilation, and a step with every host read of a tensor made an
error) and on a GPU when there is one (``torch.cuda.set_sync_debug_mode("error")``).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import qdq
from qdq import calib
from qdq.nn import TensorQuantizer
from qdq.math import fake_quant
from qdq.tensor_quant import QuantDescriptor, fake_quantize_by_amax


def _model(learn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    qdq.replace_to_quantization_module(model)
    qdq.calibrate_model(model, [torch.randn(4, 3, 8, 8)], method="max", progress=False)
    if learn:  # learned amax, per tensor and per channel
        model[0].input_quantizer.init_learn_amax()
        model[3].weight_quantizer.init_learn_amax()
    return model


def _step(model: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    out = model(x)
    loss = out.square().mean()
    loss.backward()
    opt.step()
    return out.detach()


@contextlib.contextmanager
def _host_reads_forbidden():
    """Every way of reading a tensor's value on the host raises inside the block."""

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    names = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    # the eager-CPU shortcut reads a CPU amax (no synchronisation there); it never reads a device tensor
    # (test_clip_interval_reads_only_cpu_tensors), so the path a GPU runs is the one checked here
    clip_interval = fake_quant._clip_interval
    try:
        fake_quant._clip_interval = lambda amax: None
        for n in names:
            setattr(torch.Tensor, n, refuse)
        yield
    finally:
        fake_quant._clip_interval = clip_interval
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


def test_clip_interval_reads_only_cpu_tensors():
    assert fake_quant._clip_interval(torch.ones((), device="meta")) is None
    assert fake_quant._clip_interval(torch.ones(3)) is None  # per channel: the mask path
    assert fake_quant._clip_interval(torch.tensor(float("inf"))) is None
    lo, hi = fake_quant._clip_interval(torch.tensor(0.5))
    assert lo == -hi and hi == float(torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)))


@pytest.mark.parametrize("amax", [0.5, 3.0, 1e-20])
def test_eager_cpu_gradient_without_mask_is_the_straight_through_one(amax):
    """The CPU path with one amax keeps no mask (the backward compares x with the float32 neighbours of +-amax):
    the same gradient as ``|x| <= amax``, values exactly at and next to +-amax included."""
    a = torch.tensor(amax)
    edge = torch.stack([a, torch.nextafter(a, torch.tensor(0.0)), torch.nextafter(a, torch.tensor(9.0))])
    x = torch.cat([torch.randn(500) * amax, edge, -edge, torch.zeros(1)]).requires_grad_()
    g = torch.randn_like(x)
    fake_quantize_by_amax(x, a).backward(g)
    assert fake_quant._clip_interval(a) is not None
    assert torch.equal(x.grad, torch.where(x.detach().abs() <= a, g, 0.0))


def test_qat_step_and_eval_read_no_tensor_on_the_host():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 3, 8, 8)
    _step(model, x, opt)  # first-call work (optimizer state) outside the check
    with _host_reads_forbidden():
        _step(model, x, opt)
        model.eval()
        with torch.no_grad():
            model(x)
            model(x)  # the cached weights


def _compiled_matches_eager(backend: str, exact_grads: bool) -> None:
    eager, comp = _model(), _model()
    compiled = torch.compile(comp, backend=backend, fullgraph=True)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.01)
    opt_c = torch.optim.SGD(comp.parameters(), lr=0.01)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(2):  # training, learned amax included; the second step runs on the updated parameters
        out_e, out_c = _step(eager, x, opt_e), _step(compiled, x, opt_c)
        assert torch.equal(out_e, out_c)
        for (name, p_e), (_, p_c) in zip(eager.named_parameters(), comp.named_parameters()):
            if exact_grads:
                assert torch.equal(p_e, p_c), name
            else:  # inductor may sum the conv/batch-norm gradients in another order
                torch.testing.assert_close(p_e, p_c, rtol=1e-5, atol=1e-6, msg=name)
    assert comp[0].input_quantizer._amax.grad is not None and comp[3].weight_quantizer._amax.grad is not None
    eager.eval(), comp.eval()
    with torch.no_grad():
        assert torch.equal(eager(x), compiled(x))


def test_compile_fullgraph_training_and_eval_aot_eager():
    """Dynamo traces the whole quantized model in one graph (a host sync would break it): same numbers as eager."""
    torch._dynamo.reset()
    _compiled_matches_eager("aot_eager", exact_grads=True)


@pytest.mark.slow
def test_compile_fullgraph_training_and_eval_inductor():
    torch._dynamo.reset()
    _compiled_matches_eager("inductor", exact_grads=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_qat_step_and_calibration_do_not_synchronise():
    model = _model().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 3, 8, 8, device="cuda")
    _step(model, x, opt)
    hist = calib.HistogramCalibrator(8, None, False)
    per_channel = calib.HistogramCalibrator(8, 0, False)
    maxcal = calib.MaxCalibrator(8, None, False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(model, x, opt)
        model.eval()
        with torch.no_grad():
            model(x)
        hist.collect(x)
        per_channel.collect(x)
        maxcal.collect(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert hist.compute_amax("max").item() == x.abs().max().item()


# ------------------------------------------------------------------------------------------------------------------
# autocast and channels_last
# ------------------------------------------------------------------------------------------------------------------
def _grid(out: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """The integers behind fake-quantized values (exact: the scale is applied in float32)."""
    return torch.round(out.float() / (amax / 127)).to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("axis", [None, 1])
def test_low_precision_input_has_the_float32_integers(dtype, axis):
    """fp16/bf16 inputs are quantized in float32: the same integers as float32 on the same values, and the output is
    the float32 result rounded once to the input's dtype."""
    x32 = (torch.randn(4, 6, 5, 5) * 3).to(dtype).float()  # values the low-precision type holds exactly
    amax = torch.tensor(2.5) if axis is None else torch.rand(1, 6, 1, 1) + 1.0
    ref = fake_quantize_by_amax(x32, amax)
    x = x32.to(dtype).requires_grad_()
    out = fake_quantize_by_amax(x, amax)
    assert out.dtype == dtype
    assert torch.equal(out, ref.to(dtype))
    assert torch.equal(_grid(out, amax), _grid(ref, amax))
    out.sum().backward()
    assert x.grad.dtype == dtype and torch.equal(x.grad.float(), (x32.abs() <= amax).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qat_under_autocast(dtype):
    """Under torch.autocast a QAT step runs (learned amax gets float32 gradients); each quantizer gives what it gives
    outside autocast on the same input, and its integers are those of float32."""
    model = _model()
    seen: dict[str, list[torch.Tensor]] = {}
    for name, q in qdq.quantizers(model):
        q.register_forward_hook(lambda m, inp, out, name=name: seen.setdefault(name, []).append((inp[0], out)))
    x = torch.randn(4, 3, 8, 8)
    try:
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
    except RuntimeError as err:  # an op without a CPU kernel for this dtype in this torch build
        pytest.skip(f"autocast {dtype} on CPU: {err}")
    out.float().square().mean().backward()
    amax_grad = model[0].input_quantizer._amax.grad
    assert amax_grad.dtype == torch.float32 and torch.isfinite(amax_grad)
    low_precision_inputs = 0
    for name, [(inp, got)] in seen.items():
        q = dict(qdq.quantizers(model))[name]
        with torch.no_grad():
            ref = q(inp.detach().float())
        assert got.dtype == inp.dtype
        assert torch.equal(got.detach(), ref.to(got.dtype)), name
        if inp.dtype == dtype:
            low_precision_inputs += 1
            amax = q.amax.detach()
            assert torch.equal(_grid(got.detach(), amax), _grid(ref, amax)), name
    assert low_precision_inputs >= 2  # the layers after the first conv see autocast's dtype


def test_channels_last_keeps_format_and_values():
    model = _model(learn=False)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    q = TensorQuantizer(QuantDescriptor(amax=2.0))
    out = q(xc)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, q(x))
    w = cl[3].weight
    assert w.is_contiguous(memory_format=torch.channels_last)
    wq = cl[3].weight_quantizer(w)
    assert wq.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(wq, model[3].weight_quantizer(model[3].weight))
    torch.testing.assert_close(cl(xc), model(x), rtol=1e-5, atol=1e-5)  # conv kernels differ by format
    cl(xc).sum().backward()
    assert xc.grad.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------------------------------
# layouts: permuted inputs, attention under compile
# ------------------------------------------------------------------------------------------------------------------
def test_permuted_input_gets_a_contiguous_output_and_standard_layouts_keep_theirs():
    x = torch.randn(5, 4, 6)
    amax = torch.tensor(1.5)
    with torch.no_grad():
        permuted = fake_quantize_by_amax(x.transpose(0, 1), amax)
        assert permuted.is_contiguous()
        assert torch.equal(permuted, fake_quantize_by_amax(x.transpose(0, 1).contiguous(), amax))
        image = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
        assert fake_quantize_by_amax(image, amax).is_contiguous(memory_format=torch.channels_last)


def _encoder():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    qdq.replace_to_quantization_module(layer)
    x = torch.randn(3, 20, 32)
    qdq.calibrate_model(layer, [x], progress=False)
    return layer.eval(), x


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_batch_first_attention_matches_eager(backend):
    """The eager-only layout and in-place steps of the attention modules stay out of compiled graphs."""
    torch._dynamo.reset()
    layer, x = _encoder()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    with torch.no_grad():
        expected = layer(x)
        assert expected.is_contiguous()
        torch.testing.assert_close(compiled(x), expected, rtol=0 if backend == "aot_eager" else 1e-5,
                                   atol=0 if backend == "aot_eager" else 1e-5)


def _saved_for_backward_dtypes(model: nn.Module, x: torch.Tensor) -> list[torch.dtype]:
    """The dtypes of the tensors the compiled forward keeps for the backward, with inductor's partitioner."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    forwards = []

    def fw_compiler(gm, example_inputs):
        forwards.append(gm)
        return gm

    backend = aot_autograd(fw_compiler=fw_compiler, bw_compiler=lambda gm, _: gm,
                           partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(x).sum().backward()
    (gm,) = forwards
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    outs = output.args[0]
    return [n.meta["val"].dtype for n in outs[1:] if hasattr(n, "meta") and isinstance(n.meta.get("val"), torch.Tensor)]


@pytest.mark.parametrize("fp8", [False, True])
def test_compiled_cpu_forward_saves_no_bool_mask(fp8):
    """Inductor's vectorized stores into bool buffers are ~20x slower than float ones on the CPU, so the compiled
    forward must not keep a bool straight-through mask (qdq.math._masks): the backward computes it from the input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.Conv2d(8, 4, 3))
    qdq.replace_to_quantization_module(model)
    if fp8:
        for q in (m for m in model.modules() if isinstance(m, TensorQuantizer)):
            q.num_bits = (4, 3)
    qdq.calibrate_model(model, [torch.randn(2, 3, 12, 12)], method="max", progress=False)
    dtypes = _saved_for_backward_dtypes(model.train(), torch.randn(2, 3, 12, 12))
    assert dtypes and torch.bool not in dtypes, dtypes
