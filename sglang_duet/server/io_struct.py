"""Typed messages between the three server processes (msgspec structs, msgpack on the wire).

Every message is a member of one tagged union so a receiver decodes bytes straight into the right
struct without pickle (nothing received over a socket can run code) and without a hand-written
"type" switch. Flow:

    main --GenerateReq/AbortReq--> scheduler --DetokRegister/BatchTokenOut/ReqError/SchedulerStats-->
    detokenizer --BatchStrOut (+ ReqError/SchedulerStats forwarded)--> main
"""
from __future__ import annotations

from typing import Union

import msgspec


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []  # (token id, logprob), best first


# ---- main -> scheduler ------------------------------------------------------------------------


class GenerateReq(msgspec.Struct, tag="gen"):
    rid: str
    input_ids: list[int]
    params: dict  # SamplingParams.to_dict(); rebuilt and re-verified by the scheduler
    arrival_time: float  # time.monotonic() (CLOCK_MONOTONIC is shared by all processes)


class AbortReq(msgspec.Struct, tag="abort"):
    rid: str


class FlushCacheReq(msgspec.Struct, tag="flush"):
    """/flush_cache: empty the prefix cache (the scheduler does it only while no request runs)."""


# ---- scheduler -> detokenizer ------------------------------------------------------------------


class DetokRegister(msgspec.Struct, tag="reg"):
    """Sent once per admitted request, before any of its tokens (one PUSH socket keeps the order)."""

    rid: str
    prompt_tail: list[int]  # last prompt tokens: left context for the first output piece
    stop: list[str]
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False


class TokenOut(msgspec.Struct, array_like=True):
    """One request's output of a step (a row of BatchTokenOut; not sent on its own)."""

    rid: str
    new_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: dict | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class BatchTokenOut(msgspec.Struct, tag="tok"):
    """All of a scheduler step's outputs, column by column: one list per field, so neither side
    builds (or msgpack walks) a struct per request per step. Rare fields are sparse, by row index:
    `finished` (the finish reason of rows that end their request), `logprobs`, `cached_tokens`."""

    rids: list[str]
    new_ids: list[list[int]]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    finished: dict[int, dict | None] = {}
    logprobs: dict[int, list[TokenLogprob]] = {}
    cached_tokens: dict[int, int] = {}

    @classmethod
    def of(cls, outs: list[TokenOut]) -> "BatchTokenOut":
        b = cls([o.rid for o in outs], [o.new_ids for o in outs], [o.prompt_tokens for o in outs],
                [o.completion_tokens for o in outs])
        for i, o in enumerate(outs):
            if o.finished:
                b.finished[i] = o.finish_reason
            if o.logprobs:
                b.logprobs[i] = o.logprobs
            if o.cached_tokens:
                b.cached_tokens[i] = o.cached_tokens
        return b

    def out(self, i: int) -> TokenOut:
        fin = i in self.finished
        return TokenOut(self.rids[i], self.new_ids[i], self.logprobs.get(i), fin, self.finished.get(i) if fin else None,
                        self.prompt_tokens[i], self.completion_tokens[i], self.cached_tokens.get(i, 0))

    @property
    def outs(self) -> list[TokenOut]:
        return [self.out(i) for i in range(len(self.rids))]


class ReqError(msgspec.Struct, tag="err"):
    """The scheduler refused a request (admission / validation); passed through to main."""

    rid: str
    message: str
    status: int = 400


class SchedulerStats(msgspec.Struct, tag="stats"):
    time: float
    num_running: int
    num_waiting: int
    num_inflight_launches: int
    kv_used: int
    kv_free: int
    kv_total: int
    launches: dict[str, int]
    plans: dict[str, int]
    last_sms: dict[str, int]
    finished: int
    aborted: int
    retractions: int
    prompt_tokens: int
    generated_tokens: int
    submitted: int = 0  # GenerateReqs admitted into the core (each ends finished or aborted)
    rejected: int = 0  # GenerateReqs answered with a ReqError instead
    peak_running: int = 0  # most requests holding KV at once, since start
    peak_waiting: int = 0  # most requests queued at once, since start
    # host time on the critical path (scheduler_proc.DeviceTimer.stats): cumulative since start
    critical_path: dict = {}


# ---- detokenizer -> main ---------------------------------------------------------------------


class StrOut(msgspec.Struct, array_like=True):
    rid: str
    text: str  # new text safe to show (stop strings trimmed, possible stop prefixes held back)
    new_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: dict | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class BatchStrOut(msgspec.Struct, tag="str"):
    outs: list[StrOut]


# ---- startup (child -> main over the readiness pipe) ------------------------------------------


class ReadyInfo(msgspec.Struct):
    status: str  # "ready" | "error"
    error: str = ""
    model_name: str = ""
    model_path: str | None = None
    tokenizer_dir: str | None = None  # a copy of the tokenizer saved in the private socket dir
    chat_template: str | None = None
    context_length: int = 0
    vocab_size: int = 0
    kv_slots: int = 0
    eos_token_ids: list[int] = []
    policy: dict = {}
    executor: str = ""
    device: str = ""
    max_running_requests: int = 0


Message = Union[GenerateReq, AbortReq, FlushCacheReq, DetokRegister, BatchTokenOut, ReqError, SchedulerStats, BatchStrOut]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes):
    return _decoder.decode(data)
