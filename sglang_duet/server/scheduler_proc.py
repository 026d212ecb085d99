"""The scheduler process: EngineCore in a loop between two ZMQ sockets.

Loop: drain requests/aborts without blocking, step the engine, push token updates to the
detokenizer; when idle, block on the input socket (no busy-waiting on a shared CPU). Nothing a
client sends may kill this loop: admission errors go back as ReqError. An exception from the engine
itself is a bug: the process exits non-zero and the main process reports it.

All of a step's updates go to the detokenizer as one BatchTokenOut. With `--stream-interval N` a
running request's tokens are held back here until N of them are ready (its first token and its
end go at once), so the detokenizer and the main process see one output per N tokens.

The executor is wrapped in a `DeviceTimer`, which times the host's share of the critical path:
from the end of a launch that left the device idle while requests were running to the start of
the next launch (stats `critical_path`, read by benchmark/host_overhead.py).
"""
from __future__ import annotations

import bisect
import logging
import os
import sys
import time

import msgspec
import zmq

from sglang_duet.server import io_struct as io
from sglang_duet.server.ipc import (
    IPCPaths, decode_or_drop, error_text, parent_alive, pull_socket, push_socket, send_ready, setup_child, tune_gc,
)

logger = logging.getLogger("sglang_duet.scheduler")

STATS_INTERVAL_S = 0.5
PROMPT_CONTEXT = 5  # prompt tokens the detokenizer decodes in front of the output
STEP_WAIT_S = 0.002  # how long step() may wait for a busy lane when no input is pending


# Tests of --watchdog-timeout: a request with this rid makes the loop hang while the process lives.
_TEST_HANG_RID = os.environ.get("SGLANG_DUET_TEST_HANG_RID") or None


def _hang(rid: str) -> None:
    logger.warning("test hook SGLANG_DUET_TEST_HANG_RID: the scheduler loop hangs on request %s", rid)
    while True:
        time.sleep(60)


def run_scheduler_process(args_bytes: bytes, paths: IPCPaths, conn, scheduler_class: type | None = None) -> None:
    """`scheduler_class`: a SchedulerProcess subclass from the launcher's hooks (server/hooks.py)."""
    from sglang_duet.server_args import ServerArgs

    args = msgspec.msgpack.decode(args_bytes, type=ServerArgs)
    setup_child("scheduler", args.log_level, paths.root)
    _cpu_threads()
    try:
        sched = (scheduler_class or SchedulerProcess)(args, paths)
        send_ready(conn, sched.ready_info())
    except Exception as e:  # noqa: BLE001 - report any startup failure to the main process
        send_ready(conn, io.ReadyInfo(status="error", error=error_text(e)))
        sys.exit(1)
    conn.close()
    tune_gc()
    _timer_slack()
    try:
        sched.loop()
    except SystemExit:
        pass
    except BaseException:
        logger.exception("scheduler loop crashed")
        sys.exit(1)
    finally:
        sched.close()


def _timer_slack() -> None:
    """Linux: wake from sleeps within 1 us of the deadline instead of the default 50 us (the loop
    sleeps until a launch ends, and that wake-up is on the critical path of every step)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(29, 1000)  # PR_SET_TIMERSLACK, in ns
    except (OSError, AttributeError):
        pass


def _cpu_threads() -> None:
    """Leave one core to the HTTP and detokenizer processes when the model runs on the CPU.

    torch's default (all cores) makes the forward pass fight the other two processes for them:
    on 2 cores that was ~6x slower than one thread. OMP_NUM_THREADS, when set, wins.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))


def _follower_died(rank: int, exitcode) -> None:
    """A tensor-parallel rank died: this rank cannot run another step. Exit at once (from the watcher
    thread, whatever the loop is doing) so the launcher fails every in-flight request and exits
    non-zero; waiting for the next collective to fail would leave an idle server half dead."""
    logger.error("tensor-parallel rank %d died (exit code %s): the scheduler exits", rank, exitcode)
    logging.shutdown()
    os._exit(1)


class SchedulerProcess:
    def __init__(self, args, paths: IPCPaths):
        from sglang_duet.constrained.grammar import install_grammars
        from sglang_duet.engine_core import EngineCore

        self.args = args
        self.paths = paths
        # This process only decodes (stop strings): no transformers tokenizer where the loader has a
        # decode snapshot (model_loader/decode_tokenizer.py); importing transformers cost ~1.5 s of CPU.
        self.engine = EngineCore(args, tokenizer_decode_only=True)
        if self.engine.tp_driver is not None:
            self.engine.tp_driver.on_follower_death = _follower_died
        install_grammars(self.engine)  # structured output: a matcher per request that sets a grammar
        if getattr(args, "emulated_step_ms", None):
            from sglang_duet.cost_model.constant import install_constant_device

            install_constant_device(self.engine, args.emulated_step_ms)
        self.timer = DeviceTimer(self.engine.executor)
        self.engine.executor = self.timer
        self.stream_interval = max(1, int(getattr(args, "stream_interval", 1) or 1))
        self._held: dict[str, _Held] = {}  # rid -> tokens held back by --stream-interval
        # With an interval the core skips the updates _send_updates would hold back (a running
        # request's one token between two sends): at 1024 streams and interval 8, 7 of 8 per step.
        self._core_hold = self.engine.core.stream_hold = {} if self.stream_interval > 1 else None
        self.ctx = zmq.Context(1)
        self.recv = pull_socket(self.ctx, paths.scheduler_in)
        self.send = push_socket(self.ctx, paths.detokenizer_in)
        self._outbox: list[bytes] | None = None  # see _drain_input
        self.poller = zmq.Poller()
        self.poller.register(self.recv, zmq.POLLIN)
        self._last_stats = 0.0
        self._was_busy = False
        self.submitted = 0  # admitted requests: every one ends finished or aborted (stats.finished/aborted)
        self.rejected = 0  # answered with ReqError
        self.peak_running = self.peak_waiting = 0  # high-water marks: --max-running/queued-requests held?

    def ready_info(self) -> io.ReadyInfo:
        e = self.engine
        from sglang_duet.model_loader.decode_tokenizer import DecodeTokenizer

        tok_dir = None
        if isinstance(e.tokenizer, DecodeTokenizer):
            tok_dir = e.tokenizer.folder  # the snapshot: the transformers tokenizer it decodes as, saved
        elif e.tokenizer is not None:
            # A copy in the private dir: the main and detokenizer processes load exactly this
            # tokenizer (incl. fix-ups the loader applied to a GGUF one) without the weights.
            tok_dir = os.path.join(self.paths.root, "tokenizer")
            e.tokenizer.save_pretrained(tok_dir)
        policy = e.policy.describe()
        if getattr(e, "default_policy", None) is not None:
            policy["default"] = e.default_policy.describe()  # why an unset --policy became this one
        return io.ReadyInfo(
            status="ready", model_name=e.model_config.name or "", model_path=getattr(e, "model_dir", None),
            tokenizer_dir=tok_dir, chat_template=e.chat_template, context_length=e.context_length,
            vocab_size=e.vocab_size, kv_slots=e.kv_slots, eos_token_ids=sorted(e.eos_ids),
            policy=_jsonable(policy), executor=self.args.executor,
            device=str(getattr(e, "device", "")), max_running_requests=e.core.config.max_running_requests,
        )

    # ---- loop ------------------------------------------------------------------------------------

    def loop(self) -> None:
        progressed = True
        # An executor that runs lanes concurrently returns from submit() while the launch runs:
        # then, when a result freed a lane, the next launch goes out as soon as the result is
        # applied, and the updates are sent while it runs (off the critical path). A synchronous one (ModelExecutor) computes inside
        # submit(), so its updates go out first.
        launch_first = bool(getattr(self.timer.inner, "concurrent_lanes", False))
        while True:
            busy = self.engine.has_work()
            if busy:
                # After a step that changed nothing (e.g. every request waits for KV), wait a moment
                # for input instead of spinning a shared core at 100%.
                # While a launch runs and nothing can be planned, sleep on the input socket until
                # shortly before its result is due (new requests and aborts wake the loop at once)
                # instead of waking every STEP_WAIT_S to look.
                got = self._drain(max(self._ms_until_result(), 0 if progressed else 1))
                parts = self.timer.parts
                updates = self.engine.step(0.0 if got else STEP_WAIT_S)
                applied = self.timer.parts != parts  # a result came (its updates may all be held back)
                if (applied or updates) and launch_first and self.engine.core.can_plan() and self.engine.has_work():
                    self._drain(0)  # aborts and new requests first: they change what the next launch holds
                    updates += self.engine.step(0.0)
                core = self.engine.core
                progressed = applied or bool(updates) or bool(core.inflight)
                self.peak_running = max(self.peak_running, core.num_running)
                self.peak_waiting = max(self.peak_waiting, core.num_waiting)
                if updates:
                    self._send_updates(updates)
            else:
                self.timer.idle()  # no work: the device idling now is not the host's doing
                if self._was_busy:
                    self._send_stats()  # report the idle state at once (tests and dashboards poll it)
                wait_ms = max(1, int((self._last_stats + STATS_INTERVAL_S - time.monotonic()) * 1000))
                if not self._drain(wait_ms) and not parent_alive():
                    logger.info("main process is gone; exiting")
                    return
                # A request that arrived and was aborted in that same drain left only its final
                # update in the core, and no work: send it now, not when unrelated traffic comes.
                late = self.engine.core.take_updates()
                if late:
                    self._send_updates(late)
            self._was_busy = busy
            if time.monotonic() - self._last_stats >= STATS_INTERVAL_S:
                self._send_stats()

    def _ms_until_result(self) -> int:
        """Whole milliseconds the loop may block on its input before the executor has a result due,
        when the executor can tell (the emulated GPU's `next_completion`) and nothing can be
        planned meanwhile; 0 otherwise (then it waits in the executor's poll, STEP_WAIT_S at most)."""
        nxt = getattr(self.timer.inner, "next_completion", None)
        core = self.engine.core
        if nxt is None or not core.inflight or core.can_plan():
            return 0
        t = nxt()
        if t is None:
            return 0
        return max(0, int((t - time.monotonic()) * 1000) - 1)  # 1 ms early: the poll then waits to the event

    decode_input = staticmethod(io.decode)  # the message types this scheduler accepts

    def _drain(self, timeout_ms: int) -> int:
        """Handle every pending message; wait up to timeout_ms for the first. Returns how many."""
        if not self.poller.poll(timeout_ms):
            return 0
        return self._drain_input()

    def _drain_input(self) -> int:
        # What admitting the drained requests sends (a DetokRegister or a ReqError each) goes out
        # together at the end: one send per message would wake ZMQ's I/O thread for each of a
        # burst's requests (a third of their admission CPU, counting that thread).
        n = 0
        outer = self._outbox is not None  # called from inside a drain: the outer one sends
        if not outer:
            self._outbox = []
        try:
            while True:
                try:
                    data = self.recv.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return n
                n += 1
                msg = decode_or_drop(self.decode_input, data)
                if msg is not None:
                    self._handle(msg)
        finally:
            if not outer:
                out, self._outbox = self._outbox, None
                for data in out:
                    self.send.send(data)

    def _handle(self, msg) -> None:
        if isinstance(msg, io.GenerateReq):
            self._add(msg)
        elif isinstance(msg, io.AbortReq):
            self._abort(msg.rid)
        elif isinstance(msg, io.FlushCacheReq):
            cache = self.engine.core.prefix_cache
            flushed = cache is not None and cache.reset()
            logger.info("flush_cache: %s", "done" if flushed else "nothing flushed (no cache, or requests hold it)")
        else:
            logger.error("dropping an unexpected message %s", type(msg).__name__)

    def _abort(self, rid: str) -> None:
        self.engine.abort(rid)

    def _add(self, msg: io.GenerateReq) -> None:
        from sglang_duet.core.scheduler_core import AdmissionError
        from sglang_duet.sampling_params import SamplingParams, SamplingParamsError

        if _TEST_HANG_RID is not None and msg.rid == _TEST_HANG_RID:
            _hang(msg.rid)

        try:
            # verified once, against the vocabulary too (the errors as from_dict, then verify(vocab))
            params = SamplingParams.from_dict(msg.params, self.engine.vocab_size)
            self.engine.add_request(msg.rid, msg.input_ids, params, arrival_time=msg.arrival_time,
                                    params_verified=True)
        except (AdmissionError, SamplingParamsError) as e:
            self.rejected += 1
            self._push(io.ReqError(msg.rid, str(e), getattr(e, "status", 400)))
            return
        except Exception as e:  # noqa: BLE001 - a client's request must never take the scheduler down
            logger.exception("add_request(%s) failed", msg.rid)
            self.rejected += 1
            self._push(io.ReqError(msg.rid, f"Internal error while admitting the request: {e}", 500))
            return
        self.submitted += 1
        self._push(io.DetokRegister(
            rid=msg.rid, prompt_tail=msg.input_ids[-PROMPT_CONTEXT:], stop=list(params.stop),
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens, no_stop_trim=params.no_stop_trim,
        ))

    def _send_updates(self, updates) -> None:
        """One BatchTokenOut for all of a step's updates (none if --stream-interval holds them all),
        with one row per request: the detokenizer decodes a message's requests in one pass."""
        if self.stream_interval == 1 and updates:
            rids = [u.rid for u in updates]
            if len(set(rids)) == len(rids):  # one update per request (the usual step): columns at once
                self._push(io.BatchTokenOut(
                    rids, [u.new_token_ids for u in updates], [u.prompt_tokens for u in updates],
                    [u.completion_tokens for u in updates],
                    {i: u.finish_reason for i, u in enumerate(updates) if u.finished},
                    {i: _logprobs(u.new_logprobs) for i, u in enumerate(updates) if u.new_logprobs},
                    {i: u.cached_tokens for i, u in enumerate(updates) if u.cached_tokens}))
                return
        rids = []
        new_ids: list[list[int]] = []
        prompt: list[int] = []
        completion: list[int] = []
        finished: dict[int, dict | None] = {}
        logprobs: dict[int, list] = {}
        cached: dict[int, int] = {}
        where: dict[str, int] = {}
        interval = self.stream_interval
        held = self._held
        hold = getattr(self, "_core_hold", None)  # the core's side of the holding (see __init__)
        for u in updates:
            ids, lps = u.new_token_ids, (_logprobs(u.new_logprobs) if u.new_logprobs else None)
            if interval > 1:
                h = held.get(u.rid)
                if h is None:  # nothing sent yet: the first output goes at once (time to first token)
                    if not u.finished:
                        if not ids:
                            continue
                        out = self._output_list(u.rid) if hold is not None else None
                        held[u.rid] = h = _Held(u.completion_tokens, out)
                        if hold is not None and h.out is not None:
                            hold[u.rid] = u.completion_tokens + interval
                else:
                    if h.out is not None:  # every token since the last send, the ones the core skipped too
                        ids = h.out[h.sent:u.completion_tokens]
                    elif h.ids:
                        ids = h.ids + ids
                    if h.lps:
                        lps = h.lps + lps if lps else h.lps
                    if u.finished:
                        del held[u.rid]
                        if hold is not None:
                            hold.pop(u.rid, None)
                    elif u.completion_tokens - h.sent >= interval:
                        h.ids, h.lps, h.sent = [], None, u.completion_tokens
                        if hold is not None and h.out is not None:
                            hold[u.rid] = u.completion_tokens + interval
                    else:
                        if h.out is None:
                            h.ids = ids
                        h.lps = lps
                        continue
            at = where.get(u.rid)
            if at is None:
                at = where[u.rid] = len(rids)
                rids.append(u.rid)
                new_ids.append(ids)
                prompt.append(u.prompt_tokens)
                completion.append(u.completion_tokens)
                if lps:
                    logprobs[at] = lps
                if u.cached_tokens:
                    cached[at] = u.cached_tokens
            else:  # a second update of the request in this step (parts of a launch): one row
                new_ids[at] = new_ids[at] + ids
                if lps:
                    logprobs[at] = logprobs.get(at, []) + lps
                completion[at] = u.completion_tokens
            if u.finished:
                finished[at] = u.finish_reason
        if rids:
            self._push(io.BatchTokenOut(rids, new_ids, prompt, completion, finished, logprobs, cached))

    def _output_list(self, rid: str) -> list[int] | None:
        """The running request's own output_ids (the core appends every token to it), from which a
        held request's tokens are sent; None for a request that asked for logprobs (each token's
        update carries one: all are kept) or that the core does not hold (then updates accumulate)."""
        r = self.engine.core.requests.get(rid)
        if r is None or r.params.logprobs:
            return None
        return r.output_ids

    def _send_stats(self) -> None:
        core = self.engine.core
        s = core.stats
        free = core.kv_free  # the prefix cache's unlocked slots count as free
        self._push(io.SchedulerStats(
            time=time.monotonic(), num_running=core.num_running, num_waiting=core.num_waiting,
            num_inflight_launches=len(core.inflight), kv_used=core.kv_used, kv_free=free,
            kv_total=core.allocator.capacity, launches=dict(s.launches), plans=dict(s.plans),
            last_sms=dict(s.last_sms), finished=s.finished, aborted=s.aborted, retractions=s.retractions,
            prompt_tokens=s.prompt_tokens, generated_tokens=s.generated_tokens,
            submitted=self.submitted, rejected=self.rejected, peak_running=self.peak_running,
            peak_waiting=self.peak_waiting, critical_path=self.timer.stats(),
        ))
        self._last_stats = time.monotonic()

    def _push(self, msg) -> None:
        if self._outbox is not None:  # inside _drain_input: sent, in order, when it ends
            self._outbox.append(io.encode(msg))
        else:
            self.send.send(io.encode(msg))

    def close(self) -> None:
        try:
            self.engine.shutdown()
        finally:
            self.ctx.destroy(linger=0)


class _Held:
    """A running request's tokens not sent yet (--stream-interval), and how many were sent. `out`:
    the request's output_ids, when the tokens are read from it (then `ids` stays empty)."""

    __slots__ = ("ids", "lps", "sent", "out")

    def __init__(self, sent: int, out: list[int] | None = None):
        self.ids: list[int] = []
        self.lps: list | None = None
        self.sent = sent
        self.out = out


def _logprobs(new_logprobs) -> list | None:
    if not new_logprobs:
        return None
    return [io.TokenLogprob(int(d["token_id"]), float(d["logprob"]), [(int(t), float(lp)) for t, lp in d.get("top") or ()])
            for d in new_logprobs]


# Histogram edges (ms) of the host gaps on the critical path; the last bucket is "more".
GAP_EDGES_MS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0)


class DeviceTimer:
    """The engine's executor, plus timing of the host's share of the critical path.

    A gap starts when a launch ends (its result's `finished_at`, device time) leaving no launch in
    flight, and ends when the next launch is submitted. `wake` is the part until the executor's
    poll returned with that result; the rest is the host's work between the two (applying the
    result, sending updates, reading input, planning the next launch). `cpu` is the CPU time the
    loop's thread spent from the start of that poll to the submit: the host work itself, without
    the time spent waiting for a core on a busy machine. Gaps in which the engine had no work
    (`idle()`) are not counted.
    """

    def __init__(self, inner, clock=time.monotonic, cpu_clock=time.thread_time):
        self.inner = inner
        self.clock = clock
        self.cpu_clock = cpu_clock
        self.inflight = 0
        self._end: float | None = None  # device end of the launch that left the device idle
        self._woke = 0.0
        self._cpu0 = 0.0  # this thread's CPU time when the poll that returned that result began
        self.count = 0
        self.overlapped = 0  # launches handed over while another still ran (overlap scheduling)
        self.gap_s = 0.0
        self.wake_s = 0.0
        self.cpu_s = 0.0  # CPU time the loop's thread spent in the gaps (waiting for a core is not in it)
        self.max_gap_s = 0.0
        self.hist = [0] * (len(GAP_EDGES_MS) + 1)
        self._lane_of: dict[int, object] = {}  # launch id -> its lane, while it runs
        self._lane_end: dict[object, float] = {}  # lane -> device end of its last launch
        self.device_idle_s = 0.0  # device time between launches while the engine had work
        self.device_idle_gaps = 0  # launches that started after their lane had been idle
        self.final_results = 0  # launches reported finished (the divisor of device_idle_s)
        self.parts = 0  # result parts polled (final or not)

    def __getattr__(self, name):  # everything else is the executor's
        return getattr(self.inner, name)

    def submit(self, launch) -> None:
        now = self.clock()
        if self.inflight == 0 and self._end is not None:
            gap = max(0.0, now - self._end)
            self.count += 1
            self.gap_s += gap
            self.wake_s += max(0.0, min(self._woke, now) - self._end)
            self.cpu_s += max(0.0, self.cpu_clock() - self._cpu0)
            self.max_gap_s = max(self.max_gap_s, gap)
            self.hist[bisect.bisect_left(GAP_EDGES_MS, gap * 1e3)] += 1
        self._end = None
        self.overlapped += self.inflight > 0
        self.inflight += 1
        self._lane_of[launch.launch_id] = getattr(launch, "lane", None)
        self.inner.submit(launch)

    def poll(self, timeout=None):
        cpu0 = self.cpu_clock()
        results = self.inner.poll(timeout)
        if results:
            self.parts += len(results)
            now = self.clock()
            end = None
            for r in results:
                if getattr(r, "final", True):
                    self.inflight = max(0, self.inflight - 1)
                    fin = r.finished_at or now
                    end = fin if end is None else max(end, fin)
                    self._device_gap(r, fin)
            if end is not None and self.inflight == 0:
                self._end = min(end, now)
                self._woke = now
                self._cpu0 = cpu0
        return results

    def _device_gap(self, r, fin: float) -> None:
        lane = self._lane_of.pop(r.launch_id, None)
        self.final_results += 1
        prev = self._lane_end.get(lane)
        start = getattr(r, "started_at", 0.0) or 0.0
        if prev is not None and start > prev:
            self.device_idle_s += start - prev
            self.device_idle_gaps += 1
        self._lane_end[lane] = fin

    def idle(self) -> None:
        self._end = None
        self._lane_end.clear()

    def stats(self) -> dict:
        return {"gaps": self.count, "overlapped": self.overlapped, "gap_s": self.gap_s, "wake_s": self.wake_s, "cpu_s": self.cpu_s,
                "max_gap_s": self.max_gap_s, "device_idle_s": self.device_idle_s,
                "device_idle_gaps": self.device_idle_gaps, "final_results": self.final_results,
                "hist": list(self.hist), "edges_ms": list(GAP_EDGES_MS)}


def _jsonable(d):
    """policy.describe() may hold tuples or numpy scalars; keep what msgpack and JSON can carry."""
    try:
        msgspec.msgpack.encode(d)
        return d
    except TypeError:
        import json

        return json.loads(json.dumps(d, default=str))
