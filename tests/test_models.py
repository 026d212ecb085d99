"""Model execution parity: our Llama-family model + torch attention backend + KV pool vs
transformers, on tiny random checkpoints and on the embedded SmolLM2 GGUF."""
from __future__ import annotations

import json
import os

import pytest
import torch

from sglang_duet.kernels.attention.base import ForwardBatch
from sglang_duet.kernels.attention.torch_backend import TorchAttentionBackend
from sglang_duet.memory import KVCachePool
from sglang_duet.model_loader.loader import load_model
from sglang_duet.models.config import ModelConfig, ModelConfigError

PROMPTS = ["The capital of France is", "Hello world! How", "def add(a, b):\n"]


def make_pool(cfg: ModelConfig, num_slots: int = 512, dtype=torch.float32) -> KVCachePool:
    return KVCachePool(cfg.num_hidden_layers, num_slots, cfg.num_key_value_heads, cfg.head_dim, dtype)


def greedy(lm, prompts: list[list[int]], max_new: int, eos: set[int]) -> list[list[int]]:
    """Tiny engine: one batched prefill, then batched decode steps, page-size-1 slots.

    Requests get interleaved (non-contiguous) slots, and each request's slot list is
    reserved for the whole generation up front (longer than needed at every step), as a
    look-ahead executor would do.
    """
    n = len(prompts)
    pool, attn = make_pool(lm.config, 1 + n * (max(map(len, prompts)) + max_new)), TorchAttentionBackend()
    slots = [[1 + r + n * j for j in range(len(p) + max_new)] for r, p in enumerate(prompts)]
    fb = ForwardBatch.build([(p, 0, slots[r], True) for r, p in enumerate(prompts)])
    nxt = lm.model(fb, attn, pool).argmax(-1).tolist()
    outs: list[list[int]] = [[t] for t in nxt]
    while True:
        live = [r for r in range(n) if len(outs[r]) < max_new and outs[r][-1] not in eos]
        if not live:
            return outs
        reqs = [([outs[r][-1]], len(prompts[r]) + len(outs[r]) - 1, slots[r], True) for r in live]
        nxt = lm.model(ForwardBatch.build(reqs), attn, pool).argmax(-1).tolist()
        for r, t in zip(live, nxt):
            outs[r].append(t)


def hf_greedy(hf, prompt: list[int], max_new: int, eos_id: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                      eos_token_id=eos_id, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# ---- tiny transformers-built models --------------------------------------------------------

def test_greedy_token_exact_vs_transformers(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    hf = hf_model(tiny_model_dir)
    prompts = [lm.tokenizer(p).input_ids for p in PROMPTS]
    ours = greedy(lm, prompts, 32, {2})
    for p, o in zip(prompts, ours):
        assert o == hf_greedy(hf, p, 32, 2)


def test_prefill_logits_close(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    hf = hf_model(tiny_model_dir)
    ids = lm.tokenizer(PROMPTS[0] + " " + PROMPTS[1]).input_ids
    fb = ForwardBatch.build([(ids, 0, list(range(1, len(ids) + 1)), True)])
    fb.sample_indices = torch.arange(len(ids))  # logits of every position
    ours = lm.model(fb, TorchAttentionBackend(), make_pool(lm.config))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_and_mixed_batch(tiny_model_factory):
    """Prefill in two chunks (second chunk attends to a cached prefix) while another request
    decodes in the same batch: same logits as a one-shot prefill."""
    lm = load_model(tiny_model_factory("qwen3"))
    a = lm.tokenizer(PROMPTS[0] + " Paris. " + PROMPTS[2]).input_ids
    b = lm.tokenizer(PROMPTS[1]).input_ids
    ref_a = lm.model(ForwardBatch.build([(a, 0, list(range(1, len(a) + 1)), True)]),
                     TorchAttentionBackend(), make_pool(lm.config))
    ref_b = lm.model(ForwardBatch.build([(b, 0, list(range(1, len(b) + 1)), True)]),
                     TorchAttentionBackend(), make_pool(lm.config))
    pool, attn = make_pool(lm.config), TorchAttentionBackend()
    sa = list(range(300, 300 + len(a) + 8))[::-1]  # descending slots: order comes from kv_indices only
    sb = list(range(100, 100 + len(b) + 8))
    k = len(a) // 2
    lm.model(ForwardBatch.build([(a[:k], 0, sa, False), (b[:-1], 0, sb, False)]), attn, pool)
    fb = ForwardBatch.build([(a[k:], k, sa, True), (b[-1:], len(b) - 1, sb, True)])
    assert not fb.is_decode_only and fb.num_requests == 2
    out = lm.model(fb, attn, pool)
    torch.testing.assert_close(out[0], ref_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], ref_b[0], atol=1e-5, rtol=1e-5)


def test_sharded_safetensors_match_single_file(tiny_model_factory):
    sharded = tiny_model_factory("llama", sharded=True)
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    a = load_model(sharded).model.state_dict()
    b = load_model(tiny_model_factory("llama")).model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_tied_embeddings_have_no_lm_head(tiny_model_factory):
    lm = load_model(tiny_model_factory("smollm"))
    assert lm.config.tie_word_embeddings and lm.model.lm_head is None
    assert lm.chat_template and "<|im_start|>" in lm.chat_template


def test_forward_batch_ignores_extra_slots():
    fb = ForwardBatch.build([([5, 6, 7], 0, [9, 8, 7, 6, 5], True), ([4], 2, [1, 2, 3, 10, 11], False)])
    assert fb.positions.tolist() == [0, 1, 2, 2]
    assert fb.out_cache_loc.tolist() == [9, 8, 7, 3]
    assert fb.kv_indices.tolist() == [9, 8, 7, 1, 2, 3]
    assert fb.qo_indptr.tolist() == [0, 3, 4] and fb.kv_indptr.tolist() == [0, 3, 6]
    assert fb.seq_lens.tolist() == [3, 3] and fb.prefix_lens.tolist() == [0, 2]
    assert fb.sample_indices.tolist() == [2] and fb.num_requests == 2
    with pytest.raises(ValueError):
        ForwardBatch.build([([1, 2], 3, [1, 2, 3, 4], True)])  # needs 5 slots


def test_kv_pool_sizing(tiny_model_factory):
    cfg = ModelConfig.from_path(tiny_model_factory("qwen3"))
    per = KVCachePool.bytes_per_slot(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, torch.bfloat16)
    assert per == 2 * 2 * 2 * 32 * 2 == cfg.kv_bytes_per_token(2)
    pool = KVCachePool.from_budget(cfg, 100 * per + 7, torch.bfloat16, "cpu")
    assert pool.num_slots == 100 and pool.usable_slots == 99
    assert pool.get_kv(1)[0].shape == (100, 2, 32)
    with pytest.raises(ValueError):
        KVCachePool.from_budget(cfg, per, torch.bfloat16, "cpu")


# ---- config, dummy weights, options ---------------------------------------------------------

_BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}


def test_config_layouts():
    v4 = ModelConfig.from_dict({**_BASE, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
                                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    v5 = ModelConfig.from_dict({**_BASE, "dtype": "bfloat16", "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    for c in (v4, v5):
        assert c.rope_theta == 500000.0 and c.dtype == "bfloat16" and c.rope_scaling["factor"] == 8.0
        assert c.head_dim == 16 and c.family == "llama"
    with pytest.raises(ModelConfigError, match="rope_theta"):
        ModelConfig.from_dict(dict(_BASE))


def test_dummy_weights_deterministic(tmp_path):
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps({**_BASE, "rope_theta": 10000.0, "dtype": "bfloat16"}))
    a = load_model(None, load_format="dummy", model_config_path=str(cfg_file), seed=3)
    b = load_model(None, load_format="dummy", model_config_path=str(cfg_file), seed=3)
    c = load_model(None, load_format="dummy", model_config_path=str(cfg_file), seed=4)
    assert a.tokenizer is None and a.dtype == torch.float32  # 'auto' on CPU is float32
    wa, wb, wc = (m.model.model.layers[1].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert 0.015 < wa.std().item() < 0.025
    logits = a.model(ForwardBatch.build([([1, 2, 3], 0, [1, 2, 3], True)]), TorchAttentionBackend(), make_pool(a.config))
    assert logits.shape == (1, 100) and torch.isfinite(logits).all()


def test_dummy_from_model_dir_keeps_tokenizer(tiny_model_factory):
    lm = load_model(tiny_model_factory("qwen2"), load_format="dummy")
    assert lm.tokenizer is not None and lm.load_format == "dummy"


def test_dtype_and_format_options(tiny_model_factory):
    path = tiny_model_factory("qwen2")
    with pytest.raises(ValueError, match="--dtype"):
        load_model(path, dtype="int8")
    with pytest.raises(ValueError, match="--load-format"):
        load_model(path, load_format="pt")
    lm = load_model(path, dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    pool = make_pool(lm.config, dtype=torch.bfloat16)
    logits = lm.model(ForwardBatch.build([([3, 4, 5, 6], 0, [1, 2, 3, 4], True)]), TorchAttentionBackend(), pool)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# ---- GGUF and the embedded SmolLM2 ----------------------------------------------------------

def test_gguf_qk_unpermute_matches_rope_layouts():
    """llama.cpp rotates adjacent pairs (2i, 2i+1); HF rotates (i, i + d/2). The GGUF row
    permutation maps one onto the other, so un-permuting makes HF's RoPE correct."""
    from sglang_duet.model_loader.gguf_loader import permute_qk, unpermute_qk
    from sglang_duet.models.llama import rope_inv_freq, rotate_half

    heads, d = 3, 8
    w = torch.randn(heads * d, 5)
    assert torch.equal(unpermute_qk(permute_qk(w, heads), heads), w)
    x = torch.randn(heads, d)  # one token's q, HF layout
    ang = 7 * rope_inv_freq(d, 10000.0, None)
    cos, sin = torch.cat((ang, ang)).cos(), torch.cat((ang, ang)).sin()
    hf_rot = x * cos + rotate_half(x) * sin
    xg = permute_qk(x.reshape(-1, 1), heads).reshape(heads, d // 2, 2)  # GGUF layout, pairs adjacent
    c, s = ang.cos(), ang.sin()
    gg_rot = torch.stack((xg[..., 0] * c - xg[..., 1] * s, xg[..., 0] * s + xg[..., 1] * c), -1)
    torch.testing.assert_close(unpermute_qk(gg_rot.reshape(-1, 1), heads).reshape(heads, d), hf_rot)


@pytest.fixture(scope="module")
def smollm():
    from sglang_duet.model_loader.embedded import default_model_path

    return load_model(default_model_path())


def _chat_ids(tok, text: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding


def test_embedded_model_answers_paris(smollm):
    cfg = smollm.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.rope_theta, cfg.tie_word_embeddings) == (30, 576, 9, 3, 64, 100000.0, True)
    tok = smollm.tokenizer
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    out = greedy(smollm, [_chat_ids(tok, "What is the capital of France?")], 12, {2})[0]
    assert "Paris" in tok.decode(out)


def test_embedded_model_parity_vs_transformers(smollm):
    hf = hf_model(smollm.model_dir)
    tok = smollm.tokenizer
    prompts = [_chat_ids(tok, "What is the capital of France?"), tok("Once upon a time, there was").input_ids]
    ours = greedy(smollm, prompts, 16, {2})
    for p, o in zip(prompts, ours):
        assert o == hf_greedy(hf, p, 16, 2)


def test_gguf_llama3_rope_factors_recovered():
    """Llama 3.x GGUFs store rope_freqs.weight (per-frequency divisors), not parameters."""
    from sglang_duet.model_loader.gguf_loader import _llama3_scaling_from_factors
    from sglang_duet.models.llama import rope_inv_freq

    sc = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    factors = (rope_inv_freq(128, 500000.0, None) / rope_inv_freq(128, 500000.0, sc)).numpy()
    assert _llama3_scaling_from_factors(factors, {"head_dim": 128, "rope_theta": 500000.0}) == sc


def test_gguf_direct_load_matches_converted_folder(smollm):
    from sglang_duet.model_loader.embedded import embedded_gguf_path

    direct = load_model(embedded_gguf_path())
    assert direct.load_format == "gguf" and direct.chat_template == smollm.chat_template
    a, b = direct.model.state_dict(), smollm.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = "Numbers 12345 and words, ça va?"
    assert direct.tokenizer(text).input_ids == smollm.tokenizer(text).input_ids
