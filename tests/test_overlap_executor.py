"""Overlap scheduling through the real executors (tiny llama on the CPU).

The async two-lane executor (DuetGPUExecutor; on a CPU its `none` partitioner and worker
threads) runs a chunked policy's aggregated steps with the next step planned while one runs:
decode inputs arrive as futures and the output history lags behind. Tokens must equal the plain
synchronous executor's without overlap, for greedy, seeded and penalised rows alike.
"""
from __future__ import annotations

import pytest
import torch

from sglang_duet.core.plan import FUTURE_TOKEN
from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
from sglang_duet.executor.model_executor import ModelExecutor
from sglang_duet.kernels.attention.torch_backend import TorchAttentionBackend
from sglang_duet.memory.kv_pool import KVCachePool
from sglang_duet.model_loader.loader import load_model
from sglang_duet.policies.base import PolicyContext, load_policy
from sglang_duet.sampling_params import SamplingParams
from test_duet_executor import ARRIVALS, REQUESTS, duet, prompt

SLOTS = 1024
EXTRA = [(12, 9, dict(temperature=0.9, seed=3, frequency_penalty=0.5, presence_penalty=0.2)),
         (7, 8, dict(temperature=0.0, min_new_tokens=6))]


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    torch.manual_seed(0)
    return load_model(tiny_model_factory("llama"), dtype="float32", device="cpu").model


def run(model, make_executor, overlap: bool):
    pool = KVCachePool(model.config.num_hidden_layers, SLOTS, model.config.num_key_value_heads,
                       model.config.head_dim, torch.float32, "cpu")
    ex = make_executor(pool)
    core = SchedulerCore(CoreConfig(kv_slots=SLOTS, context_length=512, chunked_prefill_size=16,
                                    overlap=overlap and getattr(ex, "supports_overlap", False)),
                         load_policy("chunked", PolicyContext(chunked_prefill_size=16)))
    reqs = REQUESTS + EXTRA
    arrivals = dict(ARRIVALS)
    arrivals[10] = [len(REQUESTS), len(REQUESTS) + 1]
    out: dict[str, list[int]] = {}
    futures = 0
    it = 0
    try:
        while it < 10_000 and (core.has_unfinished() or it <= max(arrivals)):
            for i in arrivals.get(it, []):
                n, new, sp = reqs[i]
                core.add_request(f"r{i}", prompt(i, n), SamplingParams(max_new_tokens=new, **sp), seed=100 + i,
                                 eos_ids=frozenset({5}))
            while core.can_plan():  # as EngineCore.launch: the overlapped step too
                launches = core.schedule()
                for lnch in launches:
                    futures += sum(w.input_ids == [FUTURE_TOKEN] for w in lnch.work)
                    ex.submit(lnch)
                if not launches:
                    break
            if core.inflight:
                # Apply late on purpose: collect every result the executor will give before applying
                # any, so an overlapped launch always runs before its predecessor's tokens are in the
                # core (its inputs and history must come from the executor's own record).
                results = []
                while ex.busy():
                    results += ex.poll(timeout=10.0)
                for res in results:
                    for u in core.apply_result(res):
                        out.setdefault(u.rid, []).extend(u.new_token_ids)
            it += 1
        assert not core.has_unfinished()
        assert core.allocator.available == core.allocator.capacity, "KV pool not back to free"
    finally:
        ex.shutdown()
    return out, futures


def test_async_executor_with_overlap_gives_the_synchronous_executors_tokens(model):
    ref, f0 = run(model, lambda pool: ModelExecutor(model, pool, TorchAttentionBackend(), torch.device("cpu")),
                  overlap=False)
    got, futures = run(model, duet(model), overlap=True)
    assert f0 == 0 and futures > 0, "no step was planned behind a running one"
    assert got == ref
    assert len(ref) == len(REQUESTS) + len(EXTRA)


def test_sampled_tokens_fill_the_inputs_and_history_the_core_has_not_applied():
    from sglang_duet.core.plan import ReqWork
    from sglang_duet.executor.futures import SampledTokens

    st = SampledTokens()
    st.record(7, {"a": [11, 12, 13]})
    w = ReqWork("a", [FUTURE_TOKEN], 20, [], True, input_from=7, output_ids=[1, 2], output_pos=5)
    st.resolve([w])
    assert w.input_ids == [13]
    assert st.history(w) == [1, 2, 11, 12, 13]  # two applied, three still in flight
    w2 = ReqWork("a", [13], 20, [], True, output_ids=[1, 2, 11, 12, 13, 14], output_pos=5)
    assert st.history(w2) == [1, 2, 11, 12, 13]  # the core already applied this launch's own first token
    with pytest.raises(RuntimeError, match="has not run"):
        st.resolve([ReqWork("b", [FUTURE_TOKEN], 3, [], True, input_from=8)])
