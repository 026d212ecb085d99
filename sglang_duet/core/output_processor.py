"""Applying what executors report to the requests (SchedulerCore's result side).

A mixin of `SchedulerCore` (scheduler_core.py declares the state it reads and writes), as SGLang's
scheduler keeps its result processing in `SchedulerOutputProcessorMixin`: one launch's result, or
one part of it, becomes each request's new tokens, its finish checks (eos, length, stop strings)
and a `RequestUpdate` per request. Runs for every request of every step, so the common path is
inlined on purpose.
"""
from __future__ import annotations

import msgspec

from sglang_duet.core.plan import NO_TOKEN, LaunchResult
from sglang_duet.core.request import Request, ReqState

_NO_LOGPROBS: tuple = ()  # the new_logprobs of a running request's usual update (shared: read only)


class RequestUpdate(msgspec.Struct, gc=False):
    """What changed for one request after a launch: new tokens, and the outcome if it ended.
    A msgspec Struct (built in C, untracked by the GC): one is made per request per step."""

    rid: str
    new_token_ids: list[int]
    new_logprobs: list[dict] = []  # read only: the usual update of a running request shares one empty tuple
    finished: bool = False
    finish_reason: dict | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None


class SchedulerOutputProcessorMixin:
    # rid -> the output length from which a running request's usual one-token update is built again
    # (None: every token gets one). Set by a consumer that batches a request's tokens anyway (the
    # server's --stream-interval, scheduler_proc): below the mark the update would only be held back
    # there, and the consumer reads the tokens from the request's output_ids when it sends. Finishes,
    # several tokens at once and logprobs always get their update.
    stream_hold: dict[str, int] | None = None
    # Apply a one-step decode's rows with `_apply_decode_rows` (tests turn it off to compare with the
    # general loop, which gives the same outcome)
    decode_rows_fast: bool = True

    def apply_result(self, result: LaunchResult) -> list[RequestUpdate]:
        """Apply one part of a launch's result (see LaunchResult): the tokens it makes visible, and,
        for the final part, the end of the launch (lanes freed, KV of requests that ended meanwhile
        released, aborts completed). Runs for every request of every step: kept lean on purpose."""
        lid = result.launch_id
        launch = self.inflight.get(lid)
        if launch is None:
            raise KeyError(f"result for unknown launch {lid}")
        final = result.final
        if final:
            del self.inflight[lid]
            self._lane_done(lid)
            if self.prefix_cache is not None and launch.batch.prefill:  # (a decode ends no prefill)
                self._cache_prefills(launch)
            if hasattr(self.policy, "on_result"):
                self.policy.on_result(launch, result)
            updates = self.take_updates()
            delivered = self._delivered.pop(lid, None) or {}
        else:
            updates = []
            delivered = self._delivered.setdefault(lid, {})
        # A RowResult gives row i's token as rows[i] (visible at finished_at): no per-request dicts.
        rows = result.rows
        if rows is None:
            tokens_by, times_by = result.tokens, result.token_times
        else:
            tokens_by, times_by, row_time = None, None, result.finished_at
        lps_by = result.logprobs
        if (final and rows is not None and not lps_by and not delivered and launch.reqs and self.decode_rows_fast
                and not launch.batch.prefill and launch.batch.steps <= 1):
            # The usual step: one token per row of a one-step decode, final, no logprobs
            self.stats.generated_tokens += self._apply_decode_rows(launch, rows, row_time, updates)
            return updates
        now = result.finished_at or self.clock()
        requests = self.requests
        FINISHED = ReqState.FINISHED
        hold = self.stream_hold
        generated = 0
        # The launch's requests, row by row (a request in flight is never forgotten: see _update);
        # a launch built elsewhere has none: looked up by id.
        reqs = launch.reqs or [requests.get(w.rid) for w in launch.work]
        for i, w in enumerate(launch.work):
            r = reqs[i]
            if r is None:
                continue
            if final:
                r.inflight_count -= 1
                if r.inflight == lid:
                    r.inflight = None
                if r.inflight_count:  # also in an overlapped launch queued behind this one
                    if r.release_deferred or r.aborted or not w.sample:
                        continue
                elif r.release_deferred:  # ended earlier (a part of this launch, or the launch before)
                    self._release_kv(r)
                    requests.pop(r.rid, None)
                    continue
                elif r.aborted:
                    if r.state is not ReqState.FINISHED:
                        self._finish(r, {"type": "abort", "message": "Aborted by the client."})
                        updates.append(self._update(r, []))
                    continue
                if not w.sample:
                    continue  # a prefill chunk: num_computed advanced when it was scheduled
            elif not w.sample or r.aborted or r.state is FINISHED:
                continue
            if r.state is FINISHED:
                continue
            rid = w.rid
            if rows is None:
                tokens = tokens_by.get(rid)
                got = bool(tokens)
                if got and len(tokens) == 1:
                    t = tokens[0]
                    times = times_by.get(rid)
                    tt = times[0] if times else now
                else:
                    t = NO_TOKEN
            else:
                t = rows[i]
                got = t != NO_TOKEN
                tokens = None  # (built below if the general path needs it)
                tt = row_time
            if not got:
                if final and delivered.get(rid, 0) < w.steps:
                    raise RuntimeError(f"launch {lid} ended with {delivered.get(rid, 0)} of {w.steps} tokens for {rid!r}")
                continue
            done = delivered.get(rid, 0) if delivered else 0
            if t != NO_TOKEN and done < w.steps and not (lps_by and rid in lps_by):
                # The common case (one token: a decode step, or a last prefill chunk):
                # _append_tokens + _check_finished + _update inlined for one token.
                r.pending -= 1
                out = r.output_ids
                out.append(t)
                if r.first_token_time is None:
                    r.first_token_time = tt
                elif r.last_token_time is not None and tt - r.last_token_time > r.max_tbt:
                    r.max_tbt = tt - r.last_token_time
                r.last_token_time = tt
                n_out = len(out)
                reason = None
                if t in r.eos_ids and n_out > r.params.min_new_tokens:
                    reason = {"type": "stop", "matched": t}
                elif n_out >= r.length_limit:  # max_new_tokens or the context
                    reason = {"type": "length", "length": n_out}
                elif r.has_stop and self.stop_checker is not None:
                    matched = self.stop_checker(r)
                    if matched is not None:
                        reason = {"type": "stop", "matched": matched}
                if reason is not None:
                    self._finish(r, reason)
                    updates.append(self._update(r, [t]))
                else:
                    if final and done + 1 < w.steps:
                        raise RuntimeError(f"launch {lid} ended with {done + 1} of {w.steps} tokens for {rid!r}")
                    # _update, inlined: the request runs on (unless its consumer holds this token back)
                    if hold is None or n_out >= hold.get(rid, 0):
                        updates.append(RequestUpdate(rid, [t], _NO_LOGPROBS, False, None, r.prompt_len, n_out,
                                                     r.cached_len, r.arrival_time, r.first_token_time, None))
                if not final:
                    delivered[rid] = done + 1
                generated += 1
                continue
            if tokens is None:
                tokens = [t]
            if done + len(tokens) > w.steps:
                tokens = tokens[: max(0, w.steps - done)]
            u = self._append_tokens(r, tokens, lps_by.get(rid),
                                    times_by.get(rid) if rows is None else [row_time] * len(tokens), now)
            n = len(u.new_token_ids)
            if final and done + n < w.steps and r.state is not ReqState.FINISHED:
                raise RuntimeError(f"launch {lid} ended with {done + n} of {w.steps} tokens for {rid!r}")
            if not final:
                delivered[rid] = done + n
            generated += n
            updates.append(u)
        self.stats.generated_tokens += generated
        return updates

    def _apply_decode_rows(self, launch, rows: list[int], tt: float, updates: list) -> int:
        """apply_result for the final (and only) part of a one-step decode launch given by rows,
        without logprobs: the same outcome as the general loop, with what it checks per row for
        prefill chunks, partial results, several steps and logprobs left out. Returns the tokens
        appended."""
        lid = launch.launch_id
        requests = self.requests
        FINISHED = ReqState.FINISHED
        hold = self.stream_hold
        generated = 0
        for r, t in zip(launch.reqs, rows):
            c = r.inflight_count - 1
            r.inflight_count = c
            if r.inflight == lid:
                r.inflight = None
            if c:  # also in an overlapped launch queued behind this one
                if r.release_deferred or r.aborted:
                    continue
            elif r.release_deferred:  # ended earlier (by the launch before)
                self._release_kv(r)
                requests.pop(r.rid, None)
                continue
            elif r.aborted:
                if r.state is not FINISHED:
                    self._finish(r, {"type": "abort", "message": "Aborted by the client."})
                    updates.append(self._update(r, []))
                continue
            if r.state is FINISHED:
                continue
            if t == NO_TOKEN:
                raise RuntimeError(f"launch {lid} ended with 0 of 1 tokens for {r.rid!r}")
            # _append_tokens + _check_finished + _update for one token, as in apply_result
            r.pending -= 1
            out = r.output_ids
            out.append(t)
            if r.first_token_time is None:
                r.first_token_time = tt
            elif r.last_token_time is not None and tt - r.last_token_time > r.max_tbt:
                r.max_tbt = tt - r.last_token_time
            r.last_token_time = tt
            n_out = len(out)
            generated += 1
            reason = None
            if t in r.eos_ids and n_out > r.params.min_new_tokens:
                reason = {"type": "stop", "matched": t}
            elif n_out >= r.length_limit:
                reason = {"type": "length", "length": n_out}
            elif r.has_stop and self.stop_checker is not None:
                matched = self.stop_checker(r)
                if matched is not None:
                    reason = {"type": "stop", "matched": matched}
            if reason is not None:
                self._finish(r, reason)
                updates.append(self._update(r, [t]))
            elif hold is None or n_out >= hold.get(r.rid, 0):
                updates.append(RequestUpdate(r.rid, [t], _NO_LOGPROBS, False, None, r.prompt_len, n_out,
                                             r.cached_len, r.arrival_time, r.first_token_time, None))
        return generated

    def _lane_done(self, lid: int) -> None:
        """A launch's final part arrived: its lane runs the launch queued behind it, or is idle."""
        for lane, busy_id in list(self._busy.items()):
            if busy_id == lid:
                queued = self._queued.get(lane)
                if not queued:
                    del self._busy[lane]
                else:
                    self._busy[lane] = queued.pop(0)
                if not queued:
                    self._queued.pop(lane, None)
        for lane, queued in list(self._queued.items()):
            if lid in queued:  # an executor ended them out of order: tolerate it
                queued.remove(lid)
                if not queued:
                    del self._queued[lane]

    def _append_tokens(self, r: Request, tokens: list[int], lps, times, now: float) -> RequestUpdate:
        """Append one request's tokens from a part of its launch, recording when each became visible
        and stopping at a finish (the KV they need was counted when the launch was scheduled)."""
        new: list[int] = []
        new_lps: list[dict] = []
        out = r.output_ids
        for i, t in enumerate(tokens):
            r.pending -= 1
            out.append(t)
            new.append(t)
            if lps and i < len(lps):
                r.logprobs.append(lps[i])
                new_lps.append(lps[i])
            # _record_token_time, inlined
            tt = times[i] if times and i < len(times) else now
            if r.first_token_time is None:
                r.first_token_time = tt
            elif r.last_token_time is not None and tt - r.last_token_time > r.max_tbt:
                r.max_tbt = tt - r.last_token_time
            r.last_token_time = tt
            reason = self._check_finished(r, t)
            if reason is not None:
                self._finish(r, reason)
                break
        return self._update(r, new, new_lps)

    def _record_token_time(self, r: Request, t: float) -> None:
        if r.first_token_time is None:
            r.first_token_time = t
        elif r.last_token_time is not None:
            r.max_tbt = max(r.max_tbt, t - r.last_token_time)
        r.last_token_time = t

    def _check_finished(self, r: Request, token: int) -> dict | None:
        n_out = len(r.output_ids)
        p = r.params
        if token in r.eos_ids and n_out > p.min_new_tokens:  # the sampler bans eos before min_new_tokens
            return {"type": "stop", "matched": token}
        if n_out >= r.length_limit:  # max_new_tokens, or the context (see _length_limit)
            return {"type": "length", "length": n_out}
        if p.stop and self.stop_checker is not None:
            matched = self.stop_checker(r)
            if matched is not None:
                return {"type": "stop", "matched": matched}
        return None

    def _finish(self, r: Request, reason: dict) -> None:
        if r.state == ReqState.WAITING and r in self.waiting:
            self.waiting.remove(r)
        self.running.pop(r.rid, None)
        r.state = ReqState.FINISHED
        r.finish_reason = reason
        r.finish_time = self.clock()
        if r.inflight_count:
            r.release_deferred = True  # a lane may still write to its slots: release at its launch's end
        else:
            self._release_kv(r)
        if reason["type"] == "abort":
            self.stats.aborted += 1
        else:
            self.stats.finished += 1

    def _update(self, r: Request, new: list[int], new_lps: list[dict] | None = None) -> RequestUpdate:
        finished = r.state is ReqState.FINISHED
        # positional, in field order: this runs for every request of every step
        u = RequestUpdate(r.rid, new, new_lps or [], finished, r.finish_reason, len(r.prompt_ids), len(r.output_ids),
                          r.cached_len, r.arrival_time, r.first_token_time, r.finish_time)
        if finished and r.inflight is None:
            # The core forgets a finished request once its outcome is reported (and its launch is over).
            self.requests.pop(r.rid, None)
        return u
