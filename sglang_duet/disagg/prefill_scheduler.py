"""The scheduler process of a prefill instance (`--disaggregation-mode prefill`).

A `PrefillReq` runs with max_new_tokens capped at 1. When it finishes, the core's `kv_hold` hook
keeps its KV (unless the first token already ended the request), the transport exports it, and the
descriptor goes out: to our router in the finish reason (`finish_reason["disagg"]`, through the
detokenizer like any output), or, for a request of SGLang's protocol, in a `KVOffer` to the decode
instance that asks for its bootstrap room (rooms.py). The KV stays held until a decode instance
releases it over the control socket (ZMQ ROUTER on the bootstrap port), the router releases it (an
AbortReq for the transfer id), or `--disaggregation-kv-timeout-s` passes. Held KV counts as used:
the policy admits fewer prefills while decode instances lag behind.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import msgspec
import zmq

from sglang_duet.disagg import messages as dm
from sglang_duet.disagg.rooms import PrefillRooms, PrefillRoomsMixin
from sglang_duet.disagg.scheduler import DisaggScheduler
from sglang_duet.server.ipc import decode_or_drop
from sglang_duet.server.scheduler_proc import _logprobs

logger = logging.getLogger("sglang_duet.disagg")


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


class PrefillScheduler(PrefillRoomsMixin, DisaggScheduler):
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
            # verified once, against the vocabulary too (as the scheduler process admits); the clamps
            # below keep them valid (max_new_tokens only shrinks, min_new_tokens stays below it)
            params = SamplingParams.from_dict(msg.params, self.engine.vocab_size)
            orig = params.max_new_tokens
            params.max_new_tokens = 1 if orig is None else min(orig, 1)  # prefill only: the first token
            params.min_new_tokens = min(params.min_new_tokens, params.max_new_tokens)
            self.engine.add_request(msg.rid, msg.input_ids, params, arrival_time=msg.arrival_time,
                                    params_verified=True)
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
                                            input_len=meta.input_len, kv=kv, cached_tokens=u.cached_tokens))
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
