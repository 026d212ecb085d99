"""HTTP request functions of the load generator: SGLang's native /generate and the OpenAI
completions / chat completions APIs, streamed over SSE and timed per chunk.

Timing rules (SGLang bench_serving's): TTFT is the time from sending the request to the first
chunk that carries output; every later chunk carrying output adds one inter-token latency (ITL)
gap; latency is the time until the stream ends. Token counts come from the server
(meta_info.completion_tokens, or the OpenAI `usage` block) when it sends them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import aiohttp


@dataclass
class RequestInput:
    prompt: str
    prompt_len: int
    output_len: int
    api_url: str
    model: str | None = None
    prompt_ids: list[int] | None = None
    ignore_eos: bool = True
    stream: bool = True
    extra_body: dict = field(default_factory=dict)


@dataclass
class RequestOutput:
    success: bool = False
    generated_text: str = ""
    prompt_len: int = 0  # the server's count when it reports one, else the client's
    output_len: int = 0  # the server's count when it reports one, else 0 (retokenized later)
    server_counts: bool = False  # output_len came from the server
    ttft: float = 0.0  # s
    latency: float = 0.0  # s, send to end of stream
    itl: list[float] = field(default_factory=list)  # s, gaps between output-carrying chunks
    chunks: int = 0  # output-carrying chunks received
    start_time: float = 0.0  # perf_counter at send
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """(latency - TTFT) / (output tokens - 1); None for a single-token output."""
        if self.output_len <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)

    @property
    def max_itl(self) -> float:
        return max(self.itl, default=0.0)


def _merge(base: dict, extra: dict) -> dict:
    """extra over base; nested dicts (sampling_params, stream_options) merged key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


async def _sse_events(resp: aiohttp.ClientResponse):
    """(receive time, parsed JSON) per `data:` event until `data: [DONE]` or end of stream."""
    async for raw in resp.content:
        now = time.perf_counter()
        line = raw.strip()
        if not line or line.startswith(b":"):
            continue  # keep-alive comment or event separator
        if line.startswith(b"data:"):
            line = line[5:].strip()
        if line == b"[DONE]":
            return
        yield now, json.loads(line)


class _Timer:
    """Accumulates chunk timings of one request."""

    def __init__(self, out: RequestOutput):
        self.out = out
        self.last = out.start_time

    def chunk(self, now: float) -> None:
        out = self.out
        if out.chunks == 0:
            out.ttft = now - out.start_time
        else:
            out.itl.append(now - self.last)
        self.last = now
        out.chunks += 1


async def _post_stream(session: aiohttp.ClientSession, req: RequestInput, payload: dict, headers: dict,
                       on_event: Callable[[RequestOutput, _Timer, float, dict], None]) -> RequestOutput:
    out = RequestOutput(prompt_len=req.prompt_len)
    timer = None
    try:
        out.start_time = time.perf_counter()
        timer = _Timer(out)
        async with session.post(req.api_url, json=payload, headers=headers) as resp:
            if resp.status != 200:
                body = (await resp.text())[:500]
                out.error = f"HTTP {resp.status}: {body}"
                return out
            if not req.stream:
                data = await resp.json()
                now = time.perf_counter()
                on_event(out, timer, now, data)
                if out.chunks == 0:
                    out.ttft = now - out.start_time  # no stream: the whole reply is the first chunk
            else:
                async for now, data in _sse_events(resp):
                    if isinstance(data, dict) and data.get("error"):
                        err = data["error"]
                        out.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
                        return out
                    on_event(out, timer, now, data)
            out.latency = time.perf_counter() - out.start_time
            if out.chunks == 0 and req.output_len > 0 and not out.generated_text and out.output_len == 0:
                out.error = "stream ended without output"
                return out
            out.success = True
    except Exception as e:  # one failed request is counted, never fatal to the run
        out.error = f"{type(e).__name__}: {e}"
    return out


# -- SGLang native /generate ------------------------------------------------------------------
def _sglang_event(out: RequestOutput, timer: _Timer, now: float, data: dict) -> None:
    # Text and output_ids are cumulative; a chunk carries output if either grew.
    text = data.get("text") or ""
    meta = data.get("meta_info") or {}
    n = meta.get("completion_tokens")
    grew = len(text) > len(out.generated_text) or (n is not None and n > out.output_len)
    if grew:
        timer.chunk(now)
    out.generated_text = text if len(text) >= len(out.generated_text) else out.generated_text
    if n is not None:
        out.output_len, out.server_counts = int(n), True
    if meta.get("prompt_tokens") is not None:
        out.prompt_len = int(meta["prompt_tokens"])


async def sglang_generate(session: aiohttp.ClientSession, req: RequestInput, headers: dict) -> RequestOutput:
    sampling = {"temperature": 0.0, "max_new_tokens": req.output_len, "ignore_eos": req.ignore_eos}
    payload = {"sampling_params": sampling, "stream": req.stream}
    if req.prompt_ids is not None:
        payload["input_ids"] = req.prompt_ids  # exact length, no server-side tokenization
    else:
        payload["text"] = req.prompt
    return await _post_stream(session, req, _merge(payload, req.extra_body), headers, _sglang_event)


# -- OpenAI completions and chat completions --------------------------------------------------
def _usage(out: RequestOutput, data: dict) -> None:
    usage = data.get("usage")
    if isinstance(usage, dict):
        if usage.get("completion_tokens") is not None:
            out.output_len, out.server_counts = int(usage["completion_tokens"]), True
        if usage.get("prompt_tokens") is not None:
            out.prompt_len = int(usage["prompt_tokens"])


def _completion_event(out: RequestOutput, timer: _Timer, now: float, data: dict) -> None:
    for choice in data.get("choices") or []:
        text = choice.get("text") or ""
        if text:
            timer.chunk(now)
            out.generated_text += text
    _usage(out, data)


def _chat_event(out: RequestOutput, timer: _Timer, now: float, data: dict) -> None:
    for choice in data.get("choices") or []:
        # Streaming sends `delta`; a non-streamed reply sends `message`.
        part = choice.get("delta") or choice.get("message") or {}
        text = part.get("content") or ""
        if text:
            timer.chunk(now)
            out.generated_text += text
    _usage(out, data)


def _openai_payload(req: RequestInput, body: dict) -> dict:
    body.update(temperature=0.0, max_tokens=req.output_len, stream=req.stream)
    if req.model:
        body["model"] = req.model
    if req.stream:
        body["stream_options"] = {"include_usage": True}  # server token counts in the last chunk
    if req.ignore_eos:
        body["ignore_eos"] = True  # not in OpenAI's spec; SGLang and vLLM honour it
    return _merge(body, req.extra_body)


async def openai_completions(session: aiohttp.ClientSession, req: RequestInput, headers: dict) -> RequestOutput:
    payload = _openai_payload(req, {"prompt": req.prompt})
    return await _post_stream(session, req, payload, headers, _completion_event)


async def openai_chat_completions(session: aiohttp.ClientSession, req: RequestInput,
                                  headers: dict) -> RequestOutput:
    payload = _openai_payload(req, {"messages": [{"role": "user", "content": req.prompt}]})
    return await _post_stream(session, req, payload, headers, _chat_event)


RequestFunc = Callable[[aiohttp.ClientSession, RequestInput, dict], Awaitable[RequestOutput]]

# backend -> (request function, API path)
BACKENDS: dict[str, tuple[RequestFunc, str]] = {
    "sglang": (sglang_generate, "/generate"),
    "sglang-native": (sglang_generate, "/generate"),
    "openai": (openai_completions, "/v1/completions"),
    "sglang-oai": (openai_completions, "/v1/completions"),
    "vllm": (openai_completions, "/v1/completions"),
    "openai-chat": (openai_chat_completions, "/v1/chat/completions"),
    "sglang-oai-chat": (openai_chat_completions, "/v1/chat/completions"),
}
