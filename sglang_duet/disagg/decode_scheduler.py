"""The scheduler process of a decode instance (`--disaggregation-mode decode`).

A `DecodeReq` waits (FIFO) until its prompt fits in the KV pool; then slots are allocated, the KV
is copied in through the transport, and the prefill side is asked to confirm the release. On a
positive ack the request enters the core ready to decode (`SchedulerCore.admit_prefilled`), its
first token goes out, and decoding goes on as usual. A negative ack (the hold had expired or was
released) discards the copy: answered 410, and the router prefills again. No answer within
CONFIRM_TIMEOUT_S: 503. A request of SGLang's protocol first asks the prefill instance for its
bootstrap room's offer (rooms.py), which brings the first token and the KV descriptor.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import zmq

from sglang_duet.disagg import messages as dm
from sglang_duet.disagg.rooms import DecodeRooms, DecodeRoomsMixin
from sglang_duet.disagg.scheduler import DisaggScheduler
from sglang_duet.server.ipc import decode_or_drop

logger = logging.getLogger("sglang_duet.disagg")

CONFIRM_TIMEOUT_S = 10.0  # how long to wait for the prefill's release ack


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


class DecodeScheduler(DecodeRoomsMixin, DisaggScheduler):
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
                arrival_time=m.arrival_time, first_logprob=lp if p.params.logprobs else None,
                cached_tokens=m.cached_tokens)
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
