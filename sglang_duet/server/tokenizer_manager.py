"""TokenizerManager (main process): validate, tokenize, send to the scheduler, stream results back.

Everything a client can get wrong is checked here, before the scheduler sees it (the scheduler
checks again and answers ReqError if something slips through). Per request it keeps a small state
that the receive loop fills from the detokenizer's BatchStrOut messages; handlers consume it through
`RequestGroup.next()`, which returns `Delta`s. Leaving early (client gone, handler
cancelled) must abort the request so the scheduler frees its KV slots: see RequestGroup.

A streaming response may instead take its request's running outputs as they arrive
(`RequestGroup.push_to`): the receive loop hands them to the response's sink, which renders and
writes them at once, without waking the handler's task (at 1000 streams that wake-up per event was
about half of the main process's Python time); the final output, errors, and whatever the sink
declines still go through `next()`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Annotated, Callable

import msgspec

from sglang_duet.model_loader.serving_config import read_sampling_defaults
from sglang_duet.constrained import grammar
from sglang_duet.sampling_params import SamplingParams, SamplingParamsError
from sglang_duet.server import io_struct as io
from sglang_duet.server.errors import APIError, sampling_error
from sglang_duet.server.input_processor import InputProcessor
from sglang_duet.server.metrics import ServerMetrics
from sglang_duet.server.scheduler_backend import SchedulerBackend

logger = logging.getLogger("sglang_duet.server")

DISCONNECT_CHECK_S = 0.5  # how often a waiting non-streaming handler checks for a gone client
MAX_ABORTING = 100_000
MAX_SEQS_PER_REQUEST = 4096  # prompts x n of one HTTP request: one small body must not queue 10^5 requests
PARAMS_CACHE_SIZE = 1024  # distinct sampling-params dicts kept built (make_params)


class Delta(msgspec.Struct, gc=False):
    """What arrived for one request since the handler last looked (a Struct, not a slots dataclass:
    built in C, a few times cheaper; one per request per event)."""

    text: str
    ids: list[int]
    logprobs: list[io.TokenLogprob]
    finished: bool
    finish_reason: dict | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class ReqState(msgspec.Struct):
    """One request's state in the main process (a Struct: built in C, one per admitted request)."""

    rid: str
    prompt_tokens: int
    created: float
    pending: list[io.StrOut] = msgspec.field(default_factory=list)
    finished: bool = False
    error: APIError | None = None
    event: asyncio.Event | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    # RequestGroup.push_to: takes the running outputs that arrive while nothing is pending and
    # returns whether it handled them (rendered and written); if not, they stay pending for next()
    sink: Callable[[list[io.StrOut]], bool] | None = None


class TokenizerManager:
    def __init__(self, server_args, info: io.ReadyInfo, backend: SchedulerBackend, tokenizer=None):
        """`tokenizer`: info.tokenizer_dir's tokenizer, already loaded (the launcher's warm-up); else loaded here."""
        self.args = server_args
        self.info = info
        # Where requests go and outputs come from (server/scheduler_backend.py): this server's
        # scheduler process by default; the entrypoint may plug in another (ServerHooks).
        self.backend = backend
        self.tokenizer = tokenizer if info.tokenizer_dir else None
        if info.tokenizer_dir and tokenizer is None:
            from sglang_duet.model_loader.tokenizer_cache import load_saved_tokenizer

            self.tokenizer = load_saved_tokenizer(info.tokenizer_dir)
        self.chat_template = info.chat_template
        self.context_length = info.context_length
        self.vocab_size = info.vocab_size
        # check_ids' fast path: what msgspec accepts as this model's token ids
        self._ids_type = list[Annotated[int, msgspec.Meta(ge=0, lt=self.vocab_size)]] if self.vocab_size > 0 else None
        self.served_model_name = server_args.served_model_name or _default_name(server_args, info)
        self.metrics = ServerMetrics(self.served_model_name)
        self.states: dict[str, ReqState] = {}
        self.stats: io.SchedulerStats | None = None
        self._dead: str | None = None  # why the server can no longer serve (a child died): see `dead`
        self.draining: str | None = None  # why new requests are refused while in-flight ones finish
        self.ready = False  # warm-up request went through
        # rid -> time: aborted here, the scheduler's final word on it not yet in. While listed, the
        # rid cannot be reused: a new request with it would receive the old one's outputs.
        self._aborting: dict[str, float] = {}
        # Outcome of every request sent to the scheduler (one each; see docs/reliability.md).
        self.counts = {"submitted": 0, "finished": 0, "failed": 0, "aborted": 0}
        self.pushed = 0  # events of running requests taken by a stream's sink (push_to), not next()
        self._to_push: list[ReqState] = []  # states whose sink gets their pending outputs (_push_outputs)
        # Tokenizing and chat templating: size-checked first, big inputs on a worker thread.
        self.inputs = InputProcessor(self.tokenizer, self.chat_template, self.context_length)
        # Structured output: grammars are compiled (and cached per spec) on the input worker thread, so
        # a bad one is a 400 before the request reaches the scheduler (which compiles its own copy).
        self.grammars = None
        if self.tokenizer is not None and grammar.available():
            self.grammars = grammar.GrammarCompiler(self.tokenizer, self.vocab_size)
        self.last_heard = time.monotonic()  # last message from the scheduler (via the detokenizer)
        self.log_requests = bool(getattr(server_args, "log_requests", False))
        # generation_config.json's sampling defaults, for OpenAI requests that set none (SGLang's way)
        self.sampling_defaults = read_sampling_defaults(info.model_path)
        self._params_cache: dict[tuple, SamplingParams] = {}  # see make_params
        self._watched: set[RequestGroup] = set()  # groups waiting that check their client (_tick wakes them)
        self._ticking = False

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.backend.start(self)

    def close(self) -> None:
        self.inputs.close()
        self.backend.close()

    @property
    def dead(self) -> str | None:
        """Why no request can be served: a child died (set here, for good), or the backend has
        nobody to send to now (the PD router's instances all down)."""
        return self._dead or self.backend.unavailable()

    @dead.setter
    def dead(self, message: str | None) -> None:
        self._dead = message

    def fail_all(self, message: str, *, dead: bool = True) -> None:
        """Every in-flight request ends with an error (a child died, or the shutdown grace ran out)."""
        if dead:
            self.dead = message
        for st in list(self.states.values()):
            if not st.finished:
                st.error = APIError(503, message)
                st.finished = True
                st.event.set()

    def start_draining(self, message: str = "The server is shutting down.") -> None:
        """SIGTERM: refuse new requests (503) and let /health say so; in-flight ones go on."""
        self.draining = message

    # ---- input validation ------------------------------------------------------------------

    def tokenize(self, text: str, param: str = "text") -> list[int]:
        return self.inputs.tokenize(text, param)

    async def tokenize_async(self, text: str, param: str = "text") -> list[int]:
        return await self.inputs.tokenize_async(text, param)

    async def tokenize_many_async(self, texts: list[str], param: str = "text") -> list[list[int]]:
        return await self.inputs.tokenize_many_async(texts, param)

    async def apply_chat_template_async(self, messages: list[dict], template_kwargs: dict | None = None,
                                        continue_final_message: bool = False) -> list[int]:
        return await self.inputs.apply_chat_template_async(messages, template_kwargs, continue_final_message)

    def make_params(self, d: dict) -> SamplingParams:
        """The request's SamplingParams, verified. Most requests of a workload send the same few
        dicts of scalars: those are built once and shared (the object is never changed after this;
        a request's copy for the scheduler is its to_dict()). The key holds each value's type, so
        True/1/1.0 (equal and equally hashed) do not share an entry; dicts holding lists (stop
        strings, ...) are built each time. Only valid params are kept."""
        try:
            key = tuple([(k, v.__class__, v) for k, v in d.items()])
            hash(key)
        except TypeError:
            key = None
        else:
            p = self._params_cache.get(key)
            if p is not None:
                return p
        try:
            p = SamplingParams.from_dict(d)
            p.verify(self.vocab_size)
        except (SamplingParamsError, TypeError) as e:
            raise sampling_error(e) from e
        if key is not None:
            if len(self._params_cache) >= PARAMS_CACHE_SIZE:
                self._params_cache.clear()
            self._params_cache[key] = p
        return p

    async def check_grammars(self, params: list[SamplingParams], names: dict[str, str] | None = None) -> None:
        """Compile each distinct grammar of a request's params off the event loop; a grammar that does
        not compile is a 400 naming the field (`names`: field -> the request field it came from)."""
        if self.grammars is None:
            return  # the scheduler refuses grammar requests with the reason
        specs = {s for s in (grammar.grammar_spec(p) for p in params) if s is not None}
        for kind, spec in specs:
            try:
                await self.inputs.run_off_loop(self.grammars.compile, kind, spec)
            except grammar.GrammarError as e:
                field = (names or {}).get(kind, kind)
                msg = str(e) if field == kind else f"{field}: {e}"
                raise APIError(400, msg, param=field) from None

    def check_ids(self, ids, param: str = "input_ids") -> None:
        """Token ids from a client: a list of ints inside the vocabulary (types first, then range)."""
        if not isinstance(ids, list):
            raise APIError(400, f"{param} must be a list of token ids, got {type(ids).__name__}.", param=param)
        if self._ids_type is not None:
            try:
                # The usual case in C (msgspec: ints, no bools, in range): ~14 us for 1024 ids, the
                # loop below ~110 us. The loop runs only to name what is wrong.
                msgspec.convert(ids, self._ids_type)
                return
            except msgspec.ValidationError:
                pass
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int):
                raise APIError(400, f"{param}[{i}] must be an integer token id, got {t!r}.", param=param)
            if not 0 <= t < self.vocab_size:
                raise APIError(400, f"Token id {t} is outside the vocabulary [0, {self.vocab_size}).", param=param)

    def check_fits(self, n_input: int, max_tokens, param: str = "max_tokens") -> None:
        """A limit the client set must leave room: input + max_tokens within the context and the KV pool."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or n_input >= self.context_length:
            return  # a type error (SamplingParams says so) or an input too long (check_input says so)
        total = n_input + max_tokens
        for limit, what in ((self.context_length, "the model's context length"),
                            (self.info.kv_slots - 1 if self.info.kv_slots else None, "the KV cache")):
            if limit is not None and total > limit:
                raise APIError(400, f"{param} ({max_tokens}) plus the input ({n_input} tokens) is {total} tokens, "
                                    f"more than {what} ({limit} tokens); at most {max(0, limit - n_input)} "
                                    f"new tokens fit.", param=param, code="context_length_exceeded")

    def check_input(self, ids: list[int]) -> None:
        n = len(ids)
        if n == 0:
            raise APIError(400, "The prompt is empty.", param="prompt")
        self.check_ids(ids)
        if n >= self.context_length:
            raise APIError(400, f"The input ({n} tokens) is longer than the model's context length "
                                f"({self.context_length} tokens).", code="context_length_exceeded")
        if self.info.kv_slots and n + 1 > self.info.kv_slots - 1:
            raise APIError(400, f"The input ({n} tokens) does not fit in the KV cache "
                                f"({self.info.kv_slots - 1} tokens).")

    # ---- requests --------------------------------------------------------------------------

    def new_rid(self) -> str:
        return random_id()

    def submit(self, reqs: list[tuple[str, list[int], SamplingParams]], request=None) -> "RequestGroup":
        """Send requests that are answered together (n choices, a batch); all are validated first,
        so a bad one sends none. `request` (starlette) lets waits notice a client that hung up."""
        if self.dead:
            raise APIError(503, self.dead)
        if self.draining:
            raise APIError(503, self.draining)
        if len(reqs) > MAX_SEQS_PER_REQUEST:
            raise APIError(400, f"One request may ask for at most {MAX_SEQS_PER_REQUEST} sequences (prompts x n), "
                                f"got {len(reqs)}.")
        seen = set()
        for rid, ids, _ in reqs:
            if rid in self.states or rid in seen or rid in self._aborting:
                raise APIError(400, f"Duplicate request id {rid!r}.", param="rid")
            seen.add(rid)
            self.check_input(ids)
        now = time.monotonic()
        # max_new_tokens=0 is SGLang's request for an empty completion: nothing is generated or
        # billed, so the scheduler never sees it.
        try:
            self.backend.send_generate([io.GenerateReq(rid, ids, params.to_dict(), now)
                                        for rid, ids, params in reqs if params.max_new_tokens != 0])
        except OverflowError:  # an integer parameter beyond 64 bits (top_k=10**30, ...): none was sent
            raise APIError(400, "An integer sampling parameter is out of range.") from None
        event = asyncio.Event()  # shared: one wake-up for whichever request of the group has news
        states = []
        for rid, ids, params in reqs:
            st = ReqState(rid, len(ids), now, event=event)
            self.states[rid] = st
            states.append(st)
            self.counts["submitted"] += 1
            if params.max_new_tokens == 0:
                st.finished, st.finish_time = True, now
                st.pending.append(io.StrOut(rid, "", [], None, True, {"type": "length", "length": 0}, len(ids), 0, 0))
                event.set()
        return RequestGroup(self, states, request)

    def abort_request(self, rid: str | None = None, abort_all: bool = False) -> list[str]:
        """/abort_request: end running requests as if their clients had asked (finish reason abort);
        their handlers get the scheduler's final word like any other. Returns the rids aborted."""
        rids = [r for r, st in self.states.items() if not st.finished and (abort_all or r == rid)]
        if not self._dead:
            for r in rids:
                self.backend.send_abort(r)
        return rids

    def abort(self, rid: str) -> None:
        """Forget a request; if it is still running, tell the scheduler to free its KV. Idempotent."""
        st = self.states.pop(rid, None)
        if st is None:
            return
        if self.log_requests:
            outcome = "aborted" if not st.finished else ("failed: " + st.error.message if st.error else "finished")
            logger.info("request %s %s: %d prompt tokens, %.3f s", rid, outcome, st.prompt_tokens,
                        time.monotonic() - st.created)
        if not st.finished:
            self.counts["aborted"] += 1
            if len(self._aborting) >= MAX_ABORTING:  # never expected; bounded memory if it happens
                logger.warning("%d aborted requests without a final word from the scheduler; forgetting them",
                               len(self._aborting))
                self._aborting.clear()
            self._aborting[rid] = time.monotonic()
            if not self._dead:
                self.backend.send_abort(rid)
        elif st.error is not None:
            self.counts["failed"] += 1
        else:
            self.counts["finished"] += 1

    def flush_cache(self) -> bool:
        """/flush_cache: empty the scheduler's prefix cache; refused (False) while requests run."""
        if any(not st.finished for st in self.states.values()):
            return False
        if not self._dead:
            self.backend.send_flush_cache()
        return True

    def fail_request(self, rid: str, error: APIError) -> None:
        """The backend's word that a request ended with an error (its handler raises it)."""
        st = self.states.get(rid)
        if st is not None and not st.finished:
            st.error = error
            st.finished = True
            st.event.set()

    def _settled(self, rid: str) -> None:
        """The scheduler's final word on an aborted request arrived: its rid may be used again."""
        self._aborting.pop(rid, None)

    # ---- receive loop ----------------------------------------------------------------------

    def _handle_message(self, data: bytes) -> None:
        """One encoded message from the backend (see scheduler_backend.py)."""
        self.last_heard = time.monotonic()  # the --watchdog-timeout's evidence that the pipeline is alive
        try:
            msg = io.decode(data)
            if isinstance(msg, io.BatchStrOut):
                self._on_outputs(msg)
            elif isinstance(msg, io.SchedulerStats):
                self.stats = msg
                self.metrics.on_stats(msg)
            elif isinstance(msg, io.ReqError):
                self._settled(msg.rid)
                st = self.states.get(msg.rid)
                if st is not None and not st.finished:
                    st.error = APIError(msg.status, msg.message)
                    st.finished = True
                    st.event.set()
        except msgspec.DecodeError as e:
            logger.error("dropping an undecodable message: %s", e)
        except Exception:  # noqa: BLE001 - keep serving the other requests
            logger.exception("error handling a message from the detokenizer")

    def _on_outputs(self, batch: io.BatchStrOut) -> None:
        """O(outputs in the message): each goes to its request's state, whose handler is woken, or
        whose sink will take it (`_push_outputs`)."""
        now = time.monotonic()
        states, metrics = self.states, self.metrics
        tokens = 0
        push = self._to_push
        for o in batch.outs:
            st = states.get(o.rid)
            if st is None or st.finished:
                if o.finished:
                    self._aborting.pop(o.rid, None)  # the scheduler's final word on an aborted request
                continue  # aborted by us; the scheduler's final word on it is not needed
            n = len(o.new_ids)
            if n:
                tokens += n
                if st.first_token_time is None:
                    st.first_token_time = now
                    metrics.on_first_token(now - st.created)
                else:
                    metrics.on_itl(now - st.last_token_time, n)
                st.last_token_time = now
            if o.finished:
                st.finished = True
                st.finish_time = now
                metrics.on_finish(o.prompt_tokens, now - st.created)
            elif st.sink is not None:
                # Pending empty: nothing waits for the handler, so the sink may take this output (and
                # those that join it before the push) without reordering anything. Pending not
                # empty: it is listed already, or its handler is woken and takes this one too.
                if not st.pending:
                    if not push:
                        asyncio.get_running_loop().call_soon(self._push_outputs)
                    push.append(st)
                st.pending.append(o)
                continue
            st.pending.append(o)
            st.event.set()
        if tokens:
            metrics.add_tokens(tokens)

    def _push_outputs(self) -> None:
        """Hand the running outputs received since the last call to their streams' sinks: once per
        event-loop iteration, after every message the reader callback handled, so a stream behind
        by several messages gets one event for all of them (one write, not one per message)."""
        push, self._to_push = self._to_push, []
        for st in push:
            # finished meanwhile (its final output came in a later message, or it failed), its
            # stream gone (sink removed), or the sink cannot write now: the handler takes it all
            if st.finished or st.sink is None or not st.pending or not st.sink(st.pending):
                st.event.set()
            else:
                st.pending = []
                self.pushed += 1

    def _watch(self, group: "RequestGroup") -> None:
        """`group` waits for news and must check its client meanwhile: wake it every
        DISCONNECT_CHECK_S until it stops waiting (RequestGroup._wait)."""
        self._watched.add(group)
        if not self._ticking:
            self._ticking = True
            asyncio.get_running_loop().call_later(DISCONNECT_CHECK_S, self._tick)

    def _tick(self) -> None:
        if not self._watched:
            self._ticking = False
            return
        for g in self._watched:
            g._event.set()
        asyncio.get_running_loop().call_later(DISCONNECT_CHECK_S, self._tick)

    # ---- introspection ---------------------------------------------------------------------

    def internal_state(self) -> dict:
        s = self.stats
        out = {"num_inflight_http_requests": len(self.states), "ready": self.ready, "dead": self.dead,
               "draining": self.draining, "num_aborting": len(self._aborting),
               "requests": dict(self.counts), "num_outputs_pushed": self.pushed}
        if s is not None:
            out.update(num_running_reqs=s.num_running, num_queue_reqs=s.num_waiting,
                       num_inflight_launches=s.num_inflight_launches, kv_used_slots=s.kv_used,
                       kv_free_slots=s.kv_free, kv_total_slots=s.kv_total,
                       token_usage=s.kv_used / s.kv_total if s.kv_total else 0.0, launches=s.launches,
                       plans=s.plans, last_sms=s.last_sms, finished=s.finished, aborted=s.aborted,
                       retractions=s.retractions, submitted=s.submitted, rejected=s.rejected,
                       peak_running=s.peak_running, peak_waiting=s.peak_waiting, critical_path=s.critical_path,
                       stats_age_s=time.monotonic() - s.time)
        out.update(self.backend.internal_state())
        return out


class RequestGroup:
    """Requests answered together. `next()` returns [(index, Delta)] as news arrives, None when all
    are finished; `close()` (always call it, e.g. in `finally`) aborts whatever still runs. Plain
    methods, not an async generator: closing must work synchronously from a cancelled handler."""

    def __init__(self, tm: TokenizerManager, states: list[ReqState], request=None):
        self.tm = tm
        self.states = states
        # While set, waits poll it for a client that hung up. Streaming handlers clear it once the
        # response starts: starlette then watches for the disconnect itself.
        self.request = request
        self._remaining = list(range(len(states)))
        self._event = states[0].event
        self._last_check = time.monotonic()

    @property
    def rids(self) -> list[str]:
        return [st.rid for st in self.states]

    def push_to(self, sink: Callable[[list[tuple[int, Delta]]], bool] | None) -> bool:
        """Let `sink` take this single request's running outputs as they arrive, in the shape next()
        returns ([(0, Delta)], never a finished one); it returns False to leave them to next() (it
        cannot write now). None stops it. Only a group of one request (False otherwise): a group's
        events of one step stay in index order through next()."""
        if len(self.states) != 1:
            return False
        st = self.states[0]
        st.sink = None if sink is None else (lambda outs: sink([(0, _merge(outs))]))
        return True

    async def next(self) -> list[tuple[int, Delta]] | None:
        states = self.states
        while self._remaining:
            if not self._news():
                await self._wait()
            self._event.clear()
            batch = []
            ended = None
            for i in self._remaining:
                st = states[i]
                if st.error is not None:
                    raise st.error
                if st.pending:
                    outs, st.pending = st.pending, []
                    d = _merge(outs)
                    batch.append((i, d))
                    if d.finished:
                        ended = (ended or set()) | {i}
            if ended:
                self._remaining = [i for i in self._remaining if i not in ended]
            if batch:
                return batch
        return None

    def _news(self) -> bool:
        states = self.states
        for i in self._remaining:
            st = states[i]
            if st.pending or st.error is not None:
                return True
        return False

    async def _wait(self) -> None:
        if self.request is None:
            await self._event.wait()
            return
        # Check by elapsed time, not only when nothing arrives: a request that keeps producing
        # tokens must notice its client hung up too.
        now = time.monotonic()
        if now - self._last_check >= DISCONNECT_CHECK_S:
            self._last_check = now
            if await self.request.is_disconnected():
                raise APIError(499, "Client disconnected.")
        # Woken by news or by the manager's disconnect tick (every DISCONNECT_CHECK_S, for every
        # group waiting here): next() then finds nothing and comes back, and the check above runs
        # once its time is due. One timer for all waiting groups, not a timeout per wait (each one
        # a TimerHandle and its cancellation: ~3% of the main process's CPU per admitted request).
        self.tm._watch(self)
        try:
            await self._event.wait()
        finally:
            self.tm._watched.discard(self)

    def close(self) -> None:
        for st in self.states:
            self.tm.abort(st.rid)


_UUID4_CLEAR = ~(0xF000 << 64) & ~(0xC000 << 48)
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def random_id() -> str:
    """`uuid.uuid4().hex`, the same 32 hex digits (version 4, RFC 4122 variant), at a third of its
    cost (UUID's constructor checks are most of it)."""
    return "%032x" % (int.from_bytes(os.urandom(16)) & _UUID4_CLEAR | _UUID4_SET)


def _merge(outs: list[io.StrOut]) -> Delta:
    last = outs[-1]
    if len(outs) == 1:
        return Delta(last.text, last.new_ids, last.logprobs or [], last.finished, last.finish_reason,
                     last.prompt_tokens, last.completion_tokens, last.cached_tokens)
    ids, lps = [], []
    for o in outs:
        ids.extend(o.new_ids)
        if o.logprobs:
            lps.extend(o.logprobs)
    return Delta("".join(o.text for o in outs), ids, lps, last.finished, last.finish_reason, last.prompt_tokens,
                 last.completion_tokens, last.cached_tokens)


def _default_name(args, info: io.ReadyInfo) -> str:
    if args.model_path:
        return args.model_path.rstrip("/")
    if args.load_format != "dummy" and args.executor == "model":
        from sglang_duet.model_loader.embedded import GGUF_FILENAME

        return GGUF_FILENAME.split(".")[0]  # the embedded default: "SmolLM2-135M-Instruct"
    return info.model_name or (os.path.basename(info.model_path or "") or "default")
