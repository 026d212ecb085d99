"""SGLang's native /generate: text or input_ids (one or a batch), SGLang's response shape.

Streaming sends `data: {text, output_ids, meta_info}` events whose text and output_ids are
CUMULATIVE (the whole output so far, as SGLang's default streaming does), then `data: [DONE]`.

Unknown top-level fields are ignored, as SGLang's /generate does (its request is a dataclass that
FastAPI fills leniently); unknown *sampling* parameters are a 400 (SamplingParams.from_dict).
"""
from __future__ import annotations

import time

import orjson
from starlette.requests import Request

from sglang_duet.server.errors import APIError, json_response
from sglang_duet.server.sse import start_stream
from sglang_duet.server.tokenizer_manager import MAX_SEQS_PER_REQUEST, TokenizerManager


class NativeServing:
    def __init__(self, tm: TokenizerManager):
        self.tm = tm

    async def _inputs(self, body: dict) -> tuple[list[list[int]], bool]:
        text, input_ids = body.get("text"), body.get("input_ids")
        if (text is None) == (input_ids is None):
            raise APIError(400, "Give exactly one of text or input_ids.", param="text")
        if text is not None:
            if isinstance(text, str):
                return [await self.tm.tokenize_async(text)], False
            if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
                _check_batch(len(text))
                return await self.tm.tokenize_many_async(text), True
            raise APIError(400, "text must be a string or a non-empty list of strings.", param="text")
        if isinstance(input_ids, list) and input_ids and all(isinstance(x, list) for x in input_ids):
            _check_batch(len(input_ids))
            for x in input_ids:
                self.tm.check_ids(x)
            return [list(x) for x in input_ids], True
        if isinstance(input_ids, list):
            self.tm.check_ids(input_ids)
            return [list(input_ids)], False
        raise APIError(400, "input_ids must be a list of token ids or a list of such lists.", param="input_ids")

    def _params(self, body: dict, n: int) -> list:
        sp = body.get("sampling_params") or {}
        sps = sp if isinstance(sp, list) else [sp] * n
        if len(sps) != n or not all(isinstance(d, dict) for d in sps):
            raise APIError(400, f"sampling_params must be an object or a list of {n} objects.",
                           param="sampling_params")
        return_logprob = _get(body, "return_logprob", bool, False)
        top = _get(body, "top_logprobs_num", int, 0)
        out = []
        for d in sps:
            d = dict(d)
            if return_logprob:
                d["logprobs"] = True
                d["top_logprobs"] = top
            out.append(self.tm.make_params(d))
        return out

    def _rids(self, body: dict, n: int, batch: bool) -> list[str]:
        rid = body.get("rid")
        if rid is None:
            return [self.tm.new_rid() for _ in range(n)]
        rids = rid if isinstance(rid, list) else [rid]
        if len(rids) != n or not all(isinstance(r, str) and r for r in rids):
            raise APIError(400, f"rid must be a string{' or a list of ' + str(n) + ' strings' if batch else ''}.",
                           param="rid")
        return rids

    async def generate(self, request: Request, body: dict):
        ids_list, batch = await self._inputs(body)
        n = len(ids_list)
        params = self._params(body, n)
        rids = self._rids(body, n, batch)
        stream = _get(body, "stream", bool, False)
        with_text = _get(body, "return_text_in_logprobs", bool, False)
        sp = body.get("sampling_params")
        sps = sp if isinstance(sp, list) else [sp or {}] * n
        for ids, d in zip(ids_list, sps):
            if d.get("max_new_tokens") is not None and ids:
                self.tm.check_fits(len(ids), d["max_new_tokens"], "max_new_tokens")
        await self.tm.check_grammars(params)  # json_schema / regex / ebnf: a bad one is a 400 here
        group = self.tm.submit(list(zip(rids, ids_list, params)), request)
        start = time.monotonic()
        acc = [{"text": "", "ids": [], "lps": []} for _ in range(n)]

        def add(i, d):
            a = acc[i]
            a["text"] += d.text
            a["ids"].extend(d.ids)
            if d.logprobs:
                a["lps"].extend(d.logprobs)

        def meta(i, d) -> dict:
            m = {"id": rids[i], "finish_reason": d.finish_reason if d.finished else None,
                 "prompt_tokens": d.prompt_tokens or len(ids_list[i]), "completion_tokens": d.completion_tokens,
                 "cached_tokens": d.cached_tokens, "e2e_latency": time.monotonic() - start}
            if params[i].logprobs:
                tok = self.tm.tokenizer if with_text else None
                lps = acc[i]["lps"]
                m["output_token_logprobs"] = [[lp.logprob, lp.token_id, _t(tok, lp.token_id)] for lp in lps]
                m["output_top_logprobs"] = [[[v, t, _t(tok, t)] for t, v in lp.top] for lp in lps]
            return m

        def result(i, d) -> dict:
            a = acc[i]
            return {"text": a["text"], "output_ids": a["ids"], "meta_info": meta(i, d)}  # encoded at once: no copy

        if not stream:
            last = [None] * n
            try:
                while (b := await group.next()) is not None:
                    for i, d in b:
                        add(i, d)
                        last[i] = d
            finally:
                group.close()
            outs = [result(i, last[i]) for i in range(n)]
            return json_response(outs if batch else outs[0])

        events = [_CumulativeEvent(rids[i]) for i in range(n)]
        plain = [not p.logprobs for p in params]  # meta_info without logprobs: its bytes from a template

        def render(b):
            for i, d in b:
                ev = events[i]
                ev.add(d)
                if not plain[i]:
                    acc[i]["lps"].extend(d.logprobs)
                if d.text or d.ids or d.finished:
                    if plain[i] and not d.finished:
                        m = ev.running_meta(d.prompt_tokens or len(ids_list[i]), d.completion_tokens,
                                            d.cached_tokens, time.monotonic() - start)
                    else:
                        m = orjson.dumps(meta(i, d))
                    yield ev.render(m, i if batch else None)

        return await start_stream(group, render, lambda: ())


class _CumulativeEvent:
    """One stream's /generate events, whose text and output_ids are the whole output so far: both
    are kept JSON-encoded and grown by each delta (JSON escapes character by character, so the
    encoding of a concatenation is the concatenation of the encodings), so an event costs the
    encoding of its delta and one copy, not a re-encoding of everything so far. The bytes are
    those of `sse({"text": ..., "output_ids": ..., "meta_info": ...[, "index": i]})`."""

    __slots__ = ("text", "ids", "meta_head")

    def __init__(self, rid: str):
        self.text = bytearray()  # the text so far, JSON-escaped, without quotes
        self.ids = bytearray()  # the ids so far, comma-separated
        self.meta_head = b'{"id":' + orjson.dumps(rid) + b',"finish_reason":null,"prompt_tokens":'

    def add(self, d) -> None:
        if d.text:
            self.text += orjson.dumps(d.text)[1:-1]
        if d.ids:
            if self.ids:
                self.ids += b","
            self.ids += orjson.dumps(d.ids)[1:-1]

    def running_meta(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int, latency: float) -> bytes:
        """orjson.dumps of a running output's meta_info without logprobs ({"id", "finish_reason": None,
        "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency"}), byte for byte,
        without building the dict: the one part of a stream's usual event that is not a copy."""
        return b'%b%d,"completion_tokens":%d,"cached_tokens":%d,"e2e_latency":%b}' % (
            self.meta_head, prompt_tokens, completion_tokens, cached_tokens, orjson.dumps(latency))

    def render(self, meta: bytes, index: int | None) -> bytes:
        """The event, given its meta_info already JSON-encoded."""
        end = b"}\n\n" if index is None else b',"index":%d}\n\n' % index
        return b"".join((b'data: {"text":"', self.text, b'","output_ids":[', self.ids, b'],"meta_info":', meta, end))


def _get(body: dict, name: str, kind, default):
    """A typed optional field (null means the default); the wrong type is a 400 naming it."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) != (kind is bool) or not isinstance(v, kind):
        raise APIError(400, f"{name} must be of type {kind.__name__}, got {v!r}.", param=name)
    return v


def _check_batch(n: int) -> None:
    if n > MAX_SEQS_PER_REQUEST:
        raise APIError(400, f"One request may ask for at most {MAX_SEQS_PER_REQUEST} sequences, got {n}.")


def _t(tokenizer, tid: int):
    return tokenizer.decode([tid]) if tokenizer is not None else None
