"""Op-site quantizers: inline adds, concats and poolings that go through quantizers without a forward rewrite."""

import copy
import functools
import pickle

import torch
from torch import nn

from qdq.nn import TensorQuantizer
from qdq.transform.op_sites import record_sites, remove_site_quantizers, set_site_quantizer, site_quantizers


class Sites(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def _join(self, a, b):
        return torch.cat([a, b], 1)

    def forward(self, x):
        y = self.conv(x) + x
        y += x
        z = self._join(y, x)
        return nn.functional.adaptive_avg_pool2d(z, 1), self._join(z, z)


def _q(amax=1.0):
    q = TensorQuantizer()
    q.amax = amax
    return q


def test_sites_are_told_apart_by_call_instruction_and_helpers_by_caller():
    sites = record_sites(Sites(), torch.randn(1, 2, 3, 3))
    assert [(s.kind, s.index, s.num_inputs) for s in sites] == [
        ("add", 0, 2), ("add", 1, 2), ("cat", 0, 2), ("pool", 0, 1), ("cat", 1, 2)]
    assert {s.owner for s in sites} == {""}


def test_quantizer_on_an_in_place_add_and_a_concat_input():
    model = Sites()
    x = torch.randn(1, 2, 3, 3)
    sites = record_sites(model, x)
    reference = model(x)
    set_site_quantizer(model, sites[1].key, "add", 0, "_add1_input0_quantizer", _q(0.5))
    set_site_quantizer(model, sites[2].key, "cat", 1, "_cat0_input1_quantizer", _q(0.25))
    y = model.conv(x) + x
    y = torch.clamp(torch.round(y * (127 / 0.5)), -128, 127) * (0.5 / 127) + x
    xq = torch.clamp(torch.round(x * (127 / 0.25)), -128, 127) * (0.25 / 127)
    z = torch.cat([y, xq], 1)
    out = model(x)
    torch.testing.assert_close(out[0], nn.functional.adaptive_avg_pool2d(z, 1))
    torch.testing.assert_close(out[1], torch.cat([z, z], 1))
    assert sorted(a for *_, a in site_quantizers(model)) == ["_add1_input0_quantizer", "_cat0_input1_quantizer"]
    assert remove_site_quantizers(model) == 2
    torch.testing.assert_close(model(x)[1], reference[1])
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_site_quantizers_survive_deepcopy_and_pickle_and_calling_a_submodule():
    outer = nn.Sequential(nn.Identity(), Sites())
    x = torch.randn(1, 2, 3, 3)
    sites = record_sites(outer, x)
    assert {s.owner for s in sites} == {"1"}
    set_site_quantizer(outer[1], sites[0].key, "add", 1, "_add0_input1_quantizer", _q(0.1))
    expected = outer(x)[0]
    assert not torch.equal(expected, Sites.forward(outer[1], x)[0])  # the clamp at 0.1 changes the output
    torch.testing.assert_close(outer[1](x)[0], expected)             # the submodule on its own: same sites
    torch.testing.assert_close(copy.deepcopy(outer)(x)[0], expected)
    torch.testing.assert_close(pickle.loads(pickle.dumps(outer))(x)[0], expected)
    assert "1._add0_input1_quantizer._amax" in outer.state_dict()


class Loop(nn.Module):
    """A residual add inside a loop of the forward: one call instruction, one site per iteration."""

    def __init__(self, blocks=3):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(2, 2, 1) for _ in range(blocks))
        self.repeat = blocks

    def forward(self, x):
        for conv in self.convs[:self.repeat]:
            x = x + conv(x)
        return x


def test_each_iteration_of_a_loop_is_a_site(caplog):
    model = Loop()
    x = torch.randn(1, 2, 3, 3)
    sites = record_sites(model, x)
    assert [(s.kind, s.index) for s in sites] == [("add", 0), ("add", 1), ("add", 2)]
    assert len({s.key[0] for s in sites}) == 1 and [s.key[1] for s in sites] == [0, 1, 2]
    set_site_quantizer(model, sites[1].key, "add", 0, "_add1_input0_quantizer", _q(0.1))
    with torch.no_grad():
        expected = x + model.convs[0](x)
        clipped = torch.clamp(torch.round(expected * (127 / 0.1)), -128, 127) * (0.1 / 127)
        expected = clipped + model.convs[1](expected)  # the second iteration only
        expected = expected + model.convs[2](expected)
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model(x), expected)  # the next call counts afresh
        model.repeat = 2
        assert record_sites(model, x)[-1].key == sites[1].key
    # an iteration beyond those recorded runs unquantized, with a warning
    model = Loop()
    model.repeat = 2
    for site in record_sites(model, x):
        set_site_quantizer(model, site.key, "add", 0, f"_add{site.index}_input0_quantizer", _q(0.1))
    model.repeat = 3
    with caplog.at_level("WARNING", logger="qdq.transform.op_sites"), torch.no_grad():
        model(x)
    assert any("ran 3 or more times" in r.getMessage() for r in caplog.records)


def _wrapped(forward):
    """A forward wrapper as transformers' layers have (``forward_with_checkpointing``): ``self`` in its frame."""
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        return forward(self, *args, **kwargs)
    return wrapper


class WrappedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.conv(x) + x


def test_a_wrapper_running_nested_in_itself_keeps_the_site(monkeypatch):
    """torch.export ran transformers' forward wrapper nested in itself, which gave the site another key there, and
    the dynamo export of HF ViT lost its residual-add quantizers."""
    monkeypatch.setattr(WrappedBlock, "forward", _wrapped(WrappedBlock.forward))
    model = WrappedBlock()
    x = torch.randn(1, 2, 3, 3)
    sites = record_sites(model, x)
    set_site_quantizer(model, sites[0].key, "add", 1, "_add0_input1_quantizer", _q(0.1))
    expected = model(x)
    assert not torch.equal(expected, model.conv(x) + x)
    monkeypatch.setattr(WrappedBlock, "forward", _wrapped(WrappedBlock.forward))  # the same wrapper, twice
    torch.testing.assert_close(model(x), expected)


def test_an_exception_in_forward_leaves_no_mode_active():
    model = Sites()
    sites = record_sites(model, torch.randn(1, 2, 3, 3))
    set_site_quantizer(model, sites[0].key, "add", 1, "_add0_input1_quantizer", _q())
    try:
        model(torch.randn(1, 3, 3, 3))  # wrong channel count
    except RuntimeError:
        pass
    from torch.overrides import _get_current_function_mode_stack

    assert not _get_current_function_mode_stack()


def test_site_keys_do_not_depend_on_other_torch_function_modes():
    """Regression: under the dynamo exporter's own modes a functional re-entered itself once per mode and the site
    keys found during the export matched no eager call (its quantizer then never saw data)."""
    model, x = Sites(), torch.randn(1, 2, 3, 3)
    eager = [s.key for s in record_sites(model, x)]

    def run():
        with torch.device("cpu"), torch.device("cpu"), torch.no_grad():  # two torch-function modes of torch's own
            model(x)

    assert [s.key for s in record_sites(model, run=run)] == eager


class _Calls(dict):
    """The site mode's table of op kinds, counting the ops the mode sees (each looks itself up once)."""

    def __init__(self, monkeypatch):
        from qdq.transform import op_sites

        super().__init__(op_sites._KINDS)
        self.count = 0
        monkeypatch.setattr(op_sites, "_KINDS", self)

    def get(self, key, default=None):
        self.count += 1
        return super().get(key, default)


class Block(nn.Module):
    """A residual block whose add is a site; its children are a library MLP and a module of its own."""

    def __init__(self, helper=None):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
        self.helper = helper if helper is not None else nn.Identity()

    def forward(self, x):
        return self.helper(self.mlp(x)) + x


class CallsBack(nn.Module):
    """A child that calls a helper of another module: its ops are that module's, so the mode must stay."""

    def __init__(self, owner_forward):
        super().__init__()
        self.owner_forward = owner_forward

    def forward(self, x):
        return self.owner_forward(x)


def test_library_children_of_a_site_owner_run_outside_the_mode(monkeypatch):
    """The ops of a child that runs torch.nn/qdq code only are not intercepted one by one; the site still is."""
    model, x = Block(), torch.randn(3, 4)
    sites = record_sites(model, x)
    assert [s.kind for s in sites] == ["add"]
    set_site_quantizer(model, sites[0].key, "add", 1, "_add0_input1_quantizer", _q(0.5))
    calls = _Calls(monkeypatch)
    out = model(x)
    xq = torch.clamp(torch.round(x * (127 / 0.5)), -128, 127) * (0.5 / 127)
    assert torch.equal(out, model.mlp(x) + xq)
    assert calls.count <= 3  # the add (and nn.Identity's call), not the MLP's linear and gelu ops
    assert record_sites(model, x)[0].key == sites[0].key  # recording still walks every child
    from torch.overrides import _get_current_function_mode_stack

    assert not _get_current_function_mode_stack()
    remove_site_quantizers(model)
    assert not model.mlp._forward_pre_hooks and not model.mlp._forward_hooks


def test_children_that_are_not_library_code_stay_in_the_mode_and_nested_owners_work():
    inner = Block()
    outer = Block(helper=nn.Sequential(inner))
    x = torch.randn(3, 4)
    sites = record_sites(outer, x)
    assert {s.owner for s in sites} == {"", "helper.0"}
    for s in sites:
        owner = outer if s.owner == "" else inner
        set_site_quantizer(owner, s.key, "add", 1, "_add0_input1_quantizer", _q(0.5))
    seen = []
    inner._add0_input1_quantizer.register_forward_hook(lambda m, a, o: seen.append(1))
    outer(x)
    assert seen == [1]  # the nested owner's site ran under its own mode, though its parent's mode stepped aside
    patched = Block()
    psites = record_sites(patched, x)
    set_site_quantizer(patched, psites[0].key, "add", 1, "_add0_input1_quantizer", _q(0.5))
    patched.mlp.forward = lambda t: nn.Sequential.forward(patched.mlp, t)  # patched on the instance: not library
    from qdq.transform import op_sites

    assert not op_sites._library_subtree(patched.mlp) and op_sites._library_subtree(Block().mlp)
    assert not op_sites._library_subtree(CallsBack(patched.forward))
    xq = torch.clamp(torch.round(x * (127 / 0.5)), -128, 127) * (0.5 / 127)
    assert torch.equal(patched(x), patched.mlp(x) + xq)


def test_an_exception_in_a_paused_child_leaves_no_mode_active():
    model = Block()
    sites = record_sites(model, torch.randn(3, 4))
    set_site_quantizer(model, sites[0].key, "add", 1, "_add0_input1_quantizer", _q())
    try:
        model(torch.randn(3, 5))  # wrong width: the MLP raises while the mode is paused
    except RuntimeError:
        pass
    from torch.overrides import _get_current_function_mode_stack
    from qdq.transform import op_sites

    assert not _get_current_function_mode_stack() and op_sites._depth() == 0
    assert not op_sites._local("paused") and getattr(op_sites._state, "mode", None) is None
    model(torch.randn(3, 4))
