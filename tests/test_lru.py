"""The shared LRU map against a plain list model, on random operation sequences, and under threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.lru import LRUCache


def _model_put(model: list[tuple[int, int]], budget: int, key: int, cost: int) -> None:
    """The reference: a list, least recently used first, of (key, cost)."""
    model[:] = [(k, c) for k, c in model if k != key]
    if cost > budget:
        return
    model.append((key, cost))
    while sum(c for _, c in model) > budget:
        model.pop(0)


operations = st.lists(st.tuples(st.sampled_from(["get", "put"]), st.integers(0, 7), st.integers(0, 12)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(budget=st.integers(0, 20), ops=operations)
def test_lru_matches_a_list_model(budget: int, ops: list[tuple[str, int, int]]) -> None:
    cache: LRUCache[int, int] = LRUCache(budget, cost=lambda v: v)  # a value is its own cost
    model: list[tuple[int, int]] = []
    for op, key, cost in ops:
        if op == "put":
            cache.put(key, cost)
            _model_put(model, budget, key, cost)
        else:
            expected = next((c for k, c in model if k == key), None)
            assert cache.get(key) == expected
            if expected is not None:
                model.remove((key, expected))
                model.append((key, expected))
        assert cache.values() == [c for _, c in model]
        assert cache.total_cost == sum(c for _, c in model) <= budget
        assert len(cache) == len(model)


@pytest.mark.parametrize("budget", [-1, 1.5, True, None])
def test_lru_refuses_a_bad_budget(budget) -> None:
    with pytest.raises(ValueError, match="cache budget must be an int >= 0"):
        LRUCache(budget)


def test_lru_stays_consistent_under_threads() -> None:
    cache: LRUCache[int, int] = LRUCache(50, cost=lambda v: v)

    def work(seed: int) -> None:
        for i in range(2000):
            key = (seed * 7919 + i * 31) % 40
            if cache.get(key) is None:
                cache.put(key, key % 9 + 1)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    values = cache.values()
    assert cache.total_cost == sum(values) <= 50
    assert len(cache) == len(values)
