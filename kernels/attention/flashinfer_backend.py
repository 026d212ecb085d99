"""FlashInfer attention (GPU fast path) over the token-slot KV pool, FlashInfer 0.6.x API.

Page size 1 with token-slot indices (SGLang's convention): a request's "pages" are exactly
the pool slots of its tokens, so `kv_indptr`/`kv_indices` of the ForwardBatch are FlashInfer's
paged_kv_indptr/paged_kv_indices as they are, and every last page holds one token.

KV layout NHD: the pool's per-layer k and v buffers [slots, H_kv, D] are viewed as
[slots, page_size=1, H_kv, D] and passed as a (k, v) tuple, no copy.

Per step: `plan()` once (it reads lengths on the host; FlashInfer's own plan copies indptr to
the host, so we hand it host tensors built from the ForwardBatch's host mirrors: no device
sync), then per layer `run()`: store the new tokens' k/v at `out_cache_loc` (an index_put into
the pool), then the wrapper's run. `plan(fb)` only remembers the batch and FlashInfer's plan runs
at the first layer, once q's dtype is known; a caller that wants the plan's host work done before
it marks the step's first kernel calls `plan_now(q_dtype, kv_dtype)` itself (then the model with
planned=True). Only this backend has plan_now: callers look it up with getattr.

Re-planning a wrapper: FlashInfer's plan() writes its schedule into the wrapper's PINNED host
buffer and queues an async host->device copy of it on the current stream. A second plan() of
the same wrapper before that copy ran would overwrite the buffer under it (k-step graph decode
re-plans the same bucket wrapper every step). `_PlanGuard` records an event after each plan and
waits for it before the next plan of the same wrapper (mini-sglang and vLLM do the same).

* decode-only batches: BatchDecodeWithPagedKVCacheWrapper, with use_tensor_cores when the GQA
  group (H / H_kv) is >= 4 (Llama 3 8B, Qwen3 8B: group 4), where the prefill-style kernel wins.
* prefill / extend / mixed batches: BatchPrefillWithPagedKVCacheWrapper with causal=True and
  backend="fa2": the default "auto" picks FA3 on Hopper, about ten more JIT modules per head dim
  (minutes of a GPU lease); the FA2 module is the one the tensor-core decode wrapper builds anyway.
  FlashInfer aligns the causal mask bottom-right (query j of a request with a cached prefix of
  p tokens sees keys 0..p + j), which is what an extend needs; decode rows are extends of 1.

CUDA graphs: `graph_state(bs, max_kv_tokens)` builds one decode wrapper per batch-size bucket
with use_cuda_graph=True and its own static indptr/indices/last_page_len buffers;
`plan_graph(state, fb, ...)` re-plans it outside the graph before capture and before each replay
(plan is not capturable), and `run()` then uses that wrapper.

flashinfer is imported lazily: constructing the backend without it raises a clear error.
Kernels JIT-compile with nvcc on first use (CUDA_HOME must point at the toolkit; the cache lives
under FLASHINFER_WORKSPACE_BASE). Only fp16/bf16 are supported (FlashInfer has no fp32 kernels).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch

from sglang_duet.kernels.attention.base import AttentionBackend, ForwardBatch

WORKSPACE_BYTES = 256 << 20  # split-k scratch shared by all wrappers (they never run concurrently)
TENSOR_CORE_MIN_GROUP = 4


def import_flashinfer():
    try:
        import flashinfer
    except ImportError as e:
        raise ValueError(
            "--attention-backend flashinfer: the 'flashinfer' package is not importable "
            f"({e}); install flashinfer-python==0.6.18.post1 (+ apache-tvm-ffi) or use 'triton'/'torch'"
        ) from e
    return flashinfer


class _PlanGuard:
    """Serialises re-plans of one wrapper with the host->device copy of its previous plan.

    plan(wrapper, ...) waits for the event recorded after that wrapper's previous plan (the copy
    out of its pinned buffer has then run), calls wrapper.plan(...), and records a new event on the
    current stream. Different wrappers never wait for each other. `make_event` builds an event
    with record() / synchronize() (torch.cuda.Event on a GPU); without CUDA the guard does nothing.
    """

    def __init__(self, make_event: Callable[[], object] | None = None) -> None:
        if make_event is None and torch.cuda.is_available():
            make_event = torch.cuda.Event
        self._make_event = make_event
        self._events: dict[int, object] = {}  # id(wrapper) -> event after its last plan

    def plan(self, wrapper, *args, **kwargs) -> None:
        key = id(wrapper)  # the backend keeps its wrappers alive: ids are not reused meanwhile
        event = self._events.get(key)
        if event is not None:
            event.synchronize()
        wrapper.plan(*args, **kwargs)
        if self._make_event is not None:
            if event is None:
                event = self._events[key] = self._make_event()
            event.record()  # on the current stream, behind the plan's copy


@dataclass
class GraphDecodeState:
    """One CUDA-graph batch-size bucket: a fixed-size decode wrapper bound to static buffers."""

    batch_size: int
    wrapper: object
    indptr: torch.Tensor  # [bs + 1] int32 (device; FlashInfer copies the host indptr into it)
    indices: torch.Tensor  # [max_kv_tokens] int32
    last_page_len: torch.Tensor  # [bs] int32, all ones (page size 1)


class FlashInferAttentionBackend(AttentionBackend):
    name = "flashinfer"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device | str,
                 workspace_bytes: int = WORKSPACE_BYTES, make_event: Callable[[], object] | None = None) -> None:
        fi = import_flashinfer()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"--attention-backend flashinfer needs a CUDA device, got {self.device}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.use_tensor_cores = num_heads // num_kv_heads >= TENSOR_CORE_MIN_GROUP
        # FlashInfer requires the float workspace zeroed before its first use.
        self.workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=self.device)
        self._fi = fi
        self.decode_wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.use_tensor_cores)
        self.prefill_wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
        self._guard = _PlanGuard(make_event)
        self._fb: ForwardBatch | None = None
        self._wrapper = None  # the wrapper planned for the current step
        self._pending = False  # plan deferred to the first run() (dtypes unknown at plan time)
        self._graph_state: GraphDecodeState | None = None

    # ---- host-side index tensors -----------------------------------------------------------

    @staticmethod
    def _host_indptr(lengths: list[int]) -> torch.Tensor:
        return torch.tensor([0, *accumulate(lengths)], dtype=torch.int32)

    @staticmethod
    def _check_dtype(dtype: torch.dtype) -> None:
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"--attention-backend flashinfer supports float16/bfloat16, not {dtype} "
                             "(use --dtype bfloat16, or the triton/torch backend)")

    # ---- per step ---------------------------------------------------------------------------

    def plan(self, fb: ForwardBatch) -> None:
        """Remember the batch; FlashInfer's plan runs at the first layer, once q's dtype is known."""
        self._fb = fb
        self._graph_state = None
        self._pending = True

    def plan_now(self, q_dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
        """FlashInfer's plan for the batch given to plan(), now (run() then does not plan again)."""
        fb = self._fb
        assert fb is not None, "plan() must be called before plan_now()"
        self._check_dtype(q_dtype)
        seq = fb.seq_lens_cpu or fb.seq_lens.tolist()
        kv_indptr = self._host_indptr(seq)
        last = torch.ones(len(seq), dtype=torch.int32)
        indices = fb.kv_indices.to(torch.int32)  # on the device, queued: no sync
        common = dict(q_data_type=q_dtype, kv_data_type=kv_dtype)
        if fb.is_decode_only:
            self._guard.plan(self.decode_wrapper, kv_indptr, indices, last, self.num_heads, self.num_kv_heads,
                             self.head_dim, 1, **common)
            self._wrapper = self.decode_wrapper
        else:
            ext = fb.extend_lens_cpu or (fb.seq_lens - fb.prefix_lens).tolist()
            self._guard.plan(self.prefill_wrapper, self._host_indptr(ext), kv_indptr, indices, last, self.num_heads,
                             self.num_kv_heads, self.head_dim, 1, causal=True, **common)
            self._wrapper = self.prefill_wrapper
        self._pending = False

    def run(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pool,
            kv_stored: bool = False) -> torch.Tensor:
        fb = self._fb
        assert fb is not None, "plan() must be called before run()"
        if self._pending:
            self.plan_now(q.dtype, kv_pool.dtype)
        if not kv_stored:
            kv_pool.set_kv(layer_id, fb.out_cache_loc, k, v)
        k_buf, v_buf = kv_pool.get_kv(layer_id)
        T = q.shape[0]
        out = self._wrapper.run(q.contiguous(), (k_buf.unsqueeze(1), v_buf.unsqueeze(1)))
        return out.reshape(T, self.num_heads * self.head_dim)

    # ---- CUDA graphs (see kernels/cuda_graph.py) -------------------------------------------

    def graph_state(self, batch_size: int, max_kv_tokens: int) -> GraphDecodeState:
        indptr = torch.zeros(batch_size + 1, dtype=torch.int32, device=self.device)
        indices = torch.zeros(max_kv_tokens, dtype=torch.int32, device=self.device)
        last = torch.ones(batch_size, dtype=torch.int32, device=self.device)
        wrapper = self._fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self.use_tensor_cores,
            paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last)
        return GraphDecodeState(batch_size, wrapper, indptr, indices, last)

    def plan_graph(self, state: GraphDecodeState, fb: ForwardBatch, q_dtype: torch.dtype,
                   kv_dtype: torch.dtype) -> None:
        """Outside the graph: point the bucket's wrapper at this step's (padded) batch."""
        self._check_dtype(q_dtype)
        seq = fb.seq_lens_cpu
        assert len(seq) == state.batch_size, (len(seq), state.batch_size)
        total = sum(seq)
        # fb.kv_indices is the runner's static buffer (longer than this step needs).
        self._guard.plan(state.wrapper, self._host_indptr(seq), fb.kv_indices[:total].to(torch.int32),
                         torch.ones(len(seq), dtype=torch.int32), self.num_heads, self.num_kv_heads,
                         self.head_dim, 1, q_data_type=q_dtype, kv_data_type=kv_dtype)
        self._fb = fb
        self._graph_state = state
        self._wrapper = state.wrapper
        self._pending = False
