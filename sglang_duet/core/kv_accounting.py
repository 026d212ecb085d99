"""The KV pool's accounting for SchedulerCore: allocation (evicting cached prefixes first), the
prefix cache on admission and at a launch's end, retraction, and release when a request ends.

A mixin of `SchedulerCore` (scheduler_core.py declares the state it reads and writes: allocator,
prefix_cache, the req-to-token rows, the disaggregation hold).
"""
from __future__ import annotations

import logging

from sglang_duet.core.plan import Launch, PrefillChunk
from sglang_duet.core.request import Request, ReqState

logger = logging.getLogger(__name__)


class KVAccountingMixin:
    @property
    def kv_free(self) -> int:
        """Slots a request could get now: the free ones and those only the prefix cache holds."""
        c = self.prefix_cache
        return self.allocator.available + (c.evictable if c is not None else 0)

    @property
    def kv_used(self) -> int:
        return self.allocator.capacity - self.kv_free

    def _alloc(self, n: int) -> list[int] | None:
        slots = self.allocator.alloc(n)
        if slots is None and self.prefix_cache is not None:
            self.prefix_cache.evict(n - self.allocator.available)
            slots = self.allocator.alloc(n)
        return slots

    def _use_cached_prefix(self, r: Request, chunk: PrefillChunk) -> PrefillChunk:
        """Admission: take the longest cached prefix (at least one token is left to compute, to sample
        from) and start the policy's chunk after it. The policy planned from the hit `_match_waiting`
        found (chunk.start), which is this match unless an allocation earlier in this plan evicted
        part of it, or the request was outside the matched window (start 0); either way the chunk
        keeps its token count, so the plan's budget holds."""
        cache = self.prefix_cache
        slots, node = cache.match_prefix(r.seq_ids(0, r.seq_len - 1))
        r.cached_len = r.tree_len = m = len(slots)
        r.num_computed = m
        r.prefix_pin = 0
        r.prefix_memo = None
        if m:
            cache.lock(node)
            r.cache_node = node
            r.kv_slots = slots  # a new list: executors rewrite the request's table row from position 0
        if m == chunk.start:
            return chunk
        return PrefillChunk(r.rid, m, min(chunk.length, r.planned_len - m))

    def _free_kv(self, r: Request) -> None:
        """The request's KV is no longer its own: into the prefix cache (what it computed), or free."""
        cache = self.prefix_cache
        slots = r.kv_slots
        r.kv_slots = []
        if cache is None:
            self.allocator.free(slots)
            return
        # Positions whose KV was written from the sequence's own tokens (a multi-step decode may have
        # written past the end, from tokens it sampled after the request had finished).
        n = min(len(slots), r.num_computed, r.seq_len - 1)
        n -= n % cache.page_size
        own = r.tree_len  # the first `own` slots are the cache's
        present = cache.insert(r.seq_ids(0, n), slots[:n]) if n > own else own
        self.allocator.free(slots[own:present])  # computed here, but the tree had them meanwhile
        self.allocator.free(slots[max(n, own):])
        if r.cache_node is not None:
            cache.unlock(r.cache_node)
            r.cache_node = None
        r.tree_len = 0

    def _cache_prefills(self, launch: Launch) -> None:
        """A launch ended: the prompts it finished prefilling go into the prefix cache at once
        (SGLang's cache_unfinished_req), so requests running alongside share them, not only later ones."""
        cache = self.prefix_cache
        for w in launch.work:
            if not w.sample or w.start_pos >= len(w.prompt_ids):
                continue  # a decode, or a chunk that does not end a prefill
            r = self.requests.get(w.rid)
            if r is None or r.aborted or r.state is not ReqState.RUNNING or r.kv_slots is not w.kv_slots:
                continue
            n = w.start_pos + len(w.input_ids)
            n -= n % cache.page_size
            if n <= r.tree_len:
                continue
            ids = r.seq_ids(0, n)
            if cache.match_length(ids)[0] != r.tree_len:
                continue  # the tree got part of it meanwhile: its copy is the tree's, ours is cached at the end
            cache.insert(ids, r.kv_slots[:n])
            node = cache.match_prefix(ids)[1]
            cache.lock(node)
            if r.cache_node is not None:
                cache.unlock(r.cache_node)
            r.cache_node, r.tree_len = node, n

    def _pick_victim(self, candidates: list[Request]) -> Request:
        # SGLang retracts the requests that lose least work: fewest output tokens, then longest prompt.
        return min(candidates, key=lambda r: (len(r.output_ids), -len(r.prompt_ids), -r.arrival_time))

    def _retract(self, r: Request) -> None:
        """Free a running request's KV and queue it again; its tokens so far are kept and recomputed
        (with a prefix cache, what it computed stays cached until evicted: it may match it again)."""
        self._free_kv(r)
        self._free_row(r)
        r.num_computed = 0
        r.pending = 0
        r.state = ReqState.WAITING
        r.num_retractions += 1
        del self.running[r.rid]
        self.waiting.appendleft(r)
        self.stats.retractions += 1
        logger.info("retracted %s (%d tokens) to free KV", r.rid, r.seq_len)

    def _free_row(self, r: Request) -> None:
        if r.table_row is not None:
            self._free_rows.append(r.table_row)
            r.table_row = None

    def _release_kv(self, r: Request) -> None:
        r.release_deferred = False
        self._free_row(r)
        # disaggregation hook: the prefill instance may keep the KV (see kv_hold in __init__)
        reason = r.finish_reason or {}
        if self.kv_hold is not None and reason.get("type") != "abort" and r.kv_slots and self.kv_hold(r, reason):
            self._held[r.rid] = r
            return
        self._free_kv(r)

    def release_held(self, rid: str) -> int:
        """The KV a kv_hold hook kept for `rid` is no longer needed: free it (into the prefix cache,
        if any). Returns how many slots it held (0 if none was held under that id)."""
        r = self._held.pop(rid, None)
        if r is None:
            return 0
        n = len(r.kv_slots)
        self._free_kv(r)
        return n
