"""Prefill/decode disaggregation driven by SGLang's own router: `sglang_router.launch_router
--pd-disaggregation --prefill URL BOOTSTRAP_PORT --decode URL` in front of a
`--disaggregation-mode prefill` and a `--disaggregation-mode decode` instance (embedded SmolLM2, CPU).

The router adds bootstrap_host/port/room and sends each request to both; the decode instance gets
the first token and the KV of the room from the prefill instance (rooms.py). Checked: greedy
outputs equal a plain single server's (openai completions and chat, streaming and not; native
/generate), every request's KV was pulled, no KV is left held on either side after 200 streams of
which clients abandon most midway, and killing the decode instance under load ends every one of
its streams with an error within the issue's 1 s (plus a documented margin) while the prefill
instance frees what it held.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest

from hardening_utils import internal_state as _state
from router_utils import Router, openai_client as _client
from server_utils import SHARED_HOST, ServerProcess, free_port

from sglang_duet.disagg.mooncake import mooncake_error

pytest.importorskip("sglang_router", reason="sglang-router is not installed (pip install -e '.[dev]')")
openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

KV_TIMEOUT_S = 8
# Issue 16: a decode instance killed mid-load ends its streams with an error within 1 s. Measured
# 0.07-0.13 s here (the kernel resets the instance's sockets at once; sglang-router ends each
# stream as its upstream read fails). The margin is for the client threads' wake-up on a shared
# 2-core machine at load ~10, not for anything the servers do.
KILL_TO_ERROR_S = 1.0
KILL_TO_ERROR_MARGIN_S = 0.5
# The KV goes between the instances through Mooncake (TCP on loopback: the path peers on other hosts
# take) where its engine loads; shm otherwise (test_disagg covers shm through pd-local anyway).
TRANSPORT = "shm" if mooncake_error() else "mooncake"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def single():
    """The reference: a plain server (no disaggregation mode), the engine PD must reproduce."""
    server = ServerProcess(["--max-total-tokens", "6000", *SHARED_HOST])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pd(single):  # the reference server starts first: three processes loading at once fight over 2 cores
    port = free_port()
    common = ["--disaggregation-kv-timeout-s", str(KV_TIMEOUT_S), "--max-total-tokens", "6000",
              "--disaggregation-transfer-backend", TRANSPORT, *SHARED_HOST]
    prefill = ServerProcess(["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(port), *common])
    try:
        decode = ServerProcess(["--disaggregation-mode", "decode", *common])
    except BaseException:
        prefill.stop()
        raise
    router = None
    try:
        router = Router(pd=([(prefill.base_url, port)], [decode.base_url]))
        yield {"prefill": prefill, "decode": decode, "router": router}
    finally:
        if router is not None:
            router.stop()
        decode.stop()
        prefill.stop()


def _wait_kv_free(server, timeout: float = 3 * KV_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = _state(server)
        if s["kv_used_slots"] == 0 and s["num_running_reqs"] == 0 and s["num_inflight_http_requests"] == 0:
            return s
        if time.monotonic() > deadline:
            return s
        time.sleep(0.5)


def _pulled(prefill) -> int:
    return prefill.log_tail(1 << 22).count("pulled by a decode instance")


def _texts(client, model: str, stream: bool) -> list[str]:
    out = []
    for p in PROMPTS:
        if stream:
            out.append("".join(c.choices[0].text for c in client.completions.create(
                model=model, prompt=p, max_tokens=16, temperature=0, stream=True) if c.choices))
        else:
            out.append(client.completions.create(model=model, prompt=p, max_tokens=16, temperature=0).choices[0].text)
    if stream:
        out.append("".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=CHAT, max_tokens=16, temperature=0, stream=True) if c.choices))
    else:
        out.append(client.chat.completions.create(model=model, messages=CHAT, max_tokens=16,
                                                  temperature=0).choices[0].message.content)
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_openai_outputs_equal_a_single_server(pd, single, stream):
    ref, routed = _client(single.base_url), _client(pd["router"].url)
    model = ref.models.list().data[0].id
    before = _pulled(pd["prefill"])
    assert _texts(routed, model, stream) == _texts(ref, model, stream)
    assert _pulled(pd["prefill"]) - before == len(PROMPTS) + 1  # every routed request's KV went prefill -> decode
    assert f"via {TRANSPORT}:" in pd["decode"].log_tail(1 << 22)


def test_native_generate_equals_a_single_server(pd, single):
    body = {"text": PROMPTS[1], "sampling_params": {"max_new_tokens": 16, "temperature": 0}}
    ref = httpx.post(single.url("/generate"), json=body, timeout=60).json()
    got = httpx.post(f"{pd['router'].url}/generate", json=body, timeout=60).json()
    assert got["output_ids"] == ref["output_ids"] and got["text"] == ref["text"]
    with httpx.stream("POST", f"{pd['router'].url}/generate", json={**body, "stream": True}, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["text"] == ref["text"]


def test_abandoned_streams_leave_no_kv_held(pd):
    """200 requests, 16 at a time. 3 in 5 are abandoned by their client at its 1st, 2nd or 4th chunk;
    1 in 5 by a read timeout of 20-500 ms, which lands anywhere (before the prefill's answer, while
    the KV moves, mid-decode; some finish first). The others must all complete, and neither instance
    may keep KV or a running request afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    client = _client(pd["router"].url)
    model = client.models.list().data[0].id
    rng = random.Random(0)
    # chunks to read before leaving; None: read all; a float: the read timeout the client gives up at
    plans = [rng.choice([0, 1, 3, None, round(rng.uniform(0.02, 0.5), 3)]) for _ in range(200)]
    finished, timed_out = [], []

    def one(i: int) -> None:
        leave_after = plans[i]
        c = client.with_options(timeout=leave_after) if isinstance(leave_after, float) else client
        try:
            stream = c.completions.create(model=model, prompt=PROMPTS[i % 3] + f" ({i})", max_tokens=12,
                                          temperature=0.7, seed=i, stream=True, extra_body={"ignore_eos": True})
            for k, chunk in enumerate(stream):
                if isinstance(leave_after, int) and k >= leave_after:
                    stream.close()  # the client disconnects mid-stream
                    return
                if chunk.choices and chunk.choices[0].finish_reason:
                    finished.append(i)
        except (openai.APITimeoutError, httpx.TimeoutException):
            assert isinstance(leave_after, float), i  # only the clients that asked for a short timeout
            timed_out.append(i)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(len(plans))))
    assert [i for i in finished if isinstance(plans[i], int)] == []  # those that left early did not finish
    assert {i for i, p in enumerate(plans) if p is None} <= set(finished)  # every client that stayed got all
    assert timed_out, plans  # some timeouts did cut requests short
    print(f"200 requests: {len(finished)} finished, {len(timed_out)} cut by a read timeout, "
          f"{sum(isinstance(p, int) for p in plans)} left at a chunk")
    for name in ("decode", "prefill"):  # nothing running, nothing held (a hold not pulled expires)
        s = _wait_kv_free(pd[name])
        assert s["kv_used_slots"] == 0 and s["num_running_reqs"] == 0, (name, s)
    assert client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=4, temperature=0).choices[0].text


def test_pd_local_starts_sglang_router_and_two_instances(single):
    """`--disaggregation-mode pd-local --pd-local-router sglang --api-key K`: one command, same answers;
    sglang-router asks clients for K and passes it on to both instances (which require it too), K is
    not in the log; SIGTERM stops all."""
    port = free_port()
    key = "pd-local-secret-" + os.urandom(4).hex()
    auth = {"Authorization": f"Bearer {key}"}
    log = tempfile.NamedTemporaryFile("w+", prefix="pd-local-sglang-", suffix=".log", delete=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "sglang_duet.launch_server", "--disaggregation-mode", "pd-local",
                             "--pd-local-router", "sglang", "--port", str(port), "--max-total-tokens", "6000",
                             "--api-key", key],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, open(log.name).read()[-3000:]
            try:
                workers = httpx.get(f"http://127.0.0.1:{port}/workers", headers=auth, timeout=2).json()["workers"]
                if len(workers) == 2 and all(w["is_healthy"] for w in workers):
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            assert time.monotonic() < deadline, open(log.name).read()[-3000:]
            time.sleep(1)
        model = client.models.list().data[0].id
        ref = _client(single.base_url)
        for p in PROMPTS[:2]:
            got = client.completions.create(model=model, prompt=p, max_tokens=12, temperature=0).choices[0].text
            assert got == ref.completions.create(model=model, prompt=p, max_tokens=12, temperature=0).choices[0].text
        body = {"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 2}}
        assert httpx.post(f"http://127.0.0.1:{port}/generate", json=body, timeout=60).status_code == 401
        assert httpx.post(f"http://127.0.0.1:{port}/generate", json=body, headers=auth, timeout=60).status_code == 200
        text = open(log.name).read()
        assert "pulled by a decode instance" in text and "sglang_router.launch_router" in text
        assert key not in text
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        log.close()
    assert rc == 0
    with pytest.raises(httpx.HTTPError):  # the router went with it
        httpx.get(f"http://127.0.0.1:{port}/workers", timeout=2)


def test_killing_the_decode_instance_ends_its_streams(pd):
    """Last: it kills the decode instance."""
    client = _client(pd["router"].url)
    model = client.models.list().data[0].id
    n = 4
    ends: list = [None] * n
    started = threading.Barrier(n + 1)

    def one(i: int) -> None:
        try:
            first = True
            for chunk in client.completions.create(model=model, prompt=PROMPTS[i % 3], max_tokens=400,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True}):
                if first:
                    first = False
                    started.wait(120)
                if chunk.choices and chunk.choices[0].finish_reason:
                    ends[i] = ("finished", time.monotonic())
                    return
            ends[i] = ("cut", time.monotonic())
        except Exception as e:  # noqa: BLE001 - the error the client sees
            ends[i] = (type(e).__name__, time.monotonic())
            if first:
                started.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    started.wait(120)
    pd["decode"].proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), ends
    print("stream ends after the kill:", [(e[0], round(e[1] - killed, 3)) for e in ends])
    # every stream ends with an error the client sees (not a silent end, not a finish) ...
    assert all(e is not None and e[0] not in ("finished", "cut") for e in ends), ends
    # ... within the 1 s of the kill
    assert max(e[1] for e in ends) - killed <= KILL_TO_ERROR_S + KILL_TO_ERROR_MARGIN_S, ends
    s = _wait_kv_free(pd["prefill"])
    assert s["kv_used_slots"] == 0, s  # every hold was pulled or expired

