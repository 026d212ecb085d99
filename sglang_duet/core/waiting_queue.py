"""The waiting queue (requests that hold no KV, FCFS with retracted requests first) and, beside it,
the numbers a policy's walk over the queue reads, kept as columns.

Why columns: a deadline walk over ~260 waiting requests (`policies/base.deadline_order`, run every plan)
spends its time reading request objects, ~0.12 ms per plan at batch 256 in Python. What it reads of a
waiting request is fixed while it waits (arrival, prompt + output length, whether it has output), except
its cached prefix, which the core matches for the queue's head each plan. So the core writes those
numbers once, when a request joins the queue, and a compiled walk reads arrays instead of objects.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sglang_duet.core.request import Request


@dataclass(frozen=True)
class WaitingColumns:
    """The queue's numbers in the order of `SchedulerView.waiting` (copies: later changes to the queue do
    not reach a view)."""

    arrival: np.ndarray  # float64: arrival_time
    seq_len: np.ndarray  # int64: prompt + output tokens
    out_len: np.ndarray  # int64: output tokens (> 0: retracted, its first token is out)
    computed: np.ndarray  # int64: num_computed this plan (the cached prefix the core matched; else 0)


class WaitingQueue:
    """A list of waiting requests with its columns in step. Every change goes through the methods
    below (the deque operations the core used); `check()` says whether columns and requests agree."""

    def __init__(self, capacity: int = 64) -> None:
        self._reqs: list[Request] = []
        self._arrival = np.empty(capacity)
        self._seq = np.empty(capacity, dtype=np.int64)
        self._out = np.empty(capacity, dtype=np.int64)
        self._computed = np.zeros(capacity, dtype=np.int64)

    # ---- the sequence -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._reqs)

    def __bool__(self) -> bool:
        return bool(self._reqs)

    def __iter__(self):
        return iter(self._reqs)

    def __contains__(self, r: Request) -> bool:
        return any(x is r for x in self._reqs)

    def __getitem__(self, i: int) -> Request:
        return self._reqs[i]

    def snapshot(self) -> list[Request]:
        return list(self._reqs)

    # ---- changes ------------------------------------------------------------------------------------
    def append(self, r: Request) -> None:
        n = len(self._reqs)
        self._grow(n + 1)
        self._reqs.append(r)
        self._write(n, r)

    def appendleft(self, r: Request) -> None:
        n = len(self._reqs)
        self._grow(n + 1)
        for col in self._columns():
            col[1:n + 1] = col[:n]
        self._reqs.insert(0, r)
        self._write(0, r)

    def remove(self, r: Request) -> None:
        """Take r out (by identity, as admission and abort do). ValueError if it is not here."""
        i = next((i for i, x in enumerate(self._reqs) if x is r), None)
        if i is None:
            raise ValueError(f"request {r.rid} is not waiting")
        n = len(self._reqs)
        del self._reqs[i]
        for col in self._columns():
            col[i:n - 1] = col[i + 1:n]

    def head(self, k: int) -> list[Request]:
        """The first k requests (a copy), for `replace_head`."""
        return self._reqs[:k]

    def replace_head(self, head: list[Request]) -> None:
        """Put `head` (the same requests as `head(len(head))`, possibly reordered, their num_computed set
        for this plan) back at the front, columns rewritten from the requests."""
        for i, r in enumerate(head):
            self._reqs[i] = r
            self._write(i, r)

    def clear_computed(self) -> None:
        """After a plan: waiting requests hold nothing again (the core zeroes their num_computed)."""
        self._computed[:len(self._reqs)] = 0

    # ---- what a view carries -----------------------------------------------------------------------
    def columns(self) -> WaitingColumns:
        n = len(self._reqs)
        return WaitingColumns(self._arrival[:n].copy(), self._seq[:n].copy(), self._out[:n].copy(),
                              self._computed[:n].copy())

    def check(self) -> bool:
        """Whether every column equals what its request says now, and no waiting request has tokens in
        flight (the walk over the columns takes `pending` as 0). Tests; O(n)."""
        n = len(self._reqs)
        if any(r.pending for r in self._reqs):
            return False
        want = [(r.arrival_time, r.prompt_len + len(r.output_ids), len(r.output_ids), r.num_computed)
                for r in self._reqs]
        got = list(zip(self._arrival[:n].tolist(), self._seq[:n].tolist(), self._out[:n].tolist(),
                       self._computed[:n].tolist()))
        return got == want

    # ---- internals ----------------------------------------------------------------------------------
    def _columns(self) -> tuple[np.ndarray, ...]:
        return self._arrival, self._seq, self._out, self._computed

    def _write(self, i: int, r: Request) -> None:
        out = len(r.output_ids)
        self._arrival[i] = r.arrival_time
        self._seq[i] = r.prompt_len + out
        self._out[i] = out
        self._computed[i] = r.num_computed

    def _grow(self, need: int) -> None:
        cap = self._arrival.shape[0]
        if need <= cap:
            return
        cap = max(need, 2 * cap)
        self._arrival, self._seq, self._out, self._computed = (
            np.concatenate([c, np.zeros(cap - c.shape[0], dtype=c.dtype)]) for c in self._columns())
