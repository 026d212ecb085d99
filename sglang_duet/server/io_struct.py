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
    rid: str
    new_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: dict | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class BatchTokenOut(msgspec.Struct, tag="tok"):
    outs: list[TokenOut]


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


Message = Union[GenerateReq, AbortReq, DetokRegister, BatchTokenOut, ReqError, SchedulerStats, BatchStrOut]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes):
    return _decoder.decode(data)
