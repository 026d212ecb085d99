"""SGLang's PD protocol on top of ours: requests named by a bootstrap room instead of a descriptor.

sglang-router (`--pd-disaggregation`) sends the same request to a prefill and a decode instance
with `bootstrap_host`, `bootstrap_port` (the prefill's `--disaggregation-bootstrap-port`) and a
random `bootstrap_room`. Neither instance knows when the other one gets it, so the two meet at the
prefill's control socket (ZMQ ROUTER on the bootstrap port):

    decode scheduler --KVQuery(room)--> prefill scheduler        (any time after the decode request came)
    decode scheduler <--KVOffer(room, first token, seed, KVDescriptor)--   (once the room's prefill ended)

From there on it is our ordinary pull: the decode copies the KV through the transport and sends
KVRelease(confirm) to the descriptor's control endpoint. An offer or a query waits at most
`--disaggregation-kv-timeout-s`; a prefill that fails or is aborted answers ok=False, which
the decode instance passes on to its client as the error.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec
import zmq

from sglang_duet.disagg import messages as dm


@dataclass
class _Waiting:
    value: object  # prefill: the querying peer's ZMQ identity; decode: the DecodeReq
    deadline: float


class PrefillRooms:
    """Prefill side: offers by room, and the decode instances that asked before the offer existed."""

    def __init__(self, send, timeout_s: float, clock=time.monotonic):
        self.send = send  # send(ident, KVOffer)
        self.timeout_s = timeout_s
        self.clock = clock
        self.offers: dict[int, _Waiting] = {}  # room -> KVOffer not asked for yet
        self.queries: dict[int, _Waiting] = {}  # room -> ident of a decode waiting for it

    def offer(self, offer: dm.KVOffer) -> None:
        q = self.queries.pop(offer.room, None)
        if q is not None:
            self.send(q.value, offer)
        else:
            self.offers[offer.room] = _Waiting(offer, self.clock() + self.timeout_s)

    def query(self, ident: bytes, room: int) -> None:
        o = self.offers.pop(room, None)
        if o is not None:
            self.send(ident, o.value)
        else:
            self.queries[room] = _Waiting(ident, self.clock() + self.timeout_s)

    def expire(self) -> list[int]:
        """Drop what waited too long; returns the rooms whose decode gave up waiting (told so)."""
        now = self.clock()
        for room in [r for r, o in self.offers.items() if o.deadline <= now]:
            del self.offers[room]  # the held KV has the same timeout and is freed by its own sweep
        late = [r for r, q in self.queries.items() if q.deadline <= now]
        for room in late:
            q = self.queries.pop(room)
            self.send(q.value, dm.KVOffer(room=room, ok=False, status=503, message=(
                f"The prefill instance never received bootstrap room {room}.")))
        return late


class DecodeRooms:
    """Decode side: requests waiting for their room's offer."""

    def __init__(self, timeout_s: float, clock=time.monotonic):
        self.timeout_s = timeout_s
        self.clock = clock
        self.waiting: dict[int, _Waiting] = {}  # room -> DecodeReq
        self.room_of: dict[str, int] = {}  # rid -> room

    def wait(self, msg: dm.DecodeReq) -> None:
        self.waiting[msg.bootstrap.room] = _Waiting(msg, self.clock() + self.timeout_s)
        self.room_of[msg.rid] = msg.bootstrap.room

    def has_rid(self, rid: str) -> bool:
        return rid in self.room_of

    def pop_rid(self, rid: str) -> dm.DecodeReq | None:
        room = self.room_of.pop(rid, None)
        w = self.waiting.pop(room, None) if room is not None else None
        return w.value if w is not None else None

    def resolve(self, offer: dm.KVOffer) -> tuple[dm.DecodeReq | None, str, int]:
        """(the request completed with the offer, or None) and, when it cannot go on, why and the status."""
        w = self.waiting.pop(offer.room, None)
        if w is None:
            return None, "", 0  # aborted or timed out meanwhile
        msg: dm.DecodeReq = w.value
        self.room_of.pop(msg.rid, None)
        if not offer.ok:
            return msg, offer.message or "The prefill failed.", offer.status or 502
        if offer.input_len != len(msg.input_ids):
            return msg, (f"The prefill instance's prompt has {offer.input_len} tokens and this one's "
                         f"{len(msg.input_ids)}: both instances must serve the same model and tokenizer."), 400
        return msgspec.structs.replace(msg, first_token=offer.first_token, first_logprob=offer.first_logprob,
                                       seed=offer.seed, kv=offer.kv, bootstrap=None,
                                       cached_tokens=offer.cached_tokens), "", 0

    def expire(self) -> list[dm.DecodeReq]:
        now = self.clock()
        late = [r for r, w in self.waiting.items() if w.deadline <= now]
        out = []
        for room in late:
            msg = self.waiting.pop(room).value
            self.room_of.pop(msg.rid, None)
            out.append(msg)
        return out


# ---- the scheduler processes' side (mixed into PrefillScheduler / DecodeScheduler) ----------------


class PrefillRoomsMixin:
    """Needs: self.rooms (PrefillRooms), self.control (ZMQ ROUTER), self._refuse."""

    def _refuse_room(self, msg: dm.PrefillReq, message: str, status: int) -> None:
        self._refuse(msg.rid, message, status)
        if msg.room is not None:  # the decode instance waiting for this room gets the same answer
            self.rooms.offer(dm.KVOffer(room=msg.room, ok=False, message=message, status=status))

    def _send_offer(self, ident: bytes, offer: dm.KVOffer) -> None:
        try:
            self.control.send_multipart([ident, dm.encode(offer)], zmq.NOBLOCK)
        except zmq.ZMQError:  # the decode instance is gone; the hold's timeout frees the KV
            pass


class DecodeRoomsMixin:
    """Needs: self.rooms (DecodeRooms), self._peer(endpoint), self._refuse, self._add_decode, self.kv_timeout_s."""

    def _ask_prefill(self, msg: dm.DecodeReq) -> None:
        b = msg.bootstrap
        if b.room in self.rooms.waiting or self.rooms.has_rid(msg.rid):
            self._refuse(msg.rid, f"Duplicate request id or bootstrap room ({msg.rid!r}, {b.room}).", 400)
            return
        try:
            self._peer(b.endpoint).send(dm.encode(dm.KVQuery(b.room)), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self._refuse(msg.rid, f"The prefill instance at {b.endpoint} cannot be reached: {e}", 503)
            return
        self.rooms.wait(msg)

    def _on_offer(self, offer: dm.KVOffer) -> None:
        msg, why, status = self.rooms.resolve(offer)
        if msg is None or why:  # nobody waits for it (aborted, timed out), or it cannot go on
            if offer.kv is not None:  # let the prefill free the KV now rather than at its timeout
                try:
                    self._peer(offer.kv.control).send(dm.encode(dm.KVRelease(offer.kv.transfer_id, False)),
                                                      zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            if msg is not None:
                self._refuse(msg.rid, why, status)
            return
        self._add_decode(msg)

    def _expire_rooms(self) -> int:
        late = self.rooms.expire()
        for m in late:
            self._refuse(m.rid, f"The prefill instance at {m.bootstrap.endpoint} did not answer for bootstrap "
                                f"room {m.bootstrap.room} within {self.kv_timeout_s:.0f} s.", 503)
        return len(late)
