"""oneDNN's blocked (prepacked) weights of a small float32 model on a CPU (models/cpu_weights.py, issue 18):
which models get them, which row counts multiply with which form of each weight, that the logits match the
plain GEMM's, that a batch decoded through them stays token-exact with transformers, and that they never
reach the serving file and go stale with new weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sglang_duet.kernels.attention.base import ForwardBatch
from sglang_duet.kernels.attention.torch_backend import TorchAttentionBackend
from sglang_duet.memory import KVCachePool
from sglang_duet.model_loader import loader
from sglang_duet.model_loader.loader import load_model
from sglang_duet.models import cpu_weights
from sglang_duet.models.cpu_weights import PackedRows

pytestmark = pytest.mark.skipif(not cpu_weights.onednn_available(), reason="torch without oneDNN")


def _pool(cfg, slots: int = 2048, dtype: torch.dtype = torch.float32) -> KVCachePool:
    return KVCachePool(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, cfg.head_dim, dtype)


def _decode(model, n: int, ctx: int = 4) -> torch.Tensor:
    """n requests, one new token each, `ctx` tokens of context (whatever the pool holds there)."""
    batch = [([5 + i % 50], ctx - 1, [1 + ctx * i + j for j in range(ctx)], True) for i in range(n)]
    with torch.inference_mode():
        return model(ForwardBatch.build(batch), TorchAttentionBackend(), _pool(model.config, dtype=model.dtype))


def test_which_models_get_them(tiny_model_factory, monkeypatch):
    path = tiny_model_factory("llama")
    model = load_model(path, dtype="float32").model
    assert model.has_packed_weights and model.wants_packed_weights(torch.device("cpu"))
    assert not model.wants_packed_weights(torch.device("cuda"))
    # bf16: only where the CPU runs it natively (elsewhere never measured)
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: False)
    assert not load_model(path, dtype="bfloat16").model.has_packed_weights
    monkeypatch.undo()
    assert load_model(path, dtype="bfloat16").model.has_packed_weights == loader.cpu_has_native_bf16()
    monkeypatch.setenv("SGLANG_DUET_CPU_PACKED", "0")
    assert not load_model(path, dtype="float32").model.has_packed_weights
    # new weights make them stale: load_weights drops them with the copies
    model.load_weights(model.state_dict().items())
    assert not model.has_packed_weights and model.model.layers[0].mlp.down_packed is None


@pytest.mark.parametrize("family", ["llama", "smollm", "qwen2", "qwen3"])  # untied, tied, q/k/v bias, QK-norm
def test_each_row_count_uses_its_form_and_the_logits_match(family, tiny_model_factory, monkeypatch):
    model = load_model(tiny_model_factory(family), dtype="float32").model
    assert model.model.layers[0].mlp.packed_rows == PackedRows.for_threads(torch.get_num_threads())
    calls = {"packed": 0, "linear": 0, "copy": 0}
    real_packed, real_linear, real_mm, real_addmm = cpu_weights.packed_linear, F.linear, torch.mm, torch.addmm
    monkeypatch.setattr(cpu_weights, "packed_linear", lambda *a: calls.__setitem__("packed", calls["packed"] + 1)
                        or real_packed(*a))
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: calls.__setitem__("linear", calls["linear"] + 1)
                        or real_linear(x, w, b))
    monkeypatch.setattr(torch, "mm", lambda *a: calls.__setitem__("copy", calls["copy"] + 1) or real_mm(*a))
    monkeypatch.setattr(torch, "addmm", lambda *a: calls.__setitem__("copy", calls["copy"] + 1) or real_addmm(*a))
    layers = model.config.num_hidden_layers
    all_packed = {"packed": 4 * layers + 1, "linear": 0, "copy": 0}

    def count(n):
        for k in calls:
            calls[k] = 0
        logits = _decode(model, n)
        return logits, dict(calls)

    got = {}
    for threads, one_row in ((1, {"packed": 0, "linear": layers, "copy": 3 * layers + 1}), (2, all_packed)):
        model.add_packed_weights(threads)
        top = PackedRows.for_threads(threads).hi
        # one row at one thread: the [in, out] copies for q/k/v, o, gate/up and the LM head, down_proj [out, in];
        # at two threads the blocked weights
        assert count(1)[1] == one_row, threads
        for n in (2, top):  # then every product against the blocked weights up to the top
            got[threads, n], c = count(n)
            assert c == all_packed, (threads, n)
        # past it the layers run MKL's GEMM; the LM head (only the sampled rows) stays blocked
        assert count(top + 1)[1] == {"packed": 1, "linear": 4 * layers, "copy": 0}, threads
    # the same logits as the plain GEMM (summed in another order)
    model.drop_gemv_weights()
    assert not model.has_packed_weights and count(2)[1] == {"packed": 0, "linear": 4 * layers + 1, "copy": 0}
    for (_, n), logits in got.items():
        torch.testing.assert_close(logits, count(n)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not loader.cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16/AMX)")
def test_a_bf16_model_multiplies_every_step_with_them(tiny_model_factory, monkeypatch):
    """bf16 has no [in, out] copies: one row, a few and a prefill's worth all take the blocked weights, at
    one thread and at two, with the plain bf16 GEMM's logits up to bf16 rounding."""
    model = load_model(tiny_model_factory("qwen3"), dtype="bfloat16").model
    assert model.has_packed_weights and not model.has_gemv_weights
    layers = model.config.num_hidden_layers
    calls = []
    real_packed, real_linear = cpu_weights.packed_linear, F.linear
    monkeypatch.setattr(cpu_weights, "packed_linear", lambda *a: calls.append("packed") or real_packed(*a))
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: calls.append("linear") or real_linear(x, w, b))
    got = {}
    for threads in (1, 2):
        model.add_packed_weights(threads)
        for n in (1, 3, 300):
            calls.clear()
            got[threads, n] = _decode(model, n)
            assert calls == ["packed"] * (4 * layers + 1), (threads, n)
    model.drop_packed_weights()
    for (_, n), logits in got.items():
        calls.clear()
        plain = _decode(model, n)
        assert "packed" not in calls
        torch.testing.assert_close(logits, plain, rtol=0.05, atol=0.05)


def test_they_are_not_in_the_serving_file(tiny_model_factory):
    model = load_model(tiny_model_factory("qwen2"), dtype="float32").model
    assert model.has_packed_weights
    assert not [name for name in model.serving_tensors() if "packed" in name]


def _hf_greedy_batch(path: str, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:  # one at a time: no padding in the reference
            ids = torch.tensor([p])
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_batch_decoded_through_them_is_token_exact_with_transformers(family, tiny_model_factory):
    """8 requests prefilled together, then decoded as one 8-row step each token: the blocked weights' path."""
    path = tiny_model_factory(family)
    lm = load_model(path, dtype="float32")
    model = lm.model
    assert model.has_packed_weights
    gen = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (int(n),), generator=gen).tolist() for n in torch.randint(3, 12, (8,), generator=gen)]
    max_new = 24
    pool, attn = _pool(model.config), TorchAttentionBackend()
    slots = [[1 + 64 * i + j for j in range(64)] for i in range(len(prompts))]
    with torch.inference_mode():
        first = model(ForwardBatch.build([(p, 0, slots[i], True) for i, p in enumerate(prompts)]), attn, pool)
        outs = [[int(t)] for t in first.argmax(-1)]
        for _ in range(max_new - 1):
            batch = [([o[-1]], len(p) + len(o) - 1, slots[i], True) for i, (p, o) in enumerate(zip(prompts, outs))]
            for o, t in zip(outs, model(ForwardBatch.build(batch), attn, pool).argmax(-1)):
                o.append(int(t))
    assert outs == _hf_greedy_batch(path, prompts, max_new)
