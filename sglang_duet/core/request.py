"""A request's state inside the scheduler core. Pure Python."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from sglang_duet.sampling_params import SamplingParams


class ReqState(str, Enum):
    WAITING = "waiting"  # not admitted (or retracted): holds no KV
    RUNNING = "running"  # holds KV; prefilling while computed < len(seq) - 1, then decoding
    FINISHED = "finished"


@dataclass(slots=True)
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seed: int
    eos_ids: frozenset[int] = frozenset()
    # Output tokens at which it ends by length: max_new_tokens, or what the context leaves (the core
    # sets it at admission; one comparison per token instead of two).
    length_limit: int = 1 << 62
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    state: ReqState = ReqState.WAITING
    kv_slots: list[int] = field(default_factory=list)  # slot of each position: its row of the req-to-token table
    # Which row of an executor's device-side req-to-token table holds kv_slots (assigned while the
    # request holds KV; executors copy only the slots appended since they last saw the row).
    table_row: int | None = None
    # Tokens whose KV is in the cache or being written by a launch already handed to a lane: it
    # advances when a launch is scheduled, not when its result arrives (vLLM v1's convention), so
    # the next step can be planned while this one runs (overlap scheduling). A waiting request
    # holds no KV and has 0, except while the core plans (schedule()): then it is the length of the
    # request's cached prefix in the radix cache, so that policies budget and price only what runs.
    num_computed: int = 0
    # Tokens that launches in flight will sample for this request and that have not been delivered
    # yet; the sequence as planned is prompt + output + pending (`planned_len`).
    pending: int = 0
    inflight: int | None = None  # the newest launch id while lanes work on it
    inflight_count: int = 0  # launches in flight that include it (2 while an overlapped step is queued)
    # Finished while its launch still runs (a partial result ended it): the lane may still write to
    # its KV slots, so they are released when the launch's final result arrives.
    release_deferred: bool = False
    aborted: bool = False
    finish_reason: dict | None = None
    # timings (clock of the core)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    num_retractions: int = 0
    max_tbt: float = 0.0
    # Prefix cache (memory/radix_cache.py): cached_len prompt tokens were found cached at admission
    # (reported as cached_tokens); the first tree_len slots of kv_slots are the tree's (shared, never
    # freed by this request: the hit, then its own prefill once inserted); cache_node is the tree
    # node locked while it holds them.
    cached_len: int = 0
    # While the core plans, for a waiting request with a cached prefix: the prefix's slots that no
    # running request locks. They count in the view's kv_free now and stop counting once this request
    # is admitted (it locks them), so admitting it costs remaining_prefill + prefix_pin free slots.
    prefix_pin: int = 0
    # The last schedule-time match of a waiting request: (tree version, seq_len, hit, node), reused
    # while neither the tree nor the sequence changed (one tree walk per change, not per plan).
    prefix_memo: tuple | None = None
    tree_len: int = 0
    cache_node: object | None = None
    # Structured output: the request's grammar matcher (constrained/grammar.py GrammarState), which
    # executors mask logits with and advance with every token they sample for it; None: unconstrained.
    grammar: object | None = None
    # Read for every request in every step: kept on the request so the step does not touch the prompt
    # list and the params object (cold at batch 1024) for them.
    prompt_len: int = field(init=False, default=0)
    has_stop: bool = field(init=False, default=False)  # params.stop: stop strings to check per token

    def __post_init__(self) -> None:
        self.prompt_len = len(self.prompt_ids)
        self.has_stop = bool(getattr(self.params, "stop", None))

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def seq_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output without building the whole list."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.output_ids[:end - p]

    @property
    def planned_len(self) -> int:
        """The sequence as planned: delivered tokens plus those launches in flight will sample."""
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def remaining_prefill(self) -> int:
        """Tokens still to compute before the next token can be sampled (1 means: decode)."""
        return self.planned_len - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return (self.state == ReqState.RUNNING and self.remaining_prefill == 1
                and bool(self.output_ids or self.pending))

    @property
    def is_prefilling(self) -> bool:
        return self.state == ReqState.RUNNING and not self.is_decoding

    @property
    def max_new_tokens(self) -> int | None:
        return self.params.max_new_tokens

    @property
    def finished(self) -> bool:
        return self.state == ReqState.FINISHED
