"""JSON reading that refuses duplicate keys: ``json.loads`` keeps the last of two equal keys without a word, so a
calibration table or config file naming a quantizer twice would silently lose one entry."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["DuplicateKeyError", "loads_unique"]


class DuplicateKeyError(ValueError):
    """A JSON object gives the same key twice; ``key`` is the key, ``keys`` the keys of that object."""

    def __init__(self, key: str, keys: list[str]):
        self.key, self.keys = key, keys
        context = ", ".join(repr(k) for k in keys[:6]) + (", ..." if len(keys) > 6 else "")
        super().__init__(f"key {key!r} appears more than once in the same object (keys {context})")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key, [k for k, _ in pairs])
        out[key] = value
    return out


def loads_unique(text: str) -> Any:
    """``json.loads`` that raises :class:`DuplicateKeyError` on a key given twice in one object.

    >>> loads_unique('{"a": 1, "b": {"c": 2}}')
    {'a': 1, 'b': {'c': 2}}
    >>> loads_unique('{"q": {"amax": 1}, "q": {"amax": 2}}')
    Traceback (most recent call last):
    ...
    qdq._json_keys.DuplicateKeyError: key 'q' appears more than once in the same object (keys 'q', 'q')
    """
    return json.loads(text, object_pairs_hook=_unique)
