"""Start-up phases: what a start spent its time on, in the order it happened.

The launcher and the model loader each keep one (`Phases.mark(name)` closes the phase that ran
since the previous mark) and log `summary()` when they are done, so a slow start says where its
seconds went (benchmark/results/startup-cpu2.md) instead of only that it was slow.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Phases:
    clock: object = time.perf_counter
    items: list[tuple[str, float]] = field(default_factory=list)  # (name, seconds), in order

    def __post_init__(self) -> None:
        self._last = self.clock()

    def mark(self, name: str) -> float:
        """End the phase `name` (it ran since the previous mark, or since creation); returns its seconds."""
        now = self.clock()
        took = now - self._last
        self._last = now
        self.items.append((name, took))
        return took

    @property
    def total(self) -> float:
        return sum(s for _, s in self.items)

    def names(self) -> list[str]:
        return [n for n, _ in self.items]

    def summary(self) -> str:
        return ", ".join(f"{n} {s:.2f} s" for n, s in self.items) + f" (total {self.total:.2f} s)"
