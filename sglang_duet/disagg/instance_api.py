"""HTTP routes a prefill or decode instance adds to the ordinary server (for the router).

    GET  /disagg/info     mode, model info, tokenizer files, transport and KV layout
    POST /disagg/prefill  (prefill) {rid, input_ids, sampling_params} -> first token + KV descriptor
    POST /disagg/decode   (decode) {rid, input_ids, sampling_params, first_token, first_logprob,
                          seed, kv} -> SSE stream of output deltas (not cumulative), then [DONE]
    POST /disagg/release  (prefill) {rid}: free a transfer's KV that no decode instance will pull

Requests go through the TokenizerManager's own `submit` (validation, duplicate ids, draining,
accounting, aborts when the client leaves); only the message sent to the scheduler differs.
"""
from __future__ import annotations

import base64
import json
import os

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from sglang_duet.disagg import messages as dm
from sglang_duet.disagg import pd_http
from sglang_duet.disagg.instance_backend import translating
from sglang_duet.disagg.scheduler import INFO_FILE
from sglang_duet.server import io_struct as io
from sglang_duet.server.errors import APIError, json_response
from sglang_duet.server.openai_api import loads_body
from sglang_duet.server.sse import sse, start_stream

TOKENIZER_FILE_LIMIT = 64 << 20  # the router fetches the tokenizer from an instance; refuse absurd sizes


def submit_as(tm, rid: str, ids: list[int], params, make, request):
    """tm.submit, with the scheduler getting `make(GenerateReq)` (instance_backend.py)."""
    with translating(make):
        return tm.submit([(rid, ids, params)], request)


class _ASGIResponse(Response):
    """A FastAPI route must return a Response; the server's SSEStream is a plain ASGI app."""

    def __init__(self, app):
        self.app = app
        self.background = None

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


def _body_field(body: dict, name: str, kinds, required: bool = True):
    v = body.get(name)
    if v is None and not required:
        return None
    if isinstance(v, bool) or not isinstance(v, kinds):
        raise APIError(400, f"{name} is required and must be of type {kinds}.", param=name)
    return v


def delta_json(d) -> dict:
    """One output delta as the router reads it (logprobs as TokenLogprob arrays)."""
    return {"text": d.text, "ids": d.ids, "logprobs": [msgspec.to_builtins(lp) for lp in d.logprobs],
            "finished": d.finished, "finish_reason": d.finish_reason, "prompt_tokens": d.prompt_tokens,
            "completion_tokens": d.completion_tokens, "cached_tokens": d.cached_tokens}


def add_instance_routes(app, tm, server_args) -> None:
    mode = server_args.disaggregation_mode
    # SGLang's protocol (sglang-router --pd-disaggregation) on the usual routes
    pd_http.install(app, mode, int(getattr(server_args, "max_request_bytes", 32 << 20)))
    cache: dict = {}

    def transfer_info() -> dict:
        if "transfer" not in cache:
            with open(os.path.join(tm.backend.paths.root, INFO_FILE)) as f:
                cache["transfer"] = json.load(f)
        return cache["transfer"]

    def tokenizer_files() -> dict:
        if "tok" not in cache:
            files, total = {}, 0
            d = tm.info.tokenizer_dir
            for name in sorted(os.listdir(d)) if d and os.path.isdir(d) else []:
                p = os.path.join(d, name)
                if os.path.isfile(p):
                    with open(p, "rb") as f:
                        data = f.read()
                    total += len(data)
                    files[name] = base64.b64encode(data).decode()
            if total > TOKENIZER_FILE_LIMIT:
                files = {}
            cache["tok"] = files
        return cache["tok"]

    def need(kind: str) -> None:
        if mode != kind:
            raise APIError(400, f"This is a {mode} instance; /disagg/{kind} is served by {kind} instances.")

    @app.get("/disagg/info")
    async def info():
        ready = msgspec.to_builtins(tm.info)
        ready.pop("tokenizer_dir", None)  # a path in this instance's private dir: meaningless elsewhere
        return json_response({"mode": mode, "ready": tm.ready, "dead": tm.dead, "pid": os.getpid(),
                              "served_model_name": tm.served_model_name, "ready_info": ready,
                              "disagg": transfer_info(), "tokenizer_files": tokenizer_files()})

    @app.post("/disagg/prefill")
    async def prefill(request: Request):
        need("prefill")
        body = loads_body(await request.body())
        rid = _body_field(body, "rid", str)
        ids = _body_field(body, "input_ids", list)
        params = tm.make_params(body.get("sampling_params") or {})

        def make(g: io.GenerateReq):
            return dm.PrefillReq(g.rid, g.input_ids, g.params, g.arrival_time)

        group = submit_as(tm, rid, ids, params, make, request)
        out_ids, lps, last = [], [], None
        try:
            while (batch := await group.next()) is not None:
                for _, d in batch:
                    out_ids.extend(d.ids)
                    lps.extend(d.logprobs)
                    last = d
        finally:
            group.close()
        fr = dict(last.finish_reason or {}) if last is not None else {}
        dg = fr.pop("disagg", None)
        if dg is None or not out_ids:
            raise APIError(503, f"The prefill did not complete ({fr.get('message') or fr.get('type') or 'no output'}).")
        return json_response({"rid": rid, "first_token": out_ids[0],
                              "first_logprob": msgspec.to_builtins(lps[0]) if lps else None,
                              "final": dg["final"], "seed": dg["seed"], "kv": dg["kv"], "finish_reason": fr,
                              "prompt_tokens": last.prompt_tokens, "cached_tokens": last.cached_tokens})

    @app.post("/disagg/decode")
    async def decode(request: Request):
        need("decode")
        body = loads_body(await request.body())
        rid = _body_field(body, "rid", str)
        ids = _body_field(body, "input_ids", list)
        first = _body_field(body, "first_token", int)
        seed = _body_field(body, "seed", int)
        cached = body.get("cached_tokens") or 0
        if not isinstance(cached, int) or isinstance(cached, bool) or not 0 <= cached <= len(ids):
            raise APIError(400, "cached_tokens must be an integer between 0 and the prompt's length.",
                           param="cached_tokens")
        params = tm.make_params(body.get("sampling_params") or {})
        try:
            kv = msgspec.convert(body["kv"], dm.KVDescriptor) if body.get("kv") is not None else None
            lp = (msgspec.convert(body["first_logprob"], io.TokenLogprob)
                  if body.get("first_logprob") is not None else None)
        except msgspec.ValidationError as e:
            raise APIError(400, f"Bad KV descriptor or logprob: {e}", param="kv") from None
        if not 0 <= first < tm.vocab_size:
            raise APIError(400, f"first_token {first} is outside the vocabulary.", param="first_token")

        def make(g: io.GenerateReq):
            return dm.DecodeReq(g.rid, g.input_ids, g.params, g.arrival_time, first, lp, seed, kv,
                                cached_tokens=cached)

        group = submit_as(tm, rid, ids, params, make, request)

        def render(batch):
            for _, d in batch:
                yield sse(delta_json(d))

        return _ASGIResponse(await start_stream(group, render, lambda: ()))

    @app.post("/disagg/release")
    async def release(request: Request):
        need("prefill")
        body = loads_body(await request.body())
        rid = _body_field(body, "rid", str)
        if not tm.dead:
            tm.backend.send_abort(rid)  # the prefill scheduler frees a held transfer on abort
        return json_response({"released": rid})
