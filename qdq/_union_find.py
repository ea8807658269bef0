"""Disjoint sets of names (union-find), for the scale groups of the ONNX checker and the shared layers of autotune.

The root of a set is its smallest name, so the sets, their roots and :meth:`UnionFind.pairs` do not depend on the
order of the unions (ranks that union the same pairs in another order agree). Pure Python, no torch.

>>> groups = UnionFind()
>>> groups.union("conv2", "conv1"); groups.union("conv3", "conv2")
>>> groups.find("conv3"), groups.find("fc")
('conv1', 'fc')
>>> groups.pairs()
[('conv2', 'conv1'), ('conv1', 'conv1'), ('conv3', 'conv1'), ('fc', 'fc')]
"""

from __future__ import annotations

__all__ = ["UnionFind"]


class UnionFind:
    """Disjoint sets of strings; a name never added is its own set (and :meth:`find` adds it)."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        """The root (smallest name) of ``item``'s set."""
        parent = self._parent
        parent.setdefault(item, item)
        while parent[item] != item:
            parent[item] = parent[parent[item]]  # path halving
            item = parent[item]
        return item

    def union(self, a: str, b: str) -> None:
        """Joins the sets of ``a`` and ``b``."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[max(ra, rb)] = min(ra, rb)

    def pairs(self) -> list[tuple[str, str]]:
        """``(name, root)`` for every name seen, in the order they were first seen."""
        return [(item, self.find(item)) for item in list(self._parent)]

    def __contains__(self, item: str) -> bool:
        return item in self._parent
