"""SchedulerCore: request state machine, queues and KV accounting. Pure Python, no torch.

The same core runs in the offline Engine, in the server's scheduler process and in the
discrete-event simulator. It asks a policy for a `StepPlan` whenever lanes are idle, turns the
plan into `Launch`es (allocating KV slots, retracting requests when KV runs out), and applies
the `LaunchResult`s that executors report, possibly from two lanes at different cadences.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from sglang_duet.core.kv_accounting import KVAccountingMixin
from sglang_duet.core.launch_resolver import LaunchResolverMixin
from sglang_duet.core.kv_allocator import TokenSlotAllocator
from sglang_duet.core.output_processor import RequestUpdate, SchedulerOutputProcessorMixin
from sglang_duet.core.plan import LaneKind, Launch
from sglang_duet.core.request import Request, ReqState
from sglang_duet.core.waiting_queue import WaitingColumns, WaitingQueue
from sglang_duet.sampling_params import SamplingParams

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
    # How many launches may wait behind the running aggregated one (overlap only). 1: SGLang's
    # overlap scheduler (step N+1 queued while N runs). 2: N+1 and N+2 queued, so the host has two
    # steps instead of one to apply a result and plan before the device would idle (a host that
    # sometimes waits for a core no longer idles the device), at the price of applying results one
    # more step late (an eos or stop string wastes up to two rows). While requests are being admitted
    # (some wait, or a queued launch prefills) one launch waits at most, so that an arrival's prefill
    # does not wait one more step. The executor must run queued launches in order (EngineCore asks it).
    overlap_depth: int = 1
    # Persistent decode rows (vLLM v1's persistent batch, for executors that read a launch's rows when
    # it is submitted): a decode launch of exactly the requests of its lane's previous launch (same
    # order, same steps) gets that launch's work list back, each row advanced in place (input, start,
    # input_from, output_pos), instead of a new ReqWork per request; the executor may keep what it
    # derived from the rows (EmulatedExecutor: its columns) and advance it. Rows never change their
    # rid, sample, steps or input length, which is all that is read of a launch once submitted.
    persistent_rows: bool = False
    # Order of the waiting queue (SGLang's --schedule-policy): fcfs, or lpm (longest cached prefix
    # first, among the first LPM_WINDOW waiting requests; fcfs without a prefix cache).
    schedule_policy: str = "fcfs"

    @property
    def table_rows(self) -> int:
        """Rows of a req-to-token table that can hold every request with KV: the running ones, plus
        as many that ended while a launch still writes their slots (released at its end)."""
        return 2 * self.max_running_requests + 2


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
    # `waiting`'s numbers as arrays, in its order (core/waiting_queue.py); None where a view is built by
    # hand or its waiting list was reordered (then a policy reads the requests).
    waiting_columns: WaitingColumns | None = None

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


class SchedulerCore(SchedulerOutputProcessorMixin, KVAccountingMixin, LaunchResolverMixin):
    """The state every part works on is declared here (`__init__`); applying results lives in
    `output_processor` and the KV pool's accounting in `kv_accounting`, as SGLang's scheduler keeps
    its result processing in mixins."""

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
        self.waiting = WaitingQueue()
        self.running: dict[str, Request] = {}  # insertion order = admission order
        self.inflight: dict[int, Launch] = {}
        self._busy: dict[LaneKind, int] = {}  # lane -> the launch running on it
        self._queued: dict[LaneKind, list[int]] = {}  # lane -> the overlapped launches queued behind it, in order
        self._overlap_depth = max(1, int(config.overlap_depth))
        # lane -> (requests, work, steps) of its last launch when that was a decode (persistent_rows)
        self._lane_rows: dict[LaneKind, tuple[list, list, int]] = {}
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
        """The aggregated launch a next one may be planned behind (overlap scheduling), if any: the
        newest of the running one and those queued behind it, while fewer than overlap_depth wait
        (one while requests are being admitted: `_admitting`)."""
        if not self._overlap or LaneKind.AGGREGATED not in self._busy:
            return None
        queued = self._queued.get(LaneKind.AGGREGATED)
        if not queued:
            return self.inflight[self._busy[LaneKind.AGGREGATED]]
        if len(queued) >= self._overlap_depth or self._admitting(queued):
            return None
        return self.inflight[queued[-1]]

    def _admitting(self, queued: list[int]) -> bool:
        """Requests wait, or a queued launch prefills: arrivals are being admitted, and more are
        likely. Then only one launch waits behind the running one (a deeper plan would make the
        next arrivals wait one more step for their prefill); decoding alone, overlap_depth do."""
        return bool(self.waiting) or any(self.inflight[i].batch.prefill for i in queued)

    def view(self) -> SchedulerView:
        """What the policy plans from. Normally: the requests no lane is working on, the idle lanes.
        Overlap planning (an aggregated launch runs, fewer than overlap_depth queued behind it): the
        same as if those launches had ended, the requests of the newest one (the head) included at
        their planned state (`num_computed`, `pending`), except those the tokens in flight end by
        length; a request only in earlier ones waits for them. The plan it returns must be aggregated."""
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
                if r.inflight != head_id:
                    continue
                if pending and out >= r.length_limit:
                    continue  # the tokens in flight end it by length: not planned again
            if out and r.prompt_len + out - r.num_computed == 1:
                decoding.append(r)
            elif not pending:
                prefilling.append(r)
        return SchedulerView(
            now=self.clock(),
            waiting=self.waiting.snapshot(),
            prefilling=prefilling,
            decoding=decoding,
            inflight={} if head is not None else {k: self.inflight[i] for k, i in self._busy.items()},
            idle_lanes=ALL_LANES if head is not None else self.idle_lanes(),
            kv_free=self.kv_free,
            kv_total=self.allocator.capacity,
            num_running=len(self.running),
            config=self.config,
            waiting_columns=self.waiting.columns(),
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
            self.waiting.clear_computed()

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
        head = waiting.head(LPM_WINDOW)
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
        waiting.replace_head(head)
        return head
