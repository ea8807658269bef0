"""Op-site quantizers: inline adds, concats and poolings that go through quantizers without a forward rewrite."""

import copy
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
