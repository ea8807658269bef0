"""Hostile quantization config files: duplicate keys are errors naming the key."""

import pytest

from qdq.config import QuantConfigError, load_quant_config


@pytest.mark.parametrize("text,key", [
    ('{"version": 1, "layers": {"fc": {}, "fc": {"enabled": false}}}', "fc"),
    ('{"version": 1, "global": {"batch_num": 2, "batch_num": 8}}', "batch_num"),
    ('{"version": 1, "version": 1}', "version"),
    ('{"version": 1, "layers": {"fc": {"weight": {"num_bits": 8, "num_bits": 4}}}}', "num_bits"),
])
def test_duplicate_keys_are_errors_naming_the_key(text, key, tmp_path):
    """Regression: a config naming a key twice was accepted, the last one winning (a layer's settings lost)."""
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(QuantConfigError, match=rf"key '{key}' appears more than once"):
        load_quant_config(path)


def test_a_config_without_duplicates_still_loads(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"version": 1, "layers": {"fc": {"enabled": false}, "conv": {}}}')
    assert set(load_quant_config(path)["layers"]) == {"fc", "conv"}
