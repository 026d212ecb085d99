"""Data parallel the way SGLang users run it: `python -m sglang_router.launch_router --worker-urls`
in front of two sglang-duet servers (embedded SmolLM2, CPU).

Through the router, with the official openai client and the native /generate: greedy outputs
equal one server's, usage passes through, both workers serve (round robin), the router registered
each worker's tokenizer (it reads /server_info), SGLang's own bench_serving completes every
request with both workers serving, and killing one worker under load ends only the streams it
served while the router keeps answering with the other.

SGLang's bench_serving: sglang 0.5.4's standalone `sglang/bench_serving.py`, where
`pip install --no-deps sglang==0.5.4 && pip install pybase64 datasets` put it (all of SGLang's
dependencies would replace this project's torch). Not 0.5.3: it reads `internal_states` from the
router's own `/get_server_info` answer (`{"router_manager": true, ...}`, not a worker's) and
fails after the run, whatever the workers; 0.5.4 checks first. Newer ones need SGLang's runtime.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from hardening_utils import internal_state as _state
from router_utils import Router, openai_client as _client
from server_utils import SHARED_HOST, ServerProcess

pytest.importorskip("sglang_router", reason="sglang-router is not installed (pip install -e '.[dev]')")
openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
           "Water boils at"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
BENCH_INSTALL = "pip install --no-deps sglang==0.5.4 && pip install pybase64 datasets"


@pytest.fixture(scope="module")
def workers():
    servers = []
    try:
        # two at once would fight over 2 cores while loading; the second starts as the first warms up
        servers.append(ServerProcess(SHARED_HOST))
        servers.append(ServerProcess(SHARED_HOST))
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def routers(workers):
    urls = [w.base_url for w in workers]
    rr = Router(urls, "round_robin")
    ca = Router(urls, "cache_aware")
    yield {"round_robin": rr, "cache_aware": ca}
    rr.stop()
    ca.stop()


def _submitted(server) -> int:
    return _state(server)["submitted"]


def _completions(client, model: str, stream: bool) -> list[str]:
    out = []
    for p in PROMPTS:
        if stream:
            text = "".join(c.choices[0].text for c in client.completions.create(
                model=model, prompt=p, max_tokens=12, temperature=0, stream=True) if c.choices)
        else:
            text = client.completions.create(model=model, prompt=p, max_tokens=12, temperature=0).choices[0].text
        out.append(text)
    return out


def _chat(client, model: str, stream: bool) -> str:
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=CHAT, max_tokens=12, temperature=0, stream=True) if c.choices)
    return client.chat.completions.create(model=model, messages=CHAT, max_tokens=12,
                                          temperature=0).choices[0].message.content


@pytest.mark.parametrize("policy", ["round_robin", "cache_aware"])
def test_outputs_through_the_router_equal_one_server(workers, routers, policy):
    direct, routed = _client(workers[0].base_url), _client(routers[policy].url)
    model = direct.models.list().data[0].id
    before = [_submitted(w) for w in workers]
    for stream in (False, True):
        assert _completions(routed, model, stream) == _completions(direct, model, stream)
        assert _chat(routed, model, stream) == _chat(direct, model, stream)
    if policy == "round_robin":
        served = [_submitted(w) - b for w, b in zip(workers, before)]
        direct_calls = 2 * (len(PROMPTS) + 1)  # the reference answers, all on worker 0
        assert served[1] > 0 and served[0] - direct_calls > 0, served  # both workers served routed requests


def test_native_generate_streams_through_the_router(workers, routers):
    body = {"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    ref = httpx.post(workers[0].url("/generate"), json=body, timeout=60).json()
    with httpx.stream("POST", f"{routers['round_robin'].url}/generate", json={**body, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 3
    import json

    last = json.loads(events[-2])
    assert last["text"] == ref["text"] and last["meta_info"]["finish_reason"] == ref["meta_info"]["finish_reason"]


def test_usage_passes_through_the_router(workers, routers):
    direct, routed = _client(workers[0].base_url), _client(routers["round_robin"].url)
    model = direct.models.list().data[0].id
    ref = direct.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0).usage
    assert ref.prompt_tokens > 0 and ref.completion_tokens == 6
    for _ in range(2):  # round robin: once through each worker
        got = routed.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0).usage
        assert (got.prompt_tokens, got.completion_tokens, got.total_tokens) == (
            ref.prompt_tokens, ref.completion_tokens, ref.total_tokens)
        chunks = list(routed.chat.completions.create(model=model, messages=CHAT, max_tokens=6, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6, chunks[-1]


def _sglang_bench_serving() -> str:
    """SGLang's own bench_serving.py, found without importing sglang (its package __init__ needs
    SGLang's whole runtime); only the standalone file of sglang <= 0.5.x works that way."""
    spec = importlib.util.find_spec("sglang")
    path = os.path.join(spec.submodule_search_locations[0], "bench_serving.py") if spec else ""
    if not os.path.exists(path):
        pytest.skip(f"SGLang's bench_serving is not installed ({BENCH_INSTALL})")
    tops = [n for n in ast.parse(open(path).read()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    if any((getattr(n, "module", None) or "").startswith("sglang") for n in tops):
        pytest.skip(f"{path} imports SGLang's runtime (a newer sglang); {BENCH_INSTALL}")
    return path


def test_sglang_bench_serving_through_the_router(workers, routers, tmp_path):
    """`python -m sglang.bench_serving --backend sglang` against the router: every request completes
    and both workers serve (cache-aware routing, the router's default)."""
    bench = _sglang_bench_serving()
    info = httpx.get(workers[0].url("/get_model_info"), timeout=10).json()
    before = [_submitted(w) for w in workers]
    out, n = tmp_path / "bench.jsonl", 32
    cmd = [sys.executable, bench, "--backend", "sglang", "--base-url", routers["cache_aware"].url,
           "--model", _client(workers[0].base_url).models.list().data[0].id, "--tokenizer", info["tokenizer_path"],
           "--dataset-name", "random-ids", "--random-input-len", "64", "--random-output-len", "16",
           "--random-range-ratio", "0.5", "--num-prompts", str(n), "--request-rate", "8", "--seed", "1",
           "--flush-cache", "--disable-tqdm", "--output-file", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text().splitlines()[-1])
    assert result["completed"] == n, run.stdout[-3000:]
    served = [_submitted(w) - b for w, b in zip(workers, before)]
    print(f"bench_serving: {result['completed']}/{n} completed, {result['output_throughput']:.1f} output tok/s; "
          f"requests per worker {served}")
    assert min(served) > 0 and sum(served) >= n, served  # both workers served; n plus bench_serving's warm-up


def test_router_loaded_the_workers_tokenizer(routers):
    for w in httpx.get(f"{routers['round_robin'].url}/workers", timeout=10).json()["workers"]:
        assert w["metadata"].get("model_path"), w  # from /server_info: the router can tokenize


def test_flush_cache_and_model_info_through_the_router(workers, routers):
    url = routers["round_robin"].url
    flushes = [w.log_tail(1 << 22).count("flush_cache:") for w in workers]
    assert httpx.post(f"{url}/flush_cache", timeout=30).status_code == 200
    deadline = time.monotonic() + 10
    while [w.log_tail(1 << 22).count("flush_cache:") for w in workers] != [f + 1 for f in flushes]:
        assert time.monotonic() < deadline, "the router did not send /flush_cache to each worker once"
        time.sleep(0.2)
    direct = httpx.get(workers[0].url("/get_model_info"), timeout=10).json()
    assert httpx.get(f"{url}/get_model_info", timeout=10).json()["model_path"] == direct["model_path"]


def test_a_client_leaving_mid_stream_aborts_on_the_worker(workers, routers):
    client = _client(routers["round_robin"].url)
    model = client.models.list().data[0].id
    before = sum(_state(w)["aborted"] for w in workers)
    for i in range(2):  # round robin: one on each worker
        stream = client.completions.create(model=model, prompt=PROMPTS[i], max_tokens=400, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        for k, _ in enumerate(stream):
            if k == 2:
                break
        stream.close()  # the router drops its upstream connection; the worker must notice and abort
    deadline = time.monotonic() + 60
    while True:
        states = [_state(w) for w in workers]
        idle = all(s["num_running_reqs"] == 0 and s["kv_used_slots"] == 0 for s in states)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert idle, states  # not left generating 400 tokens for nobody
    assert sum(s["aborted"] for s in states) - before == 2, states


def test_killing_a_worker_ends_only_its_streams(workers, routers):
    """Last in this module: it kills worker 1."""
    router = routers["round_robin"]
    client = _client(router.url)
    model = client.models.list().data[0].id
    n, max_tokens = 6, 200
    results: list = [None] * n
    started = threading.Barrier(n + 1)

    def one(i: int) -> None:
        got = 0
        try:
            stream = client.completions.create(model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
            for chunk in stream:
                if got == 0:
                    started.wait(60)
                got += sum(1 for c in chunk.choices if c.text)
                if chunk.choices and chunk.choices[0].finish_reason:
                    results[i] = ("done", chunk.choices[0].finish_reason)
                    return
            results[i] = ("cut", got)  # the stream ended without a finish reason
        except Exception as e:  # noqa: BLE001 - what the client sees when its worker dies
            results[i] = ("error", type(e).__name__)
            if got == 0:
                started.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    started.wait(120)  # every stream has its first token: both workers are busy
    workers[1].proc.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), results
    done = [r for r in results if r[0] == "done"]
    failed = [r for r in results if r[0] != "done"]
    assert len(done) == n // 2 and len(failed) == n // 2, results  # round robin: half on each worker
    assert all(r[1] == "length" for r in done), results
    assert time.monotonic() - t0 < 120
    # the router keeps serving with the survivor (its health check drops the dead worker)
    ok = 0
    for _ in range(6):
        try:
            client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=4, temperature=0)
            ok += 1
        except openai.APIError:
            time.sleep(1)
    assert ok >= 4, ok
    assert client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=4, temperature=0).choices[0].text
