"""The FastAPI app: routes, API-key check, error rendering."""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from sglang_duet.server.body_limit import BodyLimitMiddleware
from sglang_duet.server.errors import APIError, json_response
from sglang_duet.server.native_api import NativeServing
from sglang_duet.server.openai_api import OpenAIServing, loads_body
from sglang_duet.server.tokenizer_manager import TokenizerManager

logger = logging.getLogger("sglang_duet.server")

HEALTH_GENERATE_TIMEOUT_S = 30.0
LOG_REQUEST_BYTES = 2048  # --log-requests: how much of each request body is logged
_OPEN_PATHS = frozenset({"/health"})


class APIKeyMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware, which would buffer streams and hide disconnects)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        got = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(got, self.expected):
            resp = APIError(401, "Invalid or missing API key (send `Authorization: Bearer <key>`).",
                            code="invalid_api_key").response()
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


class DuetApp(FastAPI):
    """FastAPI, except that POSTs to the generation routes (`fast_routes`) skip its per-request
    layers: its middleware stack (server errors, exception telemetry, its body limit, exception
    handlers, an exit stack), routing and dependency solving cost about as much main-process CPU
    per request as all of our own admission, and every SSE event of a stream went back out through
    each layer's send wrapper. A fast route is the same handler behind our own two middlewares
    (API key, body limit) and the same error rendering; the FastAPI route stays registered (the
    OpenAPI schema, and any app that is not a DuetApp). Middleware added later with
    add_middleware does not see the fast routes: wrap `fast_routes` too (pd_http.install does)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fast_routes: dict[str, object] = {}  # path -> ASGI app, POST only

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self.fast_routes.get(scope["path"])
            if route is not None:
                await route(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(tm: TokenizerManager, server_args, lifespan=None) -> FastAPI:
    app = DuetApp(title="sglang-duet", lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json", version=_version())
    openai = OpenAIServing(tm, server_args.model_path)
    native = NativeServing(tm)

    @app.exception_handler(APIError)
    async def _api_error(_req, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def _internal(_req, e: Exception):
        return _internal_error(e)

    async def body_of(request: Request) -> dict:
        try:
            raw = await request.body()
        except ClientDisconnect:
            raise client_gone(request.scope) from None
        return parse_body(request.scope, raw)

    def client_gone(scope) -> APIError:
        # The client hung up mid-upload: nobody to answer, nothing went wrong here.
        logger.info("client disconnected while sending %s %s", scope["method"], scope["path"])
        return APIError(499, "Client disconnected.")

    def parse_body(scope, raw: bytes) -> dict:
        if server_args.log_requests:
            logger.info("request %s %s: %s", scope["method"], scope["path"],
                        raw[:LOG_REQUEST_BYTES].decode("utf-8", "replace"))
        return loads_body(raw)

    async def fast_body(scope, receive) -> dict:
        """body_of for the fast routes: the ASGI messages read here, as Request.body() reads them,
        without its stream generator and copies (the Request handed on is used only to ask whether
        the client is still there)."""
        chunks = []
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # http.disconnect
                raise client_gone(scope)
            body = msg.get("body", b"")
            if body:
                chunks.append(body)
            if not msg.get("more_body", False):
                break
        return parse_body(scope, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    # ---- health and info -------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if tm.dead:
            return APIError(503, tm.dead).response()
        if tm.draining:
            return APIError(503, tm.draining).response()
        if not tm.ready:
            return APIError(503, "The server is starting.").response()
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate(request: Request):
        if tm.dead:
            return APIError(503, tm.dead).response()
        ids = tm.tokenize("Hi") if tm.tokenizer is not None else [0]
        params = tm.make_params({"max_new_tokens": 1, "temperature": 0.0, "ignore_eos": True})
        group = tm.submit([(f"health-{tm.new_rid()}", ids, params)], request)
        try:
            async with asyncio.timeout(HEALTH_GENERATE_TIMEOUT_S):
                while await group.next() is not None:
                    pass
        except (APIError, TimeoutError) as e:
            return APIError(503, f"Health generation failed: {e or 'timeout'}").response()
        finally:
            group.close()
        return Response(status_code=200)

    def paths() -> dict:
        """Where the weights and tokenizer are: sglang-router loads the tokenizer from there."""
        tok = None
        if tm.tokenizer is not None:
            tok = getattr(server_args, "tokenizer_path", None) or tm.info.model_path or tm.info.tokenizer_dir
        return {"model_path": server_args.model_path or tm.info.model_path, "tokenizer_path": tok}

    @app.get("/get_model_info")
    @app.get("/model_info")  # SGLang's newer name; sglang-router asks for it first
    async def model_info():
        return json_response({**paths(), "is_generation": True, "served_model_name": tm.served_model_name,
                              "context_length": tm.context_length, "vocab_size": tm.vocab_size})

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def server_info():
        info = dataclasses.asdict(server_args)
        info.pop("api_key", None)  # never echo the secret
        info.update(paths())  # the resolved paths (the embedded model has none on the command line)
        info.update(served_model_name=tm.served_model_name, policy_info=tm.info.policy,
                    kv_slots=tm.info.kv_slots, context_length=tm.context_length,
                    max_running_requests=tm.info.max_running_requests, device=tm.info.device,
                    internal_states=[tm.internal_state()], version=_version())
        return json_response(info)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(tm.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ---- generation ------------------------------------------------------------------------

    def fast_route(path: str, handler) -> None:
        """POST `path` -> handler(request, body) on the fast path (see DuetApp)."""

        async def endpoint(scope, receive, send):
            try:
                body = await fast_body(scope, receive)
                response = await handler(Request(scope, receive), body)
            except APIError as e:
                response = e.response()
            except Exception as e:  # noqa: BLE001 - what the FastAPI route's handler does
                response = _internal_error(e)
            await response(scope, receive, send)

        asgi = BodyLimitMiddleware(endpoint, max_bytes=server_args.max_request_bytes)
        if server_args.api_key:
            asgi = APIKeyMiddleware(asgi, api_key=server_args.api_key)
        app.fast_routes[path] = asgi

    fast_route("/generate", native.generate)
    fast_route("/v1/completions", openai.completions)
    fast_route("/v1/chat/completions", openai.chat)

    @app.post("/generate")
    async def generate(request: Request):
        return await native.generate(request, await body_of(request))

    @app.get("/v1/models")
    async def models():
        return openai.list_models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        return openai.retrieve_model(model_id)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await openai.completions(request, await body_of(request))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await openai.chat(request, await body_of(request))

    @app.post("/v1/embeddings")
    async def embeddings(_request: Request):
        raise APIError(400, "This server runs a generative model, which has no embeddings endpoint (SGLang serves "
                            "embedding models with --is-embedding, which this server does not support).",
                       code="model_not_embedding")

    # ---- SGLang's utility routes -------------------------------------------------------------

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await openai.tokenize(await body_of(request))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await openai.detokenize(await body_of(request))

    async def flush_cache():
        # SGLang's answers: the prefix cache is emptied, or nothing is done while requests run.
        if not tm.flush_cache():
            return Response("Cache not flushed: there are running or waiting requests.\n", status_code=400)
        return Response("Cache flushed.\n", status_code=200)

    app.add_api_route("/flush_cache", flush_cache, methods=["POST"], operation_id="flush_cache")
    app.add_api_route("/flush_cache", flush_cache, methods=["GET"], operation_id="flush_cache_get",
                      include_in_schema=False)

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await body_of(request)
        rid, abort_all = body.get("rid"), body.get("abort_all", False)
        if not isinstance(abort_all, bool):
            raise APIError(400, f"abort_all must be of type bool, got {abort_all!r}.", param="abort_all")
        if not abort_all and not (isinstance(rid, str) and rid):
            raise APIError(400, "Give rid (a request id) or abort_all: true.", param="rid")
        return json_response({"aborted": tm.abort_request(rid, abort_all)})

    app.add_middleware(BodyLimitMiddleware, max_bytes=server_args.max_request_bytes)
    if server_args.api_key:  # added last: outermost, so a client without the key learns nothing more
        app.add_middleware(APIKeyMiddleware, api_key=server_args.api_key)
    return app


def _internal_error(e: Exception):
    logger.exception("internal error", exc_info=e)
    return APIError(500, f"Internal server error: {type(e).__name__}: {e}").response()


def _version() -> str:
    from sglang_duet import __version__

    return __version__
