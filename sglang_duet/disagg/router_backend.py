"""The router's request path: the server's TokenizerManager with HTTP peers instead of a scheduler.

The router is the server's own TokenizerManager with `RouterBackend` as its scheduler backend
(server/scheduler_backend.py), so it serves the same OpenAI and native API with the same
validation, tokenization, chat templating, streaming, metrics and abort-on-disconnect code
(sglang_duet/server/*). The backend runs each GenerateReq as an asyncio task:

  1. prefill: POST /disagg/prefill to the prefill instance with the fewest requests in flight
     (retried on another prefill instance if one cannot be reached or is overloaded);
  2. decode: POST /disagg/decode to the decode instance with the most KV room, which pulls the
     KV and streams output deltas; they are fed to the handler as if a detokenizer had sent them.

Nothing is lost: a decode instance that refuses, cannot be reached or dies before the first token
makes the router try the next one (prefilling again if the KV is gone: HTTP 410); once tokens
have reached the client, a failure ends the request with an error. Every hop has a timeout, and a
background poll keeps each instance's health, queue and KV room current.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass

import httpx
import msgspec
import orjson

from sglang_duet.server import io_struct as io
from sglang_duet.server.errors import APIError
from sglang_duet.server.scheduler_backend import SchedulerBackend

logger = logging.getLogger("sglang_duet.router")

CONNECT_TIMEOUT_S = 5.0
RELEASE_TIMEOUT_S = 5.0


@dataclass
class RouterConfig:
    prefill_timeout_s: float = 600.0  # a prefill's whole HTTP exchange
    decode_timeout_s: float = 600.0  # the longest silence in a decode stream (incl. waiting for KV room)
    health_interval_s: float = 1.0
    max_attempts: int = 4  # decode attempts per request (each decode instance at most once)
    instance_api_key: str | None = None


@dataclass
class Instance:
    url: str
    role: str  # "prefill" | "decode"
    healthy: bool = True
    inflight: int = 0  # this router's requests at the instance now
    queue: int = 0  # waiting requests, last poll
    running: int = 0
    kv_free: int = 0  # free KV slots, last poll
    kv_total: int = 0
    sent_tokens: int = 0  # prompt tokens this router sent there since the last poll (decode room estimate)
    requests: int = 0
    failures: int = 0
    last_error: str = ""

    def room(self) -> int:
        return self.kv_free - self.sent_tokens


class InstancePool:
    def __init__(self, prefill: list[str], decode: list[str]):
        self.prefill = [Instance(u.rstrip("/"), "prefill") for u in prefill]
        self.decode = [Instance(u.rstrip("/"), "decode") for u in decode]

    @property
    def all(self) -> list[Instance]:
        return self.prefill + self.decode

    def pick_prefill(self, exclude: set[str]) -> Instance | None:
        """The shortest queue: fewest of our requests in flight there, then the shortest polled queue."""
        cands = [i for i in self.prefill if i.healthy and i.url not in exclude]
        return min(cands, key=lambda i: (i.inflight, i.queue), default=None)

    def pick_decode(self, need: int, exclude: set[str]) -> Instance | None:
        """The instance with room: the most free KV (as last polled, less what we sent since)."""
        cands = [i for i in self.decode if i.healthy and i.url not in exclude]
        if not cands:
            return None
        fits = [i for i in cands if i.room() >= need]
        return max(fits or cands, key=lambda i: (i.room(), -i.inflight))

    def mark_down(self, inst: Instance, why) -> None:
        if inst.healthy:
            logger.warning("%s instance %s marked down: %s", inst.role, inst.url, why)
        inst.healthy = False
        inst.failures += 1
        inst.last_error = str(why) or type(why).__name__


class _Retry(Exception):
    """A decode attempt failed before the request ended; `reprefill`: the KV is gone."""

    def __init__(self, message: str, reprefill: bool = False):
        super().__init__(message)
        self.message = message
        self.reprefill = reprefill


def _error_of(r: httpx.Response) -> APIError:
    try:
        err = r.json()["error"]
        return APIError(r.status_code, err.get("message") or str(err), param=err.get("param"),
                        code=err.get("code") if isinstance(err.get("code"), str) else None)
    except Exception:  # noqa: BLE001 - not our error body
        return APIError(r.status_code, f"HTTP {r.status_code}: {r.text[:200]}")


class RouterBackend(SchedulerBackend):
    def __init__(self, pool: InstancePool, config: RouterConfig):
        self.pool = pool
        self.config = config
        self.tm = None  # the TokenizerManager it delivers to (set by start)
        self.tasks: dict[str, asyncio.Task] = {}
        self._background: set[asyncio.Task] = set()
        self._poll_task: asyncio.Task | None = None
        self.http: httpx.AsyncClient | None = None
        self.routed = {"requests": 0, "retries": 0, "reprefills": 0, "failed": 0}

    # ---- the backend interface -----------------------------------------------------------------

    def start(self, tm) -> None:
        self.tm = tm
        headers = {"Authorization": f"Bearer {self.config.instance_api_key}"} if self.config.instance_api_key else {}
        # No connection cap: every decoding request holds one stream open.
        self.http = httpx.AsyncClient(headers=headers, limits=httpx.Limits(max_connections=None,
                                                                           max_keepalive_connections=64))
        self._poll_task = asyncio.get_running_loop().create_task(self._poll_loop())

    def send_generate(self, reqs: list[io.GenerateReq]) -> None:
        loop = asyncio.get_running_loop()
        for msg in reqs:
            self.routed["requests"] += 1
            self.tasks[msg.rid] = loop.create_task(self._serve(msg))

    def send_abort(self, rid: str) -> None:
        t = self.tasks.pop(rid, None)
        if t is not None and not t.done():
            t.cancel()

    def unavailable(self) -> str | None:
        """The router cannot serve while no prefill or no decode instance is reachable."""
        if not any(i.healthy for i in self.pool.prefill):
            return "No prefill instance is reachable."
        if not any(i.healthy for i in self.pool.decode):
            return "No decode instance is reachable."
        return None

    def internal_state(self) -> dict:
        return {"routed": dict(self.routed), "num_running_reqs": sum(i.running for i in self.pool.decode),
                "num_queue_reqs": sum(i.queue for i in self.pool.prefill),
                "instances": [asdict(i) for i in self.pool.all]}

    async def aclose(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
        for t in list(self.tasks.values()):
            t.cancel()
        if self.http is not None:
            await self.http.aclose()

    # ---- dispatch ------------------------------------------------------------------------------

    def _background_task(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def _serve(self, msg: io.GenerateReq) -> None:
        rid, ids, params = msg.rid, msg.input_ids, msg.params
        pre = None
        tried: set[str] = set()
        delivered = [False]
        last = ""
        try:
            for attempt in range(1, self.config.max_attempts + 1):
                if pre is None:
                    pre = await self._prefill(rid, attempt, ids, params)
                dec = self.pool.pick_decode(len(ids) + 1, tried)
                if dec is None:
                    why = f" (last error: {last})." if last else "."
                    raise APIError(503, "No decode instance is available" + why)
                tried.add(dec.url)
                try:
                    await self._decode(dec, rid, attempt, ids, params, pre, delivered)
                    pre = None  # consumed by the decode instance
                    return
                except _Retry as e:
                    last = e.message
                    if delivered[0]:
                        raise APIError(502, f"The decode instance {dec.url} failed mid-stream: {e.message}") from None
                    self.routed["retries"] += 1
                    logger.warning("request %s: decode at %s failed (%s); retrying", rid, dec.url, e.message)
                    if e.reprefill:
                        self.routed["reprefills"] += 1
                        self._release(pre)
                        pre = None
            raise APIError(503, f"The request failed on {len(tried)} decode instance(s): {last}")
        except APIError as e:
            self.routed["failed"] += 1
            self._fail(rid, e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - never leave a client hanging
            logger.exception("routing %s failed", rid)
            self.routed["failed"] += 1
            self._fail(rid, APIError(500, f"Router error: {type(e).__name__}: {e}"))
        finally:
            if pre is not None:
                self._release(pre)  # given up or cancelled: the prefill need not wait for its timeout
            self.tasks.pop(rid, None)
            self.tm._settled(rid)  # the final word on a request the client left: its rid is free again

    async def _prefill(self, rid: str, attempt: int, ids: list[int], params: dict) -> dict:
        tried: set[str] = set()
        last = ""
        body = {"rid": f"{rid}.p{attempt}", "input_ids": ids, "sampling_params": params}
        timeout = httpx.Timeout(self.config.prefill_timeout_s, connect=CONNECT_TIMEOUT_S)
        while True:
            inst = self.pool.pick_prefill(tried)
            if inst is None:
                raise APIError(503, "No prefill instance is available" + (f" (last error: {last})." if last else "."))
            tried.add(inst.url)
            inst.inflight += 1
            inst.requests += 1
            try:
                r = await self.http.post(inst.url + "/disagg/prefill", json=body, timeout=timeout)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as e:
                self.pool.mark_down(inst, e)
                last = f"{inst.url}: {type(e).__name__}: {e}"
                continue
            except httpx.TimeoutException as e:
                inst.failures += 1
                last = f"{inst.url}: timed out ({type(e).__name__})"
                continue
            finally:
                inst.inflight -= 1
            if r.status_code == 200:
                out = r.json()
                out["instance"] = inst.url
                return out
            err = _error_of(r)
            if r.status_code in (429, 502, 503):  # overloaded, draining or dying: another may serve it
                last = f"{inst.url}: {err.message}"
                continue
            raise err

    async def _decode(self, dec: Instance, rid: str, attempt: int, ids: list[int], params: dict, pre: dict,
                      delivered: list) -> None:
        body = {"rid": f"{rid}.d{attempt}", "input_ids": ids, "sampling_params": params,
                "first_token": pre["first_token"], "first_logprob": pre["first_logprob"], "seed": pre["seed"],
                "kv": pre["kv"], "cached_tokens": pre.get("cached_tokens", 0)}
        timeout = httpx.Timeout(self.config.decode_timeout_s, connect=CONNECT_TIMEOUT_S)
        dec.inflight += 1
        dec.requests += 1
        dec.sent_tokens += len(ids) + 1
        finished = False
        try:
            async with self.http.stream("POST", dec.url + "/disagg/decode", json=body, timeout=timeout) as r:
                if r.status_code != 200:
                    await r.aread()
                    err = _error_of(r)
                    if r.status_code == 410:
                        raise _Retry(err.message, reprefill=True)
                    if r.status_code >= 500 or r.status_code == 429:
                        raise _Retry(f"{dec.url}: HTTP {r.status_code}: {err.message}")
                    raise err
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    obj = orjson.loads(data)
                    if "error" in obj:
                        raise _Retry(f"{dec.url}: {obj['error'].get('message')}")
                    self._deliver(rid, obj)
                    delivered[0] = True
                    finished = bool(obj.get("finished"))
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            self.pool.mark_down(dec, e)
            raise _Retry(f"cannot connect to {dec.url}: {e}") from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as e:
            self.pool.mark_down(dec, e)
            raise _Retry(f"lost the connection to {dec.url}: {type(e).__name__}: {e}") from None
        except httpx.TimeoutException as e:
            dec.failures += 1
            raise _Retry(f"{dec.url} timed out ({type(e).__name__})") from None
        finally:
            dec.inflight -= 1
        if not finished:
            raise _Retry(f"the stream from {dec.url} ended before the request finished")

    def _deliver(self, rid: str, obj: dict) -> None:
        lps = msgspec.convert(obj.get("logprobs") or [], list[io.TokenLogprob])
        out = io.StrOut(rid, obj.get("text", ""), list(obj.get("ids") or []), lps or None, bool(obj.get("finished")),
                        obj.get("finish_reason"), int(obj.get("prompt_tokens") or 0),
                        int(obj.get("completion_tokens") or 0), int(obj.get("cached_tokens") or 0))
        self.tm._on_outputs(io.BatchStrOut([out]))

    def _fail(self, rid: str, err: APIError) -> None:
        self.tm.fail_request(rid, err)

    def _release(self, pre: dict | None) -> None:
        if not pre or not pre.get("kv"):
            return
        url, tid = pre["instance"], pre["kv"]["transfer_id"]

        async def go():
            try:
                await self.http.post(url + "/disagg/release", json={"rid": tid}, timeout=RELEASE_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - best effort: the prefill's timeout frees it anyway
                logger.debug("release of %s at %s failed: %s", tid, url, e)

        self._background_task(go())

    # ---- polling -------------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.gather(*(self._poll_one(i) for i in self.pool.all), return_exceptions=True)
            await asyncio.sleep(self.config.health_interval_s)

    async def _poll_one(self, inst: Instance) -> None:
        t0 = time.monotonic()
        try:
            r = await self.http.get(inst.url + "/get_server_info", timeout=max(2.0, 2 * self.config.health_interval_s))
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}")
            st = (r.json().get("internal_states") or [{}])[0]
            problem = st.get("dead") or st.get("draining") or (None if st.get("ready", True) else "starting")
            if problem:
                raise RuntimeError(problem)
        except Exception as e:  # noqa: BLE001
            if inst.healthy:
                logger.warning("%s instance %s is unhealthy: %s", inst.role, inst.url, e or type(e).__name__)
            inst.healthy = False
            inst.last_error = str(e) or type(e).__name__
            return
        if not inst.healthy:
            logger.info("%s instance %s is healthy again (%.0f ms)", inst.role, inst.url,
                        (time.monotonic() - t0) * 1e3)
        inst.healthy = True
        inst.queue = int(st.get("num_queue_reqs") or 0)
        inst.running = int(st.get("num_running_reqs") or 0)
        if st.get("kv_free_slots") is not None:
            inst.kv_free = int(st["kv_free_slots"])
            inst.kv_total = int(st.get("kv_total_slots") or inst.kv_total)
        inst.sent_tokens = 0
