"""CUDA-graph decode: forward + sampling of a decode step captured once per batch-size bucket.

A decode step of a small batch is dominated by kernel-launch overhead (hundreds of small
kernels per layer stack); replaying a captured graph removes it. SGLang's scheme:

* buckets 1, 2, 4, 8, then every 8 up to `max_bs` (default 256); a batch of n rows runs in the
  smallest bucket >= n, padded. Padding rows decode token 0 at position 0 into KV slot 0 (the
  pool's reserved padding slot) and attend to slot 0 only, so they touch no live data;
* static input buffers (input ids, positions, out_cache_loc, seq lens, kv indptr/indices, the
  per-row sampling tensors) sized for `max_bs`; each bucket's graph reads views of them. Before
  a replay the runner copies the step's values into them (host->device from pinned memory,
  non-blocking) and re-plans the attention backend *outside* the graph;
* one graph per (bucket, sampling mode): 'greedy' (argmax), 'sample' (temperature + exponential
  race) and 'filtered' (also top-k/top-p/min-p, which costs a vocabulary sort). Greedy graphs are
  captured up front; the others on first use. All graphs share one memory pool, captured
  largest first so that smaller ones reuse its blocks.

Attention backends join through two methods (duck-typed; flashinfer and triton have them):
  graph_state(bs, max_kv_tokens) -> state      per-bucket static state (e.g. a FlashInfer decode
                                               wrapper with use_cuda_graph=True and its buffers)
  plan_graph(state, fb, q_dtype, kv_dtype)     outside the graph, before capture and each replay
A backend without them (torch) can still run through the runner with use_graphs=False, which
executes the same static-buffer path eagerly: that is how CPU tests check padding and buffers.

Slot indices. A caller with a request-to-token table (sglang_duet/memory/req_to_token.py) passes
it and each row's table row instead of the slot lists: out_cache_loc and kv_indices are then gathered
from the table on the device straight into the static buffers (a handful of tensor ops), and the host
sends O(batch) ints per step (positions, lengths, rows). Without a table the lists are copied as before.

The sampled ids stay on the device; the caller reads them (the one host sync of a step) or feeds
them back as the next step's input ids without a sync.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from sglang_duet.kernels import gpu_sampling
from sglang_duet.kernels.attention.base import ForwardBatch
from sglang_duet.memory.kv_pool import PADDING_SLOT

DEFAULT_MAX_BS = 256
MODES = ("greedy", "sample", "filtered")


def capture_batch_sizes(max_bs: int = DEFAULT_MAX_BS) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to max_bs (max_bs itself always included)."""
    if max_bs < 1:
        raise ValueError(f"cuda graph max batch size must be >= 1, got {max_bs}")
    sizes = [b for b in (1, 2, 4, 8) if b <= max_bs] + list(range(16, max_bs + 1, 8))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


def supports_graphs(attn) -> bool:
    return hasattr(attn, "graph_state") and hasattr(attn, "plan_graph")


@dataclass
class _Bucket:
    bs: int
    state: object
    graphs: dict[str, torch.cuda.CUDAGraph] = field(default_factory=dict)
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class CudaGraphDecodeRunner:
    """Runs decode steps of up to `max_bs` rows through captured graphs (or eagerly on the same
    static buffers when use_graphs=False: CPU tests, backends without graph support)."""

    def __init__(self, model, attn, kv_pool, max_bs: int = DEFAULT_MAX_BS, use_graphs: bool | None = None,
                 max_kv_tokens: int | None = None) -> None:
        self.model, self.attn, self.kv_pool = model, attn, kv_pool
        self.device = kv_pool.device
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        if self.use_graphs and not supports_graphs(attn):
            raise ValueError(f"attention backend {getattr(attn, 'name', attn)!r} cannot be captured in a CUDA graph")
        self.sizes = capture_batch_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        self.vocab = model.config.vocab_size
        self.dtype = next(model.parameters()).dtype
        # Every live token has its own slot, plus one padding entry per padded row.
        self.max_kv_tokens = max_kv_tokens or (kv_pool.num_slots + self.max_bs)
        self._pin = self.device.type == "cuda"
        dev, n = self.device, self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.out_cache_loc = torch.full((n,), PADDING_SLOT, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.prefix_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.kv_indptr = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.kv_indices = torch.full((self.max_kv_tokens,), PADDING_SLOT, dtype=torch.long, device=dev)
        self.qo_indptr = torch.arange(n + 1, dtype=torch.int32, device=dev)  # one query per row, constant
        self.sample_indices = torch.arange(n, dtype=torch.long, device=dev)
        self.table_rows = torch.zeros(n, dtype=torch.long, device=dev)  # each row's req-to-token table row
        self.sampling = gpu_sampling.SamplingTensors.empty(n, dev)
        self._buckets: dict[int, _Bucket] = {}
        self._mempool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    # ---- public ---------------------------------------------------------------------------------

    def bucket_size(self, n: int) -> int:
        i = bisect_left(self.sizes, n)
        if i == len(self.sizes):
            raise ValueError(f"decode batch of {n} rows exceeds the largest graph bucket {self.max_bs}")
        return self.sizes[i]

    def capture(self, modes: Sequence[str] = ("greedy",)) -> None:
        """Capture every bucket (largest first, so smaller graphs reuse the shared pool's blocks)."""
        for bs in reversed(self.sizes):
            for mode in modes:
                self._ensure(bs, mode)

    @torch.inference_mode()
    def run(self, input_ids, positions, out_cache_loc, seq_lens: Sequence[int], kv_indices,
            sampling_rows: list[list] | None = None, mode: str = "greedy",
            before_launch: Callable[[], None] | None = None, table=None,
            rows: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of n = len(seq_lens) rows; returns (logits [n, V], ids [n]) on the device.

        input_ids / positions / out_cache_loc: [n] lists or tensors (input ids may be the previous
        step's sampled ids, on the device: no sync). kv_indices: the slots of every row's tokens,
        new one included, concatenated ([sum(seq_lens)], list or tensor). With `table` (a
        ReqToTokenTable already synced for these positions) and `rows` (each row's table row, host
        ints), out_cache_loc and kv_indices are ignored (pass None): both are gathered from the
        table on the device into the static buffers. sampling_rows: from
        SamplingTensors.host_rows (None for greedy). before_launch: called after the static-buffer
        copies and the attention plan, right before the replay (or the eager forward): where a
        caller marks the step's first kernel, so that the host work before it is not timed as the
        step's. The outputs are views of static buffers: clone them before the next call if they
        must survive it.
        """
        if mode not in MODES:
            raise ValueError(f"sampling mode must be one of {MODES}, got {mode!r}")
        if mode != "greedy" and sampling_rows is None:
            raise ValueError(f"mode {mode!r} needs sampling_rows")
        n = len(seq_lens)
        bs = self.bucket_size(n)
        bucket = self._ensure(bs, mode)
        seq = list(seq_lens) + [1] * (bs - n)
        total = sum(seq_lens)
        if total + (bs - n) > self.max_kv_tokens:
            raise ValueError(f"{total} kv indices exceed the static buffer of {self.max_kv_tokens}")

        self._put(self.input_ids, input_ids, n, bs, 0)
        self._put(self.positions, positions, n, bs, 0)
        self._put(self.seq_lens, seq, bs, bs, 1)
        self._put(self.prefix_lens, [s - 1 for s in seq], bs, bs, 0)
        self._put(self.kv_indptr, [0, *accumulate(seq)], bs + 1, bs + 1, 0)
        if table is None:
            self._put(self.out_cache_loc, out_cache_loc, n, bs, PADDING_SLOT)
            self._put(self.kv_indices, kv_indices, total, total + bs - n, PADDING_SLOT)
        else:  # gathered on the device from the positions, lengths and rows just copied
            self._put(self.table_rows, rows, n, n, 0)
            table.gather_decode(self.table_rows[:n], self.positions[:n], self.seq_lens[:n], self.kv_indptr[:n + 1],
                                total, self.out_cache_loc[:n], self.kv_indices)
            if bs > n:
                self.out_cache_loc[n:bs].fill_(PADDING_SLOT)
                self.kv_indices[total:total + bs - n].fill_(PADDING_SLOT)
        if sampling_rows is not None:
            self._put_sampling(sampling_rows, n, bs)

        fb = self._batch(bs, seq)
        self._plan(bucket, fb)
        if before_launch is not None:
            before_launch()
        if self.use_graphs:
            bucket.graphs[mode].replay()
            logits, ids = bucket.outputs[mode]
        else:
            logits, ids = self._forward(fb, self._sampling_view(bs), mode)
        return logits[:n], ids[:n]

    # ---- internals ------------------------------------------------------------------------------

    def _put(self, dst: torch.Tensor, src, n: int, end: int, pad_value: int) -> None:
        """dst[:n] = src (host values through pinned memory, non-blocking); dst[n:end] = pad."""
        if n:
            if isinstance(src, torch.Tensor):
                dst[:n].copy_(src.reshape(-1)[:n], non_blocking=True)
            else:
                host = torch.tensor(list(src)[:n], dtype=dst.dtype, pin_memory=self._pin)
                dst[:n].copy_(host, non_blocking=self._pin)
        if end > n:
            dst[n:end].fill_(pad_value)

    def _put_sampling(self, rows: list[list], n: int, bs: int) -> None:
        st = self.sampling
        temp, top_k, top_p, min_p, greedy, lo, hi = rows
        for dst, vals in ((st.temperature, temp), (st.top_k, top_k), (st.top_p, top_p), (st.min_p, min_p),
                          (st.is_greedy, greedy), (st.key_lo, lo), (st.key_hi, hi)):
            host = torch.tensor(vals, dtype=dst.dtype, pin_memory=self._pin)
            dst[:n].copy_(host, non_blocking=self._pin)
        if bs > n:  # padding rows: neutral greedy rows
            st.temperature[n:bs].fill_(1.0)
            st.top_k[n:bs].fill_(self.vocab)
            st.top_p[n:bs].fill_(float("inf"))
            st.min_p[n:bs].fill_(0.0)
            st.is_greedy[n:bs].fill_(True)

    def _sampling_view(self, bs: int) -> gpu_sampling.SamplingTensors:
        st = self.sampling
        return gpu_sampling.SamplingTensors(st.temperature[:bs], st.top_k[:bs], st.top_p[:bs], st.min_p[:bs],
                                            st.is_greedy[:bs], st.key_lo[:bs], st.key_hi[:bs])

    def _batch(self, bs: int, seq: list[int]) -> ForwardBatch:
        """A ForwardBatch of views into the static buffers (same addresses at capture and replay)."""
        return ForwardBatch(
            input_ids=self.input_ids[:bs], positions=self.positions[:bs], out_cache_loc=self.out_cache_loc[:bs],
            qo_indptr=self.qo_indptr[:bs + 1], kv_indptr=self.kv_indptr[:bs + 1], kv_indices=self.kv_indices,
            seq_lens=self.seq_lens[:bs], prefix_lens=self.prefix_lens[:bs], sample_indices=self.sample_indices[:bs],
            seq_lens_cpu=list(seq), prefix_lens_cpu=[s - 1 for s in seq], extend_lens_cpu=[1] * bs,
        )

    def _plan(self, bucket: _Bucket, fb: ForwardBatch) -> None:
        if supports_graphs(self.attn):
            self.attn.plan_graph(bucket.state, fb, self.dtype, self.kv_pool.dtype)
        else:
            self.attn.plan(fb)

    def _forward(self, fb: ForwardBatch, st: gpu_sampling.SamplingTensors, mode: str):
        logits = self.model(fb, self.attn, self.kv_pool, planned=True)
        if mode == "greedy":
            ids = gpu_sampling.greedy(logits, self.vocab)
        else:
            ids = gpu_sampling.sample(logits, st, self.vocab, filters=(mode == "filtered"))
        return logits, ids

    def _ensure(self, bs: int, mode: str) -> _Bucket:
        bucket = self._buckets.get(bs)
        if bucket is None:
            state = self.attn.graph_state(bs, self.max_kv_tokens) if supports_graphs(self.attn) else None
            bucket = self._buckets[bs] = _Bucket(bs, state)
        if self.use_graphs and mode not in bucket.graphs:
            self._capture(bucket, mode)
        return bucket

    def _capture_inputs(self, bucket: _Bucket):
        """Dummy inputs for a capture: every row a padding row (token 0 at position 0 into slot 0)."""
        bs = bucket.bs
        self._put(self.input_ids, [], 0, bs, 0)
        self._put(self.positions, [], 0, bs, 0)
        self._put(self.out_cache_loc, [], 0, bs, PADDING_SLOT)
        self._put(self.seq_lens, [], 0, bs, 1)
        self._put(self.prefix_lens, [], 0, bs, 0)
        self._put(self.kv_indptr, list(range(bs + 1)), bs + 1, bs + 1, 0)
        self._put(self.kv_indices, [], 0, bs, PADDING_SLOT)
        self._put_sampling([[1.0] * bs, [self.vocab] * bs, [float("inf")] * bs, [0.0] * bs, [True] * bs,
                            [0] * bs, [0] * bs], bs, bs)
        fb = self._batch(bs, [1] * bs)
        st = self._sampling_view(bs)
        self._plan(bucket, fb)
        return fb, st

    @torch.inference_mode()
    def _capture(self, bucket: _Bucket, mode: str) -> None:
        fb, st = self._capture_inputs(bucket)
        # Warm up outside the capture (lazy inits, autotuning, Triton compiles), on a side stream
        # as torch.cuda.graph itself captures on one.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(fb, st, mode)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            out = self._forward(fb, st, mode)
        bucket.graphs[mode] = graph
        bucket.outputs[mode] = out
