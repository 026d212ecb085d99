"""Disaggregated serving: KV transport, core hooks, placement search, and the whole thing end to end.

End to end (CPU, embedded SmolLM2): `launch_server --disaggregation-mode pd-local` (1 prefill + 1
decode instance + the router) must answer exactly like a single plain server (greedy), through
the openai client and the native /generate; a decode instance that refuses makes the router try
the next one; killing the decode instance under load ends every request with an answer or an
error, never a hang. The plain reference server and pd-local start in parallel.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import orjson
import pytest
import torch

from server_utils import REPO, SHARED_HOST, ServerProcess, free_port

from sglang_duet.core.request import ReqState
from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
from sglang_duet.disagg.messages import KVLayout
from sglang_duet.disagg.transfer import (MAX_RUNS, NullTransport, ShmTransport, make_transport, pool_layout,
                                        slot_runs)
from sglang_duet.memory.kv_pool import KVCachePool
from sglang_duet.sampling_params import SamplingParams

# A hang guard, not a speed check: the first end-to-end test also pays for starting the reference
# server and pd-local (182 s of setup + 45 s measured at load average 11 on the 2-core machine).
pytestmark = pytest.mark.timeout(480)

KV_SLOTS = 6000  # per instance: small pools, small shared-memory files


# ---- KV transport ------------------------------------------------------------------------------


def _pool(slots=64, layers=3, heads=2, dim=8, dtype=torch.float32):
    return KVCachePool(layers, slots, heads, dim, dtype, "cpu")


@pytest.mark.parametrize("share_pool", [True, False], ids=["pool-in-shm", "staged"])
def test_shm_round_trip(tmp_path, caplog, share_pool):
    src, dst = _pool(), _pool()
    tx = ShmTransport(src, pool_layout(src), "p0", "prefill", shm_dir=str(tmp_path), share_pool=share_pool)
    rx = ShmTransport(dst, pool_layout(dst), "d0", "decode", shm_dir=str(tmp_path))
    try:
        # The model writes into the (possibly moved) pool after the transport is set up.
        src.buffer.copy_(torch.randn_like(src.buffer))
        src_slots, dst_slots = [5, 6, 7, 20, 3], [40, 41, 2, 9, 10]
        desc = tx.export("t1", src_slots)
        assert desc.nbytes == len(src_slots) * pool_layout(src).bytes_per_token
        with caplog.at_level(logging.INFO, logger="sglang_duet.disagg.transfer"):
            stats = rx.import_kv(desc, dst_slots)
        assert torch.equal(dst.buffer[:, :, dst_slots], src.buffer[:, :, src_slots])
        untouched = [s for s in range(dst.num_slots) if s not in dst_slots]
        assert not dst.buffer[:, :, untouched].any()
        assert slot_runs([5, 6, 7, 20, 3], [40, 41, 2, 9, 10]) == [(5, 40, 2), (7, 2, 1), (20, 9, 1), (3, 10, 1)]
        assert stats.nbytes == desc.nbytes and stats.seconds > 0 and stats.gbps > 0
        assert any("KV transfer t1 via shm" in r.message and "GB/s" in r.message for r in caplog.records)
        assert rx.totals()["transfers"] == 1
        tx.release("t1")
        # a fragmented list (more runs than MAX_RUNS) takes the indexed path
        import random

        rng = random.Random(0)
        src_slots, dst_slots = rng.sample(range(1, 64), 40), rng.sample(range(1, 64), 40)
        assert len(slot_runs(src_slots, dst_slots)) > MAX_RUNS
        rx.import_kv(tx.export("t2", src_slots), dst_slots)
        assert torch.equal(dst.buffer[:, :, dst_slots], src.buffer[:, :, src_slots])
        tx.release("t2")
    finally:
        tx.close()
        rx.close()
    assert os.listdir(tmp_path) == []  # pool and staging files removed


def _import_in_child(desc_bytes, dst_slots, conn):
    import msgspec

    from sglang_duet.disagg.messages import KVDescriptor

    desc = msgspec.msgpack.decode(desc_bytes, type=KVDescriptor)
    dst = _pool()
    rx = ShmTransport(dst, pool_layout(dst), "d1", "decode")
    stats = rx.import_kv(desc, dst_slots)
    conn.send((dst.buffer[:, :, dst_slots].numpy().tobytes(), stats.nbytes, stats.ms))


def test_shm_round_trip_across_processes():
    import msgspec

    src = _pool()
    tx = ShmTransport(src, pool_layout(src), "p1", "prefill")
    try:
        src.buffer.copy_(torch.randn_like(src.buffer))
        desc = tx.export("t2", [1, 2, 3, 60])
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_import_in_child, args=(msgspec.msgpack.encode(desc), [9, 8, 7, 6], child))
        p.start()
        assert parent.poll(60), "the child did not answer"
        data, nbytes, ms = parent.recv()
        p.join(10)
        got = torch.frombuffer(bytearray(data), dtype=torch.float32).view(2, 3, 4, 2, 8)
        assert torch.equal(got, src.buffer[:, :, [1, 2, 3, 60]])
        assert nbytes == desc.nbytes and ms > 0
    finally:
        tx.close()


def test_transport_checks():
    pool = _pool()
    assert isinstance(make_transport("auto", None, KVLayout(2, 2, 8, "bfloat16"), "x", "prefill"), NullTransport)
    with pytest.raises(ValueError, match="emulated"):
        make_transport("shm", None, KVLayout(2, 2, 8, "bfloat16"), "x", "prefill")
    rx = ShmTransport(pool, pool_layout(pool), "d", "decode")
    other = _pool(layers=4)
    tx = ShmTransport(other, pool_layout(other), "p", "prefill")
    try:
        with pytest.raises(ValueError, match="layout"):
            rx.import_kv(tx.export("t", [1, 2]), [1, 2])
    finally:
        tx.close()


def _share_in_child(conn):
    from sglang_duet.disagg.cuda_ipc import CudaIpcTransport

    pool = KVCachePool(3, 64, 2, 8, torch.bfloat16, "cuda")
    pool.buffer.copy_(torch.randn_like(pool.buffer))
    tx = CudaIpcTransport(pool, pool_layout(pool), "p", "prefill")
    desc = tx.export("t", [4, 5, 6, 33])
    import msgspec

    conn.send((msgspec.msgpack.encode(desc), pool.buffer[:, :, [4, 5, 6, 33]].float().cpu().numpy().tobytes()))
    conn.recv()  # keep the exporting process (and its memory) alive until the parent is done


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
def test_cuda_ipc_round_trip():
    import msgspec

    from sglang_duet.disagg.cuda_ipc import CudaIpcTransport
    from sglang_duet.disagg.messages import KVDescriptor

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_share_in_child, args=(child,))
    p.start()
    try:
        assert parent.poll(120)
        desc_bytes, expected = parent.recv()
        desc = msgspec.msgpack.decode(desc_bytes, type=KVDescriptor)
        dst = KVCachePool(3, 64, 2, 8, torch.bfloat16, "cuda")
        rx = CudaIpcTransport(dst, pool_layout(dst), "d", "decode")
        stats = rx.import_kv(desc, [10, 11, 12, 13])
        got = dst.buffer[:, :, [10, 11, 12, 13]].float().cpu()
        want = torch.frombuffer(bytearray(expected), dtype=torch.float32).view(got.shape)
        assert torch.equal(got, want) and stats.nbytes == desc.nbytes
        rx.close()
    finally:
        parent.send("done")
        p.join(30)


# ---- scheduler core hooks --------------------------------------------------------------------------


class _NoPolicy:
    def plan(self, view):
        return None


def test_core_hooks_hold_and_admit_prefilled():
    core = SchedulerCore(CoreConfig(kv_slots=100, context_length=64), _NoPolicy())
    held = {}

    def hold(r, reason):
        held[r.rid] = list(r.kv_slots)
        return True

    core.kv_hold = hold
    r = core.add_request("a", [1, 2, 3], SamplingParams(max_new_tokens=1))
    core.waiting.remove(r)
    core.running["a"] = r
    r.kv_slots = core.allocator.alloc(3)
    r.state = ReqState.RUNNING
    free_before = core.allocator.available
    core._finish(r, {"type": "length"})
    assert len(held["a"]) == 3
    assert core.allocator.available == free_before  # kept for the decode side, not freed
    assert core.release_held("a") == 3 and core.allocator.available == free_before + 3
    assert core.release_held("a") == 0  # released once
    core.abort("b")  # aborts never go to the hook
    # decode side: admit with the slots, the first token already sampled
    dec = SchedulerCore(CoreConfig(kv_slots=100, context_length=64), _NoPolicy())
    slots = dec.allocator.alloc(3)
    u = dec.admit_prefilled("a", [1, 2, 3], 9, SamplingParams(max_new_tokens=4), slots, seed=5, cached_tokens=2)
    req = dec.requests["a"]
    assert u.new_token_ids == [9] and not u.finished and req.is_decoding and req.num_computed == 3
    assert u.cached_tokens == 2  # the prefill's prefix-cache hit, reported as a single server would
    # the first token may end the request (eos): its slots are freed at once
    slots = dec.allocator.alloc(3)
    avail = dec.allocator.available
    u = dec.admit_prefilled("b", [1, 2, 3], 2, SamplingParams(max_new_tokens=4), slots, eos_ids={2})
    assert u.finished and u.finish_reason["type"] == "stop" and dec.allocator.available == avail + 3


# ---- placement search ---------------------------------------------------------------------------


def test_placement_small_grid():
    from sglang_duet.disagg.placement import SearchConfig, enumerate_plans, markdown, search

    cfg = SearchConfig(num_requests=120, min_span_s=0.0, tps=(1, 2), refine=1, start_rate=8.0, max_rate=150.0)
    res = search(cfg, [2, 3], ["chunked:2048"], validate=True, log=lambda s: None)
    for n, e in res["plans"].items():
        b = e["best"]
        assert b["gpus"] <= int(n)
        assert b["gpus"] == b["n_prefill"] * b["tp_prefill"] + b["n_decode"] * b["tp_decode"]
        assert b["goodput"] == pytest.approx(min(b["n_prefill"] * b["goodput_prefill"],
                                                 b["n_decode"] * b["goodput_decode"]))
        assert b["goodput_per_gpu"] == pytest.approx(b["goodput"] / b["gpus"])
        v = e["validated"]["attainment"]
        assert v["goodput"] > 0 and v["per_gpu"] == pytest.approx(v["goodput"] / b["gpus"])
        f = e["fill"]  # the plan with the most goodput on the whole budget
        assert f["gpus"] <= int(n) and f["goodput"] >= b["goodput"] - 1e-9
        assert f["per_budget_gpu"] == pytest.approx(f["goodput"] / int(n))
        assert e["fill_validated"]["attainment"]["per_gpu"] == pytest.approx(
            e["fill_validated"]["attainment"]["goodput"] / f["gpus"])
    assert res["plans"]["2"]["best"]["gpus"] == 2  # 1 prefill + 1 decode at tp 1 is the only plan
    assert set(res["phase_goodput"]["prefill"]) == set(res["phase_goodput"]["decode"]) == {"1", "2"}
    # colocated at each TP degree too, per GPU over the group's GPUs
    c1, c2 = res["colocated"]["chunked-2048"], res["colocated"]["chunked-2048-tp2"]
    assert c1["goodput"]["attainment"] > 0 and c2["tp"] == 2
    assert c2["per_gpu"]["attainment"] == pytest.approx(c2["goodput"]["attainment"] / 2)
    assert "| chunked-2048-tp2 | 2 |" in markdown(res)
    plans = enumerate_plans({1: 10.0, 2: 25.0}, {1: 30.0}, 4)
    assert all(p.gpus <= 4 for p in plans)
    assert plans[0].goodput_per_gpu == max(p.goodput_per_gpu for p in plans)
    # each phase picks its own degree: tp 2 prefill (25 req/s on 2 GPUs) + tp 1 decode (30 on 1) is
    # 25 req/s on 3 GPUs, more per GPU than 3 tp-1 prefills + 1 decode (30 on 4)
    assert (plans[0].tp_prefill, plans[0].n_prefill, plans[0].tp_decode, plans[0].n_decode) == (2, 1, 1, 1)


# ---- end to end --------------------------------------------------------------------------------


class PDLocal:
    """`launch_server --disaggregation-mode pd-local`: the router on our port, instances on free ports."""

    def __init__(self, args: list[str], timeout: float = 240.0):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sglang-duet-pd-local-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "sglang_duet.launch_server", "--disaggregation-mode", "pd-local",
               "--pd-local-router", "builtin", "--port", str(self.port), *args]  # this project's router's features
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        self.timeout = timeout

    def wait(self) -> "PDLocal":
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pd-local exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url("/health"), timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"pd-local not healthy:\n{self.log_tail()}")

    def url(self, path: str) -> str:
        return self.base_url + path

    def log_tail(self, n: int = 6000) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-n:]

    def instances(self) -> dict:
        return httpx.get(self.url("/disagg/instances"), timeout=10).json()

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        os.unlink(self.log.name)
        return self.proc.returncode


@pytest.fixture(scope="module")
def servers():
    common = ["--max-total-tokens", str(KV_SLOTS), "--disaggregation-kv-timeout-s", "20"]
    pd = PDLocal(common)  # starts its instances meanwhile
    try:
        ref = ServerProcess(["--max-total-tokens", str(KV_SLOTS), *SHARED_HOST])  # beside pd-local's two
    except BaseException:
        pd.stop()
        raise
    try:
        pd.wait()
    except BaseException:
        ref.stop()
        pd.stop()
        raise
    yield pd, ref
    ref.stop()
    pd.stop()


@pytest.fixture(scope="module")
def clients(servers):
    import openai  # here, not at the top: the transport tests run where openai is not installed (GPU machine)

    pd, ref = servers
    kw = dict(api_key="unused", max_retries=0, timeout=120)
    return openai.OpenAI(base_url=pd.url("/v1"), **kw), openai.OpenAI(base_url=ref.url("/v1"), **kw)


def _model(client) -> str:
    return client.models.list().data[0].id


def _counts(usage) -> tuple:
    # token counts only: cached-token details depend on each server's prefix cache, not on disaggregation
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]


def test_completions_match_single_server(clients):
    router, ref = clients
    model = _model(router)
    assert model == _model(ref)
    for prompt in PROMPTS:
        kw = dict(model=model, prompt=prompt, max_tokens=20, temperature=0)
        want = ref.completions.create(**kw)
        got = router.completions.create(**kw)
        assert got.choices[0].text == want.choices[0].text
        assert got.choices[0].finish_reason == want.choices[0].finish_reason
        assert _counts(got.usage) == _counts(want.usage)
        streamed = list(router.completions.create(**kw, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == want.choices[0].text
    # n > 1 and several prompts in one request
    kw = dict(model=model, prompt=PROMPTS[:2], max_tokens=8, temperature=0, n=2)
    assert sorted((c.index, c.text) for c in router.completions.create(**kw).choices) == \
        sorted((c.index, c.text) for c in ref.completions.create(**kw).choices)


def test_chat_match_single_server(clients):
    router, ref = clients
    model = _model(router)
    kw = dict(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24,
              temperature=0)
    want = ref.chat.completions.create(**kw)
    got = router.chat.completions.create(**kw)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert "Paris" in got.choices[0].message.content
    assert _counts(got.usage) == _counts(want.usage)
    chunks = list(router.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.choices[0].message.content
    assert _counts(chunks[-1].usage) == _counts(want.usage)


def _sse(text: str) -> list:
    return [line[6:] if line[6:] == "[DONE]" else orjson.loads(line[6:])
            for line in text.splitlines() if line.startswith("data: ")]


def test_native_generate_match_single_server(servers):
    pd, ref = servers
    body = {"text": PROMPTS[:2], "sampling_params": {"max_new_tokens": 12, "temperature": 0},
            "return_logprob": True, "top_logprobs_num": 2}
    want = httpx.post(ref.url("/generate"), json=body, timeout=120).json()
    got = httpx.post(pd.url("/generate"), json=body, timeout=120).json()
    for g, w in zip(got, want):
        assert g["text"] == w["text"] and g["output_ids"] == w["output_ids"]
        assert g["meta_info"]["finish_reason"] == w["meta_info"]["finish_reason"]
        for a, b in zip(g["meta_info"]["output_token_logprobs"], w["meta_info"]["output_token_logprobs"]):
            assert a[1] == b[1] and a[0] == pytest.approx(b[0], abs=1e-4)
        assert [[t for _, t, _ in top] for top in g["meta_info"]["output_top_logprobs"]] == \
            [[t for _, t, _ in top] for top in w["meta_info"]["output_top_logprobs"]]
    # input_ids, streaming (cumulative text), a stop string, and a one-token answer (no KV transfer)
    ids = want[0]["output_ids"][:3] + [28, 29, 30]
    for sp in ({"max_new_tokens": 10, "temperature": 0}, {"max_new_tokens": 1, "temperature": 0},
               {"max_new_tokens": 30, "temperature": 0, "stop": [" Paris"]}):
        b = {"input_ids": ids if sp["max_new_tokens"] != 30 else None, "sampling_params": sp, "stream": True}
        if b["input_ids"] is None:
            b = {"text": PROMPTS[0], "sampling_params": sp, "stream": True}
        w = _sse(httpx.post(ref.url("/generate"), json=b, timeout=120).text)
        g = _sse(httpx.post(pd.url("/generate"), json=b, timeout=120).text)
        assert g[-1] == "[DONE]" and g[-2]["text"] == w[-2]["text"] and g[-2]["output_ids"] == w[-2]["output_ids"]
        assert g[-2]["meta_info"]["finish_reason"] == w[-2]["meta_info"]["finish_reason"]


def test_kv_accounting_and_health(servers):
    pd, _ = servers
    assert httpx.get(pd.url("/health"), timeout=10).status_code == 200
    assert httpx.get(pd.url("/health_generate"), timeout=60).status_code == 200
    inst = pd.instances()
    assert inst["routed"]["failed"] == 0
    urls = {i["role"]: i["url"] for i in inst["instances"]}
    info = httpx.get(urls["prefill"] + "/disagg/info", timeout=10).json()
    # auto: shm on this host, plus Mooncake for other hosts where its engine loads
    from sglang_duet.disagg.mooncake import mooncake_error

    expect = "shm" if mooncake_error() else "shm+mooncake"
    assert info["mode"] == "prefill" and info["disagg"]["transfer"]["backend"] == expect
    # Every transfer was pulled and released: no KV stays held on either instance.
    deadline = time.monotonic() + 10
    while True:
        states = [httpx.get(u + "/get_server_info", timeout=10).json()["internal_states"][0] for u in urls.values()]
        if all(s["kv_free_slots"] == s["kv_total_slots"] for s in states) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(s["kv_free_slots"] == s["kv_total_slots"] for s in states), states
    log = pd.log_tail(1 << 20)
    assert "KV transfer" in log and "GB/s" in log and "pulled by a decode instance" in log


def test_a_descriptor_is_pulled_once(servers):
    """The release confirmation: a second pull of the same KV, or a pull after the router released it,
    is refused with 410 (the copy could hold another request's KV) instead of decoding garbage."""
    pd, _ = servers
    urls = {i["role"]: i["url"] for i in pd.instances()["instances"]}
    ids = [1, 504, 3458, 282, 4649, 314]
    sp = {"max_new_tokens": 6, "temperature": 0}

    def prefill(rid):
        r = httpx.post(urls["prefill"] + "/disagg/prefill", json={"rid": rid, "input_ids": ids, "sampling_params": sp},
                       timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["kv"]["slots"] and len(out["kv"]["slots"]) == len(ids) and not out["final"]
        return out

    def decode(rid, pre):
        body = {"rid": rid, "input_ids": ids, "sampling_params": sp, "first_token": pre["first_token"],
                "first_logprob": None, "seed": pre["seed"], "kv": pre["kv"]}
        return httpx.post(urls["decode"] + "/disagg/decode", json=body, timeout=60)

    pre = prefill("once-p")
    first = decode("once-d1", pre)
    assert first.status_code == 200 and _sse(first.text)[-1] == "[DONE]"
    assert _sse(first.text)[-2]["finished"]
    second = decode("once-d2", pre)
    assert second.status_code == 410, second.text
    pre = prefill("released-p")
    assert httpx.post(urls["prefill"] + "/disagg/release", json={"rid": pre["kv"]["transfer_id"]},
                      timeout=10).status_code == 200
    late = decode("released-d", pre)
    assert late.status_code == 410, late.text


class _RefusingDecode(BaseHTTPRequestHandler):
    """Looks like a decode instance with plenty of room, and refuses every decode with 503."""

    info: dict = {}
    calls = 0

    def _json(self, code: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        if self.path == "/disagg/info":
            self._json(200, self.info)
        else:  # /get_server_info: ready, and more free KV than the real decode instance
            self._json(200, {"internal_states": [{"ready": True, "dead": None, "num_queue_reqs": 0,
                                                  "kv_free_slots": 10 ** 9, "kv_total_slots": 10 ** 9}]})

    def do_POST(self):  # noqa: N802
        type(self).calls += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._json(503, {"error": {"message": "no room here", "code": 503}})

    def log_message(self, *args):
        pass


def test_router_retries_a_refusing_decode_instance(servers):
    pd, ref = servers
    urls = {i["role"]: i["url"] for i in pd.instances()["instances"]}
    _RefusingDecode.info = httpx.get(urls["decode"] + "/disagg/info", timeout=10).json()
    fake = ThreadingHTTPServer(("127.0.0.1", 0), _RefusingDecode)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    fake_url = f"http://127.0.0.1:{fake.server_address[1]}"
    port = free_port()
    router = subprocess.Popen([sys.executable, "-m", "sglang_duet.router", "--prefill", urls["prefill"],
                               "--decode", fake_url, urls["decode"], "--port", str(port), "--log-level", "warning"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        body = {"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
        got = httpx.post(base + "/generate", json=body, timeout=60).json()
        want = httpx.post(ref.url("/generate"), json=body, timeout=60).json()
        assert got["text"] == want["text"]
        assert _RefusingDecode.calls >= 1  # it was tried first (most room), refused, then the real one served
        st = httpx.get(base + "/disagg/instances", timeout=10).json()
        assert st["routed"]["retries"] >= 1 and st["routed"]["failed"] == 0
    finally:
        router.terminate()
        router.wait(20)
        fake.shutdown()


def _stream_one(url: str, i: int, out: dict) -> None:
    body = {"prompt": f"Story number {i}: once upon a time", "max_tokens": 60, "temperature": 0,
            "ignore_eos": True, "stream": True}
    text, end = [], None
    try:
        with httpx.stream("POST", url, json=body, timeout=httpx.Timeout(60, connect=5)) as r:
            if r.status_code != 200:
                out[i] = ("error", r.status_code)
                return
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                obj = orjson.loads(line[6:])
                if "error" in obj:
                    end = ("error", obj["error"]["message"])
                    continue
                c = obj["choices"][0]
                text.append(c["text"])
                if c.get("finish_reason"):
                    end = ("ok", c["finish_reason"])
        out[i] = end or ("error", "stream ended without a finish")
    except httpx.HTTPError as e:  # a transport error is an answer too, but must not be a hang
        out[i] = ("error", type(e).__name__)


def test_killing_the_decode_instance_under_load(servers):
    """Last: kills pd-local's decode instance. Every request ends (answer or error); none hangs."""
    pd, _ = servers
    urls = {i["role"]: i["url"] for i in pd.instances()["instances"]}
    pid = httpx.get(urls["decode"] + "/disagg/info", timeout=10).json()["pid"]
    out: dict = {}
    threads = [threading.Thread(target=_stream_one, args=(pd.url("/v1/completions"), i, out)) for i in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    # kill once the decode instance is busy decoding
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        s = httpx.get(urls["decode"] + "/get_server_info", timeout=10).json()["internal_states"][0]
        if s.get("num_running_reqs", 0) >= 2:
            break
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert len(out) == 6 and all(v[0] in ("ok", "error") for v in out.values()), out
    assert any(v[0] == "error" for v in out.values()), out  # the decode instance died under them
    assert not any(v[0] == "error" and isinstance(v[1], int) and v[1] < 500 for v in out.values()), out
    assert time.monotonic() - t0 < 60
    # new requests fail fast with an error instead of waiting: no decode instance is left
    t1 = time.monotonic()
    r = httpx.post(pd.url("/generate"), json={"text": "Hi", "sampling_params": {"max_new_tokens": 4}}, timeout=60)
    assert r.status_code in (502, 503) and time.monotonic() - t1 < 30
    deadline = time.monotonic() + 10
    while httpx.get(pd.url("/health"), timeout=5).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert httpx.get(pd.url("/health"), timeout=5).status_code == 503
    # the prefill instance holds no KV for the failed requests (released by the router or timed out)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = httpx.get(urls["prefill"] + "/get_server_info", timeout=10).json()["internal_states"][0]
        if s["kv_free_slots"] == s["kv_total_slots"]:
            break
        time.sleep(0.5)
    assert s["kv_free_slots"] == s["kv_total_slots"], s
