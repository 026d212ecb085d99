"""The scheduler process: EngineCore in a loop between two ZMQ sockets.

Loop: drain requests/aborts without blocking, step the engine, push token updates to the
detokenizer; when idle, block on the input socket (no busy-waiting on a shared CPU). Nothing a
client sends may kill this loop: admission errors go back as ReqError. An exception from the engine
itself is a bug: the process exits non-zero and the main process reports it.
"""
from __future__ import annotations

import logging
import os
import sys
import time

import msgspec
import zmq

from sglang_duet.server import io_struct as io
from sglang_duet.server.ipc import IPCPaths, decode_or_drop, error_text, parent_alive, pull_socket, push_socket, send_ready, setup_child

logger = logging.getLogger("sglang_duet.scheduler")

STATS_INTERVAL_S = 0.5
PROMPT_CONTEXT = 5  # prompt tokens the detokenizer decodes in front of the output
STEP_WAIT_S = 0.002  # how long step() may wait for a busy lane when no input is pending


def run_scheduler_process(args_bytes: bytes, paths: IPCPaths, conn) -> None:
    from sglang_duet.server_args import ServerArgs

    args = msgspec.msgpack.decode(args_bytes, type=ServerArgs)
    setup_child("scheduler", args.log_level, paths.root)
    _cpu_threads()
    try:
        cls = SchedulerProcess
        if args.disaggregation_mode in ("prefill", "decode"):  # disaggregation hook: sglang_duet/disagg/scheduler.py
            from sglang_duet.disagg.scheduler import scheduler_class

            cls = scheduler_class(args.disaggregation_mode)
        sched = cls(args, paths)
        send_ready(conn, sched.ready_info())
    except Exception as e:  # noqa: BLE001 - report any startup failure to the main process
        send_ready(conn, io.ReadyInfo(status="error", error=error_text(e)))
        sys.exit(1)
    conn.close()
    try:
        sched.loop()
    except SystemExit:
        pass
    except BaseException:
        logger.exception("scheduler loop crashed")
        sys.exit(1)
    finally:
        sched.close()


def _cpu_threads() -> None:
    """Leave one core to the HTTP and detokenizer processes when the model runs on the CPU.

    torch's default (all cores) makes the forward pass fight the other two processes for them:
    on 2 cores that was ~6x slower than one thread. OMP_NUM_THREADS, when set, wins.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))


class SchedulerProcess:
    def __init__(self, args, paths: IPCPaths):
        from sglang_duet.engine_core import EngineCore

        self.args = args
        self.paths = paths
        self.engine = EngineCore(args)
        self.ctx = zmq.Context(1)
        self.recv = pull_socket(self.ctx, paths.scheduler_in)
        self.send = push_socket(self.ctx, paths.detokenizer_in)
        self.poller = zmq.Poller()
        self.poller.register(self.recv, zmq.POLLIN)
        self._last_stats = 0.0
        self._was_busy = False
        self.submitted = 0  # admitted requests: every one ends finished or aborted (stats.finished/aborted)
        self.rejected = 0  # answered with ReqError
        self.peak_running = self.peak_waiting = 0  # high-water marks: --max-running/queued-requests held?

    def ready_info(self) -> io.ReadyInfo:
        e = self.engine
        tok_dir = None
        if e.tokenizer is not None:
            # A copy in the private dir: the main and detokenizer processes load exactly this
            # tokenizer (incl. fix-ups the loader applied to a GGUF one) without the weights.
            tok_dir = os.path.join(self.paths.root, "tokenizer")
            e.tokenizer.save_pretrained(tok_dir)
        return io.ReadyInfo(
            status="ready", model_name=e.model_config.name or "", model_path=getattr(e, "model_dir", None),
            tokenizer_dir=tok_dir, chat_template=e.chat_template, context_length=e.context_length,
            vocab_size=e.vocab_size, kv_slots=e.kv_slots, eos_token_ids=sorted(e.eos_ids),
            policy=_jsonable(e.policy.describe()), executor=self.args.executor,
            device=str(getattr(e, "device", "")), max_running_requests=e.core.config.max_running_requests,
        )

    # ---- loop ------------------------------------------------------------------------------------

    def loop(self) -> None:
        progressed = True
        while True:
            busy = self.engine.has_work()
            if busy:
                # After a step that changed nothing (e.g. every request waits for KV), wait a moment
                # for input instead of spinning a shared core at 100%.
                got = self._drain(0 if progressed else 1)
                updates = self.engine.step(0.0 if got else STEP_WAIT_S)
                core = self.engine.core
                progressed = bool(updates) or bool(core.inflight)
                self.peak_running = max(self.peak_running, core.num_running)
                self.peak_waiting = max(self.peak_waiting, core.num_waiting)
                if updates:
                    self._send_updates(updates)
            else:
                if self._was_busy:
                    self._send_stats()  # report the idle state at once (tests and dashboards poll it)
                wait_ms = max(1, int((self._last_stats + STATS_INTERVAL_S - time.monotonic()) * 1000))
                if not self._drain(wait_ms) and not parent_alive():
                    logger.info("main process is gone; exiting")
                    return
            self._was_busy = busy
            if time.monotonic() - self._last_stats >= STATS_INTERVAL_S:
                self._send_stats()

    decode_input = staticmethod(io.decode)  # the message types this scheduler accepts

    def _drain(self, timeout_ms: int) -> int:
        """Handle every pending message; wait up to timeout_ms for the first. Returns how many."""
        if not self.poller.poll(timeout_ms):
            return 0
        return self._drain_input()

    def _drain_input(self) -> int:
        n = 0
        while True:
            try:
                data = self.recv.recv(zmq.NOBLOCK)
            except zmq.Again:
                return n
            n += 1
            msg = decode_or_drop(self.decode_input, data)
            if msg is not None:
                self._handle(msg)

    def _handle(self, msg) -> None:
        if isinstance(msg, io.GenerateReq):
            self._add(msg)
        elif isinstance(msg, io.AbortReq):
            self._abort(msg.rid)
        else:
            logger.error("dropping an unexpected message %s", type(msg).__name__)

    def _abort(self, rid: str) -> None:
        self.engine.abort(rid)

    def _add(self, msg: io.GenerateReq) -> None:
        from sglang_duet.core.scheduler_core import AdmissionError
        from sglang_duet.sampling_params import SamplingParams, SamplingParamsError

        try:
            params = SamplingParams.from_dict(msg.params)
            self.engine.add_request(msg.rid, msg.input_ids, params, arrival_time=msg.arrival_time)
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
        outs = []
        for u in updates:
            lps = None
            if u.new_logprobs:
                lps = [io.TokenLogprob(int(d["token_id"]), float(d["logprob"]),
                                       [(int(t), float(lp)) for t, lp in d.get("top") or ()])
                       for d in u.new_logprobs]
            outs.append(io.TokenOut(u.rid, list(u.new_token_ids), lps, u.finished, u.finish_reason,
                                    u.prompt_tokens, u.completion_tokens, u.cached_tokens))
        self._push(io.BatchTokenOut(outs))

    def _send_stats(self) -> None:
        core = self.engine.core
        s = core.stats
        free = core.allocator.available
        self._push(io.SchedulerStats(
            time=time.monotonic(), num_running=core.num_running, num_waiting=core.num_waiting,
            num_inflight_launches=len(core.inflight), kv_used=core.kv_used, kv_free=free,
            kv_total=core.allocator.capacity, launches=dict(s.launches), plans=dict(s.plans),
            last_sms=dict(s.last_sms), finished=s.finished, aborted=s.aborted, retractions=s.retractions,
            prompt_tokens=s.prompt_tokens, generated_tokens=s.generated_tokens,
            submitted=self.submitted, rejected=self.rejected, peak_running=self.peak_running,
            peak_waiting=self.peak_waiting,
        ))
        self._last_stats = time.monotonic()

    def _push(self, msg) -> None:
        self.send.send(io.encode(msg))

    def close(self) -> None:
        try:
            self.engine.shutdown()
        finally:
            self.ctx.destroy(linger=0)


def _jsonable(d):
    """policy.describe() may hold tuples or numpy scalars; keep what msgpack and JSON can carry."""
    try:
        msgspec.msgpack.encode(d)
        return d
    except TypeError:
        import json

        return json.loads(json.dumps(d, default=str))
