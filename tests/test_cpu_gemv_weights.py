"""One-row CPU steps against [in, out] copies of the wide weights (models/cpu_weights.py, GEMV_COPY_MAX_BYTES):
which models get them, that they are exact transposes that one-row steps (and only those) multiply with,
that greedy decoding of a single request stays token-exact with transformers (tiny models and the embedded
SmolLM2), and that the embedded model's serving file carries them mapped."""
from __future__ import annotations

import shutil

import pytest
import torch

from sglang_duet.kernels.attention.base import ForwardBatch
from sglang_duet.kernels.attention.torch_backend import TorchAttentionBackend
from sglang_duet.memory import KVCachePool
from sglang_duet.model_loader import prepared
from sglang_duet.model_loader.loader import load_model
from sglang_duet.models import cpu_weights

PROMPTS = ["The capital of France is", "Hello world! How", "def add(a, b):\n"]


def _pool(cfg, slots: int = 256) -> KVCachePool:
    return KVCachePool(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, cfg.head_dim, torch.float32)


def greedy_alone(model, prompt: list[int], max_new: int, eos: int) -> list[int]:
    """One request by itself: a prefill, then one-row decode steps (the path the copies serve)."""
    pool, attn = _pool(model.config, len(prompt) + max_new + 2), TorchAttentionBackend()
    slots = list(range(1, len(prompt) + max_new + 1))
    with torch.inference_mode():
        out = [int(model(ForwardBatch.build([(prompt, 0, slots, True)]), attn, pool).argmax(-1))]
        while len(out) < max_new and out[-1] != eos:
            fb = ForwardBatch.build([([out[-1]], len(prompt) + len(out) - 1, slots, True)])
            out.append(int(model(fb, attn, pool).argmax(-1)))
    return out


def hf_greedy(path: str, prompt: list[int], max_new: int, eos: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["llama", "smollm", "qwen2", "qwen3"])  # untied, tied, q/k/v bias, QK-norm
def test_copies_are_exact_transposes_and_steps_of_up_to_3_rows_use_them(family, tiny_model_factory, monkeypatch):
    # without the blocked weights (no oneDNN, or SGLANG_DUET_CPU_PACKED=0); with them: test_cpu_packed_weights.py
    monkeypatch.setenv("SGLANG_DUET_CPU_PACKED", "0")
    model = load_model(tiny_model_factory(family), dtype="float32").model
    assert model.has_gemv_weights and not model.has_packed_weights
    a, m = model.model.layers[0].self_attn, model.model.layers[0].mlp
    head = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    for w_t, w in ((a.qkv_weight_t, a.qkv_weight), (a.o_weight_t, a.o_proj.weight),
                   (m.gate_up_weight_t, m.gate_up_weight), (model.lm_head_weight_t, head)):
        assert w_t.is_contiguous() and torch.equal(w_t, w.t())
    assert model.model.layers[0].mlp.down_proj.weight.is_contiguous()  # down_proj keeps one [out, in] copy
    # every [out, in] product goes through F.linear (nn.Linear's too); the copies through torch.mm / addmm
    rows_of_linear = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, w, b=None: rows_of_linear.append(x.shape[0]) or real(x, w, b))
    n_layers = model.config.num_hidden_layers

    def decode(n):  # n requests, one new token each, context 4
        batch = [([5 + i], 3, [1 + 4 * i + j for j in range(4)], True) for i in range(n)]
        rows_of_linear.clear()
        with torch.inference_mode():
            return model(ForwardBatch.build(batch), TorchAttentionBackend(), _pool(model.config))

    got = {n: decode(n) for n in (1, 2, 3)}
    assert rows_of_linear == [3] * n_layers  # up to GEMV_MAX_ROWS rows: only down_proj is [out, in]
    decode(cpu_weights.GEMV_MAX_ROWS + 1)
    assert rows_of_linear == [4] * (4 * n_layers + 1)  # 4 rows: q/k/v, o, gate/up, down, the LM head
    model.drop_gemv_weights()
    for n, logits in got.items():
        torch.testing.assert_close(logits, decode(n), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "smollm", "qwen2", "qwen3"])
def test_one_request_greedy_is_token_exact_with_transformers(family, tiny_model_factory):
    path = tiny_model_factory(family)
    lm = load_model(path, dtype="float32")
    assert lm.model.has_gemv_weights
    for text in PROMPTS:
        ids = lm.tokenizer(text).input_ids
        assert greedy_alone(lm.model, ids, 32, 2) == hf_greedy(path, ids, 32, 2), text


def test_which_models_get_the_copies(tiny_model_factory, monkeypatch):
    path = tiny_model_factory("llama")
    assert not load_model(path, dtype="bfloat16").model.has_gemv_weights  # measured for float32 only
    model = load_model(path, dtype="float32").model
    assert model.wants_gemv_weights(torch.device("cpu")) and not model.wants_gemv_weights(torch.device("cuda"))
    assert model.gemv_copy_bytes() == sum(t.numel() * 4 for t in (
        *(l.self_attn.qkv_weight for l in model.model.layers), *(l.self_attn.o_proj.weight for l in model.model.layers),
        *(l.mlp.gate_up_weight for l in model.model.layers), model.lm_head.weight))
    monkeypatch.setattr(cpu_weights, "GEMV_COPY_MAX_BYTES", model.gemv_copy_bytes() - 1)  # a model too big for them
    assert not load_model(path, dtype="float32").model.has_gemv_weights
    # new weights make the copies stale: load_weights drops them
    model.load_weights(model.state_dict().items())
    assert not model.has_gemv_weights and model.model.layers[0].self_attn.qkv_weight_t is None


def test_the_serving_file_maps_the_copies(tmp_path, monkeypatch, tiny_model_factory):
    root = tmp_path / "cache"
    monkeypatch.setenv("SGLANG_DUET_CACHE", str(root))
    folder = root / "smollm2-0123456789abcdef"
    shutil.copytree(tiny_model_factory("qwen2"), folder)
    load_model(str(folder), dtype="float32")  # writes the serving file
    mapped = load_model(str(folder), dtype="float32")
    assert mapped.mapped_file and mapped.model.has_gemv_weights
    assert prepared.mapped_files(mapped.model.lm_head_weight_t) == [mapped.mapped_file]
    tensors = mapped.model.serving_tensors()
    assert "model.layers.0.mlp.gate_up_weight_t" in tensors and "lm_head_weight_t" in tensors
    a = mapped.model.model.layers[1].self_attn
    assert torch.equal(a.qkv_weight_t, a.qkv_weight.t())
    # a file whose copy is not the transpose of its weight is refused
    bad = dict(tensors)
    bad["model.layers.0.self_attn.o_weight_t"] = torch.zeros(3, 3)
    with torch.device("meta"):
        fresh = type(mapped.model)(mapped.model.config, torch.float32)
    with pytest.raises(ValueError, match="o_weight_t"):
        fresh.adopt_serving_tensors(bad)


def test_the_embedded_model_alone_is_token_exact_with_transformers():
    """SmolLM2-135M (float32): each prompt decoded by itself, every step one row through the copies."""
    from sglang_duet.model_loader.embedded import default_model_path

    lm = load_model(default_model_path(), dtype="float32")
    assert lm.model.has_gemv_weights
    tok = lm.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=True)
    chat = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    for ids in (chat, tok("Once upon a time, there was").input_ids, tok("def fibonacci(n):").input_ids):
        assert greedy_alone(lm.model, ids, 32, 2) == hf_greedy(lm.model_dir, ids, 32, 2)
