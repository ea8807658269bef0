"""Ignore policies: which dotted module paths a conversion leaves in float.

A policy is a layer name, a regular expression, a compiled pattern, a callable on the dotted path, a mapping
``{pattern: bool}`` or a list of these (:func:`compile_ignore_policy` says how each matches).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, Sequence, Union

__all__ = ["IgnorePolicy", "compile_ignore_policy", "unmatched_ignore_patterns"]

IgnorePolicy = Union[None, str, re.Pattern, Callable[[str], bool], Sequence[Union[str, re.Pattern, Callable]]]


def compile_ignore_policy(policy: IgnorePolicy) -> Callable[[str], bool]:
    """A predicate on dotted module paths.

    A string matches a path that equals it, a path under it (``"head"`` matches ``"head.conv"``) or a path the
    string, read as a regular expression, matches in full (``"head.*"``, ``r"model\\.2[0-4]\\..*"``). Compiled
    patterns match in full; callables receive the path. A list matches when any item does. A mapping
    ``{pattern: bool}`` ignores the paths its ``True`` patterns match, except those a ``False`` pattern matches
    (``{"0": False}`` ignores nothing). Anything else (``ignore_policy=5``) is a ``TypeError``.

    >>> ignore = compile_ignore_policy(["head", r"backbone\\.layer[34]\\..*"])
    >>> [ignore(p) for p in ["head.fc", "backbone.layer3.0.conv1", "backbone.layer1.0.conv1", "header"]]
    [True, True, False, False]
    >>> ignore = compile_ignore_policy({"layer1": True, "layer1.0": False})
    >>> [ignore(p) for p in ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1"]]
    [False, True, False]
    """
    if policy is None:
        return lambda path: False
    return _compile_items(_policy_items(policy))


def _policy_items(policy: IgnorePolicy) -> list:
    """The items of a policy; a mapping ``{pattern: bool}`` gives ``("keep", pattern)`` items for False values."""
    if isinstance(policy, (str, re.Pattern)) or callable(policy):
        return [policy]
    if isinstance(policy, Mapping):
        items = []
        for key, value in policy.items():
            if not isinstance(value, bool):
                raise TypeError(f"ignore_policy[{key!r}] must be True (ignore) or False (quantize), got {value!r}")
            items.append(key if value else ("keep", key))
        return items
    if isinstance(policy, (bytes, bytearray)) or not isinstance(policy, Iterable):
        raise TypeError(
            "ignore_policy must be a layer name or regular expression, a compiled pattern, a callable on the dotted "
            f"path, a mapping {{pattern: bool}} or a list of these; got {policy!r} ({type(policy).__name__})"
        )
    return list(policy)


def _compile_items(items: list) -> Callable[[str], bool]:
    """A path is ignored when an item matches it and no ``("keep", pattern)`` item does."""
    keep = [_compile_items([item[1]]) for item in items if isinstance(item, tuple) and item[:1] == ("keep",)]
    items = [item for item in items if not (isinstance(item, tuple) and item[:1] == ("keep",))]
    tests = []
    for item in items:
        if isinstance(item, re.Pattern):
            tests.append(lambda p, rx=item: rx.fullmatch(p) is not None)
        elif isinstance(item, str):
            try:
                rx = re.compile(item)
            except re.error as err:
                raise ValueError(f"ignore_policy: {item!r} is not a valid regular expression ({err})") from None
            tests.append(lambda p, s=item, rx=rx: p == s or p.startswith(s + ".") or rx.fullmatch(p) is not None)
        elif callable(item):
            tests.append(lambda p, f=item: bool(f(p)))
        else:
            raise TypeError(f"ignore_policy items must be strings, compiled patterns or callables, got {item!r}")
    if keep:
        return lambda path: any(t(path) for t in tests) and not any(k(path) for k in keep)
    return lambda path: any(t(path) for t in tests)


def unmatched_ignore_patterns(policy: IgnorePolicy, paths: Iterable[str]) -> list[str]:
    """The string and pattern entries of ``policy`` that match none of ``paths`` (callables cannot be judged).

    >>> unmatched_ignore_patterns(["fc", "head.*", "nothing"], ["conv1", "fc", "head.0"])
    ['nothing']
    """
    if policy is None:
        return []
    paths = list(paths)
    unmatched = []
    for item in _policy_items(policy):
        pattern = item[1] if isinstance(item, tuple) else item
        if isinstance(pattern, (str, re.Pattern)):
            test = _compile_items([pattern])
            if not any(test(p) for p in paths):
                unmatched.append(pattern if isinstance(pattern, str) else pattern.pattern)
    return unmatched
