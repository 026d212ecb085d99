"""The real server (three processes) on the embedded default model, through the official `openai`
client and raw HTTP. One module-scoped server; a second, tiny dummy one for the API-key checks."""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time

import httpx
import openai
import orjson
import pytest
import torch

from server_utils import REPO, TINY_CONFIG, ServerProcess

pytestmark = pytest.mark.timeout(300)

CHAT_Q = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    s = ServerProcess([])
    yield s
    assert s.stop() == 0, s.log_tail()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def server_info(server) -> dict:
    return httpx.get(server.url("/get_server_info"), timeout=10).json()


def sse_events(text: str) -> list:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


# ---- OpenAI API -------------------------------------------------------------------------------


def test_models(server, client, model):
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    r = httpx.get(server.url("/v1/models/no-such-model"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_chat_non_stream_and_stream(client, model):
    kw = dict(model=model, messages=CHAT_Q, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw)
    text = full.choices[0].message.content
    assert "Paris" in text
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 5 and 0 < full.usage.completion_tokens <= 24

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [full.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (
        full.usage.prompt_tokens, full.usage.completion_tokens)
    # the same prompt again: served from the prefix cache (all but the token it samples from)
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_non_stream_and_stream(client, model):
    kw = dict(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
    full = client.completions.create(**kw)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


def test_n_and_seeds(client, model):
    kw = dict(model=model, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=16,
              temperature=0.8, seed=1234, n=2)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert 2 <= a.usage.completion_tokens <= 32  # summed over the n choices
    # stream with n=2: every choice ends exactly once
    chunks = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, n=2,
                                            temperature=0.8, seed=7, stream=True))
    ends = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(ends) == [0, 1]


def test_stop_strings(client, model):
    kw = dict(model=model, prompt="Count: 1, 2, 3, 4,", max_tokens=24, temperature=0)
    base = client.completions.create(**kw).choices[0].text
    p = len(base) // 2
    stop = base[p:p + 4]
    assert len(stop) == 4
    expected = base[:base.find(stop)]
    got = client.completions.create(**kw, stop=[stop, "never-there"])
    assert got.choices[0].text == expected and stop not in got.choices[0].text
    assert got.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**kw, stop=stop, stream=True))
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == expected and stop not in streamed
    # chat, streaming: the stop string never reaches the client
    chat = client.chat.completions.create(model=model, messages=CHAT_Q, max_tokens=24, temperature=0,
                                          stop=["Paris"], stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    assert "Paris" not in text


def test_logprobs(client, model):
    r = client.chat.completions.create(model=model, messages=CHAT_Q, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.bytes == list(t.token.encode())
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4  # greedy picks the top token
    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5, temperature=0,
                                  logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == c.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and all(len(t) <= 2 for t in lp.top_logprobs)


def test_concurrent_clients(client, model):
    prompts = ["The capital of France is", "My favourite food is", "The sky is", "In 1492,"]
    results: dict[int, str] = {}

    def run(i):
        r = client.completions.create(model=model, prompt=prompts[i % 4], max_tokens=16, temperature=0)
        results[i] = r.choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 8
    for i in range(4):
        assert results[i] == results[i + 4]


# ---- native API, info, metrics ----------------------------------------------------------------


def test_generate_native(server):
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    r = httpx.post(server.url("/generate"), json=body, timeout=60).json()
    assert set(r) == {"text", "output_ids", "meta_info"} and len(r["output_ids"]) == 8
    meta = r["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["prompt_tokens"] > 0 and meta["completion_tokens"] == 8 and meta["e2e_latency"] > 0
    assert {"id", "cached_tokens"} <= set(meta)

    pushed = server_info(server)["internal_states"][0]["num_outputs_pushed"]
    ev = sse_events(httpx.post(server.url("/generate"), json={**body, "stream": True}, timeout=60).text)
    assert ev[-1] == "[DONE]" and len(ev) >= 3
    # uvicorn's httptools send: running events written from the receive loop (SSEStream._push), at
    # least one of the 6 between the first and the final output whatever the timing
    assert server_info(server)["internal_states"][0]["num_outputs_pushed"] > pushed
    texts = [e["text"] for e in ev[:-1]]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative
    assert texts[-1] == r["text"] and ev[-2]["output_ids"] == r["output_ids"]
    assert ev[-2]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(e["meta_info"]["finish_reason"] is None for e in ev[:-2])

    batch = httpx.post(server.url("/generate"), json={**body, "text": ["Hi", "Hello"]}, timeout=60).json()
    assert isinstance(batch, list) and len(batch) == 2


def test_errors(server, model):
    def post(path, body):
        return httpx.post(server.url(path), json=body, timeout=60)

    r = post("/v1/completions", {"model": model, "prompt": [1] * 9000, "max_tokens": 4})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == \
        "The input (9000 tokens) is longer than the model's context length (8192 tokens)."
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = post("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi " * 9000}]})
    assert r.status_code == 400
    assert re.fullmatch(r"The input \(\d+ tokens\) is longer than the model's context length \(8192 tokens\)\.",
                        r.json()["error"]["message"])
    r = post("/v1/chat/completions", {"model": model, "messages": CHAT_Q, "top_p": 1.5})
    assert r.status_code == 400 and r.json()["error"]["message"] == "top_p must be in (0, 1], got 1.5."
    assert r.json()["error"]["param"] == "top_p"
    r = post("/v1/completions", {"model": "gpt-4", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(server.url("/v1/completions"), content=b"{not json", timeout=10)
    assert r.status_code == 400 and "Malformed JSON" in r.json()["error"]["message"]
    r = post("/generate", {"text": "hi", "sampling_params": {"temperature": -1}})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = post("/generate", {"input_ids": [1, 10**9]})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    r = post("/v1/chat/completions", {"model": model, "messages": CHAT_Q, "n": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = post("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 4, "top_k": 10**30})
    assert r.status_code == 400
    r = post("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 4, "stream_options": {}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    assert httpx.get(server.url("/health")).status_code == 200  # and the server is still fine


def test_health_info_metrics(server):
    assert httpx.get(server.url("/health_generate"), timeout=60).status_code == 200
    info = server_info(server)
    # no --policy on a CPU: chunked, the budget sized from the CPU's calibration (cost_model/cpu_budget.py)
    assert info["policy"] == "chunked" and info["policy_info"]["name"] == "chunked"
    budget = info["chunked_prefill_size"]
    assert budget == info["policy_info"]["chunked_prefill_size"] and 64 <= budget <= 8192 and budget % 64 == 0
    default = info["policy_info"]["default"]
    assert (default["policy"], default["chunked_prefill_size"], default["source"]) == ("chunked", budget,
                                                                                       "cpu-calibration")
    assert info["policy_info"]["tbt_slo_ms"] == 100.0 and "ttft_slo_ms" in info["policy_info"]
    assert "api_key" not in info
    st = info["internal_states"][0]
    assert st["kv_free_slots"] + st["kv_used_slots"] == st["kv_total_slots"] > 0
    mi = httpx.get(server.url("/get_model_info")).json()
    assert mi["is_generation"] is True and "model_path" in mi and "tokenizer_path" in mi
    text = httpx.get(server.url("/metrics")).text
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage",
                 "sglang:prompt_tokens_total", "sglang:generation_tokens_total",
                 "sglang:time_to_first_token_seconds_bucket", "sglang:inter_token_latency_seconds_bucket",
                 "sglang:e2e_request_latency_seconds_count"):
        assert name in text, name
    assert re.search(r'sglang:policy_steps_total\{.*mode="aggregated".*\} [1-9]', text)
    assert 'sglang:policy_steps_total{' in text and 'mode="split"' in text
    assert re.search(r'sglang:policy_lane_launches_total\{.*lane="aggregated".*\} [1-9]', text)
    assert 'sglang:policy_sm_split{' in text and 'lane="decode"' in text


def test_greedy_matches_offline_engine(server):
    from sglang_duet.engine import Engine

    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    sp = {"max_new_tokens": 24, "temperature": 0}
    served = [httpx.post(server.url("/generate"), json={"text": p, "sampling_params": sp}, timeout=120).json()
              for p in prompts]
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # as the server (server_utils)
    engine = Engine()
    try:
        offline = engine.generate(prompts, sp)
    finally:
        engine.shutdown()
        torch.set_num_threads(threads)
    for s, o in zip(served, offline):
        assert s["output_ids"] == o["output_ids"]
        assert s["text"] == o["text"]


def wait_idle(server, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = server_info(server)["internal_states"][0]
        if (st["num_running_reqs"] == 0 and st["num_queue_reqs"] == 0 and st["num_inflight_http_requests"] == 0
                and st["num_inflight_launches"] == 0):
            return st
        assert time.monotonic() < deadline, f"not idle after {timeout}s: {st}"
        time.sleep(0.25)


def test_disconnected_streams_free_kv(server):
    before = wait_idle(server)

    async def one(client, i):
        body = {"input_ids": [1, 2, 3, 4 + i], "stream": True,
                "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}
        async with client.stream("POST", server.url("/generate"), json=body) as r:
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    n += 1
                    if n == 2:
                        return  # leaving the block closes the connection mid-stream

    async def non_streaming(client, i):  # gives up waiting for a long answer: the server must notice
        body = {"input_ids": [5, 6, 7 + i], "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}
        with pytest.raises(httpx.ReadTimeout):
            await client.post(server.url("/generate"), json=body, timeout=1.0)

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as c:
            await asyncio.gather(*(one(c, i) for i in range(50)), *(non_streaming(c, i) for i in range(4)))

    asyncio.run(main())
    after = wait_idle(server)  # 50 x 4000 tokens would take many minutes: only aborts get here
    assert after["kv_free_slots"] == before["kv_free_slots"] == before["kv_total_slots"]
    assert after["aborted"] - before["aborted"] >= 54


# ---- API key, tokenizer-less dummy model, CLI -------------------------------------------------


def test_api_key_and_dummy_model():
    with ServerProcess(["--load-format", "dummy", "--model-config", TINY_CONFIG], api_key="sekrit") as s:
        assert httpx.get(s.url("/health")).status_code == 200  # open without the key
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            for path in ("/v1/models", "/get_server_info", "/metrics"):
                r = httpx.get(s.url(path), headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        c = openai.OpenAI(base_url=s.url("/v1"), api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
        c = openai.OpenAI(base_url=s.url("/v1"), api_key="sekrit", max_retries=0)
        assert c.models.list().data[0].id == "tiny-overhead"
        r = httpx.post(s.url("/generate"), headers=s.headers, timeout=60,
                       json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}})
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 5 and r.json()["text"] == ""
        r = httpx.post(s.url("/generate"), headers=s.headers, json={"text": "hi"})
        assert r.status_code == 400 and "tokenizer" in r.json()["error"]["message"]


def test_cli_argument_errors():
    r = subprocess.run([sys.executable, "-m", "sglang_duet.launch_server", "--tp-size", "0"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--tp-size 0" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sglang_duet.cli", "serve", "--policy", "nope"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--policy nope" in r.stderr
