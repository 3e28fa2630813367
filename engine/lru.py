"""A thread-safe least-recently-used map bounded by the total cost of its values.

The pixel front end's prompt-embedding cache (cost: bytes) and the reward server's conditioning cache (cost: one
per prompt row) are both this map.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _one(_: object) -> int:
    return 1


class LRUCache(Generic[K, V]):
    """``get`` marks a key most recently used; ``put`` evicts least recently used values until the total cost is
    within ``budget``. A value costing more than the whole budget is not stored (``budget=0`` disables the cache)."""

    def __init__(self, budget: int, cost: Callable[[V], int] = _one) -> None:
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise ValueError(f"cache budget must be an int >= 0 (0 disables the cache), got {budget!r}")
        self.budget = budget
        self._cost = cost
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: K, value: V) -> None:
        cost = self._cost(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._total -= old[1]
            if cost > self.budget:
                return
            self._items[key] = (value, cost)
            self._total += cost
            while self._total > self.budget:
                _, (_, evicted) = self._items.popitem(last=False)
                self._total -= evicted

    @property
    def total_cost(self) -> int:
        """The summed cost of the stored values (always <= ``budget``)."""
        return self._total

    def values(self) -> list[V]:
        """A snapshot, least recently used first."""
        with self._lock:
            return [value for value, _ in self._items.values()]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._total = 0

    def __len__(self) -> int:
        return len(self._items)
