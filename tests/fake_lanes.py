"""A two-lane executor for core tests: no model, a virtual clock, and a KV pool of token ids.

Each launch writes its input tokens into the slots the core allocated and derives the next token
from the tokens it reads back through the request's slot list, so any slot bookkeeping error in
the core shows up as a different output than `reference_tokens`.
"""
from __future__ import annotations

import heapq

from sglang_duet.core.plan import FUTURE_TOKEN, LaneBatch, LaneKind, Launch, LaunchResult, StepPlan
from sglang_duet.policies.base import Policy, select_prefills

VOCAB = 97


def next_token(seq: list[int]) -> int:
    h = 7
    for t in seq:
        h = (h * 31 + t) % 1_000_003
    return 3 + h % (VOCAB - 3)  # never 0..2, so tests can pick eos ids freely


def reference_tokens(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq))
    return seq[len(prompt):]


class FakeLanes:
    """Runs launches on a virtual clock: a launch takes `prefill_ms` per prefill token plus `decode_ms` per step."""

    def __init__(self, core, pool_size: int, prefill_ms: float = 1.0, decode_ms: float = 10.0, forced: dict | None = None,
                 partials: bool = False):
        self.core = core
        # partials: a k-step launch reports each step's tokens when that step ends (final=False parts),
        # then an empty final part at its end, as a GPU executor that delivers per step does.
        self.partials = partials
        self.kv = [None] * pool_size
        self.prefill_ms = prefill_ms
        self.decode_ms = decode_ms
        self.now = 0.0
        self.pending: list[tuple[float, int, LaunchResult]] = []
        self.forced = forced or {}  # rid -> {position: token}: force e.g. an eos at an output index
        self.max_concurrent = 0
        self.launches: list[Launch] = []
        # Overlap scheduling: a launch submitted while its lane runs another starts when that one
        # ends, and a FUTURE_TOKEN input is the last token the launch it names sampled for the row.
        self.lane_free_at: dict[LaneKind, float] = {}
        self.sampled: dict[tuple[int, str], int] = {}
        self.queued_submits = 0
        self._work: dict[int, list] = {}  # launch id -> its work, for the table-row check

    def clock(self) -> float:
        return self.now

    def submit(self, launch: Launch) -> None:
        self.launches.append(launch)
        # The req-to-token table row: one per request holding KV, never two requests on one row.
        owners = {w.table_row: w.rid for _, _, r in self.pending for w in self._work_of(r)}
        for w in launch.work:
            assert w.table_row is not None, f"{w.rid}: no req-to-token table row"
            assert owners.setdefault(w.table_row, w.rid) == w.rid, f"row {w.table_row} shared by two requests"
        self._work[launch.launch_id] = launch.work
        start = max(self.now, self.lane_free_at.get(launch.lane, 0.0))
        self.queued_submits += start > self.now
        res = LaunchResult(launch.launch_id, started_at=start)
        dur = 0.0
        for w in launch.work:
            slots = w.kv_slots
            for i, t in enumerate(w.input_ids):
                if t == FUTURE_TOKEN:
                    t = self.sampled[(w.input_from, w.rid)]
                self.kv[slots[w.start_pos + i]] = t
            if not w.sample:
                dur += len(w.input_ids) * self.prefill_ms
                continue
            if len(w.input_ids) > 1 or launch.lane != LaneKind.DECODE:
                dur += len(w.input_ids) * self.prefill_ms
            pos = w.start_pos + len(w.input_ids)  # tokens now in the cache
            out = []
            for step in range(w.steps):
                seq = [self.kv[s] for s in slots[:pos]]
                assert None not in seq, f"{w.rid}: read an unwritten slot"
                n_out = pos - len(w.prompt_ids)
                tok = self.forced.get(w.rid, {}).get(n_out, next_token(seq))
                out.append(tok)
                if step + 1 < w.steps:
                    self.kv[slots[pos]] = tok
                    pos += 1
            res.tokens[w.rid] = out
            self.sampled[(launch.launch_id, w.rid)] = out[-1]
        steps = launch.batch.steps if launch.batch.decode else 0
        res.finished_at = start + (dur + steps * self.decode_ms) / 1e3
        self.lane_free_at[launch.lane] = res.finished_at
        if self.partials and steps > 1:
            for j in range(steps):  # step j's tokens, visible when step j ends
                t = start + (dur + (j + 1) * self.decode_ms) / 1e3
                part = LaunchResult(launch.launch_id, started_at=start, finished_at=t, final=False)
                part.tokens = {rid: toks[j:j + 1] for rid, toks in res.tokens.items() if len(toks) > j}
                heapq.heappush(self.pending, (t, (launch.launch_id, j), part))
            res = LaunchResult(launch.launch_id, started_at=start, finished_at=res.finished_at)
        heapq.heappush(self.pending, (res.finished_at, (launch.launch_id, steps), res))
        self.max_concurrent = max(self.max_concurrent, len({lid for _, (lid, _), r in self.pending}))

    def _work_of(self, res: LaunchResult) -> list:
        return self._work.get(res.launch_id, [])

    def run(self, max_iters: int = 100_000) -> list:
        """Drive the core until every request has finished; return all updates."""
        updates = []
        for _ in range(max_iters):
            updates.extend(self.core.take_updates())
            while True:  # with overlap, a second call plans the step queued behind the running one
                launches = self.core.schedule()
                for launch in launches:
                    self.submit(launch)
                if not launches:
                    break
            if not self.pending:
                if not self.core.has_unfinished():
                    return updates
                raise AssertionError("core has work but scheduled nothing")
            t, _, res = heapq.heappop(self.pending)
            self.now = t
            updates.extend(self.core.apply_result(res))
        raise AssertionError("did not finish")



class SplitAlways(Policy):
    """A test policy: prefill chunks on the prefill lane and k-step decodes on the decode lane, always."""

    name = "test-split-always"

    def __init__(self, prefill_budget: int = 64, steps: int = 3, prefill_sms: int = 100, decode_sms: int = 32):
        super().__init__()
        self.prefill_budget, self.steps = prefill_budget, steps
        self.prefill_sms, self.decode_sms = prefill_sms, decode_sms

    def plan(self, view):
        plan = StepPlan(prefill_sms=self.prefill_sms, decode_sms=self.decode_sms)
        if LaneKind.PREFILL in view.idle_lanes:
            chunks = select_prefills(view, self.prefill_budget)
            if chunks:
                plan.prefill_lane = LaneBatch(prefill=chunks)
        if LaneKind.DECODE in view.idle_lanes and view.decoding:
            plan.decode_lane = LaneBatch(decode=[r.rid for r in view.decoding], steps=self.steps)
        return plan
