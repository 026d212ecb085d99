"""The FlashInfer backend's host side on a CPU: the re-plan guard and the wrapper API it calls.

FlashInfer's plan() leaves its schedule in a pinned host buffer that an async copy reads later, so
a second plan of the same wrapper must wait for the first one's copy (`_PlanGuard`). The backend
itself is built here over a fake `flashinfer` whose constructors and plan() methods have FlashInfer
0.6.18's parameter names (copied from flashinfer/decode.py and prefill.py): a misspelt keyword or a
shifted positional argument fails here instead of in a GPU lease. Kernels are not run (tests/gpu).
"""
from __future__ import annotations

import inspect
import types

import pytest
import torch

from sglang_duet.kernels.attention import flashinfer_backend as fib
from sglang_duet.kernels.attention.base import ForwardBatch
from sglang_duet.memory.kv_pool import KVCachePool


class FakeEvent:
    def __init__(self, log: list):
        self.log = log

    def record(self):
        self.log.append(("record", self))

    def synchronize(self):
        self.log.append(("sync", self))


class FakeWrapper:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def plan(self, *args, **kwargs):
        self.log.append(("plan", self))


def test_guard_waits_for_the_previous_plan_of_the_same_wrapper_only():
    log: list = []
    guard = fib._PlanGuard(lambda: FakeEvent(log))
    a, b = FakeWrapper(log, "a"), FakeWrapper(log, "b")
    guard.plan(a)
    guard.plan(b)
    guard.plan(a)
    guard.plan(b)
    ev_a, ev_b = log[1][1], log[3][1]
    assert ev_a is not ev_b
    assert log == [("plan", a), ("record", ev_a),  # a first plan waits for nothing
                   ("plan", b), ("record", ev_b),  # nor does b's, although a's copy may still be pending
                   ("sync", ev_a), ("plan", a), ("record", ev_a),
                   ("sync", ev_b), ("plan", b), ("record", ev_b)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the guard's no-CUDA behaviour")
def test_guard_without_cuda_only_plans():
    log: list = []
    guard = fib._PlanGuard()
    w = FakeWrapper(log, "w")
    guard.plan(w)
    guard.plan(w)
    assert log == [("plan", w), ("plan", w)]


# ---- FlashInfer 0.6.18's signatures (names and order only) ---------------------------------------------

def _decode_init(float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, use_tensor_cores=False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None,
                 backend="auto", jit_args=None):
    pass


def _decode_plan(indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, *,
                 pos_encoding_mode="NONE", window_left=-1, window_right=0, logits_soft_cap=None,
                 q_data_type="float16", kv_data_type=None, o_data_type=None, data_type=None, sm_scale=None,
                 rope_scale=None, rope_theta=None, non_blocking=True, block_tables=None, seq_lens=None,
                 fixed_split_size=None, disable_split_kv=False, q_len_per_req=1):
    pass


def _prefill_init(float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, qo_indptr_buf=None,
                  paged_kv_indptr_buf=None, paged_kv_indices_buf=None, paged_kv_last_page_len_buf=None,
                  custom_mask_buf=None, mask_indptr_buf=None, backend="auto", jit_args=None, jit_kwargs=None):
    pass


def _prefill_plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
                  num_kv_heads, head_dim_qk, page_size, head_dim_vo=None, custom_mask=None, packed_custom_mask=None,
                  causal=False, pos_encoding_mode="NONE", use_fp16_qk_reduction=False, sm_scale=None, window_left=-1,
                  logits_soft_cap=None, rope_scale=None, rope_theta=None, q_data_type="float16", kv_data_type=None,
                  o_data_type=None, non_blocking=True, prefix_len_ptr=None, token_pos_in_items_ptr=None,
                  token_pos_in_items_len=0, max_item_len_ptr=None, seq_lens=None, seq_lens_q=None, block_tables=None,
                  max_token_per_sequence=None, max_sequence_kv=None, fixed_split_size=None, disable_split_kv=False):
    pass


def _bind(spec, args, kwargs) -> dict:
    bound = inspect.signature(spec).bind(*args, **kwargs)  # TypeError on a name FlashInfer does not have
    bound.apply_defaults()
    return dict(bound.arguments)


def _fake_flashinfer(log: list):
    class Wrapper:
        init_spec = plan_spec = None

        def __init__(self, *args, **kwargs):
            self.init = _bind(self.init_spec, args, kwargs)

        def plan(self, *args, **kwargs):
            log.append(("plan", self, _bind(self.plan_spec, args, kwargs)))

        def run(self, q, paged_kv_cache):
            k, v = paged_kv_cache
            assert k.shape[1] == 1 and v.shape[1] == 1  # [slots, page_size=1, H_kv, D]
            log.append(("run", self))
            return torch.zeros_like(q)

    class Decode(Wrapper):
        init_spec, plan_spec = staticmethod(_decode_init), staticmethod(_decode_plan)

    class Prefill(Wrapper):
        init_spec, plan_spec = staticmethod(_prefill_init), staticmethod(_prefill_plan)

    return types.SimpleNamespace(BatchDecodeWithPagedKVCacheWrapper=Decode, BatchPrefillWithPagedKVCacheWrapper=Prefill)


class _CpuTorch:
    """torch as the backend sees it, with its device tensors allocated on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, **kwargs)

    @staticmethod
    def ones(*args, device=None, **kwargs):
        return torch.ones(*args, **kwargs)


H, H_KV, D = 8, 2, 16  # GQA group 4: tensor-core decode


@pytest.fixture
def backend(monkeypatch):
    log: list = []
    monkeypatch.setattr(fib, "import_flashinfer", lambda: _fake_flashinfer(log))
    monkeypatch.setattr(fib, "torch", _CpuTorch())
    be = fib.FlashInferAttentionBackend(H, H_KV, D, "cuda", workspace_bytes=1024, make_event=lambda: FakeEvent(log))
    return be, log


def _plans(log, wrapper) -> list[dict]:
    return [e[2] for e in log if e[0] == "plan" and e[1] is wrapper]


def _run(be, fb):
    pool = KVCachePool(1, 64, H_KV, D, torch.bfloat16, "cpu")
    T = fb.num_tokens
    q = torch.zeros(T, H, D, dtype=torch.bfloat16)
    kv = torch.zeros(T, H_KV, D, dtype=torch.bfloat16)
    return be.run(0, q, kv, kv, pool)


EXTEND = [([5, 6, 7], 0, [1, 2, 3], True), ([8, 9], 4, [10, 11, 12, 13, 14, 15], True)]
DECODE = [([5], 3, [1, 2, 3, 4], True), ([6], 1, [20, 21], True)]


def test_wrappers_are_built_with_flashinfers_argument_names(backend):
    be, _ = backend
    assert be.prefill_wrapper.init["backend"] == "fa2" and be.prefill_wrapper.init["kv_layout"] == "NHD"
    assert be.decode_wrapper.init["use_tensor_cores"] is True and not be.decode_wrapper.init["use_cuda_graph"]
    state = be.graph_state(2, 64)
    init = state.wrapper.init
    assert init["use_cuda_graph"] and init["use_tensor_cores"]
    assert init["paged_kv_indptr_buffer"] is state.indptr and init["paged_kv_indices_buffer"] is state.indices
    assert init["paged_kv_last_page_len_buffer"] is state.last_page_len


def test_extend_plan_arguments_and_plan_now_before_run(backend):
    be, log = backend
    fb = ForwardBatch.build(EXTEND)
    be.plan(fb)
    assert _plans(log, be.prefill_wrapper) == []  # deferred: q's dtype is not known yet
    be.plan_now(torch.bfloat16, torch.bfloat16)
    (p,) = _plans(log, be.prefill_wrapper)
    assert p["qo_indptr"].tolist() == [0, 3, 5] and p["paged_kv_indptr"].tolist() == [0, 3, 9]
    assert p["paged_kv_indices"].tolist() == [1, 2, 3, 10, 11, 12, 13, 14, 15]
    assert p["paged_kv_indices"].dtype == torch.int32 and p["paged_kv_last_page_len"].tolist() == [1, 1]
    assert (p["num_qo_heads"], p["num_kv_heads"], p["head_dim_qk"], p["page_size"]) == (H, H_KV, D, 1)
    assert p["head_dim_vo"] is None and p["causal"] is True
    assert p["q_data_type"] == torch.bfloat16 and p["kv_data_type"] == torch.bfloat16
    assert _run(be, fb).shape == (5, H * D)
    assert len(_plans(log, be.prefill_wrapper)) == 1, "run() planned again after plan_now()"


def test_decode_plan_arguments(backend):
    be, log = backend
    fb = ForwardBatch.build(DECODE)
    be.plan(fb)
    _run(be, fb)  # plans at the first layer
    (p,) = _plans(log, be.decode_wrapper)
    assert p["indptr"].tolist() == [0, 4, 6] and p["indices"].tolist() == [1, 2, 3, 4, 20, 21]
    assert p["last_page_len"].tolist() == [1, 1]
    assert (p["num_qo_heads"], p["num_kv_heads"], p["head_dim"], p["page_size"]) == (H, H_KV, D, 1)
    assert p["q_data_type"] == torch.bfloat16 and p["kv_data_type"] == torch.bfloat16
    assert _plans(log, be.prefill_wrapper) == []


def test_every_plan_goes_through_the_guard(backend):
    be, log = backend
    state = be.graph_state(2, 64)
    fb = ForwardBatch.build(DECODE)
    for _ in range(2):  # two steps re-plan the same bucket wrapper, as k-step graph decode does
        be.plan_graph(state, fb, torch.bfloat16, torch.bfloat16)
    for batch in (EXTEND, DECODE, EXTEND):
        be.plan(ForwardBatch.build(batch))
        be.plan_now(torch.bfloat16, torch.bfloat16)
    (p, _) = _plans(log, state.wrapper)
    assert p["indptr"].tolist() == [0, 4, 6] and p["indices"].tolist() == [1, 2, 3, 4, 20, 21]
    # every plan is followed by its wrapper's event; a re-plan waits for that event first
    events: dict = {}
    for i, entry in enumerate(log):
        if entry[0] != "plan":
            continue
        kind, ev = log[i + 1]
        assert kind == "record"
        w = entry[1]
        if w in events:
            assert log[i - 1] == ("sync", events[w]), f"re-plan of {type(w).__name__} without a wait"
        else:
            assert i == 0 or log[i - 1][0] == "record", "a first plan waited"
        events[w] = ev
    assert len(set(map(id, events.values()))) == 3  # graph bucket, prefill, decode: one event each
