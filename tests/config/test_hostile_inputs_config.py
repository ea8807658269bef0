"""Hostile quantization config files: duplicate keys are errors naming the key."""

import pytest

from qdq.config import QuantConfigError, load_quant_config


@pytest.mark.parametrize("text,key", [
    ('{"version": 1, "layers": {"fc": {}, "fc": {"enabled": false}}}', "fc"),
    ('{"version": 1, "global": {"batch_num": 2, "batch_num": 8}}', "batch_num"),
    ('{"version": 1, "version": 1}', "version"),
    ('{"version": 1, "layers": {"fc": {"weight": {"num_bits": 8, "num_bits": 4}}}}', "num_bits"),
    ('{"version": 2, "global": {"num_batches": 2, "num_batches": 8}}', "num_batches"),
    ('{"version": 2, "layers": {"fc": {"input": {"calib_method": "mse", "calib_method": "max"}}}}', "calib_method"),
    ('{"version": 2, "layers": {"fc": {"input": {"calib_args": {"num_bins": 64, "num_bins": 4096}}}}}', "num_bins"),
])
def test_duplicate_keys_are_errors_naming_the_key(text, key, tmp_path):
    """Regression: a config naming a key twice was accepted, the last one winning (a layer's settings lost)."""
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(QuantConfigError, match=rf"key '{key}' appears more than once"):
        load_quant_config(path)


def test_a_config_without_duplicates_still_loads(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"version": 2, "layers": {"fc": {"enabled": false}, "conv": {}}}')
    assert set(load_quant_config(path)["layers"]) == {"fc", "conv"}


def test_create_quant_config_skip_layers_of_a_wrong_type():
    import torch

    from qdq.config import create_quant_config

    with pytest.raises(TypeError, match=r"skip_layers must be a list of layer names or patterns, got 5"):
        create_quant_config(None, torch.nn.Sequential(torch.nn.Linear(2, 2)), skip_layers=5)
