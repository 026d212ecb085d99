"""Turning a policy's plan into launches for SchedulerCore: each lane batch's KV allocated, decodes
retracted when KV runs out, prefills that do not fit dropped, and the rows (`ReqWork`) an executor
runs, built per request or, with persistent rows, advanced in place from the lane's previous launch.

A mixin of `SchedulerCore` (scheduler_core.py declares the state it reads and writes: requests and
queues, the launches in flight and queued, the lanes' last rows, the req-to-token rows).
"""
from __future__ import annotations

import operator

from sglang_duet.core.plan import FUTURE_TOKEN, LaneBatch, LaneKind, Launch, PrefillChunk, ReqWork, StepPlan
from sglang_duet.core.request import Request, ReqState


class LaunchResolverMixin:
    def _materialize(self, plan: StepPlan, idle: frozenset[LaneKind], decodable: list[Request]) -> list[Launch]:
        batches = plan.lane_batches()
        for lane, _ in batches:
            if lane not in idle:
                raise RuntimeError(f"policy {self.policy!r} planned work for the busy lane {lane.value}")
        if plan.aggregated is not None and (plan.prefill_lane or plan.decode_lane):
            raise RuntimeError("a plan is either aggregated or split, not both")
        launches = []
        touched: list[Request] = []  # requests an earlier lane of this plan took
        for lane, batch in batches:
            if touched and decodable:
                took = {id(r) for r in touched}
                if any(id(r) in took for r in decodable):
                    decodable = ()  # the view no longer vouches for them: _resolve checks each one
            reqs: list[Request] = []
            lid = self._next_launch
            work = self._resolve(batch, reqs, decodable, lid, lane)  # marks each of reqs as in launch lid
            if not work:
                continue
            launch = Launch(lid, lane, batch, work)
            launch.sms = {LaneKind.PREFILL: plan.prefill_sms, LaneKind.DECODE: plan.decode_sms}.get(lane)
            launch.predicted_ms = plan.predicted_ms
            launch.reqs = reqs
            touched += reqs
            self._next_launch += 1
            self.inflight[lid] = launch
            if lane in self._busy:  # overlap: queued behind the running launch (and those queued already)
                self._queued.setdefault(lane, []).append(lid)
            else:
                self._busy[lane] = lid
            self.stats.launches[lane.value] += 1
            launches.append(launch)
        return launches

    def _resolve(self, batch: LaneBatch, reqs: list[Request], decodable: list[Request], lid: int,
                 lane: LaneKind | None = None) -> list[ReqWork]:
        """Allocate KV for a lane batch; retract decodes when KV runs out; drop prefills that don't fit.
        Advances each request's planned state (num_computed, pending, inflight) as launch `lid` will.
        Appends to `reqs` the request of each ReqWork returned, in the same order (nothing is touched
        when no work is returned). `decodable`: the view's decoding requests the policy planned from
        (a plan that decodes all of them, in order, needs no per-request check)."""
        steps = max(1, batch.steps)
        head = self._overlap_head()
        head_id = head.launch_id if head is not None else None
        names = batch.decode
        if names and len(names) == len(decodable) and [r.rid for r in decodable] == names:
            decodes = list(decodable)  # view() checked each of them as the loop below does
        else:
            decodes = []
            requests = self.requests
            running = ReqState.RUNNING
            for rid in names:
                r = requests.get(rid)
                if (r is None or r.aborted or r.state is not running
                        or (r.inflight is not None and r.inflight != head_id)
                        or not (r.output_ids or r.pending)
                        or len(r.prompt_ids) + len(r.output_ids) + r.pending - r.num_computed != 1):  # is_decoding
                    raise RuntimeError(f"policy planned a decode for {rid!r}, which is not ready to decode")
                decodes.append(r)
        # Decodes first: they already hold KV and their users are waiting for the next token.
        need = len(decodes) * steps
        while need > self.kv_free and decodes:
            victims = [r for r in decodes if r.inflight is None]  # a lane still writes to the others' KV
            if not victims:
                decodes = []  # all in flight: plan them again when the running launch has ended
                break
            victim = self._pick_victim(victims)
            decodes.remove(victim)
            self._retract(victim)
            need = len(decodes) * steps
        lane_rows = self._lane_rows.pop(lane, None) if self.config.persistent_rows else None
        slots = self._alloc(len(decodes) * steps) if decodes else []  # one allocation for the batch
        if lane_rows is not None and not batch.prefill and lane_rows[2] == steps and len(lane_rows[0]) == len(decodes) \
                and all(map(operator.is_, lane_rows[0], decodes)):
            work = lane_rows[1]
            self._advance_rows(decodes, work, slots, steps, lid)
            reqs.extend(decodes)
            self._lane_rows[lane] = (lane_rows[0], work, steps)
            return work
        work: list[ReqWork] = []
        append = work.append
        for i, r in enumerate(decodes):
            kv = r.kv_slots
            if steps == 1:
                kv.append(slots[i])
            else:
                kv.extend(slots[i * steps:(i + 1) * steps])
            pending = r.pending
            out = r.output_ids
            computed = r.num_computed
            # _work, inlined (positional, in ReqWork's field order): this runs for every request of every step.
            # With tokens in flight the input is the last one the launch before samples for it.
            append(ReqWork(r.rid, [FUTURE_TOKEN] if pending else [out[-1]], computed, kv, True, steps,
                           r.seed, r.params, out, r.prompt_ids, r.eos_ids, r.inflight if pending else None,
                           len(out) + pending, r.table_row, r.grammar))
            r.num_computed = computed + steps  # the KV of the input and of steps - 1 fed-back tokens
            r.pending = pending + steps
            r.inflight = lid
            r.inflight_count += 1
        reqs.extend(decodes)
        if lane is not None and self.config.persistent_rows and decodes and not batch.prefill:
            self._lane_rows[lane] = (list(decodes), work, steps)
        for chunk in batch.prefill:
            w = self._resolve_prefill(chunk, head_id)
            if w is not None:
                r = self.requests[w.rid]
                r.inflight = lid
                r.inflight_count += 1
                work.append(w)
                reqs.append(r)
        return work

    @staticmethod
    def _advance_rows(decodes: list[Request], work: list[ReqWork], slots: list[int], steps: int, lid: int) -> None:
        """Persistent rows: the lane's previous decode launch held exactly `decodes`, in order; advance
        each of its rows in place to this launch (the fields _resolve's ReqWork would differ in) and
        the requests as _resolve does. A row whose input was in flight already holds [FUTURE_TOKEN]
        (a list of its own that nothing writes to): only its source launch changes."""
        for i, (r, w) in enumerate(zip(decodes, work)):
            kv = r.kv_slots
            if steps == 1:
                kv.append(slots[i])
            else:
                kv.extend(slots[i * steps:(i + 1) * steps])
            pending = r.pending
            computed = r.num_computed
            if pending:
                if w.input_from is None:
                    w.input_ids = [FUTURE_TOKEN]
                w.input_from = r.inflight
                w.output_pos = w.output_pos + steps  # the tokens in flight moved on by the last launch's
            else:
                out = r.output_ids
                w.input_ids = [out[-1]]
                w.input_from = None
                w.output_pos = len(out)
            w.start_pos = computed
            r.num_computed = computed + steps
            r.pending = pending + steps
            r.inflight = lid
            r.inflight_count += 1

    def _resolve_prefill(self, chunk: PrefillChunk, head_id: int | None = None) -> ReqWork | None:
        r = self.requests.get(chunk.rid)
        if (r is None or r.aborted or r.finished or r.pending
                or (r.inflight is not None and r.inflight != head_id)):
            raise RuntimeError(f"policy planned a prefill for {chunk.rid!r}, which cannot prefill now")
        if chunk.start != r.num_computed or not 0 < chunk.length <= r.remaining_prefill:
            raise RuntimeError(f"bad prefill chunk {chunk} for a request with {r.num_computed}/{r.seq_len} computed")
        admitting = r.state == ReqState.WAITING
        if admitting and len(self.running) >= self.config.max_running_requests:
            return None
        if admitting and self.prefix_cache is not None:
            chunk = self._use_cached_prefix(r, chunk)
        slots = self._alloc(chunk.length)
        if slots is None:
            if admitting and self.prefix_cache is not None:
                self._free_kv(r)  # gives the matched prefix back (unlocks it)
                r.num_computed = 0
            return None  # the policy over-asked; the request waits for KV
        if admitting:
            self.waiting.remove(r)
            r.state = ReqState.RUNNING
            r.table_row = self._free_rows.pop()
            self.running[r.rid] = r
            if r.first_scheduled_time is None:
                r.first_scheduled_time = self.clock()
        r.kv_slots.extend(slots)
        end = chunk.start + chunk.length
        sample = end == r.seq_len
        w = self._work(r, r.seq_ids(chunk.start, end), chunk.start, sample, 1)
        r.num_computed = end
        if sample:
            r.pending += 1
        return w

    def _work(self, r: Request, ids: list[int], start: int, sample: bool, steps: int) -> ReqWork:
        # positional, in ReqWork's field order: this runs for every request of every step
        return ReqWork(r.rid, ids, start, r.kv_slots, sample, steps, r.seed, r.params, r.output_ids, r.prompt_ids,
                       r.eos_ids, None, len(r.output_ids) + r.pending, r.table_row, r.grammar)
