"""What exploration costs, live: per policy the slots served, those given to fresh ads and the
exploratory ones (``Slate.explored``: the posterior mean's top-k would not have shown them).

The service adds every slate it serves; ``/metrics`` exports the totals and each served
slot's flags go into the event log, where the experiment report reads them per arm.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np

from adrec_assets.online.fresh_ads import FreshAdEffects
from adrec_assets.online.policy import Slate


class SlotTotals(NamedTuple):
    """What one policy served since start: slates, slots, slots given to fresh ads, and
    exploratory slots (``Slate.explored``: the posterior mean's top-k would not have shown them)."""

    slates: int
    slots: int
    fresh: int
    explored: int

    @property
    def fresh_share(self) -> float:
        return self.fresh / self.slots if self.slots else 0.0

    @property
    def explored_share(self) -> float:
        return self.explored / self.slots if self.slots else 0.0


class SlotFlags(NamedTuple):
    """Per served slot (the slots >= 0, in position order): on a fresh ad, exploratory."""

    fresh: list[bool]
    explored: list[bool]


class SlotCounts:
    """Running :class:`SlotTotals` per policy (thread-safe): the service adds every slate it
    serves; ``/metrics`` exports them. Per slate a binary search of the served slots among
    the fresh ads and a few additions under a lock."""

    def __init__(self) -> None:
        self._totals: dict[str, SlotTotals] = {}
        self._lock = threading.Lock()

    def add(self, slate: Slate, fresh: FreshAdEffects | None = None) -> SlotFlags:
        """Count ``slate``; ``fresh``: the served state's fresh ads (None: none are fresh).
        Returns each served slot's flags (what the service logs with its impressions)."""
        shown = slate.slots >= 0
        served = int(np.count_nonzero(shown))
        on_fresh = np.zeros(served, dtype=bool)
        if fresh is not None and served:
            on_fresh = fresh.view().rows_of(slate.slots[shown]) >= 0
        explored = slate.explored[shown] if slate.explored is not None else np.zeros(served, dtype=bool)
        with self._lock:
            before = self._totals.get(slate.policy, SlotTotals(0, 0, 0, 0))
            self._totals[slate.policy] = SlotTotals(
                before.slates + 1,
                before.slots + served,
                before.fresh + int(np.count_nonzero(on_fresh)),
                before.explored + int(np.count_nonzero(explored)),
            )
        return SlotFlags(on_fresh.tolist(), np.asarray(explored, dtype=bool).tolist())

    def totals(self) -> dict[str, SlotTotals]:
        with self._lock:
            return dict(self._totals)
