"""CUDA-graph decode: replay equals the same step run eagerly; the GPU executor's graph path gives
the same tokens as eager execution; device sampling on CUDA equals the CPU sampler."""
from __future__ import annotations

import pytest
import torch

from gpu_common import GPU, requires_flashinfer, requires_triton, small_model
from sglang_duet.core.plan import LaneBatch, LaneKind, Launch, ReqWork
from sglang_duet.kernels import gpu_sampling
from sglang_duet.kernels.attention.base import ForwardBatch
from sglang_duet.kernels.attention.torch_backend import TorchAttentionBackend
from sglang_duet.kernels.cuda_graph import CudaGraphDecodeRunner
from sglang_duet.memory.kv_pool import KVCachePool
from sglang_duet.sampling import Sampler, SamplingRow
from sglang_duet.sampling_params import SamplingParams

pytestmark = GPU


def _backend(name, cfg):
    if name == "flashinfer":
        from sglang_duet.kernels.attention.flashinfer_backend import FlashInferAttentionBackend

        return FlashInferAttentionBackend(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, "cuda")
    from sglang_duet.kernels.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(cfg.num_key_value_heads)


def _contiguous_slots(prompts, steps):
    """Each prompt's slots (its tokens plus `steps` decode steps) laid out back to back from slot 1
    (0 is padding); also the first slot past them all."""
    slot_lists, nxt = [], 1
    for p in prompts:
        slot_lists.append(list(range(nxt, nxt + len(p) + steps)))
        nxt += len(p) + steps
    return slot_lists, nxt


def _pool(model, slots=4096):
    c = model.config
    dtype = next(model.parameters()).dtype
    return KVCachePool(c.num_hidden_layers, slots, c.num_key_value_heads, c.head_dim, dtype, "cuda")


def _prefill(model, pool, prompts, slot_lists):
    fb = ForwardBatch.build([(p, 0, s, True) for p, s in zip(prompts, slot_lists)], "cuda")
    return model(fb, TorchAttentionBackend(), pool)


BACKENDS = [pytest.param("flashinfer", marks=requires_flashinfer), pytest.param("triton", marks=requires_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 3, 9, 24])  # buckets 1, 4, 16, 24
def test_graph_replay_equals_eager_static_path(tmp_path, backend, n):
    model = small_model(tmp_path)
    g = torch.Generator().manual_seed(n)
    prompts = [torch.randint(3, 1000, (int(torch.randint(2, 200, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    steps = 4
    slot_lists, nxt = _contiguous_slots(prompts, steps)
    outs = []
    for use_graphs in (False, True):
        pool = _pool(model)
        _prefill(model, pool, [p[:-1] for p in prompts], [s[: len(p) - 1] for p, s in zip(prompts, slot_lists)])
        runner = CudaGraphDecodeRunner(model, _backend(backend, model.config), pool, max_bs=32,
                                       use_graphs=use_graphs)
        ids = [p[-1] for p in prompts]
        seq_logits, seq_ids = [], []
        for step in range(steps):
            pos = [len(p) - 1 + step for p in prompts]
            seq = [x + 1 for x in pos]
            kv = [x for s, L in zip(slot_lists, seq) for x in s[:L]]
            logits, out = runner.run(ids, pos, [s[x] for s, x in zip(slot_lists, pos)], seq, kv)
            seq_logits.append(logits.clone())
            seq_ids.append(out.clone())
            ids = out.clone()  # fed back on the device
        outs.append((seq_logits, seq_ids))
    for a, b in zip(outs[0][0], outs[1][0]):
        assert torch.equal(a, b), "graph replay differs from the same kernels run eagerly"
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.equal(a, b)


def _decode_launch(prompts, params, steps, slot_lists, seeds):
    work = [ReqWork(rid=f"r{i}", input_ids=[p[-1]], start_pos=len(p) - 1, kv_slots=s, sample=True, steps=steps,
                    sampling_seed=seed, params=pr, output_ids=[], prompt_ids=list(p))
            for i, (p, s, pr, seed) in enumerate(zip(prompts, slot_lists, params, seeds))]
    return Launch(1, LaneKind.AGGREGATED, LaneBatch(decode=[w.rid for w in work], steps=steps), work)


@requires_triton
def test_gpu_executor_graphs_match_eager_executor_fp32(tmp_path):
    """float32 + Triton: the graph path (padded buckets, device sampling, k-step feedback) gives the
    tokens of the eager executor with the torch backend and the CPU-semantics sampler."""
    from sglang_duet.executor.gpu_executor import GPUModelExecutor
    from sglang_duet.executor.model_executor import ModelExecutor
    from sglang_duet.kernels.attention.triton_backend import TritonAttentionBackend

    model = small_model(tmp_path, dtype="float32")
    n, steps = 5, 6
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1000, (10 + 7 * i,), generator=g).tolist() for i in range(n)]
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.2, top_k=20),
              SamplingParams(temperature=0.0)]
    slot_lists, nxt = _contiguous_slots(prompts, steps)
    tokens = []
    for make in (
        lambda pool: ModelExecutor(model, pool, TorchAttentionBackend(), torch.device("cuda")),
        lambda pool: GPUModelExecutor(model, pool, TritonAttentionBackend(2), torch.device("cuda"),
                                      graph_runner=CudaGraphDecodeRunner(model, TritonAttentionBackend(2), pool,
                                                                         max_bs=16)),
    ):
        pool = _pool(model)
        _prefill(model, pool, [p[:-1] for p in prompts], [s[: len(p) - 1] for p, s in zip(prompts, slot_lists)])
        ex = make(pool)
        ex.submit(_decode_launch(prompts, params, steps, slot_lists, [7, 8, 9, 10, 11]))
        (res,) = ex.poll()
        tokens.append(res.tokens)
        times = [t for ts in res.token_times.values() for t in ts]
        assert all(res.started_at <= t <= res.finished_at + 1e-3 for t in times)
        # one synchronous launch: its k tokens are delivered together, at the host's read
        assert set(times) == {res.finished_at}
        if hasattr(ex, "graphs"):  # the graph path logs each step's event time beside the read
            assert [d.step for d in ex.deliveries] == list(range(steps))
            assert all(d.device_t <= d.seen_t + 1e-3 for d in ex.deliveries)
    assert tokens[0] == tokens[1]


@requires_flashinfer
def test_gpu_executor_graphs_match_eager_flashinfer_bf16(tmp_path):
    from sglang_duet.executor.gpu_executor import GPUModelExecutor
    from sglang_duet.kernels.attention.flashinfer_backend import FlashInferAttentionBackend

    model = small_model(tmp_path, dtype="bfloat16")
    cfg = model.config
    n, steps = 7, 5
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 1000, (20 + 30 * i,), generator=g).tolist() for i in range(n)]
    params = [SamplingParams(temperature=0.0)] * n
    slot_lists, nxt = _contiguous_slots(prompts, steps)
    tokens = []
    for graphs in (False, True):
        pool = _pool(model)
        _prefill(model, pool, [p[:-1] for p in prompts], [s[: len(p) - 1] for p, s in zip(prompts, slot_lists)])
        attn = FlashInferAttentionBackend(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, "cuda")
        runner = CudaGraphDecodeRunner(model, attn, pool, max_bs=16) if graphs else None
        ex = GPUModelExecutor(model, pool, attn, torch.device("cuda"), graph_runner=runner)
        ex.submit(_decode_launch(prompts, params, steps, slot_lists, [0] * n))
        (res,) = ex.poll()
        tokens.append(res.tokens)
    # Greedy: same tokens. (bf16; a mismatch would be a near-tie worth a look, not necessarily a bug.)
    assert tokens[0] == tokens[1]


def test_device_sampler_on_cuda_matches_cpu_sampler():
    torch.manual_seed(3)
    V = 5000
    logits = torch.randn(64, V) * 3
    params = [SamplingParams(temperature=t) for t in (0.0, 0.6, 1.0, 1.5)] * 16
    seeds = list(range(100, 164))
    steps = [i % 7 for i in range(64)]
    cpu = Sampler(vocab_size=V)(logits, [SamplingRow(p, s, [], [0] * k) for p, s, k in zip(params, seeds, steps)])
    st = gpu_sampling.SamplingTensors.build(params, seeds, steps, V, "cuda")
    dev = gpu_sampling.sample(logits.cuda(), st, vocab=V, filters=False)
    assert dev.tolist() == cpu.token_ids
    dev_f = gpu_sampling.sample(logits.cuda(), st, vocab=V, filters=True)
    assert dev_f.tolist() == cpu.token_ids  # neutral filters change nothing


# ---- the device-side req-to-token table (sglang_duet/memory/req_to_token.py) --------------------------

def test_req_to_token_inputs_on_cuda_equal_forward_batch_build():
    """Syncs queued back to back (pinned, non-blocking, no host wait between them) and inputs gathered on
    the device: the same ForwardBatch as the slot lists give, launch after launch."""
    import random

    from sglang_duet.memory.req_to_token import ReqToTokenTable

    rng = random.Random(0)
    table = ReqToTokenTable(64, 5000, "cuda")
    lists = {row: rng.sample(range(1, 10**6), 4800) for row in range(0, 64, 3)}
    pos = {row: 0 for row in lists}
    for launch in range(12):
        work = []
        for row in rng.sample(sorted(lists), rng.randint(1, len(lists))):
            n = 1 if launch % 2 else rng.randint(1, 300)  # decodes and chunks
            n = min(n, 4800 - pos[row])
            if n <= 0:
                continue
            work.append(ReqWork(f"q{row}", [rng.randrange(1000) for _ in range(n)], pos[row], lists[row], True,
                                table_row=row))
            pos[row] += n
        if not work:
            continue
        assert table.prepare(work)
        got = table.forward_batch([(w.input_ids, w.start_pos, w.table_row, w.sample) for w in work])
        ref = ForwardBatch.build([(w.input_ids, w.start_pos, w.kv_slots, w.sample) for w in work], "cuda")
        for f in ("input_ids", "positions", "out_cache_loc", "qo_indptr", "kv_indptr", "kv_indices", "seq_lens",
                  "prefix_lens", "sample_indices"):
            a, b = getattr(got, f), getattr(ref, f)
            assert a.device.type == "cuda" and a.dtype == b.dtype and torch.equal(a, b), f
    for row in lists:
        assert table.row_slots(row) == lists[row][:pos[row]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [3, 24])
def test_graph_replay_from_the_table_equals_the_slot_lists(tmp_path, backend, n):
    """Replayed graphs fed from the table (out_cache_loc and kv_indices gathered on the device into the
    static buffers) give bit-identical logits and ids to graphs fed the flattened lists."""
    from sglang_duet.executor.gpu_executor import graph_decode_steps
    from sglang_duet.memory.req_to_token import ReqToTokenTable

    model = small_model(tmp_path)
    g = torch.Generator().manual_seed(n)
    prompts = [torch.randint(3, 1000, (int(torch.randint(2, 300, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    steps = 4
    slot_lists, nxt = _contiguous_slots(prompts, steps)
    outs = []
    for use_table in (False, True):
        pool = _pool(model, slots=nxt + 8)
        _prefill(model, pool, [p[:-1] for p in prompts], [s[: len(p) - 1] for p, s in zip(prompts, slot_lists)])
        runner = CudaGraphDecodeRunner(model, _backend(backend, model.config), pool, max_bs=32)
        work = [ReqWork(f"r{i}", [p[-1]], len(p) - 1, s, True, steps=steps - (i % 2),
                        params=SamplingParams(temperature=0.0), table_row=(2 * i + 1 if use_table else None))
                for i, (p, s) in enumerate(zip(prompts, slot_lists))]
        table = ReqToTokenTable(2 * n + 2, 400, "cuda")
        assert table.prepare(work) == use_table
        index = lambda keep: torch.tensor(keep, device="cuda")  # noqa: E731
        outs.append([ids.clone() for ids, _ in graph_decode_steps(runner, work, "greedy", model.config.vocab_size,
                                                                  index, table=table if use_table else None)])
    assert all(torch.equal(a, b) for a, b in zip(*outs))
