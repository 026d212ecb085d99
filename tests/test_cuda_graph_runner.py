"""The CUDA-graph decode runner's static-buffer path and the GPU executor, run eagerly on CPU.

With use_graphs=False the runner executes exactly what a graph would replay (padded bucket,
static buffers, plan_graph, device sampling), so padding, buffer refills between steps and
the k-step feedback of sampled ids are checked here; the graph capture itself needs a GPU
(tests/gpu)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from sglang_duet.core.plan import LaneKind, LaneBatch, Launch, ReqWork
from sglang_duet.executor.gpu_executor import GPUModelExecutor, build_model_executor
from sglang_duet.executor.model_executor import ModelExecutor
from sglang_duet.kernels.attention.base import ForwardBatch
from sglang_duet.kernels.attention.torch_backend import TorchAttentionBackend
from sglang_duet.kernels.cuda_graph import CudaGraphDecodeRunner, capture_batch_sizes
from sglang_duet.memory.kv_pool import KVCachePool
from sglang_duet.model_loader.loader import load_model
from sglang_duet.sampling_params import SamplingParams

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "models", "tiny-overhead.json")


@pytest.fixture(scope="module")
def model():
    return load_model(None, load_format="dummy", model_config_path=CONFIG, dtype="float32", device="cpu",
                      seed=3).model


def _pool(model, slots=256):
    c = model.config
    return KVCachePool(c.num_hidden_layers, slots, c.num_key_value_heads, c.head_dim, torch.float32, "cpu")


def _prefill(model, pool, prompts, slots):
    fb = ForwardBatch.build([(p, 0, s, True) for p, s in zip(prompts, slots)])
    return model(fb, TorchAttentionBackend(), pool)


def test_capture_batch_sizes():
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    s = capture_batch_sizes(256)
    assert s[:5] == [1, 2, 4, 8, 16] and s[-1] == 256 and all(b - a == 8 for a, b in zip(s[4:], s[5:]))
    assert len(capture_batch_sizes(160)) == 23


def _backends():
    out = [("torch", TorchAttentionBackend)]
    if not torch.cuda.is_available():
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            return out  # imported in compiled mode already: the interpreter cannot be switched on
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from sglang_duet.kernels.attention.triton_backend import HAS_TRITON, TritonAttentionBackend, interpreter_enabled
        if HAS_TRITON and (torch.cuda.is_available() or interpreter_enabled()):
            out.append(("triton", lambda: TritonAttentionBackend(2, block_n=16)))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("name,make", _backends(), ids=[b[0] for b in _backends()])
def test_padded_static_decode_matches_eager(model, name, make):
    torch.manual_seed(0)
    prompts = [[5, 9, 11], [7] * 9, [3, 4]]  # 3 rows -> bucket 4 (one padding row)
    slot_lists = [[10 + i for i in range(4)], [40 + 2 * i for i in range(10)], [100, 7, 90]]
    pool = _pool(model)
    _prefill(model, pool, prompts, slot_lists)
    ref_pool = KVCachePool(pool.num_layers, pool.num_slots, pool.num_kv_heads, pool.head_dim, pool.dtype, "cpu")
    ref_pool.buffer.copy_(pool.buffer)

    new_ids = [17, 23, 29]
    reqs = [([t], len(p), s, True) for t, p, s in zip(new_ids, prompts, slot_lists)]
    ref_logits = model(ForwardBatch.build(reqs), TorchAttentionBackend(), ref_pool)

    runner = CudaGraphDecodeRunner(model, make(), pool, max_bs=8, use_graphs=False)
    positions = [len(p) for p in prompts]
    seq = [n + 1 for n in positions]
    kv = [x for s, n in zip(slot_lists, seq) for x in s[:n]]
    out_loc = [s[n] for s, n in zip(slot_lists, positions)]
    logits, ids = runner.run(new_ids, positions, out_loc, seq, kv)
    assert logits.shape == ref_logits.shape and ids.shape == (3,)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert ids.tolist() == ref_logits.argmax(-1).tolist()
    # live slots got the same k/v; only the padding slot 0 may differ (the padding row wrote it)
    torch.testing.assert_close(pool.buffer[:, :, 1:], ref_pool.buffer[:, :, 1:], atol=1e-5, rtol=1e-5)


def _launch(work, steps):
    return Launch(1, LaneKind.AGGREGATED, LaneBatch(decode=[w.rid for w in work], steps=steps), work)


def test_gpu_executor_kstep_decode_matches_model_executor(model):
    """k-step decode with greedy, seeded and filtered rows: same tokens as the eager executor."""
    prompts = [[5, 9, 11, 2], [7] * 6, [3, 4, 8]]
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=5),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=50)]
    steps = 3
    slot_lists = [list(range(1 + 20 * i, 1 + 20 * i + len(p) + steps)) for i, p in enumerate(prompts)]

    def work():
        return [ReqWork(rid=f"r{i}", input_ids=[p[-1]], start_pos=len(p) - 1, kv_slots=s, sample=True, steps=steps,
                        sampling_seed=1000 + i, params=pr, output_ids=[], prompt_ids=list(p))
                for i, (p, s, pr) in enumerate(zip(prompts, slot_lists, params))]

    results = []
    for make_exec in (
        lambda pool: ModelExecutor(model, pool, TorchAttentionBackend(), torch.device("cpu")),
        lambda pool: GPUModelExecutor(model, pool, TorchAttentionBackend(), torch.device("cpu"),
                                      graph_runner=CudaGraphDecodeRunner(model, TorchAttentionBackend(), pool,
                                                                         max_bs=8, use_graphs=False)),
    ):
        pool = _pool(model)
        _prefill(model, pool, [p[:-1] for p in prompts], [s[: len(p) - 1] for p, s in zip(prompts, slot_lists)])
        ex = make_exec(pool)
        ex.submit(_launch(work(), steps))
        (res,) = ex.poll()
        assert all(len(res.tokens[f"r{i}"]) == steps for i in range(3))
        assert all(len(res.token_times[f"r{i}"]) == steps for i in range(3))
        # single lane, synchronous: the k tokens reach the caller together, timed at the host's read;
        # each step's own time is only logged
        assert {t for ts in res.token_times.values() for t in ts} == {res.finished_at}
        assert [d.step for d in ex.deliveries] == list(range(steps))
        assert all(d.rows == 3 and d.device_t <= d.seen_t == res.finished_at for d in ex.deliveries)
        results.append(res.tokens)
    assert results[0] == results[1]


def test_graph_eligibility_and_factory(model):
    pool = _pool(model)
    ex = GPUModelExecutor(model, pool, TorchAttentionBackend(), torch.device("cpu"),
                          graph_runner=CudaGraphDecodeRunner(model, TorchAttentionBackend(), pool, max_bs=4,
                                                             use_graphs=False))

    def w(**kw):
        base = dict(rid="a", input_ids=[1], start_pos=3, kv_slots=[1, 2, 3, 4], sample=True,
                    params=SamplingParams(), eos_ids=frozenset({2}))
        base.update(kw)
        return ReqWork(**base)

    assert ex.graph_eligible([w()])
    assert not ex.graph_eligible([w(input_ids=[1, 2])])  # a prefill chunk
    assert not ex.graph_eligible([w(params=SamplingParams(logprobs=True))])
    assert not ex.graph_eligible([w(params=SamplingParams(repetition_penalty=1.2))])
    assert not ex.graph_eligible([w(params=SamplingParams(min_new_tokens=3))])
    assert not ex.graph_eligible([w()] * 5)  # beyond the largest bucket
    # on a CPU the factory gives the plain executor
    assert type(build_model_executor(model, pool, TorchAttentionBackend(), torch.device("cpu"))) is ModelExecutor


class _LoggingAttention(TorchAttentionBackend):
    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def plan(self, fb):
        self.log.append("plan")
        super().plan(fb)

    def run(self, layer_id, *args, **kw):
        self.log.append(f"run{layer_id}")
        return super().run(layer_id, *args, **kw)


def test_before_launch_comes_after_the_plan_and_before_the_first_kernel(model):
    """The hook is where a caller marks a step's first kernel: after the step's host work (buffer copies,
    plan), before the forward; graph_decode_steps passes it to every step."""
    from sglang_duet.executor.gpu_executor import graph_decode_steps

    log: list = []
    pool = _pool(model)
    runner = CudaGraphDecodeRunner(model, _LoggingAttention(log), pool, max_bs=4, use_graphs=False)
    layers = model.config.num_hidden_layers
    runner.run([7], [0], [5], [1], [5], before_launch=lambda: log.append("launch"))
    assert log == ["plan", "launch"] + [f"run{i}" for i in range(layers)]
    log.clear()
    runner.run([7], [0], [5], [1], [5])  # no hook: same path
    assert log == ["plan"] + [f"run{i}" for i in range(layers)]

    log.clear()
    w = ReqWork("a", [3], 0, list(range(1, 5)), True, steps=3, params=SamplingParams(temperature=0.0))
    steps = list(graph_decode_steps(runner, [w], "greedy", model.config.vocab_size, torch.tensor,
                                    before_launch=lambda: log.append("launch")))
    assert len(steps) == 3
    assert log == (["plan", "launch"] + [f"run{i}" for i in range(layers)]) * 3
