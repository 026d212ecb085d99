"""The device-side request-to-token table (SGLang's `req_to_token`): row x position -> KV slot.

The scheduler core gives every request that holds KV a row (`ReqWork.table_row`, fewer than
`CoreConfig.table_rows`) and keeps the request's slot list (`ReqWork.kv_slots`, position -> slot)
on the host. This table mirrors those lists on the executor's device and is updated incrementally:
at each launch `sync` copies only the slots appended since the row was last seen (one host->device
copy and one scatter for the whole launch), so a decode step moves `batch` ints, not
`batch x context`. Step inputs are then gathered from it with a handful of tensor ops
(`forward_batch`, `gather_decode`): the host work per step is O(batch) (plus the new tokens of a
prefill chunk, which the host has to send anyway).

Row ownership. The host keeps, per row, the slot list it mirrors (the very list object) and how
many of its slots were copied. The core extends a request's list in place while the request holds
KV and replaces it by a new list when the KV is freed (finish, retraction, a disaggregated
hand-over), so a row whose list is not the work's list (a new owner, or the same request
re-admitted after a retraction) is rewritten from position 0; so is one whose list got shorter
than what was copied. Positions past a row's copied count may hold a previous owner's slots:
nothing reads them (every gather stops at the request's sequence length).

Concurrency (two-lane executor). Both lanes share the table; the host records are guarded by a
lock. On a GPU each sync's copy and scatter run on the calling lane's stream, and a lane only
writes (a) slots appended to rows of requests in its own launch, which no launch in flight reads
yet, or (b) whole rows of requests whose KV was just (re)allocated, whose previous owners' launches
have all completed (the core frees a row only after the final part of the last launch that used
it). Rows of different requests are disjoint, and a request is on one lane at a time, so a sync for
one lane never rewrites what the other lane's launch in flight reads.

Fallback. Work built by hand (`table_row` None), a row beyond the table or a sequence longer than
its columns: `prepare` returns False and the caller builds its inputs from the slot lists
(`ForwardBatch.build`), which stays the oracle in tests.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from sglang_duet.kernels.attention.base import ForwardBatch
from sglang_duet.memory.kv_pool import PADDING_SLOT

logger = logging.getLogger(__name__)

DEFAULT_MAX_RUNNING = 256  # CoreConfig's default max_running_requests
LOOKAHEAD_SLACK = 64  # columns past the context length: look-ahead decode slots reserved near the end


def table_rows_for(max_running_requests: int | None) -> int:
    """CoreConfig.table_rows for this many running requests (the core's own formula)."""
    return 2 * (max_running_requests or DEFAULT_MAX_RUNNING) + 2


@dataclass
class TableStats:
    """What sync moved: instrumentation for tests and benchmarks (not thread-exact under two lanes)."""

    syncs: int = 0  # sync calls that copied something
    slots_copied: int = 0  # slot values copied host -> device, all syncs together
    last_copied: int = 0  # ... by the latest sync
    rewrites: int = 0  # rows rewritten from position 0 (new owner, retraction)
    fallbacks: int = 0  # launches whose work the table could not serve (hand-built, too large)


class ReqToTokenTable:
    def __init__(self, rows: int, cols: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.int32):
        if rows < 1 or cols < 1:
            raise ValueError(f"req-to-token table needs rows, cols >= 1, got {rows} x {cols}")
        self.rows, self.cols = int(rows), int(cols)
        self.device = torch.device(device)
        # Unwritten entries point at the padding slot (they are never read; the padding slot is harmless).
        self.table = torch.full((self.rows, self.cols), PADDING_SLOT, dtype=dtype, device=self.device)
        self._flat = self.table.view(-1)
        self._lists: list[list | None] = [None] * self.rows  # the kv_slots list each row mirrors
        self._copied = [0] * self.rows  # how many of its slots are on the device
        self._lock = threading.Lock()
        self._pin = self.device.type == "cuda"
        self.stats = TableStats()
        self._warned = False

    @classmethod
    def for_executor(cls, kv_pool, model_config, args=None, device=None) -> "ReqToTokenTable":
        """Sized for an engine: CoreConfig.table_rows rows (args.max_running_requests), and as many
        columns as the longest sequence can have (args.context_length or the model's, plus look-ahead
        slots; never more than the pool's slots)."""
        max_running = _arg(args, "max_running_requests")
        context = _arg(args, "context_length") or getattr(model_config, "max_position_embeddings", None) or 4096
        cols = min(int(kv_pool.num_slots), int(context) + LOOKAHEAD_SLACK)
        return cls(table_rows_for(max_running), cols, device if device is not None else kv_pool.device)

    # ---- host records ----------------------------------------------------------------------------

    def covers(self, work: Sequence) -> bool:
        """Whether every request of this work has a row of this table and fits its columns."""
        for w in work:
            row = w.table_row
            if row is None or not 0 <= row < self.rows:
                return False
            if w.start_pos + len(w.input_ids) + w.steps - 1 > self.cols:
                return False
        return bool(work)

    def prepare(self, work: Sequence) -> bool:
        """sync(work) when the table covers it; False (nothing done) when the caller must fall back
        to the slot lists (ForwardBatch.build)."""
        if not self.covers(work):
            self.stats.fallbacks += 1
            if not self._warned and any(w.table_row is not None for w in work):
                self._warned = True
                logger.warning("req-to-token table (%d rows x %d columns) cannot hold a launch's requests: its "
                               "inputs are built from the slot lists (slower); size it from the core's config",
                               self.rows, self.cols)
            return False
        self.sync(work)
        return True

    def sync(self, work: Sequence) -> int:
        """Copy the slots this work uses that the device does not have yet: for each request, positions
        [copied, start_pos + len(input_ids) + steps - 1) of its row (from 0 when the row changed owner or
        its list shrank). One host->device copy (pinned, non-blocking) and one scatter on the current
        stream for the whole launch. Returns how many slots were copied."""
        cols = self.cols
        buf: list[int] = []  # flat table indices, then the slot values (same order)
        vals: list[int] = []
        with self._lock:
            for w in work:
                row = w.table_row
                slots = w.kv_slots
                need = w.start_pos + len(w.input_ids) + w.steps - 1
                if len(slots) < need:
                    raise ValueError(f"{w.rid}: kv_slots has {len(slots)} slots, the launch needs {need}")
                start = self._copied[row]
                if self._lists[row] is not slots or len(slots) < start:
                    self._lists[row] = slots
                    start = 0
                    self.stats.rewrites += 1
                if need > start:
                    base = row * cols
                    buf.extend(range(base + start, base + need))
                    vals.extend(slots[start:need])
                    self._copied[row] = need
            n = len(vals)
            if n:
                buf.extend(vals)
                host = torch.tensor(buf, dtype=torch.int64, pin_memory=self._pin)
                dev = host.to(self.device, non_blocking=self._pin)
                self._flat.index_copy_(0, dev[:n], dev[n:].to(self.table.dtype))
                self.stats.syncs += 1
                self.stats.slots_copied += n
            self.stats.last_copied = n
        return n

    def row_slots(self, row: int) -> list[int]:
        """The slots copied into a row so far (a host read: tests and debugging only)."""
        with self._lock:
            n = self._copied[row]
        return self.table[row, :n].tolist()

    def owner(self, row: int):
        return self._lists[row]

    # ---- step inputs from the table ------------------------------------------------------------

    def kv_index(self, rows: torch.Tensor, seq_lens: torch.Tensor, kv_indptr: torch.Tensor, total: int) -> torch.Tensor:
        """Flat table indices of every row's positions [0, seq_len), concatenated ([total] long, on the
        device): rows [B] long, seq_lens [B] and kv_indptr [B+1] (int32 or long), total = sum(seq_lens)
        known on the host, so nothing syncs (repeat_interleave is told its output size)."""
        starts = rows * self.cols - kv_indptr[:-1]  # flat index of position 0, minus the row's offset
        idx = torch.repeat_interleave(starts, seq_lens, output_size=total)
        idx += torch.arange(total, dtype=idx.dtype, device=idx.device)
        return idx

    def gather_decode(self, rows: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
                      kv_indptr: torch.Tensor, total: int, out_cache_loc: torch.Tensor, kv_indices: torch.Tensor) -> None:
        """One query per row: out_cache_loc[:] = table[row, position], kv_indices[:total] = table[row, 0:seq_len]
        concatenated, written into the caller's (static) buffers. All inputs are device tensors."""
        flat = self._flat
        out_cache_loc.copy_(flat.index_select(0, rows * self.cols + positions))
        kv_indices[:total].copy_(flat.index_select(0, self.kv_index(rows, seq_lens, kv_indptr, total)))

    def forward_batch(self, requests: Sequence[tuple[Sequence[int], int, int, bool]]) -> ForwardBatch:
        """ForwardBatch.build's batch, on the table's device, from (new input ids, start position, table
        row, wants logits) per request, its slot indices gathered from the table (synced for these
        positions). Host work: the new tokens (ids, positions) plus O(batch) lengths, sent in one
        host->device copy."""
        if not requests:
            raise ValueError("a forward batch needs at least one request")
        dev = self.device
        ids: list[int] = []
        pos: list[int] = []
        rows: list[int] = []
        seq: list[int] = []
        pre: list[int] = []
        ext: list[int] = []
        sample: list[int] = []
        t = 0
        for input_ids, start, row, wants_logits in requests:
            n = len(input_ids)
            if n == 0:
                raise ValueError("a request in a forward batch must add at least one token")
            ids.extend(input_ids)
            pos.extend(range(start, start + n))
            rows.append(row)
            seq.append(start + n)
            pre.append(start)
            ext.append(n)
            t += n
            if wants_logits:
                sample.append(t - 1)
        B, T, N = len(rows), t, len(sample)
        qo_indptr = [0, *accumulate(ext)]
        kv_indptr = [0, *accumulate(seq)]
        total = kv_indptr[-1]
        # one copy: [ids T | positions T | sample N | rows B] long, then [qo B+1 | kv B+1 | seq B | pre B | ext B]
        # as int32 after one conversion on the device
        host = torch.tensor(ids + pos + sample + rows + qo_indptr + kv_indptr + seq + pre + ext, dtype=torch.int64,
                            pin_memory=self._pin)
        d = host.to(dev, non_blocking=self._pin)
        o = 2 * T + N + B
        i64, i32 = d[:o], d[o:].to(torch.int32)
        input_ids, positions = i64[:T], i64[T:2 * T]
        sample_indices, rows_d = i64[2 * T:2 * T + N], i64[2 * T + N:]
        qo_d, kv_d = i32[:B + 1], i32[B + 1:2 * B + 2]
        seq_d, pre_d, ext_d = i32[2 * B + 2:3 * B + 2], i32[3 * B + 2:4 * B + 2], i32[4 * B + 2:]
        flat = self._flat
        tok_rows = rows_d if T == B else torch.repeat_interleave(rows_d, ext_d, output_size=T)
        out_cache_loc = flat.index_select(0, tok_rows * self.cols + positions).long()
        kv_indices = flat.index_select(0, self.kv_index(rows_d, seq_d, kv_d, total)).long()
        return ForwardBatch(
            input_ids=input_ids, positions=positions, out_cache_loc=out_cache_loc, qo_indptr=qo_d,
            kv_indptr=kv_d, kv_indices=kv_indices, seq_lens=seq_d, prefix_lens=pre_d,
            sample_indices=sample_indices, seq_lens_cpu=seq, prefix_lens_cpu=pre, extend_lens_cpu=ext,
        )


def _arg(args, name: str):
    if args is None:
        return None
    got = getattr(args, name, None)
    if got is None:
        got = (getattr(args, "extra", None) or {}).get(name)
    return got
