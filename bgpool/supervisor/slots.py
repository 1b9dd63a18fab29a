"""Which table slot each worker instance is published in.

Slots are handed out lowest first, so the part of the table its readers scan
follows what runs, not what was ever declared; each time a slot changes hands
its generation number grows, so a reader that cached where a name lives sees
that it moved. The table is made with room to spare, so that `reload()` can
add declarations to a running pool.
"""

from __future__ import annotations

import heapq

from .. import platform
from ..shm import varstore
from ..shm.table import Slot, TableWriter


def capacity(needed: int) -> int:
    """The slots to make a table with, for declarations that need `needed`."""
    return max(4 * needed, 256)


class Slots:
    """The table's slots: free ones, and each one's generation."""

    def __init__(self, table: TableWriter, count: int) -> None:
        self.table = table
        self.count = count
        self.gens = [0] * count
        self.free = list(range(count))  # a heap; already in order
        self.high = 0  # one past the highest slot ever handed out

    def take(self, count: int) -> tuple[list[int], int]:
        """`count` free slots, lowest first, and the generation they now share
        (the caller checked that they are free: `available`)."""
        slots = [heapq.heappop(self.free) for _ in range(count)]
        gen = max(self.gens[s] for s in slots) + 1
        for slot in slots:
            self.gens[slot] = gen
        if slots[-1] >= self.high:
            self.high = slots[-1] + 1
            self.table.use(self.high)
        return slots, gen

    def bump(self, slots: list[int]) -> int:
        """Give `slots` (one worker's) a new generation: what readers cached of
        them no longer holds. Returns it."""
        gen = max(self.gens[s] for s in slots) + 1
        for slot in slots:
            self.gens[slot] = gen
        return gen

    def give_back(self, slots: list[int]) -> None:
        """Free `slots` (the first one's vars go too)."""
        self.bump(slots)
        for slot in slots:
            self.table.write(slot, Slot(gen=self.gens[slot]))
            heapq.heappush(self.free, slot)
        platform.unlink_shm(varstore.segment_name(self.table.name, slots[0]))

    @property
    def available(self) -> int:
        """How many slots are free."""
        return len(self.free)
