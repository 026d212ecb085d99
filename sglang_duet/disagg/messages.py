"""Typed messages of the disaggregation protocol (msgspec structs; msgpack over ZMQ, JSON over HTTP).

Flow of one request (see docs/disaggregation.md):

    router --HTTP /disagg/prefill--> prefill main --PrefillReq--> prefill scheduler
        (runs the prompt, samples the first token, keeps the prompt's KV: a `KVDescriptor`)
    router <--first token + KVDescriptor-- prefill main
    router --HTTP /disagg/decode (prompt, first token, descriptor)--> decode main --DecodeReq--> decode scheduler
        (allocates slots, copies the KV in through the transport, then asks the prefill
         scheduler to release it: KVRelease(confirm=True) --ZMQ DEALER->ROUTER-->, KVReleaseAck back)
    router <--SSE deltas-- decode main

No torch here: the router imports this module too.
"""
from __future__ import annotations

from typing import Union

import msgspec

from sglang_duet.server import io_struct as io


class KVLayout(msgspec.Struct, frozen=True):
    """Shape of one token's KV in a pool [2, layers, slots, kv_heads, head_dim]."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"

    @property
    def elem_bytes(self) -> int:
        return {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1}.get(self.dtype, 2)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.elem_bytes

    def same_shape(self, other: "KVLayout") -> bool:
        return (self.num_layers, self.num_kv_heads, self.head_dim) == (
            other.num_layers, other.num_kv_heads, other.head_dim)


class KVDescriptor(msgspec.Struct, kw_only=True):
    """Where a prefilled prompt's KV is and how to reach it; handed prefill -> router -> decode.

    `slots[i]` is the position, in the exported buffer, of prompt token i. `handle` is the
    transport's own (a file path for shared memory, an IPC handle for CUDA)."""

    transfer_id: str  # unique per prefill attempt; the release names it
    backend: str  # "shm" | "cuda-ipc" | "none"
    instance_id: str  # the prefill scheduler that holds the KV
    control: str  # its ZMQ ROUTER endpoint for KVRelease ("tcp://host:port")
    layout: KVLayout
    slots: list[int]
    nbytes: int
    handle: dict = {}


# ---- main process -> scheduler process (same socket as GenerateReq / AbortReq) -----------------


class PrefillReq(msgspec.Struct, tag="dg_prefill"):
    """Run the prompt, sample the first token, keep the KV for a decode instance to pull."""

    rid: str
    input_ids: list[int]
    params: dict  # SamplingParams.to_dict() of the client's request (max_new_tokens is capped here)
    arrival_time: float
    room: int | None = None  # SGLang's bootstrap_room: the decode instance asks for the KV by it (KVQuery)


class DecodeReq(msgspec.Struct, tag="dg_decode"):
    """Admit a request prefilled elsewhere: prompt + first token + where its KV is."""

    rid: str
    input_ids: list[int]
    params: dict
    arrival_time: float
    first_token: int
    first_logprob: io.TokenLogprob | None
    seed: int  # the prefill's sampling seed: the same seed continues the same random stream
    kv: KVDescriptor | None  # None: the first token already ended the request
    # SGLang's protocol (sglang-router --pd-disaggregation): no first token nor kv yet; the decode
    # scheduler asks the prefill at bootstrap for them (KVQuery -> KVOffer)
    bootstrap: "Bootstrap | None" = None
    cached_tokens: int = 0  # the prefill's prefix-cache hit, reported in usage as a single server would


class Bootstrap(msgspec.Struct):
    """Where the prefill of a request is, as sglang-router names it: host, port, room."""

    host: str
    port: int
    room: int

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


# ---- decode scheduler <-> prefill scheduler (ZMQ DEALER -> ROUTER) ------------------------------


class KVRelease(msgspec.Struct, tag="dg_release"):
    """The decode side is done with a transfer's KV (copied it, or gave up on it).

    confirm=True asks for a KVReleaseAck: the copy is valid only if the KV was still held when
    this message arrived (holds only ever go from held to freed, so held now means held during
    the copy). That makes a descriptor safe to try twice and safe against the hold's timeout."""

    transfer_id: str
    confirm: bool
    nbytes: int = 0
    ms: float = 0.0


class KVReleaseAck(msgspec.Struct, tag="dg_ack"):
    transfer_id: str
    ok: bool


class KVQuery(msgspec.Struct, tag="dg_query"):
    """Decode -> prefill: the first token and KV of bootstrap room `room`, when they are ready."""

    room: int


class KVOffer(msgspec.Struct, tag="dg_offer", kw_only=True):
    """Prefill -> decode, answering a KVQuery once the room's prefill ended (or failed: ok=False)."""

    room: int
    ok: bool
    message: str = ""
    status: int = 0  # HTTP status of a failure (the prefill's own answer to the router)
    first_token: int = -1
    first_logprob: io.TokenLogprob | None = None
    seed: int = 0
    input_len: int = 0  # the prefill's prompt length: the decode's tokenization must agree
    cached_tokens: int = 0  # of them, found in the prefill's prefix cache
    kv: KVDescriptor | None = None  # None with ok: the first token ended the request


SchedulerInput = Union[io.GenerateReq, io.AbortReq, PrefillReq, DecodeReq]
Control = Union[KVRelease, KVReleaseAck, KVQuery, KVOffer]

_enc = msgspec.msgpack.Encoder()
_input_dec = msgspec.msgpack.Decoder(SchedulerInput)
_control_dec = msgspec.msgpack.Decoder(Control)


def encode(msg) -> bytes:
    return _enc.encode(msg)


def decode_input(data: bytes):
    return _input_dec.decode(data)


def decode_control(data: bytes):
    return _control_dec.decode(data)
