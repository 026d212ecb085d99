"""The CPU fast path (issue 18): fused q/k/v and gate/up, decode attention without transposed copies,
the paged in-place decode attention and the compiled decode step (with its fallbacks), and the CPU's
dtype choice. Oracles: the reference attention (`_decode_attention`) and the eager model; the slow
tests check greedy parity with transformers through torch.compile and bf16 against float32."""
from __future__ import annotations

import logging

import pytest
import torch

from sglang_duet.kernels.attention.base import ForwardBatch
from sglang_duet.kernels.attention.torch_backend import (TorchAttentionBackend, _decode_attention,
                                                         _decode_attention_grouped_sdpa,
                                                         _decode_attention_per_kv_head, _gather)
from sglang_duet.memory.kv_pool import KVCachePool
from sglang_duet.model_loader import loader
from sglang_duet.model_loader.loader import load_model
from sglang_duet.models import decode_step
from sglang_duet.models.decode_step import CompiledDecodeStep, decode_slot_table, paged_decode_attention


def _pool(cfg, slots=256, dtype=torch.float32):
    return KVCachePool(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, cfg.head_dim, dtype)


def _scattered_batch(lens, starts_new, gen):
    """Requests whose slots are scattered over the pool (as after many allocations and frees)."""
    perm = (torch.randperm(200, generator=gen) + 1).tolist()
    out, at = [], 0
    for n, new in zip(lens, starts_new):
        slots = perm[at:at + n]
        at += n
        out.append(([3 + len(out)] * new, n - new, slots, True))
    return out


# ---- attention ------------------------------------------------------------------------------------

@pytest.mark.parametrize("hkv,n_rep", [(3, 3), (1, 4), (2, 1)])
def test_decode_attention_variants_equal_the_reference(hkv, n_rep):
    gen = torch.Generator().manual_seed(hkv * 10 + n_rep)
    S, D, b = 64, 16, 5
    k_buf, v_buf = torch.randn(S, hkv, D, generator=gen), torch.randn(S, hkv, D, generator=gen)
    lens = torch.tensor([1, 7, 13, 2, 9])
    L = int(lens.max())
    slots = torch.randint(1, S, (b, L), generator=gen)
    valid = torch.arange(L)[None, :] < lens[:, None]
    slots = torch.where(valid, slots, torch.zeros_like(slots))
    q = torch.randn(b, hkv * n_rep, D, generator=gen)
    mask = valid[:, None, None, :]
    ref = _decode_attention(q, _gather(k_buf, slots), _gather(v_buf, slots), mask, n_rep)
    per_head = _decode_attention_per_kv_head(q, _gather(k_buf, slots), _gather(v_buf, slots), mask, n_rep)
    in_place = paged_decode_attention(q, k_buf, v_buf, slots, valid)
    grouped = _decode_attention_grouped_sdpa(q, _gather(k_buf, slots), _gather(v_buf, slots), mask, n_rep)
    torch.testing.assert_close(per_head, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(in_place, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped, ref, rtol=1e-5, atol=1e-6)
    # masked positions carry no weight: large (finite) values in the padding slot change nothing
    k_buf[0], v_buf[0] = 1e4, -1e4
    torch.testing.assert_close(paged_decode_attention(q, k_buf, v_buf, slots, valid), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_decode_attention_grouped_sdpa(q, _gather(k_buf, slots), _gather(v_buf, slots), mask,
                                                              n_rep), ref, rtol=1e-5, atol=1e-6)


def test_the_cpu_decode_path_runs_the_grouped_sdpa(monkeypatch):
    """The torch backend's CPU decode group goes through _decode_attention_grouped_sdpa, with the reference's
    result (one and several requests, scattered slots)."""
    from sglang_duet.kernels.attention import torch_backend

    calls = []
    real = torch_backend._decode_attention_grouped_sdpa
    monkeypatch.setattr(torch_backend, "_decode_attention_grouped_sdpa",
                        lambda *a: calls.append(a[0].shape[0]) or real(*a))
    gen = torch.Generator().manual_seed(7)
    hkv, n_rep, D = 2, 3, 16
    pool = KVCachePool(1, 64, hkv, D, torch.float32)
    pool.buffer.normal_(generator=gen)
    for lens in ([5], [5, 9, 2, 7]):
        batch = [([1], n - 1, [1 + 10 * i + j for j in range(n)], True) for i, n in enumerate(lens)]
        fb = ForwardBatch.build(batch)
        attn = TorchAttentionBackend()
        attn.plan(fb)
        q = torch.randn(len(lens), hkv * n_rep, D, generator=gen)
        k, v = torch.randn(len(lens), hkv, D, generator=gen), torch.randn(len(lens), hkv, D, generator=gen)
        got = attn.run(0, q, k, v, pool).view(len(lens), hkv * n_rep, D)
        slots = torch.zeros(len(lens), max(lens), dtype=torch.long)
        for i, (_, _, sl, _) in enumerate(batch):
            slots[i, :len(sl)] = torch.tensor(sl)
        mask = (torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None])[:, None, None, :]
        k_buf, v_buf = pool.get_kv(0)
        ref = _decode_attention(q, _gather(k_buf, slots), _gather(v_buf, slots), mask, n_rep)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert calls == [1, 4]


def test_decode_slot_table_matches_the_batch():
    gen = torch.Generator().manual_seed(1)
    fb = ForwardBatch.build(_scattered_batch([4, 9, 1 + 1, 6], [1, 1, 1, 1], gen))
    slots, valid = decode_slot_table(fb)
    assert slots.shape == valid.shape == (4, 9)
    for i in range(4):
        row = fb.kv_indices[fb.kv_indptr[i]:fb.kv_indptr[i + 1]]
        n = int(fb.seq_lens[i])
        assert torch.equal(slots[i, :n], row) and valid[i, :n].all() and not valid[i, n:].any()
        assert (slots[i, n:] == 0).all()


# ---- the model ------------------------------------------------------------------------------------

def _run(model, batch, pool, attn=None):
    with torch.inference_mode():
        return model(ForwardBatch.build(batch), attn or TorchAttentionBackend(), pool)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])  # plain, q/k/v bias, QK-norm
def test_fused_projections_are_views_and_change_no_logit(family, tiny_model_factory):
    path = tiny_model_factory(family)
    fused = load_model(path, dtype="float32").model  # load_model fuses on a CPU
    attn0 = fused.model.layers[0].self_attn
    assert attn0.qkv_weight is not None and fused.model.layers[0].mlp.gate_up_weight is not None
    assert attn0.k_proj.weight.data_ptr() == attn0.qkv_weight[attn0.qkv_sizes[0]:].data_ptr()
    plain = loader._empty_model(fused.config, torch.float32, torch.device("cpu"))
    plain.load_weights(fused.state_dict().items())
    assert plain.model.layers[0].self_attn.qkv_weight is None
    gen = torch.Generator().manual_seed(0)
    batch = _scattered_batch([7, 5], [7, 5], gen)
    a = _run(fused, batch, _pool(fused.config))
    b = _run(plain, batch, _pool(plain.config))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # load_weights copies into the parameters (p.copy_): through the views, into the fused weights
    with torch.no_grad():
        attn0.v_proj.weight.copy_(torch.zeros_like(attn0.v_proj.weight))
    assert (attn0.qkv_weight[-attn0.qkv_sizes[2]:] == 0).all()


def _decode_case(model, gen):
    """A pool holding a few prefilled requests, and the decode batch that continues them."""
    pool = _pool(model.config)
    prompts = [5, 11, 3, 8, 6]  # 5 decodes: the batched function; the first 1 or 3: the few-row one
    prefill = _scattered_batch(prompts, prompts, gen)
    _run(model, prefill, pool)
    decode = [([7 + i], n, slots + [250 - i], True) for i, (_, _, slots, _) in enumerate(prefill)
              for n in [len(slots)]]
    return pool, decode


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_the_functional_decode_layer_equals_the_eager_model(family, tiny_model_factory):
    """The compiled step's Python, run without compiling (compile_fn = identity): same logits and KV as the
    eager model, through the layer function of each weight form (models/cpu_weights.py) at the row counts
    that take it."""
    from sglang_duet.models.decode_step import COPIES, PACKED, PLAIN

    model = load_model(tiny_model_factory(family), dtype="float32").model
    pool, decode = _decode_case(model, torch.Generator().manual_seed(2))
    snapshot = pool.buffer.clone()

    def check(step, n, form):
        assert step.form_for(n) == form
        pool.buffer.copy_(snapshot)
        eager = _run(model, decode[:n], pool)
        eager_kv = pool.buffer.clone()
        pool.buffer.copy_(snapshot)
        with torch.inference_mode():
            got = step(ForwardBatch.build(decode[:n]))
        assert got is not None
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pool.buffer, eager_kv, rtol=1e-5, atol=1e-6)

    # oneDNN's blocked weights, at two threads: every count from one request (up to 128)
    model.add_packed_weights(threads=2)
    step = CompiledDecodeStep(model, pool, compile_fn=lambda fn: fn)
    for n in (1, 3, 5):
        check(step, n, PACKED)
    assert step._graphs == {"packed/one", "packed/batch"}
    with torch.inference_mode():
        assert step(ForwardBatch.build([([1, 2], 0, [9, 10], True)])) is None  # not decode-only
    # at one thread: one request over the [in, out] copies, 2-32 blocked, beyond that the eager model
    model.add_packed_weights(threads=1)
    step = CompiledDecodeStep(model, pool, compile_fn=lambda fn: fn)
    check(step, 1, COPIES)
    check(step, 3, PACKED)
    assert step.form_for(33) is None
    # the copies without blocked weights (no oneDNN, or SGLANG_DUET_CPU_PACKED=0): up to 3 requests, then [out, in]
    model.drop_packed_weights()
    step = CompiledDecodeStep(model, pool, compile_fn=lambda fn: fn)
    for n, form in ((1, COPIES), (3, COPIES), (5, PLAIN)):
        check(step, n, form)
    assert step._graphs == {"copies/one", "copies/batch", "plain/batch"}
    # neither (e.g. bf16, or a model too big for them): a single request runs eagerly
    model.drop_gemv_weights()
    plain = CompiledDecodeStep(model, pool, compile_fn=lambda fn: fn)
    with torch.inference_mode():
        assert plain.form_for(1) is None and plain(ForwardBatch.build(decode[:1])) is None
    check(plain, 5, PLAIN)
    # the start-up warm-up runs the step over the padding slot and leaves the pool as it found it
    before = pool.buffer.clone()
    step.warm_up()
    assert torch.equal(pool.buffer, before)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_mixed_step_through_the_functional_layer_equals_the_eager_model(family, tiny_model_factory):
    """Decodes next to prefill chunks (chunked prefill's step), a chunk after its cached prefix or at position 0,
    first, in the middle or last in the batch, or two chunks at once: same logits and KV as the eager model."""
    from sglang_duet.models.decode_step import BATCH, MIXED, ONE, step_kind

    model = load_model(tiny_model_factory(family), dtype="float32").model
    pool, decode = _decode_case(model, torch.Generator().manual_seed(4))
    free = [s for s in range(1, 256) if s not in {x for _, _, slots, _ in decode for x in slots}]
    after_prefix = ([11, 12, 13, 14], 3, free[:7], True)  # its first 3 tokens were cached by an earlier chunk
    pool.buffer[:, :, free[:3]] = torch.randn_like(pool.buffer[:, :, free[:3]])
    snapshot = pool.buffer.clone()
    from_zero = ([21, 22, 23, 24, 25, 26], 0, free[10:16], True)
    two = ([31, 32], 0, free[20:22], True)
    step = CompiledDecodeStep(model, pool, compile_fn=lambda fn: fn)
    for batch in ([after_prefix] + decode[:3], decode[:2] + [from_zero] + decode[2:4], decode[:4] + [after_prefix],
                  [two] + decode[:2] + [after_prefix] + decode[2:3]):  # two chunks: one attention call
        fb = ForwardBatch.build(batch)
        assert step_kind(fb)[0] == MIXED
        pool.buffer.copy_(snapshot)
        eager = _run(model, batch, pool)
        eager_kv = pool.buffer.clone()
        pool.buffer.copy_(snapshot)
        with torch.inference_mode():
            got = step(fb)
        assert got is not None and got.shape == eager.shape
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pool.buffer, eager_kv, rtol=1e-5, atol=1e-6)
    assert step.steps == {f"{step.form_for(7)}/mixed": 4}
    # chunks next to fewer than two decodes run eagerly, and so do chunks whose joint attention would waste
    # more than MIXED_ATTENTION_WASTE (here: a 40-token chunk after 2000 cached next to a 60-token one from 0)
    long_prefix = (list(range(40)), 2000, list(range(1, 2041)), True)
    with torch.inference_mode():
        for batch in ([after_prefix] + decode[:1], [from_zero], [long_prefix, ([1] * 60, 0, list(range(1, 61)), True)]
                      + decode[:2]):
            assert step_kind(ForwardBatch.build(batch)) is None and step(ForwardBatch.build(batch)) is None
    # a prompt's 17-token tail after 111 cached and the next one's first 32 tokens: compiled (a 2.45x waste, but
    # under MIXED_ATTENTION_SPARE_PAIRS)
    tail_and_head = [([1] * 17, 111, list(range(1, 129)), True), ([1] * 32, 0, list(range(1, 33)), True)]
    assert step_kind(ForwardBatch.build(tail_and_head + decode[:2])) == (MIXED, [0, 1])
    # one chunk whose attention is past MIXED_MAX_CHUNK_PAIRS: eager (SDPA's causal kernel); at it: compiled
    def fresh(n):  # a fresh n-token prompt beside two decodes: n * n (query, key) pairs
        return ForwardBatch.build([([1] * n, 0, list(range(1, n + 1)), True)] + decode[:2])

    n = int(decode_step.MIXED_MAX_CHUNK_PAIRS ** 0.5)
    assert step_kind(fresh(n))[0] == MIXED and step_kind(fresh(n + 1)) is None
    assert step_kind(ForwardBatch.build(decode[:1])) == (ONE, [])
    assert step_kind(ForwardBatch.build(decode[:2])) == (BATCH, [])


def test_a_cpu_model_compiles_its_decode_step_by_default(tiny_model_factory, monkeypatch):
    from sglang_duet.executor import gpu_executor
    from sglang_duet.server_args import ServerArgs

    model = load_model(tiny_model_factory("llama"), dtype="float32").model
    monkeypatch.delenv(gpu_executor.CPU_COMPILE_ENV, raising=False)
    monkeypatch.setattr(decode_step, "cpp_compiler", lambda: "/usr/bin/g++")
    wants = gpu_executor.wants_torch_compile
    assert wants(ServerArgs(), model, "cpu") and wants(None, model, "cpu")
    from sglang_duet.server.args import parse_args

    assert not wants(parse_args(["--disable-torch-compile"]), model, "cpu")
    assert wants(parse_args([]), model, "cpu")
    assert not wants(ServerArgs(), model, "cuda")  # the GPU has CUDA graphs
    monkeypatch.setenv(gpu_executor.CPU_COMPILE_ENV, "0")
    assert not wants(ServerArgs(), model, "cpu") and wants(ServerArgs(enable_torch_compile=True), model, "cpu")
    monkeypatch.delenv(gpu_executor.CPU_COMPILE_ENV)
    monkeypatch.setattr(decode_step, "cpp_compiler", lambda: None)
    assert not wants(ServerArgs(), model, "cpu")  # no compiler: eager, no warning (nobody asked)
    assert wants(ServerArgs(enable_torch_compile=True), model, "cpu")  # asked: build() warns and runs eagerly


def test_a_failing_compile_falls_back_to_eager_for_good(tiny_model_factory, caplog):
    model = load_model(tiny_model_factory("llama"), dtype="float32").model
    pool, decode = _decode_case(model, torch.Generator().manual_seed(3))
    calls = []

    def broken(fn):
        calls.append(fn)
        raise RuntimeError("no compiler today")

    step = CompiledDecodeStep(model, pool, compile_fn=broken)
    with caplog.at_level(logging.WARNING, logger="sglang_duet.models.decode_step"), torch.inference_mode():
        assert step(ForwardBatch.build(decode)) is None
        assert step(ForwardBatch.build(decode)) is None
    assert len(calls) == 1 and not step.active and "no compiler today" in step.reason_off
    assert "runs eagerly" in caplog.text


def test_compiled_step_is_refused_where_it_cannot_run(tiny_model_factory, monkeypatch):
    model = load_model(tiny_model_factory("llama"), dtype="float32").model
    pool = _pool(model.config)
    monkeypatch.setattr(decode_step, "cpp_compiler", lambda: None)
    assert CompiledDecodeStep.build(model, pool, "cpu") is None
    monkeypatch.setattr(decode_step, "cpp_compiler", lambda: "/usr/bin/g++")
    assert CompiledDecodeStep.build(model, pool, "cuda") is None
    model.step_broadcaster = object()  # a tensor-parallel driver rank
    assert CompiledDecodeStep.build(model, pool, "cpu") is None
    model.step_broadcaster = None
    assert isinstance(CompiledDecodeStep.build(model, pool, "cpu"), CompiledDecodeStep)


def test_engine_with_a_broken_compiler_still_serves_the_same_tokens(tiny_model_factory, monkeypatch):
    """--enable-torch-compile where compiling fails: the engine's greedy tokens equal the eager engine's."""
    from sglang_duet import Engine

    path = tiny_model_factory("qwen3")
    params = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    eager = [o["output_ids"] for o in Engine(model_path=path, dtype="float32").generate(input_ids=prompts,
                                                                                          sampling_params=params)]

    def broken(self, fn):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(CompiledDecodeStep, "_compile_layer", broken)
    engine = Engine(model_path=path, dtype="float32", enable_torch_compile=True)
    got = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
    step = engine.core.executor.decode_step
    assert step is not None and not step.active and "inductor exploded" in step.reason_off  # at start-up
    assert got == eager


# ---- dtype ----------------------------------------------------------------------------------------

def test_cpu_bf16_needs_avx512_kernels_and_a_bf16_flag():
    native = loader.cpu_has_native_bf16
    assert native("AVX512", frozenset({"avx512f", "avx512_bf16"}))
    assert native("AVX512", frozenset({"amx_bf16"}))
    assert not native("AVX512", frozenset({"avx512f"}))
    assert not native("AVX2", frozenset({"avx2", "avx512_bf16"}))  # torch's kernels would not use it
    assert not native("DEFAULT", frozenset())


def test_cpu_auto_dtype_choice_and_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(loader.CPU_DTYPE_ENV, raising=False)
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)
    assert loader.resolve_dtype("auto", "float32", cpu) == torch.bfloat16
    assert loader.resolve_dtype("float32", "bfloat16", cpu) == torch.float32  # --dtype wins
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: False)
    assert loader.resolve_dtype("auto", "bfloat16", cpu) == torch.float32
    monkeypatch.setenv(loader.CPU_DTYPE_ENV, "bfloat16")
    assert loader.resolve_dtype("auto", "float32", cpu) == torch.bfloat16
    monkeypatch.setenv(loader.CPU_DTYPE_ENV, "int4")
    with pytest.raises(ValueError, match=loader.CPU_DTYPE_ENV):
        loader.resolve_dtype("auto", "float32", cpu)


# ---- slow: real compiles and the embedded model ---------------------------------------------------

@pytest.mark.slow
def test_torch_compiled_engine_is_token_exact_with_transformers(tiny_model_factory):
    """A real torch.compile (tens of seconds on a small CPU): greedy tokens equal transformers float32."""
    from test_engine import PROMPTS, hf_greedy

    from sglang_duet import Engine

    from torch._dynamo.utils import counters

    path = tiny_model_factory("llama")
    counters.clear()
    # chunks of 8 tokens: the prompts' later chunks run next to the earlier ones' decodes (mixed steps)
    engine = Engine(model_path=path, dtype="float32", enable_torch_compile=True, policy="chunked",
                    chunked_prefill_size=8)
    params = {"temperature": 0, "max_new_tokens": 16}
    got = [o["output_ids"] for o in engine.generate(PROMPTS, sampling_params=params)]
    assert engine.core.executor.decode_step.steps[f"{engine.core.executor.decode_step.form_for(8)}/mixed"] > 0
    # one request alone: every decode step through the one-request graph
    alone = engine.generate(PROMPTS[0], sampling_params=params)["output_ids"]
    step = engine.core.executor.decode_step
    # compiled at start-up (warm_up), before any request
    assert step is not None and step.active and step.compile_s is not None, step and step.reason_off
    # the start-up compiles serve every batch and context: one request, a batch, and a batch with a chunk, each in
    # the weight form the eager model uses there (blocked weights; the copies for one request at one thread)
    assert step._graphs == {f"{step.form_for(1)}/one", f"{step.form_for(2)}/batch", f"{step.form_for(8)}/mixed"}
    assert counters["stats"]["unique_graphs"] == 3
    ref = hf_greedy(path, PROMPTS, 16)
    for g, r in zip(got, ref):
        assert g == r[:len(g)]
    assert alone == ref[0][:len(alone)]


SMOLLM_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Hello, my name is",
                  "The three primary colors are"]
BF16_EXACT_TOKENS = 16
#: float32's own top-2 log-probability margin under which a position is a near tie: bf16 rounds logits of
#: ~20 nats by ~0.1, so it may pick either token there ("The three primary colors are" has one of 0.044 at
#: its 4th token), and the sequences part from there on
NEAR_TIE = 0.25
#: bf16 vs float32, teacher-forced on float32's greedy tokens: at every position float32's choice has a
#: bf16 log-probability within this of bf16's best
BF16_LOGPROB_TOL = 0.5


def _teacher_forced_logprobs(model, ids, dtype):
    n = len(ids)
    fb = ForwardBatch.build([(ids[:-1], 0, list(range(1, n)), True)])
    fb.sample_indices = torch.arange(n - 1)
    with torch.inference_mode():
        return torch.log_softmax(model(fb, TorchAttentionBackend(), _pool(model.config, n + 2, dtype)), dim=-1)


@pytest.mark.slow
@pytest.mark.skipif(not loader.cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16/AMX)")
def test_bf16_on_the_embedded_model_follows_float32():
    """bf16 where the CPU supports it: the first 16 greedy tokens of each prompt equal float32's (bf16 may
    only leave float32's path at a near tie of float32 itself), and at every one of the 32 positions
    float32's token is within BF16_LOGPROB_TOL of bf16's top log-probability (teacher-forced)."""
    from sglang_duet import Engine

    total = 32
    params = {"temperature": 0, "max_new_tokens": total, "ignore_eos": True}
    f32, bf16 = Engine(dtype="float32"), Engine(dtype="bfloat16")
    ref = [o["output_ids"] for o in f32.generate(SMOLLM_PROMPTS, params)]
    got = [o["output_ids"] for o in bf16.generate(SMOLLM_PROMPTS, params)]
    tok = f32.tokenizer
    for prompt, r, g in zip(SMOLLM_PROMPTS, ref, got):
        prompt_ids = tok.encode(prompt)
        start = len(prompt_ids) - 1  # the row that predicts r[0]
        lp32 = _teacher_forced_logprobs(f32.core.executor.model, prompt_ids + r, torch.float32)[start:]
        lp16 = _teacher_forced_logprobs(bf16.core.executor.model, prompt_ids + r, torch.bfloat16)[start:]
        margins = [float(a[0] - a[1]) for a in lp32.topk(2, dim=-1).values]
        part = next((j for j in range(total) if g[j] != r[j]), total)
        if part < BF16_EXACT_TOKENS:
            assert margins[part] < NEAR_TIE, (prompt, part, margins[part])
        for j in range(total):
            assert lp16[j].max() - lp16[j][r[j]] <= BF16_LOGPROB_TOL, (prompt, j)


def test_the_cpu_lm_head_in_pieces_gives_the_same_logits_bit_for_bit(tiny_model_factory, monkeypatch):
    """compute_logits on a CPU runs the LM head over LM_HEAD_CPU_ROWS vocabulary rows at a time for 2+ rows."""
    import torch.nn.functional as F

    from sglang_duet.models import cpu_weights

    monkeypatch.setenv("SGLANG_DUET_CPU_PACKED", "0")  # the path without oneDNN's blocked weights
    model = load_model(tiny_model_factory("llama"), dtype="float32").model
    monkeypatch.setattr(cpu_weights, "LM_HEAD_CPU_ROWS", 100)  # the tiny vocabulary is 384 rows: 4 pieces, the last short
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, model.config.hidden_size, generator=gen)
    idx = torch.tensor([0, 2, 3, 5])
    w = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    assert w.shape[0] > 100 and w.shape[0] % 100
    calls = []
    real = cpu_weights._chunked_linear
    monkeypatch.setattr(cpu_weights, "_chunked_linear", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        got = model.compute_logits(x, idx)
        assert calls  # the chunked path ran
        assert torch.equal(got, F.linear(model.model.norm(x[idx]), w).float())
        one = model.compute_logits(x, idx[:1])  # one row: a single GEMV, against the [in, out] copy
        assert len(calls) == 1 and torch.equal(one, torch.mm(model.model.norm(x[idx[:1]]), model.lm_head_weight_t))
        torch.testing.assert_close(one, F.linear(model.model.norm(x[idx[:1]]), w), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_the_default_compiled_step_of_smollm2_is_token_exact_with_transformers():
    """The embedded model as a CPU server runs it by default (compiled decode step over the blocked weights):
    8 prompts batched and 3 alone, 32 greedy tokens each, equal to transformers' float32 generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sglang_duet import Engine
    from sglang_duet.model_loader.embedded import default_model_path

    path = default_model_path()
    prompts = SMOLLM_PROMPTS + ["Once upon a time", "import numpy as np\n", "The best way to learn"]
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
            ref.append(out[0, ids.shape[1]:].tolist())
    engine = Engine(dtype="float32", enable_torch_compile=True)
    step = engine.core.executor.decode_step
    assert step is not None and step.active, step and step.reason_off
    params = {"temperature": 0, "max_new_tokens": 32}
    got = [o["output_ids"] for o in engine.generate(input_ids=[tok(p).input_ids for p in prompts], sampling_params=params)]
    alone = [engine.generate(input_ids=tok(p).input_ids, sampling_params=params)["output_ids"] for p in prompts[:3]]
    assert got == [r[:len(g)] for g, r in zip(got, ref)] and all(len(g) > 8 for g in got)
    assert alone == [r[:len(a)] for a, r in zip(alone, ref)]
    assert {g.split("/")[1] for g in step._graphs} == {"one", "batch", "mixed"}


def test_the_torch_backend_gathers_k_and_v_into_two_buffers_it_keeps(tiny_model_factory, monkeypatch):
    """Every layer and step gathers into the same two buffers (K, V; grown when a batch needs more), with the
    logits of gathering into fresh tensors."""
    from sglang_duet.kernels.attention import torch_backend

    model = load_model(tiny_model_factory("qwen3"), dtype="float32").model
    pool, decode = _decode_case(model, torch.Generator().manual_seed(4))
    snapshot = pool.buffer.clone()

    def logits(attn, batch):
        pool.buffer.copy_(snapshot)
        with torch.inference_mode():
            return model(ForwardBatch.build(batch), attn, pool)

    fresh_backend = TorchAttentionBackend()
    monkeypatch.setattr(fresh_backend, "_gather", lambda which, buf, slots: torch_backend._gather(buf, slots))
    want = {n: logits(fresh_backend, decode[:n]) for n in (2, 5)}
    outs = []
    real = torch_backend._gather
    monkeypatch.setattr(torch_backend, "_gather", lambda buf, slots, out=None: outs.append(out) or real(buf, slots, out))
    attn = TorchAttentionBackend()
    storages = []
    for n in (2, 2, 5):  # 5 requests need bigger buffers
        outs.clear()
        torch.testing.assert_close(logits(attn, decode[:n]), want[n], rtol=0, atol=0)
        assert len(outs) == 2 * model.config.num_hidden_layers
        storages.append({o.untyped_storage().data_ptr() for o in outs})
        assert len(storages[-1]) == 2, n
    assert storages[0] == storages[1]  # the second step reuses the first's buffers
