"""The emulated GPU's token ids: a deterministic hash of (request seed, position), and a launch's
rows gathered once for its pricing and every step's ids (executor/emulated.py).

`token_id` is the definition; `token_ids` and `LaunchRows.tokens` give the same ids for many rows
at once with numpy (uint64 arithmetic wraps as `token_id`'s `& _MASK` does)."""
from __future__ import annotations

import numpy as np

from sglang_duet.core.plan import NO_TOKEN

_MASK = (1 << 64) - 1


def token_id(seed: int, position: int, lo: int, hi: int, banned: frozenset[int] = frozenset()) -> int:
    """A deterministic id in [lo, hi) for (seed, position), never in `banned` (splitmix64)."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    x ^= x >> 31
    t = lo + x % (hi - lo)
    while t in banned:
        t = lo + (t - lo + 1) % (hi - lo)
    return t


_M2 = 0xBF58476D1CE4E5B9  # the position's multiplier
_C1, _C2, _C3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(_M2), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
VECTOR_ROWS = 16  # from this many rows a launch's ids are hashed with numpy (same ids, less host time)


def token_ids(seeds, positions, lo: int, hi: int, banned: frozenset[int] = frozenset()) -> list[int]:
    """[token_id(s, p, lo, hi, banned) for s, p in zip(seeds, positions)], as one numpy pass
    (uint64 arithmetic wraps as the `& _MASK` does); the rare banned id is moved on in Python."""
    return _hashed_ids(_seed_array(seeds) * _C1 + np.array(positions, dtype=np.uint64) * _C2 + _C3,
                       lo, hi, banned).tolist()


def _seed_array(seeds) -> np.ndarray:
    try:
        return np.array(seeds, dtype=np.uint64)
    except OverflowError:  # a negative or > 64-bit seed: reduce as token_id does
        return np.array([x & _MASK for x in seeds], dtype=np.uint64)


def _hashed_ids(x: np.ndarray, lo: int, hi: int, banned: frozenset[int]) -> np.ndarray:
    """token_id's mixing and range reduction of x = seed * C1 + position * C2 + C3 (uint64, each
    row's own), as an int64 array; a banned id is moved on as token_id does."""
    x = (x ^ (x >> _S30)) * _C2
    x = (x ^ (x >> _S27)) * _C3
    x ^= x >> _S31
    t = (x % np.uint64(hi - lo)).astype(np.int64) + lo
    if banned:
        # rows that drew a banned id: one numpy comparison per banned id in range (a few eos ids;
        # np.isin costs more, but less than dozens of comparisons), then the rare row moved on in Python
        inside = [b for b in banned if lo <= b < hi]  # ids outside the range are never drawn
        hits = None
        if len(inside) > 16:
            hits = np.isin(t, inside)
        else:
            for b in inside:
                m = t == b
                hits = m if hits is None else hits | m
        if hits is not None and hits.any():
            for i in np.flatnonzero(hits).tolist():
                tok = int(t[i])
                while tok in banned:
                    tok = lo + (tok - lo + 1) % (hi - lo)
                t[i] = tok
    return t


class LaunchRows:
    """A launch's per-row data, gathered once when it starts, column by column: its pricing reads the
    new tokens, start positions and steps, and every step's report hashes its ids from the rows'
    seeds and first sampled positions (numpy from VECTOR_ROWS rows: one addition per step).

    Step j's token of row i is token_id(seed_i, pos_i + j) while j < samples_i (the row's steps, 0
    when it samples nothing), else NO_TOKEN."""

    __slots__ = ("q", "c", "s", "samples", "masked", "lp_rows", "seeds", "pos", "x0")

    def __init__(self, work: list):
        # One list comprehension per column: on CPython 3.11 the cheapest way to read one attribute
        # of each of a thousand msgspec Structs (~25 ns a row; map(attrgetter) ~35)
        n = len(work)
        self.q = q = [len(w.input_ids) for w in work]  # new tokens
        self.c = c = [w.start_pos for w in work]  # start positions
        self.s = s = [w.steps for w in work]  # decode steps
        self.samples = [w.steps if w.sample else 0 for w in work]  # steps that sample a token
        # a row stops sampling before the launch's last step, or samples nothing (a prefill chunk)
        self.masked = min(self.samples) < max(s) if n else False
        try:  # the rows that want logprobs (params are SamplingParams; anything else: getattr)
            lp = [w.params.logprobs for w in work]
        except AttributeError:
            lp = [w.params is not None and getattr(w.params, "logprobs", False) for w in work]
        self.lp_rows = [i for i, f in enumerate(lp) if f] if any(lp) else []
        seeds = [w.sampling_seed for w in work]
        if n >= VECTOR_ROWS:
            self.seeds = self.pos = None
            pos = np.array(c, dtype=np.uint64) + np.array(q, dtype=np.uint64)  # the first sampled position
            self.x0 = _seed_array(seeds) * _C1 + pos * _C2 + _C3
            if self.masked:
                self.samples = np.array(self.samples)
        else:
            self.seeds, self.pos, self.x0 = seeds, [ci + qi for ci, qi in zip(c, q)], None

    def advanced(self) -> "LaunchRows":
        """The rows of the next launch of the same requests, each advanced by its steps (persistent
        decode rows: every row a decode, whose next input starts `steps` positions later): what
        LaunchRows(work) would read from the advanced work, without reading it."""
        nxt = LaunchRows.__new__(LaunchRows)
        nxt.q, nxt.s, nxt.samples, nxt.masked, nxt.lp_rows = self.q, self.s, self.samples, self.masked, self.lp_rows
        s = self.s
        k = s[0] if s and min(s) == max(s) else None  # one step count for every row (a core decode)
        nxt.c = [ci + k for ci in self.c] if k is not None else [ci + si for ci, si in zip(self.c, s)]
        if self.x0 is not None:
            nxt.seeds = nxt.pos = None
            # position + k moves the hash input by k * C2 (wrapping, as token_id's & _MASK)
            nxt.x0 = self.x0 + (np.uint64(k * _M2 & _MASK) if k is not None else np.array(s, dtype=np.uint64) * _C2)
        else:
            nxt.seeds, nxt.x0 = self.seeds, None
            nxt.pos = [p + si for p, si in zip(self.pos, s)]
        return nxt

    def tokens(self, j: int, lo: int, hi: int, banned: frozenset[int]) -> list[int]:
        """Each row's token of step j (NO_TOKEN where the row samples nothing in it)."""
        if self.x0 is not None:
            # (pos + j) * C2 wraps to pos * C2 + j * C2: step j's hash input is one addition away
            t = _hashed_ids(self.x0 + np.uint64(j * _M2 & _MASK) if j else self.x0, lo, hi, banned)
            if self.masked:
                t[self.samples <= j] = NO_TOKEN
            return t.tolist()
        rows = [token_id(s, p + j, lo, hi, banned) for s, p in zip(self.seeds, self.pos)]
        if self.masked:
            rows = [tok if k > j else NO_TOKEN for tok, k in zip(rows, self.samples)]
        return rows
