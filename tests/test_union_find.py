"""qdq._union_find: the one union-find of the checker's scale groups and of autotune's shared layers."""

import random

from qdq._union_find import UnionFind


def _reference_sets(names, pairs):
    """Connected components by repeated relabelling (a slow, obvious reference)."""
    label = {n: n for n in names}
    changed = True
    while changed:
        changed = False
        for a, b in pairs:
            low = min(label[a], label[b])
            for n in (a, b):
                if label[n] != low:
                    label[n], changed = low, True
        for n in names:  # propagate through the labels themselves
            if label[label[n]] != label[n]:
                label[n], changed = label[label[n]], True
    return label


def test_sets_match_the_reference_whatever_the_order_of_the_unions():
    rng = random.Random(0)
    names = [f"t{i:02d}" for i in range(40)]
    pairs = [(rng.choice(names), rng.choice(names)) for _ in range(30)]
    reference = _reference_sets(names, pairs)
    for seed in range(5):
        shuffled = pairs[:]
        random.Random(seed).shuffle(shuffled)
        groups = UnionFind()
        for a, b in shuffled:
            groups.union(a, b) if seed % 2 else groups.union(b, a)
        assert {n: groups.find(n) for n in names} == reference  # the root is the smallest name, in any order


def test_find_adds_and_pairs_list_every_name_once():
    groups = UnionFind()
    assert "x" not in groups and groups.find("x") == "x" and "x" in groups
    groups.union("b", "a")
    assert groups.pairs() == [("x", "x"), ("b", "a"), ("a", "a")]
