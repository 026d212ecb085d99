"""The benchmark client (benchmark/bench_serving.py) and the policy A/B harness (benchmark/ab.py).

(a) Against a stub SSE server with known delays: TTFT/ITL/TPOT/E2E arithmetic for every backend,
    error counting; dataset loaders and arrival processes (no server).
(b) Against the real server on the embedded model: every metric checked against what the server
    reported (its per-request counts and its /metrics counters).
(c) The A/B harness end to end on a reduced CPU experiment: runs.jsonl, summary.md, PNGs, and
    the table's numbers equal to the records.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import re
import sys
import time

import numpy as np
import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # `benchmark` is a top-level folder of the repository

from aiohttp import web  # noqa: E402

from benchmark.arrivals import arrival_offsets  # noqa: E402
from benchmark.backends import RequestOutput  # noqa: E402
from benchmark.bench_serving import build_args, main, run_benchmark  # noqa: E402
from benchmark.datasets import (PromptBuilder, iter_json_array, load_sharegpt_pairs, random_lengths,  # noqa: E402
                                sample_random, sample_sharegpt, sample_workload, sharegpt_default_path)
from benchmark.metrics import compute_metrics, format_table  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sglang_duet.model_loader.embedded import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def tokenizer_path():
    from sglang_duet.model_loader.embedded import default_model_path

    return default_model_path()


# ============================== (a) stub server ===============================================
FIRST_S, GAP_S = 0.100, 0.050  # stub: first chunk after 100 ms, then one every 50 ms
TOL_MS = 10.0  # localhost delivery of one chunk, stub stamp to client receipt, on a shared 2-core machine
# A loaded machine delays the stub's sends and the client's reads but never advances them: the
# delays themselves are checked as exact lower bounds, with this much slack above (it only
# guards against gross errors; the arithmetic is checked exactly against the stub's stamps).
SLACK_MS = 150.0


class StubServer:
    """SSE server with known delays in SGLang native and OpenAI formats. It runs in a process of
    its own (this file run as a script), so neither the client's event loop nor the GIL moves its
    timing. `fail_every`: every Nth request fails (odd N: HTTP 500; even N: the connection drops
    after the first chunk)."""

    def __init__(self, fail_every: int = 0):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--stub-server", str(fail_every)],
                                     stdout=subprocess.PIPE, text=True, cwd=REPO)
        line = self.proc.stdout.readline()
        assert line.startswith("PORT "), line
        self.port = int(line.split()[1])

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


def _stamp() -> str:
    """The stub's output text: the time each chunk is sent (CLOCK_MONOTONIC, shared by processes)."""
    return f"{time.perf_counter():.6f} "


async def _sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.perf_counter()))


class StubApp:
    def __init__(self, fail_every: int = 0):
        self.fail_every = fail_every
        self.count = 0

    def serve(self):
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)

        async def run():
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            print("PORT", site._server.sockets[0].getsockname()[1], flush=True)
            await asyncio.Event().wait()

        asyncio.run(run())

    @staticmethod
    async def _open(request):
        import socket

        # No Nagle: each event leaves at once, as from a real SSE server (uvicorn sets this too).
        request.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        return resp

    async def models(self, request):
        return web.json_response({"data": [{"id": "stub-model"}]})

    async def _stream(self, request, n: int, event, final=None):
        t0 = time.perf_counter()
        self.count += 1
        fail = self.fail_every and self.count % self.fail_every == 0
        if fail and self.fail_every % 2 == 1:
            return web.json_response({"error": {"message": "stub failure"}}, status=500)
        resp = await self._open(request)
        for i in range(n):
            await _sleep_until(t0 + FIRST_S + i * GAP_S)  # absolute times: delays do not add up
            await resp.write(f"data: {json.dumps(event(i))}\n\n".encode())
            if fail:
                request.transport.close()  # drop the connection mid-stream
                return resp
        if final is not None:
            await resp.write(f"data: {json.dumps(final)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def generate(self, request):
        body = await request.json()
        n = body["sampling_params"]["max_new_tokens"]
        prompt_tokens = len(body["input_ids"]) if "input_ids" in body else 7

        sent = []

        def event(i):
            sent.append(_stamp())
            return {"text": "".join(sent), "output_ids": list(range(i + 1)),
                    "meta_info": {"id": "x", "finish_reason": None, "prompt_tokens": prompt_tokens,
                                  "completion_tokens": i + 1, "cached_tokens": 0}}
        return await self._stream(request, n, event)

    async def completions(self, request):
        body = await request.json()
        n = body["max_tokens"]
        assert body["model"] == "stub-model" and body["stream_options"] == {"include_usage": True}
        return await self._stream(request, n, lambda i: {"choices": [{"index": 0, "text": _stamp()}]},
                                  final={"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": n}})

    async def chat(self, request):
        t0 = time.perf_counter()
        body = await request.json()
        n = body["max_tokens"]
        assert body["messages"][0]["role"] == "user"

        def event(i):
            return {"choices": [{"index": 0, "delta": {"content": _stamp()}}]}

        self.count += 1
        resp = await self._open(request)
        # A role-only chunk at once: it carries no output and must not count as the first token.
        await resp.write(b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n')
        for i in range(n):
            await _sleep_until(t0 + FIRST_S + i * GAP_S)  # absolute times: delays do not add up
            await resp.write(f"data: {json.dumps(event(i))}\n\n".encode())
        usage = {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": n}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return resp


@pytest.fixture
def stub():
    s = StubServer()
    yield s
    s.close()


def _stub_args(stub, tokenizer_path, backend, **kw):
    opts = dict(backend=backend, base_url=stub.url, tokenizer=tokenizer_path, dataset_name="random-ids",
                random_input_len=16, random_output_len=5, random_range_ratio=1.0, num_prompts=3,
                disable_tqdm=True, warmup_requests=0, seed=3)
    opts.update(kw)
    return build_args(**opts)


@pytest.mark.parametrize("backend", ["sglang", "openai", "openai-chat"])
def test_stub_timing_arithmetic(stub, tokenizer_path, backend):
    n = 5
    rec = run_benchmark(_stub_args(stub, tokenizer_path, backend, ttft_slo_ms=130, tbt_slo_ms=60, warmup_requests=1))
    assert rec["completed"] == 3 and rec["failed"] == 0
    e2e_expected = FIRST_S + (n - 1) * GAP_S
    ms = lambda xs: 1000 * float(np.median(xs))  # noqa: E731
    for ttft, lat, itl, chunks, out_len in zip(rec["ttfts"], rec["latencies"], rec["itls"], rec["chunks"],
                                              rec["output_lens"]):
        assert out_len == n and chunks == n and len(itl) == n - 1
        # Each value near the stub's delays (a loaded shared CPU can delay one event a little)...
        assert 0 <= ttft - FIRST_S < SLACK_MS / 1000
        assert all(abs(g - GAP_S) * 1000 < SLACK_MS for g in itl)
        assert 0 <= lat - e2e_expected < SLACK_MS / 1000
        # ...and the arithmetic between them exact: E2E = TTFT + sum(ITL) up to the last event.
        assert ttft + sum(itl) <= lat and lat - (ttft + sum(itl)) < 0.005
    # The typical values (TTFT and E2E also hold the request's set-up: connection, parsing).
    assert 0 <= ms(rec["ttfts"]) - 100 < SLACK_MS and rec["median_ttft_ms"] == pytest.approx(ms(rec["ttfts"]))
    assert abs(rec["median_itl_ms"] - 50) < SLACK_MS and abs(rec["median_tpot_ms"] - 50) < SLACK_MS
    assert 0 <= rec["median_e2e_latency_ms"] - 300 < SLACK_MS
    tpots = [(lat - t) / (n - 1) for t, lat in zip(rec["ttfts"], rec["latencies"])]
    assert rec["mean_tpot_ms"] == pytest.approx(1000 * float(np.mean(tpots)), rel=1e-9)
    assert rec["mean_ttft_ms"] == pytest.approx(1000 * float(np.mean(rec["ttfts"])), rel=1e-9)
    assert rec["p99_itl_ms"] == pytest.approx(float(np.percentile([g * 1000 for i in rec["itls"] for g in i], 99)))
    assert rec["total_output_tokens"] == 3 * n
    prompt_tokens = {"sglang": 16, "openai": 9, "openai-chat": 11}[backend]  # as the stub reports them
    assert rec["total_input_tokens"] == 3 * prompt_tokens
    # Both SLOs met by every request: TTFT 100 <= 130, TPOT and max ITL 50 <= 60.
    assert rec["slo_attainment"] == 1.0 and rec["itl_slo_attainment"] == 1.0
    assert rec["goodput"] == pytest.approx(3 / rec["duration"])
    assert rec["output_throughput"] == pytest.approx(3 * n / rec["duration"])


@pytest.mark.parametrize("backend", ["sglang", "openai", "openai-chat"])
def test_stub_chunk_times_exact(stub, backend):
    """Each chunk's text is the time the stub sent it, so the client's TTFT, ITLs and latency can
    be checked against the send times themselves: only delivery (localhost) stays in between."""
    import aiohttp

    from benchmark.backends import BACKENDS, RequestInput

    func, path = BACKENDS[backend]
    n = 5

    async def go():
        async with aiohttp.ClientSession() as session:
            reqs = [RequestInput(prompt="hi", prompt_len=1, output_len=n, api_url=stub.url + path,
                                 model="stub-model", prompt_ids=[1, 2, 3]) for _ in range(3)]
            await func(session, reqs[0], {})  # warm both processes' code paths
            return await asyncio.gather(*(func(session, r, {}) for r in reqs))

    for o in asyncio.run(go()):
        assert o.success and o.chunks == n and o.output_len == n and len(o.itl) == n - 1
        sent = [float(x) - o.start_time for x in o.generated_text.split()]
        received = [o.ttft + sum(o.itl[:i]) for i in range(n)]
        assert all(abs(r - s) * 1000 < TOL_MS for r, s in zip(received, sent)), (received, sent)
        assert abs(o.latency - sent[-1]) * 1000 < TOL_MS  # [DONE] follows the last chunk at once
        assert o.tpot == pytest.approx((o.latency - o.ttft) / (n - 1))
        assert o.max_itl == max(o.itl)
        assert FIRST_S <= o.ttft < FIRST_S + SLACK_MS / 1000  # the stub's delays, plus overheads
        assert all(abs(g - GAP_S) * 1000 < SLACK_MS for g in o.itl)


def test_stub_slo_misses_and_concurrency(stub, tokenizer_path):
    # With one request at a time the run lasts three E2E latencies; TTFT SLO 90 ms is missed by all.
    rec = run_benchmark(_stub_args(stub, tokenizer_path, "sglang", max_concurrency=1, ttft_slo_ms=90,
                                   warmup_requests=1))
    assert abs(rec["duration"] - 3 * 0.3) < 0.05
    assert rec["slo_attainment"] == 0.0 and rec["goodput"] == 0.0
    assert rec["concurrency"] == pytest.approx(1.0, abs=0.05)


def test_stub_errors_counted_not_fatal(tokenizer_path, tmp_path):
    for fail_every in (2, 3):  # dropped connection mid-stream; HTTP 500
        s = StubServer(fail_every=fail_every)
        try:
            out = tmp_path / "out.jsonl"
            rec = run_benchmark(_stub_args(s, tokenizer_path, "sglang", num_prompts=6, output_file=str(out),
                                           tbt_slo_ms=1000))
        finally:
            s.close()
        failed = 6 // fail_every
        assert rec["failed"] == failed and rec["completed"] == 6 - failed
        assert sum(bool(e) for e in rec["errors"]) == failed
        assert rec["slo_attainment"] == pytest.approx((6 - failed) / 6)  # failures count as misses
        line = json.loads(out.read_text().splitlines()[-1])
        assert line["failed"] == failed and "itls" not in line  # details only with --output-details


def test_main_prints_table(stub, tokenizer_path, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    argv = ["--backend", "openai", "--base-url", stub.url, "--tokenizer", tokenizer_path, "--dataset-name",
            "random-ids", "--random-input-len", "8", "--random-output-len", "3", "--num-prompts", "2",
            "--disable-tqdm", "--output-file", str(out), "--output-details", "--request-rate", "20",
            "--tbt-slo-ms", "100"]
    assert main(argv) == 0
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "============ Serving Benchmark Result ============" in text
    for label in ("Successful requests:", "Benchmark duration (s):", "Total input tokens:",
                  "Total generated tokens:", "Request throughput (req/s):", "Output token throughput (tok/s):",
                  "Mean TTFT (ms):", "P99 TPOT (ms):", "Median ITL (ms):", "P90 E2E Latency (ms):",
                  "Goodput, TTFT+TPOT (req/s):"):
        row = next(line for line in text.splitlines() if line.startswith(label))
        assert row[41:].strip(), row  # SGLang's layout: label padded to 40, value from column 41
    lines = out.read_text().splitlines()
    assert len(lines) == 2  # appended, one record per run
    rec = json.loads(lines[0])
    assert rec["request_rate"] == 20 and len(rec["itls"]) == 2 and rec["model"] == "stub-model"


def test_format_table_layout():
    outs = [RequestOutput(success=True, prompt_len=10, output_len=3, server_counts=True, ttft=0.1, latency=0.3,
                          itl=[0.1, 0.1], chunks=3), RequestOutput(error="boom")]
    m = compute_metrics(outs, duration=1.0, ttft_slo_ms=200, tbt_slo_ms=150)
    assert (m.completed, m.failed, m.total_input_tokens, m.total_output_tokens) == (1, 1, 10, 3)
    assert m.slo_attainment == 0.5 and m.goodput == 1.0
    assert m.tpot.mean == pytest.approx(100.0) and m.e2e_latency.median == pytest.approx(300.0)
    table = format_table(m, "sglang", math.inf, None)
    lines = table.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============" and lines[-1] == "=" * 50
    assert "Traffic request rate:                    inf" in table
    assert "Max request concurrency:                 not set" in table


# ------------------------------ datasets ------------------------------------------------------
def _write_conversations(path, convs, truncate_last: bool):
    items = [{"id": str(i), "conversations": [{"from": f, "value": v} for f, v in c]} for i, c in enumerate(convs)]
    text = json.dumps(items, indent=1)
    if truncate_last:
        text = text[: text.rindex('"value"')]  # cut inside the last conversation, like the packaged file
    path.write_text(text)


def test_iter_json_array_tolerates_truncation(tmp_path):
    p = tmp_path / "a.json"
    _write_conversations(p, [[("human", "x" * 50), ("gpt", "y")]] * 5, truncate_last=True)
    with pytest.raises(json.JSONDecodeError):
        json.loads(p.read_text())
    for block in (7, 64, 1 << 20):  # items straddling block boundaries
        items = list(iter_json_array(str(p), block_chars=block))
        assert len(items) == 4 and all(i["conversations"][0]["value"] == "x" * 50 for i in items)
    p.write_text('[{"a": 1}, {"a": 2}]')
    assert [i["a"] for i in iter_json_array(str(p), block_chars=3)] == [1, 2]


def test_packaged_sharegpt_recovered():
    path = sharegpt_default_path()
    assert os.path.basename(path) == "ShareGPT_V3_unfiltered_cleaned_split.json"
    pairs = load_sharegpt_pairs(path)
    assert 17000 < len(pairs) < 18000  # the whole conversations of the truncated file (>= 2 turns)


def test_sharegpt_filters(tmp_path, tokenizer):
    word = " hello"  # one token per repetition with this tokenizer
    assert len(tokenizer.encode(word * 10, add_special_tokens=False)) == 10
    convs = {
        "ok": [("human", word * 10), ("gpt", word * 20), ("human", "ignored third turn")],
        "short_prompt": [("human", word * 3), ("gpt", word * 20)],
        "short_reply": [("human", word * 10), ("gpt", word * 3)],
        "long_prompt": [("human", word * 1025), ("gpt", word * 10)],
        "long_total": [("human", word * 1000), ("gpt", word * 1049)],
        "one_turn": [("human", word * 10)],
    }
    p = tmp_path / "sg.json"
    _write_conversations(p, list(convs.values()), truncate_last=False)
    rows = sample_sharegpt(tokenizer, 10, str(p), seed=0)
    assert [(r.prompt_len, r.output_len) for r in rows] == [(10, 20)]
    # A fixed output length replaces the reply's: the short reply passes, the total is rechecked.
    rows = sample_sharegpt(tokenizer, 10, str(p), fixed_output_len=5, seed=0)
    assert sorted((r.prompt_len, r.output_len) for r in rows) == [(10, 5), (10, 5), (1000, 5)]
    assert len(sample_sharegpt(tokenizer, 1, str(p), fixed_output_len=5)) == 1  # stops at num_prompts


def test_random_range_ratio_semantics():
    rng = np.random.default_rng(0)
    x = random_lengths(20000, 100, 0.0, rng)
    assert x.min() == 1 and x.max() == 100  # r = 0: uniform on [1, X]
    x = random_lengths(20000, 100, 0.5, rng)
    assert x.min() == 50 and x.max() == 100 and abs(x.mean() - 75) < 1
    assert set(random_lengths(100, 100, 1.0, rng).tolist()) == {100}
    assert random_lengths(100, 1, 0.0, rng).tolist() == [1] * 100
    with pytest.raises(ValueError):
        random_lengths(1, 10, 1.5, rng)


@pytest.mark.parametrize("source", ["ids", "sharegpt"])
def test_random_prompts_have_exact_lengths(tokenizer, source):
    rows = sample_random(tokenizer, 12, input_len=200, output_len=20, range_ratio=0.5, source=source, seed=5)
    assert all(100 <= r.prompt_len <= 200 and 10 <= r.output_len <= 20 for r in rows)
    for r in rows:
        # The text re-encodes to exactly the ids: text and id prompts give the server one length.
        assert tokenizer.encode(r.prompt, add_special_tokens=False) == r.prompt_ids
        assert len(r.prompt_ids) == r.prompt_len
        assert not set(r.prompt_ids) & set(tokenizer.all_special_ids)
    again = sample_random(tokenizer, 12, input_len=200, output_len=20, range_ratio=0.5, source=source, seed=5)
    assert [r.prompt_ids for r in again] == [r.prompt_ids for r in rows]  # deterministic per seed


def test_prompt_builder_small_model_vocab(tokenizer):
    ids = PromptBuilder(tokenizer, "ids", np.random.default_rng(0), vocab_size=512).build(50)[1]
    assert len(ids) == 50 and max(ids) < 512


def test_workload_dataset(tokenizer):
    from sglang_duet.workloads import Workload

    rows = sample_workload(tokenizer, "azure-code", 6, request_rate=3.0, seed=2)
    specs = Workload.load("azure-code").sample(6, rate=3.0, seed=2)
    assert [(r.prompt_len, r.output_len) for r in rows] == [(s.input_len, s.output_len) for s in specs]
    assert [r.arrival_s for r in rows] == [s.arrival_s for s in specs]


# ------------------------------ arrivals ------------------------------------------------------
def test_poisson_and_gamma_arrivals():
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    t = np.array(arrival_offsets(40001, 4.0, seed=1))
    gaps = np.diff(t)
    assert t[0] == 0 and np.all(gaps >= 0)
    assert abs(gaps.mean() - 0.25) < 0.005 and abs(gaps.std() / gaps.mean() - 1.0) < 0.03  # exponential
    for burstiness in (0.25, 4.0):  # gamma shape k: mean 1/rate, CV 1/sqrt(k)
        gaps = np.diff(arrival_offsets(40001, 4.0, burstiness=burstiness, seed=1))
        assert abs(gaps.mean() - 0.25) < 0.01
        assert abs(gaps.std() / gaps.mean() - 1 / math.sqrt(burstiness)) < 0.05
    assert arrival_offsets(10, 2.0, seed=7) == arrival_offsets(10, 2.0, seed=7)
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0)


# ============================== (b) the real server ===========================================
@pytest.fixture(scope="module")
def real_server():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from server_utils import ServerProcess

    srv = ServerProcess(["--skip-warmup", "--max-running-requests", "8"])
    yield srv
    srv.stop()


def _server_counters(base_url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    out = {}
    for name in ("sglang:prompt_tokens_total", "sglang:generation_tokens_total", "sglang:num_requests_total"):
        out[name] = sum(float(m) for m in re.findall(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M))
    return out


@pytest.mark.parametrize("backend", ["sglang", "openai"])
def test_real_server_metrics_match_server(real_server, tokenizer_path, backend):
    n, n_in, n_out = 8, 32, 16
    before = _server_counters(real_server.base_url)
    rec = run_benchmark(build_args(backend=backend, base_url=real_server.base_url, dataset_name="random-ids",
                                   random_input_len=n_in, random_output_len=n_out, random_range_ratio=1.0,
                                   num_prompts=n, disable_tqdm=True, warmup_requests=1, seed=4,
                                   tbt_slo_ms=10_000, ttft_slo_ms=60_000))
    after = _server_counters(real_server.base_url)
    assert rec["completed"] == n and rec["failed"] == 0, rec["error_samples"]
    # Token counts are the server's (meta_info / usage) and equal what the run asked for.
    assert rec["output_lens"] == [n_out] * n and rec["input_lens"] == [n_in] * n
    assert rec["total_input_tokens"] == n * n_in and rec["total_output_tokens"] == n * n_out
    # ...and what the server counted in /metrics (plus the one warm-up request).
    assert after["sglang:generation_tokens_total"] - before["sglang:generation_tokens_total"] == (n + 1) * n_out
    assert after["sglang:prompt_tokens_total"] - before["sglang:prompt_tokens_total"] == (n + 1) * n_in
    assert rec["total_output_tokens_retokenized"] > 0
    for ttft, lat, itl, chunks in zip(rec["ttfts"], rec["latencies"], rec["itls"], rec["chunks"]):
        assert 0 < ttft <= lat
        assert 1 <= chunks <= n_out and len(itl) == chunks - 1  # one gap per chunk after the first
        assert sum(itl) <= lat - ttft + 1e-6
    tpots = [(lat - ttft) / (n_out - 1) for ttft, lat in zip(rec["ttfts"], rec["latencies"])]
    assert rec["mean_tpot_ms"] == pytest.approx(1000 * float(np.mean(tpots)), rel=1e-6)
    assert rec["mean_ttft_ms"] == pytest.approx(1000 * float(np.mean(rec["ttfts"])), rel=1e-6)
    assert rec["max_itl_ms"] == pytest.approx(1000 * max(g for i in rec["itls"] for g in i), rel=1e-6)
    assert rec["mean_ttft_ms"] <= rec["mean_e2e_latency_ms"]
    assert rec["output_throughput"] == pytest.approx(n * n_out / rec["duration"])
    assert rec["slo_attainment"] == 1.0 and rec["goodput"] == pytest.approx(n / rec["duration"])


# ============================== (c) the A/B harness ===========================================
def test_ab_harness_end_to_end(tmp_path):
    """The CPU experiment, reduced: its quick settings, with the model swapped for a 1-layer
    dummy (the embedded model's load alone would take most of the time budget) and a
    third policy whose server cannot start (a bad flag), which must be reported, not hang."""
    from benchmark.ab import CDF_GRID, main as ab_main
    from benchmark.ab_config import load_experiment
    from benchmark.ab_report import PLOTS, RUN_COLUMNS, read_records, run_cells

    with open(os.path.join(REPO, "configs", "experiments", "cpu-smollm2.yaml")) as fh:
        d = yaml.safe_load(fh)
    d["name"] = "cpu-smollm2-test"
    d["server"].update(load_format="dummy", model_config=os.path.join(REPO, "configs", "models", "tiny-overhead.json"))
    d["quick"]["rates"] = [4, 16]
    d["quick"]["benchmark"] = {"num_prompts": 4, "random_input_len": 24, "random_output_len": 6}
    d["policies"].append({"name": "broken", "policy": "chunked", "server": {"chunked_prefill_size": -2}})
    d["cdf_rate"] = 4
    exp_path = tmp_path / "exp.yaml"
    exp_path.write_text(yaml.safe_dump(d))
    out = tmp_path / "out"
    t0 = time.monotonic()
    assert ab_main([str(exp_path), "--quick", "--out", str(out)]) == 0
    assert time.monotonic() - t0 < 120

    exp = load_experiment(str(exp_path), quick=True)
    recs = read_records(str(out / "runs.jsonl"))
    assert [(r["policy"], r["rate"]) for r in recs] == [(p, r) for p in ("aggregated", "chunked-32", "broken")
                                                         for r in ("4", "16")]
    ok = [r for r in recs if r["status"] == "ok"]
    assert len(ok) == 4 and all(r["completed"] == 4 and r["total_output_tokens"] > 0 for r in ok)
    assert all(len(r["itl_cdf_ms"]) == len(CDF_GRID) for r in ok)
    assert {r["status"] for r in recs if r["policy"] == "broken"} == {"startup_failed"}
    assert "chunked-prefill-size" in recs[-1]["error"]  # the server's own message, from its log tail

    for name in PLOTS:
        assert (out / name).stat().st_size > 5000
    md = (out / "summary.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    run_rows = {(c[0], c[1]): c for c in ([x.strip() for x in row.strip("|").split("|")] for row in rows)
                if len(c) == 3 + len(RUN_COLUMNS)}
    for r in recs:
        cells = run_rows[(r["policy"], r["rate"])]
        assert cells[2] == r["status"]
        if r["status"] == "ok":
            assert cells[3:] == run_cells(r)
            assert float(cells[3]) == r["completed"] and float(cells[5]) == pytest.approx(
                r["request_throughput"], abs=0.005)
    pol = {c[0]: c for c in ([x.strip() for x in row.strip("|").split("|")] for row in rows) if len(c) == 10}
    assert pol["broken"][1] == "startup failed" and pol["aggregated"][1] == "ok"
    best = max(r["goodput"] for r in ok if r["policy"] == "chunked-32")
    assert float(pol["chunked-32"][2]) == pytest.approx(best, abs=0.005)

    # --resume: nothing left to run for the good policies; the broken one is retried and fails again.
    assert ab_main([str(exp_path), "--quick", "--out", str(out), "--resume"]) == 0
    recs2 = read_records(str(out / "runs.jsonl"))
    assert recs2[:6] == recs and [r["policy"] for r in recs2[6:]] == ["broken", "broken"]
    assert exp.plot_rate == 4


if __name__ == "__main__" and sys.argv[1:2] == ["--stub-server"]:
    StubApp(int(sys.argv[2])).serve()
