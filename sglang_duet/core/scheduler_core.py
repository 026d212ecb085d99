"""SchedulerCore: request state machine, queues and KV accounting. Pure Python, no torch.

The same core runs in the offline Engine, in the server's scheduler process and in the
discrete-event simulator. It asks a policy for a `StepPlan` whenever lanes are idle, turns the
plan into `Launch`es (allocating KV slots, retracting requests when KV runs out), and applies
the `LaunchResult`s that executors report, possibly from two lanes at different cadences.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import msgspec

from sglang_duet.core.kv_allocator import TokenSlotAllocator
from sglang_duet.core.plan import (
    FUTURE_TOKEN, NO_TOKEN, LaneBatch, LaneKind, Launch, LaunchResult, PrefillChunk, ReqWork, StepPlan,
)
from sglang_duet.core.request import Request, ReqState
from sglang_duet.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

ALL_LANES = frozenset({LaneKind.AGGREGATED, LaneKind.PREFILL, LaneKind.DECODE})
LPM_WINDOW = 64  # waiting requests whose cached prefix each plan matches (and lpm reorders): one match each


class AdmissionError(ValueError):
    """A request that can never run (too long, duplicate id, queue full); served as HTTP 400/503."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class CoreConfig:
    kv_slots: int  # size of the KV pool in token slots (slot 0 reserved)
    context_length: int
    max_running_requests: int = 256
    max_queued_requests: int | None = None
    chunked_prefill_size: int = 8192
    # Overlap scheduling (SGLang's overlap scheduler): while an aggregated launch runs, plan the next
    # one and hand it to the executor, which queues it behind the running one and feeds it the
    # running one's sampled ids on the device. Results are applied one step late: a request that
    # ends by eos or a stop string in step N has one wasted row in step N+1. Only with a policy and
    # an executor that both support it (EngineCore decides).
    overlap: bool = False
    # Order of the waiting queue (SGLang's --schedule-policy): fcfs, or lpm (longest cached prefix
    # first, among the first LPM_WINDOW waiting requests; fcfs without a prefix cache).
    schedule_policy: str = "fcfs"

    @property
    def table_rows(self) -> int:
        """Rows of a req-to-token table that can hold every request with KV: the running ones, plus
        as many that ended while a launch still writes their slots (released at its end)."""
        return 2 * self.max_running_requests + 2


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


@dataclass
class SchedulerView:
    """What a policy may read. The lists are the core's own; a policy must not mutate them."""

    now: float
    waiting: list[Request]  # FCFS (retracted requests first), hold no KV
    prefilling: list[Request]  # admitted, prefill not complete, not on a lane
    decoding: list[Request]  # ready for their next decode step, not on a lane
    inflight: dict[LaneKind, Launch]
    idle_lanes: frozenset[LaneKind]
    kv_free: int
    kv_total: int
    num_running: int  # requests holding KV (on a lane or not)
    config: CoreConfig

    @property
    def all_idle(self) -> bool:
        return LaneKind.AGGREGATED in self.idle_lanes


@dataclass
class CoreStats:
    launches: dict[str, int] = field(default_factory=lambda: {"aggregated": 0, "prefill": 0, "decode": 0})
    plans: dict[str, int] = field(default_factory=lambda: {"aggregated": 0, "split": 0})
    last_sms: dict[str, int] = field(default_factory=dict)
    retractions: int = 0
    finished: int = 0
    aborted: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0


class SchedulerCore:
    def __init__(
        self,
        config: CoreConfig,
        policy,
        clock: Callable[[], float] = time.monotonic,
        stop_checker: Callable[[Request], str | None] | None = None,
    ):
        self.config = config
        self.policy = policy
        self.clock = clock
        self.stop_checker = stop_checker
        self.allocator = TokenSlotAllocator(config.kv_slots)
        self._free_rows = list(range(config.table_rows - 1, -1, -1))  # req-to-token table rows, lowest first
        self._max_seq_len = min(config.context_length, self.allocator.capacity)
        # Overlap needs a policy that plans aggregated batches only (it is shown a view as if the
        # running launch had ended); the executor's support is the caller's to check.
        self._overlap = config.overlap and getattr(policy, "supports_overlap", False)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}  # insertion order = admission order
        self.inflight: dict[int, Launch] = {}
        self._busy: dict[LaneKind, int] = {}  # lane -> the launch running on it
        self._queued: dict[LaneKind, int] = {}  # lane -> the overlapped launch queued behind it
        self._next_launch = 0
        self._pending_updates: list[RequestUpdate] = []
        self._delivered: dict[int, dict[str, int]] = {}  # launch id -> rid -> tokens delivered by partials
        self.stats = CoreStats()
        # --- disaggregation hook (sglang_duet/disagg): a prefill instance keeps a finished
        # request's KV for a decode instance to pull. Called as kv_hold(request, reason) when a
        # request finishes (not on abort); returning True means the KV (request.kv_slots) stays
        # allocated until the hook's owner calls release_held(rid). The core keeps the request
        # meanwhile, so that with a prefix cache the tree's part stays locked (never evicted while
        # a decode instance reads it) and the release puts what it computed in the tree, as SGLang's
        # prefill server caches a request once its KV was sent.
        self.kv_hold: Callable[[Request, dict], bool] | None = None
        self._held: dict[str, Request] = {}
        # --- prefix cache hook (sglang_duet/memory/radix_cache.py, set by EngineCore unless
        # --disable-radix-cache): requests leave the KV they computed in it when their KV is freed,
        # and an admitted request starts after its longest cached prefix. Slots only the cache holds
        # count as free (kv_free): they are evicted, least recently used first, before a retraction.
        self.prefix_cache = None
        # --- structured output hook (constrained/grammar.py install_grammars): called as
        # grammar_factory(params, stop_ids) at admission; returns the request's grammar matcher (None
        # when its params set no grammar) or raises a SamplingParamsError for a grammar that fails.
        self.grammar_factory: Callable | None = None

    # ---- requests in and out -------------------------------------------------------------

    def add_request(
        self,
        rid: str,
        prompt_ids: list[int],
        params: SamplingParams,
        seed: int = 0,
        eos_ids: frozenset[int] | set[int] = frozenset(),
        arrival_time: float | None = None,
        grammar: object | None = None,
    ) -> Request:
        if rid in self.requests:
            raise AdmissionError(f"Duplicate request id {rid!r}.")
        n = len(prompt_ids)
        if n == 0:
            raise AdmissionError("The prompt is empty.")
        ctx = self.config.context_length
        if n >= ctx:
            raise AdmissionError(f"The input ({n} tokens) is longer than the model's context length ({ctx} tokens).")
        if n + 1 > self.allocator.capacity:
            raise AdmissionError(
                f"The input ({n} tokens) does not fit in the KV cache ({self.allocator.capacity} tokens)."
            )
        q = self.config.max_queued_requests
        if q is not None and len(self.waiting) >= q:
            raise AdmissionError("Too many queued requests; try again later.", status=503)
        stop_ids = set(eos_ids) if not params.ignore_eos else set()
        if grammar is None and self.grammar_factory is not None:
            grammar = self.grammar_factory(params, stop_ids | set(params.stop_token_ids))
        req = Request(
            rid=rid,
            prompt_ids=list(prompt_ids),
            params=params,
            arrival_time=self.clock() if arrival_time is None else arrival_time,
            seed=seed,
            eos_ids=frozenset(stop_ids | set(params.stop_token_ids)),
            grammar=grammar,
            length_limit=self._length_limit(n, params),
        )
        self.requests[rid] = req
        self.waiting.append(req)
        self.stats.prompt_tokens += n
        return req

    def abort(self, rid: str, message: str = "Aborted by the client.") -> None:
        """Abort a request in any state; its update (and KV release) happens now or when its lane reports."""
        req = self.requests.get(rid)
        if req is None or req.finished:
            return
        req.aborted = True
        if req.inflight_count:
            return  # a lane still writes to its slots; release when its (last) launch reports
        self._finish(req, {"type": "abort", "message": message})
        self._pending_updates.append(self._update(req, []))

    # --- disaggregation hook (sglang_duet/disagg): a decode instance admits a request whose
    # prompt was prefilled elsewhere. The caller allocated `kv_slots` from self.allocator (one per
    # prompt token) and copied the prompt's KV into them; the first token was sampled by the
    # prefill instance. The request enters RUNNING, ready to decode, after the same finish checks
    # a locally sampled first token gets (eos, max tokens, stop strings).
    def admit_prefilled(
        self,
        rid: str,
        prompt_ids: list[int],
        first_token: int,
        params: SamplingParams,
        kv_slots: list[int],
        seed: int = 0,
        eos_ids: frozenset[int] | set[int] = frozenset(),
        arrival_time: float | None = None,
        first_logprob: dict | None = None,
        first_token_time: float | None = None,
        cached_tokens: int = 0,
    ) -> RequestUpdate:
        """Admit a request prefilled elsewhere (a PD decode instance): its KV is in `kv_slots` and
        its first token was sampled; `cached_tokens` is the prefill's prefix-cache hit, reported in
        usage as a single server would (this instance caches nothing of it)."""
        if rid in self.requests:
            raise AdmissionError(f"Duplicate request id {rid!r}.")
        n = len(prompt_ids)
        if n == 0:
            raise AdmissionError("The prompt is empty.")
        if n >= self.config.context_length:
            raise AdmissionError(f"The input ({n} tokens) is longer than the model's context length "
                                 f"({self.config.context_length} tokens).")
        if kv_slots and len(kv_slots) != n:
            raise ValueError(f"admit_prefilled: {len(kv_slots)} KV slots for a {n}-token prompt")
        stop_ids = set(eos_ids) if not params.ignore_eos else set()
        # a grammar request continues its grammar past the first token the prefill instance sampled
        grammar = (self.grammar_factory(params, stop_ids | set(params.stop_token_ids))
                   if self.grammar_factory is not None else None)
        now = self.clock()
        r = Request(rid=rid, prompt_ids=list(prompt_ids), params=params,
                    arrival_time=now if arrival_time is None else arrival_time, seed=seed,
                    eos_ids=frozenset(stop_ids | set(params.stop_token_ids)), grammar=grammar,
                    length_limit=self._length_limit(n, params))
        r.kv_slots = list(kv_slots)
        r.num_computed = n
        r.cached_len = min(max(0, cached_tokens), n)
        r.state = ReqState.RUNNING
        r.table_row = self._free_rows.pop()
        r.first_scheduled_time = now
        self.requests[rid] = r
        self.running[rid] = r
        self.stats.prompt_tokens += n
        r.output_ids.append(first_token)
        if grammar is not None:
            grammar.accept(first_token)
        new_lps = [first_logprob] if first_logprob is not None else []
        r.logprobs.extend(new_lps)
        self._record_token_time(r, now if first_token_time is None else first_token_time)
        self.stats.generated_tokens += 1
        reason = self._check_finished(r, first_token)
        if reason is not None:
            self._finish(r, reason)
        elif not kv_slots:
            self._finish(r, {"type": "abort", "message": "The prompt's KV cache did not arrive."})
        return self._update(r, [first_token], new_lps)

    def take_updates(self) -> list[RequestUpdate]:
        """Updates produced outside apply_result (aborts)."""
        out, self._pending_updates = self._pending_updates, []
        return out

    # ---- introspection ---------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.inflight)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def kv_free(self) -> int:
        """Slots a request could get now: the free ones and those only the prefix cache holds."""
        c = self.prefix_cache
        return self.allocator.available + (c.evictable if c is not None else 0)

    @property
    def kv_used(self) -> int:
        return self.allocator.capacity - self.kv_free

    def idle_lanes(self) -> frozenset[LaneKind]:
        if not self._busy:
            return ALL_LANES
        if LaneKind.AGGREGATED in self._busy:
            return frozenset()  # an aggregated launch holds every SM
        return frozenset(k for k in (LaneKind.PREFILL, LaneKind.DECODE) if k not in self._busy)

    def can_plan(self) -> bool:
        """Whether schedule() could launch anything now: a lane is idle, or an aggregated launch runs
        with nothing queued behind it (overlap). Cheap: callers check it before schedule()."""
        return bool(self.idle_lanes()) or self._overlap_head() is not None

    def _overlap_head(self) -> Launch | None:
        """The running aggregated launch a next one may be planned behind (overlap scheduling), if any."""
        if not self._overlap or LaneKind.AGGREGATED not in self._busy or self._queued:
            return None
        return self.inflight[self._busy[LaneKind.AGGREGATED]]

    def view(self) -> SchedulerView:
        """What the policy plans from. Normally: the requests no lane is working on, the idle lanes.
        Overlap planning (an aggregated launch runs, nothing queued behind it): the same as if that
        launch had ended, its requests included at their planned state (`num_computed`, `pending`),
        except those it will end by length; the plan it returns must be aggregated."""
        head = self._overlap_head()
        head_id = head.launch_id if head is not None else None
        prefilling, decoding = [], []
        # r.is_decoding and _ends_by_length, inlined: this loop runs over every running request each step
        for r in self.running.values():
            if r.aborted:
                continue
            pending = r.pending
            out = len(r.output_ids) + pending
            if r.inflight is not None:
                if r.inflight != head_id or r.inflight_count != 1:
                    continue
                if pending and out >= r.length_limit:
                    continue  # the tokens in flight end it by length: not planned again
            if out and r.prompt_len + out - r.num_computed == 1:
                decoding.append(r)
            elif not pending:
                prefilling.append(r)
        return SchedulerView(
            now=self.clock(),
            waiting=list(self.waiting),
            prefilling=prefilling,
            decoding=decoding,
            inflight={} if head is not None else {k: self.inflight[i] for k, i in self._busy.items()},
            idle_lanes=ALL_LANES if head is not None else self.idle_lanes(),
            kv_free=self.kv_free,
            kv_total=self.allocator.capacity,
            num_running=len(self.running),
            config=self.config,
        )

    def _length_limit(self, prompt_len: int, params: SamplingParams) -> int:
        """Output tokens at which a request ends by length: max_new_tokens, or the context (a sequence
        the whole KV pool cannot hold one more token of could never be resumed)."""
        limit = self._max_seq_len - prompt_len
        mx = params.max_new_tokens
        return limit if mx is None or mx > limit else mx

    def _ends_by_length(self, r: Request) -> bool:
        """Whether the tokens in flight will end the request by max_new_tokens or the context (known
        before they arrive, unlike eos and stop strings): it must not be planned again."""
        return bool(r.pending) and len(r.output_ids) + r.pending >= r.length_limit

    # ---- planning ----------------------------------------------------------------------------

    def schedule(self) -> list[Launch]:
        """Ask the policy for work for the idle lanes and resolve it into launches."""
        if not self.waiting and not self.running:
            return []
        if self.prefix_cache is None or not self.waiting:
            return self._schedule()
        matched = self._match_waiting()
        try:
            return self._schedule()
        finally:
            for r in matched:  # those not admitted hold nothing again
                if r.state is ReqState.WAITING:
                    r.num_computed = r.prefix_pin = 0

    def _schedule(self) -> list[Launch]:
        view = self.view()
        if not view.idle_lanes or (not view.waiting and not view.prefilling and not view.decoding):
            return []
        plan = self.policy.plan(view)
        if plan is None or plan.is_empty():
            return []
        if self._overlap_head() is not None and plan.aggregated is None:
            # Only an aggregated launch can queue behind the running one; a split waits for it to end.
            return []
        launches = self._materialize(plan, view.idle_lanes, view.decoding)
        if launches:
            self.stats.plans[plan.mode] += 1
            if plan.prefill_sms:
                self.stats.last_sms["prefill"] = plan.prefill_sms
            if plan.decode_sms:
                self.stats.last_sms["decode"] = plan.decode_sms
        return launches

    def _match_waiting(self) -> list[Request]:
        """Match the cached prefix of the first LPM_WINDOW waiting requests now, as SGLang does when it
        schedules (not only when a request arrived: one that waited while the same prefix got cached
        benefits). Each gets num_computed = its hit for this plan, so policies budget and price only
        the uncached part and see the cached context, and prefix_pin = the hit's unlocked slots not
        already counted for a request ahead of it (what admitting it takes from kv_free). lpm then
        orders the window by hit. Nothing is locked: `_use_cached_prefix` matches again at admission."""
        cache, waiting = self.prefix_cache, self.waiting
        head = [waiting.popleft() for _ in range(min(LPM_WINDOW, len(waiting)))]
        nodes = {}
        version = cache.version
        for r in head:
            memo = r.prefix_memo
            if memo is not None and memo[0] == version and memo[1] == r.seq_len:
                r.num_computed, node = memo[2], memo[3]
                cache.touch(node)
            else:
                r.num_computed, node = cache.match_length(r.seq_ids(0, r.seq_len - 1))
                r.prefix_memo = (version, r.seq_len, r.num_computed, node)
            nodes[r.rid] = node
        if self.config.schedule_policy == "lpm":
            head.sort(key=lambda r: -r.num_computed)  # stable: FCFS among equals
        seen: set[int] = set()
        for r in head:
            r.prefix_pin = cache.pin_cost(nodes[r.rid], seen)
        waiting.extendleft(reversed(head))
        return head

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
            work = self._resolve(batch, reqs, decodable, lid)  # marks each of reqs as in launch lid
            if not work:
                continue
            launch = Launch(lid, lane, batch, work)
            launch.sms = {LaneKind.PREFILL: plan.prefill_sms, LaneKind.DECODE: plan.decode_sms}.get(lane)
            launch.predicted_ms = plan.predicted_ms
            launch.reqs = reqs
            touched += reqs
            self._next_launch += 1
            self.inflight[lid] = launch
            if lane in self._busy:  # overlap: queued behind the running launch
                self._queued[lane] = lid
            else:
                self._busy[lane] = lid
            self.stats.launches[lane.value] += 1
            launches.append(launch)
        return launches

    def _resolve(self, batch: LaneBatch, reqs: list[Request], decodable: list[Request], lid: int) -> list[ReqWork]:
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
                        or (r.inflight is not None and (r.inflight != head_id or r.inflight_count != 1))
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
        work: list[ReqWork] = []
        slots = self._alloc(len(decodes) * steps) if decodes else []  # one allocation for the batch
        for i, r in enumerate(decodes):
            kv = r.kv_slots
            if steps == 1:
                kv.append(slots[i])
            else:
                kv.extend(slots[i * steps:(i + 1) * steps])
            pending = r.pending
            out = r.output_ids
            # _work, inlined (positional, in ReqWork's field order): this runs for every request of every step.
            # With tokens in flight the input is the last one the running launch samples for it.
            work.append(ReqWork(r.rid, [FUTURE_TOKEN] if pending else [out[-1]], r.num_computed, kv, True, steps,
                                r.seed, r.params, out, r.prompt_ids, r.eos_ids, r.inflight if pending else None,
                                len(out) + pending, r.table_row, r.grammar))
            r.num_computed += steps  # the KV of the input and of steps - 1 fed-back tokens
            r.pending = pending + steps
            r.inflight = lid
            r.inflight_count += 1
        reqs.extend(decodes)
        for chunk in batch.prefill:
            w = self._resolve_prefill(chunk, head_id)
            if w is not None:
                r = self.requests[w.rid]
                r.inflight = lid
                r.inflight_count += 1
                work.append(w)
                reqs.append(r)
        return work

    def _resolve_prefill(self, chunk: PrefillChunk, head_id: int | None = None) -> ReqWork | None:
        r = self.requests.get(chunk.rid)
        if (r is None or r.aborted or r.finished or r.pending
                or (r.inflight is not None and (r.inflight != head_id or r.inflight_count != 1))):
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

    def _alloc(self, n: int) -> list[int] | None:
        slots = self.allocator.alloc(n)
        if slots is None and self.prefix_cache is not None:
            self.prefix_cache.evict(n - self.allocator.available)
            slots = self.allocator.alloc(n)
        return slots

    def _use_cached_prefix(self, r: Request, chunk: PrefillChunk) -> PrefillChunk:
        """Admission: take the longest cached prefix (at least one token is left to compute, to sample
        from) and start the policy's chunk after it. The policy planned from the hit `_match_waiting`
        found (chunk.start), which is this match unless an allocation earlier in this plan evicted
        part of it, or the request was outside the matched window (start 0); either way the chunk
        keeps its token count, so the plan's budget holds."""
        cache = self.prefix_cache
        slots, node = cache.match_prefix(r.seq_ids(0, r.seq_len - 1))
        r.cached_len = r.tree_len = m = len(slots)
        r.num_computed = m
        r.prefix_pin = 0
        r.prefix_memo = None
        if m:
            cache.lock(node)
            r.cache_node = node
            r.kv_slots = slots  # a new list: executors rewrite the request's table row from position 0
        if m == chunk.start:
            return chunk
        return PrefillChunk(r.rid, m, min(chunk.length, r.planned_len - m))

    def _free_kv(self, r: Request) -> None:
        """The request's KV is no longer its own: into the prefix cache (what it computed), or free."""
        cache = self.prefix_cache
        slots = r.kv_slots
        r.kv_slots = []
        if cache is None:
            self.allocator.free(slots)
            return
        # Positions whose KV was written from the sequence's own tokens (a multi-step decode may have
        # written past the end, from tokens it sampled after the request had finished).
        n = min(len(slots), r.num_computed, r.seq_len - 1)
        n -= n % cache.page_size
        own = r.tree_len  # the first `own` slots are the cache's
        present = cache.insert(r.seq_ids(0, n), slots[:n]) if n > own else own
        self.allocator.free(slots[own:present])  # computed here, but the tree had them meanwhile
        self.allocator.free(slots[max(n, own):])
        if r.cache_node is not None:
            cache.unlock(r.cache_node)
            r.cache_node = None
        r.tree_len = 0

    def _cache_prefills(self, launch: Launch) -> None:
        """A launch ended: the prompts it finished prefilling go into the prefix cache at once
        (SGLang's cache_unfinished_req), so requests running alongside share them, not only later ones."""
        cache = self.prefix_cache
        for w in launch.work:
            if not w.sample or w.start_pos >= len(w.prompt_ids):
                continue  # a decode, or a chunk that does not end a prefill
            r = self.requests.get(w.rid)
            if r is None or r.aborted or r.state is not ReqState.RUNNING or r.kv_slots is not w.kv_slots:
                continue
            n = w.start_pos + len(w.input_ids)
            n -= n % cache.page_size
            if n <= r.tree_len:
                continue
            ids = r.seq_ids(0, n)
            if cache.match_length(ids)[0] != r.tree_len:
                continue  # the tree got part of it meanwhile: its copy is the tree's, ours is cached at the end
            cache.insert(ids, r.kv_slots[:n])
            node = cache.match_prefix(ids)[1]
            cache.lock(node)
            if r.cache_node is not None:
                cache.unlock(r.cache_node)
            r.cache_node, r.tree_len = node, n

    def _work(self, r: Request, ids: list[int], start: int, sample: bool, steps: int) -> ReqWork:
        # positional, in ReqWork's field order: this runs for every request of every step
        return ReqWork(r.rid, ids, start, r.kv_slots, sample, steps, r.seed, r.params, r.output_ids, r.prompt_ids,
                       r.eos_ids, None, len(r.output_ids) + r.pending, r.table_row, r.grammar)

    def _pick_victim(self, candidates: list[Request]) -> Request:
        # SGLang retracts the requests that lose least work: fewest output tokens, then longest prompt.
        return min(candidates, key=lambda r: (len(r.output_ids), -len(r.prompt_ids), -r.arrival_time))

    def _retract(self, r: Request) -> None:
        """Free a running request's KV and queue it again; its tokens so far are kept and recomputed
        (with a prefix cache, what it computed stays cached until evicted: it may match it again)."""
        self._free_kv(r)
        self._free_row(r)
        r.num_computed = 0
        r.pending = 0
        r.state = ReqState.WAITING
        r.num_retractions += 1
        del self.running[r.rid]
        self.waiting.appendleft(r)
        self.stats.retractions += 1
        logger.info("retracted %s (%d tokens) to free KV", r.rid, r.seq_len)

    # ---- results -----------------------------------------------------------------------------

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
        now = result.finished_at or self.clock()
        requests = self.requests
        FINISHED = ReqState.FINISHED
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
                if r.inflight_count:  # also in the overlapped launch queued behind this one
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
                    # _update, inlined: the request runs on
                    updates.append(RequestUpdate(rid, [t], _NO_LOGPROBS, False, None, r.prompt_len, n_out, r.cached_len,
                                                 r.arrival_time, r.first_token_time, None))
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

    def _lane_done(self, lid: int) -> None:
        """A launch's final part arrived: its lane runs the launch queued behind it, or is idle."""
        for lane, busy_id in list(self._busy.items()):
            if busy_id == lid:
                queued = self._queued.pop(lane, None)
                if queued is None:
                    del self._busy[lane]
                else:
                    self._busy[lane] = queued
        for lane, queued_id in list(self._queued.items()):
            if queued_id == lid:  # an executor ended them out of order: tolerate it
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

    def _free_row(self, r: Request) -> None:
        if r.table_row is not None:
            self._free_rows.append(r.table_row)
            r.table_row = None

    def _release_kv(self, r: Request) -> None:
        r.release_deferred = False
        self._free_row(r)
        # disaggregation hook: the prefill instance may keep the KV (see kv_hold in __init__)
        reason = r.finish_reason or {}
        if self.kv_hold is not None and reason.get("type") != "abort" and r.kv_slots and self.kv_hold(r, reason):
            self._held[r.rid] = r
            return
        self._free_kv(r)

    def release_held(self, rid: str) -> int:
        """The KV a kv_hold hook kept for `rid` is no longer needed: free it (into the prefix cache,
        if any). Returns how many slots it held (0 if none was held under that id)."""
        r = self._held.pop(rid, None)
        if r is None:
            return 0
        n = len(r.kv_slots)
        self._free_kv(r)
        return n

    def _update(self, r: Request, new: list[int], new_lps: list[dict] | None = None) -> RequestUpdate:
        finished = r.state is ReqState.FINISHED
        # positional, in field order: this runs for every request of every step
        u = RequestUpdate(r.rid, new, new_lps or [], finished, r.finish_reason, len(r.prompt_ids), len(r.output_ids),
                          r.cached_len, r.arrival_time, r.first_token_time, r.finish_time)
        if finished and r.inflight is None:
            # The core forgets a finished request once its outcome is reported (and its launch is over).
            self.requests.pop(r.rid, None)
        return u
