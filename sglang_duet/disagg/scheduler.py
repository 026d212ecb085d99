"""The scheduler process of a prefill or a decode instance.

Both are the ordinary scheduler process (same EngineCore, policy and executor, same loop) plus:

- Prefill (`PrefillScheduler`): a `PrefillReq` runs with max_new_tokens capped at 1. When it
  finishes, the core's `kv_hold` hook keeps its KV slots (unless the first token already ended
  the request), the transport exports them, and the descriptor rides back to the main process in
  the finish reason (`finish_reason["disagg"]`), through the detokenizer like any output. The
  slots stay held until a decode instance releases them over the ZMQ ROUTER socket, the router
  releases them (an AbortReq for the transfer id), or `--disaggregation-kv-timeout-s` passes.
  Held KV counts as used: the policy admits fewer prefills while decode instances lag behind.
- Decode (`DecodeScheduler`): a `DecodeReq` waits (FIFO) until its prompt fits in the KV pool;
  then slots are allocated, the KV is copied in through the transport, and the prefill side is
  asked to confirm the release. On a positive ack the request enters the core ready to decode
  (`SchedulerCore.admit_prefilled`), its first token goes out, and decoding goes on as usual.
  A negative ack (the hold had expired or was released) discards the copy: answered 410, and
  the router prefills again. No answer within CONFIRM_TIMEOUT_S: 503.

Ordinary GenerateReqs are served as usual on both kinds (the warm-up request, /health_generate).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid
from collections import deque
from dataclasses import dataclass

import msgspec
import zmq

from sglang_duet.disagg import messages as dm
from sglang_duet.disagg.mooncake import advertised_host
from sglang_duet.disagg.rooms import DecodeRooms, DecodeRoomsMixin, PrefillRooms, PrefillRoomsMixin
from sglang_duet.disagg.transfer import make_transport, pool_layout
from sglang_duet.server import io_struct as io
from sglang_duet.server.ipc import decode_or_drop
from sglang_duet.server.scheduler_proc import PROMPT_CONTEXT, SchedulerProcess, _logprobs

logger = logging.getLogger("sglang_duet.disagg")

INFO_FILE = "disagg.json"  # in the private IPC dir: what the main process serves at /disagg/info
CONFIRM_TIMEOUT_S = 10.0  # decode: how long to wait for the prefill's release ack


def scheduler_class(mode: str):
    if mode == "prefill":
        return PrefillScheduler
    if mode == "decode":
        return DecodeScheduler
    raise ValueError(f"--disaggregation-mode {mode!r}: the scheduler runs prefill or decode instances")


class _DisaggScheduler(SchedulerProcess):
    role = "?"

    def __init__(self, args, paths):
        super().__init__(args, paths)
        self.instance_id = f"{self.role}-{uuid.uuid4().hex[:10]}"
        self.kv_timeout_s = float(args.disaggregation_kv_timeout_s)
        pool = getattr(self.engine, "kv_pool", None)
        layout = pool_layout(pool) if pool is not None else _emulated_layout(self.engine)
        # peers on other hosts (Mooncake, the release socket) reach this instance at `self.host`
        self.host = advertised_host(args.host)
        self.transport = make_transport(args.disaggregation_transfer_backend, pool, layout, self.instance_id,
                                        self.role, host=self.host)
        # SIGTERM (from the main process, or its death) must still clean up shared memory; then the
        # process's own handler (setup_child's: its cleanup, then exit) runs as before.
        self._prev_sigterm = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        try:
            self.transport.close()
        finally:
            if callable(self._prev_sigterm):
                self._prev_sigterm(signum, frame)
            os._exit(0)

    def write_info(self, extra: dict) -> None:
        info = {"mode": self.role, "instance_id": self.instance_id, "transfer": self.transport.describe(),
                "kv_timeout_s": self.kv_timeout_s, **extra}
        with open(os.path.join(self.paths.root, INFO_FILE), "w") as f:
            json.dump(info, f)

    # ---- input -------------------------------------------------------------------------------

    def _drain(self, timeout_ms: int) -> int:
        """Like the base loop's: every pending input message, plus control messages and timers."""
        n = 0
        ready = dict(self.poller.poll(timeout_ms))
        if self.recv in ready:
            n += self._drain_input()
        n += self._drain_control(ready)
        n += self._housekeeping()
        return n

    decode_input = staticmethod(dm.decode_input)  # the base messages plus the disaggregation ones

    def _handle(self, msg) -> None:
        if isinstance(msg, dm.PrefillReq):
            self._add_prefill(msg)
        elif isinstance(msg, dm.DecodeReq):
            self._add_decode(msg)
        else:
            super()._handle(msg)

    def _add_prefill(self, msg) -> None:
        self._refuse(msg.rid, "This is a decode instance; send prefills to a prefill instance.", 400)

    def _add_decode(self, msg) -> None:
        self._refuse(msg.rid, "This is a prefill instance; send decodes to a decode instance.", 400)

    def _drain_control(self, ready: dict) -> int:
        return 0

    def _housekeeping(self) -> int:
        return 0

    def _refuse(self, rid: str, message: str, status: int) -> None:
        """The request's final word when it never entered the core (the main process settles on it)."""
        self._count("rejected")
        self._push(io.ReqError(rid, message, status))

    def _count(self, name: str) -> None:
        """The base process's accounting (submitted / rejected), where it keeps one."""
        setattr(self, name, getattr(self, name, 0) + 1)

    def _register(self, rid: str, prompt_ids: list[int], params) -> None:
        self._push(io.DetokRegister(
            rid=rid, prompt_tail=prompt_ids[-PROMPT_CONTEXT:], stop=list(params.stop),
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens, no_stop_trim=params.no_stop_trim,
        ))

    def close(self) -> None:
        try:
            self.transport.close()
        finally:
            super().close()


def _emulated_layout(engine) -> dm.KVLayout:
    c = engine.model_config
    return dm.KVLayout(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, "bfloat16")


# ==== prefill ====================================================================================


@dataclass
class _PrefillMeta:
    max_new_tokens: int | None  # the client's, before the cap
    seed: int
    final: bool = False
    room: int | None = None  # SGLang's bootstrap room (rooms.py), when sglang-router sent it
    input_len: int = 0


@dataclass
class _Held:
    slots: list[int]
    since: float
    deadline: float


class PrefillScheduler(PrefillRoomsMixin, _DisaggScheduler):
    role = "prefill"

    def __init__(self, args, paths):
        super().__init__(args, paths)
        self.meta: dict[str, _PrefillMeta] = {}
        self.held: dict[str, _Held] = {}
        self.engine.core.kv_hold = self._kv_hold
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        bind = "*" if args.host in ("", "0.0.0.0", "::") else args.host  # --host 0.0.0.0: every interface
        port = int(args.disaggregation_bootstrap_port or 0)
        if port:
            self.control.bind(f"tcp://{bind}:{port}")
        else:
            port = self.control.bind_to_random_port(f"tcp://{bind}")
        self.transport.control = f"tcp://{self.host}:{port}"
        self.poller.register(self.control, zmq.POLLIN)
        self._last_sweep = 0.0
        self.rooms = PrefillRooms(self._send_offer, self.kv_timeout_s)
        self.write_info({"control": self.transport.control})
        logger.info("prefill instance %s: KV release endpoint %s, transport %s", self.instance_id,
                    self.transport.control, self.transport.name)

    def _add_prefill(self, msg: dm.PrefillReq) -> None:
        from sglang_duet.core.scheduler_core import AdmissionError
        from sglang_duet.sampling_params import SamplingParams, SamplingParamsError

        try:
            params = SamplingParams.from_dict(msg.params)
            orig = params.max_new_tokens
            params.max_new_tokens = 1 if orig is None else min(orig, 1)  # prefill only: the first token
            params.min_new_tokens = min(params.min_new_tokens, params.max_new_tokens)
            self.engine.add_request(msg.rid, msg.input_ids, params, arrival_time=msg.arrival_time)
        except (AdmissionError, SamplingParamsError) as e:
            self._refuse_room(msg, str(e), getattr(e, "status", 400))
            return
        except Exception as e:  # noqa: BLE001 - a client's request must never take the scheduler down
            logger.exception("prefill add_request(%s) failed", msg.rid)
            self._refuse_room(msg, f"Internal error while admitting the request: {e}", 500)
            return
        self._count("submitted")
        self.meta[msg.rid] = _PrefillMeta(orig, self.engine.core.requests[msg.rid].seed, room=msg.room,
                                          input_len=len(msg.input_ids))
        self._register(msg.rid, msg.input_ids, params)

    def _kv_hold(self, r, reason: dict) -> bool:
        """Core hook at a request's finish: keep the KV of a prefill whose decode is still to come."""
        meta = self.meta.get(r.rid)
        if meta is None:
            return False  # an ordinary request
        core = self.engine.core
        limit = min(core.config.context_length, core.allocator.capacity)
        meta.final = (reason.get("type") == "stop" or (meta.max_new_tokens is not None and meta.max_new_tokens <= 1)
                      or r.seq_len >= limit)
        if meta.final:
            return False  # nothing left to decode: no transfer, the KV is freed now
        now = time.monotonic()
        self.held[r.rid] = _Held(list(r.kv_slots), now, now + self.kv_timeout_s)
        return True

    def _send_updates(self, updates) -> None:
        for u in updates:
            if not u.finished:
                continue
            meta = self.meta.pop(u.rid, None)
            if meta is None:
                continue
            fr = u.finish_reason or {}
            if fr.get("type") == "abort" or not u.new_token_ids:
                if meta.room is not None:
                    self.rooms.offer(dm.KVOffer(room=meta.room, ok=False, status=fr.get("status") or 499,
                                                message=fr.get("message") or "The prefill was aborted."))
                continue
            kv = None
            held = self.held.get(u.rid)
            if held is not None:
                try:
                    kv = self.transport.export(u.rid, held.slots)
                except Exception:  # noqa: BLE001 - fail this request, keep serving
                    logger.exception("exporting the KV of %s failed", u.rid)
                    self._release(u.rid, "export failed")
                    u.finish_reason = {"type": "abort", "message": "The prefill instance could not export the KV."}
                    if meta.room is not None:
                        self.rooms.offer(dm.KVOffer(room=meta.room, ok=False, status=500,
                                                    message=u.finish_reason["message"]))
                    continue
            if meta.room is not None:  # SGLang's protocol: the decode instance asks for it by room
                lps = _logprobs(u.new_logprobs)
                self.rooms.offer(dm.KVOffer(room=meta.room, ok=True, first_token=u.new_token_ids[0],
                                            first_logprob=lps[0] if lps else None, seed=meta.seed,
                                            input_len=meta.input_len, kv=kv))
                continue
            desc = msgspec.to_builtins(kv) if kv is not None else None
            u.finish_reason = {**u.finish_reason, "disagg": {"final": meta.final, "seed": meta.seed, "kv": desc}}
        super()._send_updates(updates)

    def _abort(self, rid: str) -> None:
        # The router's /disagg/release comes here too: the transfer id is the prefill's rid.
        self.engine.abort(rid)
        self._release(rid, "released by the router")

    def _release(self, rid: str, why: str) -> bool:
        h = self.held.pop(rid, None)
        if h is None:
            return False
        self.engine.core.release_held(rid)  # into the prefix cache (what the prompt computed), or free
        self.transport.release(rid)
        logger.debug("KV of %s released (%s) after %.1f ms", rid, why, (time.monotonic() - h.since) * 1e3)
        return True

    def _drain_control(self, ready: dict) -> int:
        if self.control not in ready:
            return 0
        n = 0
        while True:
            try:
                ident, data = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return n
            except ValueError:  # not a two-frame message: not ours
                continue
            n += 1
            msg = decode_or_drop(dm.decode_control, data, "control message")
            if msg is None:
                continue
            if isinstance(msg, dm.KVQuery):
                self.rooms.query(ident, msg.room)
                continue
            if not isinstance(msg, dm.KVRelease):
                continue
            ok = self._release(msg.transfer_id, "pulled" if msg.confirm else "given up by the decode instance")
            if msg.confirm and msg.nbytes:
                logger.info("KV %s pulled by a decode instance: %.2f MB in %.2f ms", msg.transfer_id,
                            msg.nbytes / 1e6, msg.ms)
            if msg.confirm:
                self.control.send_multipart([ident, dm.encode(dm.KVReleaseAck(msg.transfer_id, ok))], zmq.NOBLOCK)

    def _housekeeping(self) -> int:
        now = time.monotonic()
        if not (self.held or self.rooms.offers or self.rooms.queries) or now - self._last_sweep < 0.2:
            return 0
        self._last_sweep = now
        expired = [rid for rid, h in self.held.items() if h.deadline <= now]
        for rid in expired:
            logger.warning("KV of %s was not pulled within %.0f s; freeing it", rid, self.kv_timeout_s)
            self._release(rid, "timeout")
        return len(expired) + len(self.rooms.expire())

    def has_held(self) -> int:
        return sum(len(h.slots) for h in self.held.values())


# ==== decode =====================================================================================


@dataclass
class _Pending:
    msg: dm.DecodeReq
    params: object  # SamplingParams
    deadline: float


@dataclass
class _Confirming:
    pending: _Pending
    slots: list[int]
    deadline: float
    aborted: bool = False


class DecodeScheduler(DecodeRoomsMixin, _DisaggScheduler):
    role = "decode"

    def __init__(self, args, paths):
        super().__init__(args, paths)
        self.pending: deque[_Pending] = deque()
        self.confirming: dict[str, _Confirming] = {}  # transfer id -> copy waiting for its ack
        self.by_rid: dict[str, str] = {}  # rid -> transfer id, while confirming
        self.peers: dict[str, zmq.Socket] = {}  # prefill control endpoint -> DEALER socket
        self.rooms = DecodeRooms(self.kv_timeout_s)  # requests waiting for their bootstrap room's offer
        self.write_info({})

    # ---- admission ----
    def _add_decode(self, msg: dm.DecodeReq) -> None:
        from sglang_duet.core.scheduler_core import AdmissionError
        from sglang_duet.sampling_params import SamplingParams, SamplingParamsError

        core = self.engine.core
        if msg.bootstrap is not None and msg.kv is None and msg.first_token < 0:
            self._ask_prefill(msg)  # SGLang's protocol: first token and KV come from the room's offer
            return
        try:
            params = SamplingParams.from_dict(msg.params)
            params.verify(self.engine.vocab_size)
            vocab = self.engine.vocab_size
            bad = next((t for t in [*msg.input_ids, msg.first_token] if not 0 <= t < vocab), None)
            if bad is not None:
                raise AdmissionError(f"Token id {bad!r} is outside the vocabulary [0, {vocab}).")
            if msg.rid in core.requests or any(p.msg.rid == msg.rid for p in self.pending) or msg.rid in self.by_rid \
                    or self.rooms.has_rid(msg.rid):
                raise AdmissionError(f"Duplicate request id {msg.rid!r}.")
            n = len(msg.input_ids)
            if n + 1 > core.allocator.capacity:
                raise AdmissionError(f"The input ({n} tokens) does not fit in the KV cache "
                                     f"({core.allocator.capacity} tokens).")
            if msg.kv is not None and len(msg.kv.slots) != n:
                raise AdmissionError(f"The KV descriptor holds {len(msg.kv.slots)} tokens for a {n}-token prompt.")
        except (AdmissionError, SamplingParamsError) as e:
            self._give_up(msg, str(e), getattr(e, "status", 400))
            return
        p = _Pending(msg, params, time.monotonic() + self.kv_timeout_s)
        if msg.kv is None:  # the first token ended the request: nothing to pull
            self._admit(p, [])
        else:
            self.pending.append(p)

    def _housekeeping(self) -> int:
        n = 0
        now = time.monotonic()
        core = self.engine.core
        n += self._expire_rooms()
        while self.pending:
            p = self.pending[0]
            if p.deadline <= now:
                self.pending.popleft()
                self._give_up(p.msg, f"No room in the decode instance's KV cache within {self.kv_timeout_s:.0f} s.",
                              503)
                n += 1
                continue
            need = len(p.msg.input_ids)
            room = core.allocator.available - core.num_running - 1  # keep a slot per running request
            if room < need or core.num_running + len(self.confirming) >= core.config.max_running_requests:
                break  # FIFO: the head waits for KV, the others wait behind it
            self.pending.popleft()
            n += 1
            self._pull(p)
        for tid, c in list(self.confirming.items()):
            if c.deadline <= now:
                self._drop_confirming(tid)
                self._refuse(c.pending.msg.rid, "Aborted by the client." if c.aborted else
                             "The prefill instance did not confirm the KV transfer in time.", 499 if c.aborted else 503)
                n += 1
        return n

    def _pull(self, p: _Pending) -> None:
        core = self.engine.core
        kv = p.msg.kv
        slots = core.allocator.alloc(len(p.msg.input_ids))
        try:
            stats = self.transport.import_kv(kv, slots)
        except Exception as e:  # noqa: BLE001 - a bad descriptor or a vanished prefill: fail this request
            logger.exception("importing the KV of %s failed", p.msg.rid)
            core.allocator.free(slots)
            self._give_up(p.msg, f"The KV transfer failed: {e}", 502)
            return
        sock = self._peer(kv.control)
        try:
            sock.send(dm.encode(dm.KVRelease(kv.transfer_id, True, stats.nbytes, stats.ms)), zmq.NOBLOCK)
        except zmq.Again:
            core.allocator.free(slots)
            self._refuse(p.msg.rid, "The prefill instance cannot be reached to release the KV.", 503)
            return
        self.confirming[kv.transfer_id] = _Confirming(p, slots, time.monotonic() + CONFIRM_TIMEOUT_S)
        self.by_rid[p.msg.rid] = kv.transfer_id

    def _drain_control(self, ready: dict) -> int:
        n = 0
        for sock in self.peers.values():
            if sock not in ready:
                continue
            while True:
                try:
                    data = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                n += 1
                msg = decode_or_drop(dm.decode_control, data, "control message")
                if msg is None:
                    continue
                if isinstance(msg, dm.KVReleaseAck):
                    self._on_ack(msg)
                elif isinstance(msg, dm.KVOffer):
                    self._on_offer(msg)
        return n

    def _on_ack(self, ack: dm.KVReleaseAck) -> None:
        c = self.confirming.get(ack.transfer_id)
        if c is None:
            return  # timed out already
        if c.aborted or not ack.ok:
            self._drop_confirming(ack.transfer_id)
            if c.aborted:
                self._refuse(c.pending.msg.rid, "Aborted by the client.", 499)
            else:
                # The hold was gone (timeout, or a decode instance before us pulled it): the copy may
                # hold another request's KV. Discard it; the router prefills again.
                self._refuse(c.pending.msg.rid, "The prompt's KV was no longer held by the prefill instance; "
                                                "prefill again.", 410)
            return
        del self.confirming[ack.transfer_id]
        self.by_rid.pop(c.pending.msg.rid, None)
        self._admit(c.pending, c.slots)

    def _drop_confirming(self, tid: str) -> None:
        c = self.confirming.pop(tid)
        self.by_rid.pop(c.pending.msg.rid, None)
        self.engine.core.allocator.free(c.slots)

    def _admit(self, p: _Pending, slots: list[int]) -> None:
        from sglang_duet.core.scheduler_core import AdmissionError

        m = p.msg
        lp = None
        if m.first_logprob is not None:
            lp = {"token_id": m.first_logprob.token_id, "logprob": m.first_logprob.logprob,
                  "top": [tuple(x) for x in m.first_logprob.top]}
        try:
            update = self.engine.core.admit_prefilled(
                m.rid, m.input_ids, m.first_token, p.params, slots, seed=m.seed, eos_ids=self.engine.eos_ids,
                arrival_time=m.arrival_time, first_logprob=lp if p.params.logprobs else None)
        except AdmissionError as e:
            self.engine.core.allocator.free(slots)
            self._refuse(m.rid, str(e), e.status)
            return
        self._count("submitted")
        self._register(m.rid, m.input_ids, p.params)
        self._send_updates([update])

    def _give_up(self, msg: dm.DecodeReq, message: str, status: int) -> None:
        """Refuse a request before its KV was copied; the prefill may free the KV now."""
        if msg.kv is not None and msg.kv.control:
            try:
                self._peer(msg.kv.control).send(dm.encode(dm.KVRelease(msg.kv.transfer_id, False)), zmq.NOBLOCK)
            except zmq.Again:
                pass  # the hold's timeout frees it
        self._refuse(msg.rid, message, status)

    def _abort(self, rid: str) -> None:
        if self.rooms.pop_rid(rid) is not None:  # still waiting for the room's offer
            self._refuse(rid, "Aborted by the client.", 499)
            return
        for p in self.pending:
            if p.msg.rid == rid:
                self.pending.remove(p)
                if p.msg.kv is not None:
                    self._give_up(p.msg, "Aborted by the client.", 499)
                return
        tid = self.by_rid.get(rid)
        if tid is not None:
            self.confirming[tid].aborted = True  # freed when the ack (or its timeout) comes
            return
        self.engine.abort(rid)

    def _peer(self, endpoint: str) -> zmq.Socket:
        sock = self.peers.get(endpoint)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 10_000)
            sock.connect(endpoint)
            self.poller.register(sock, zmq.POLLIN)
            self.peers[endpoint] = sock
        return sock
