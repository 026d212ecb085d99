"""The server with --tp-size 2 on CPU (gloo): the OpenAI API answers as the tp-1 engine does, and a
follower rank killed mid-load takes the server down with an error to every request (no hang in a
collective, no process left behind). Slow: each server spawns three processes plus a follower."""
from __future__ import annotations

import asyncio
import os
import signal

import openai
import pytest

from hardening_utils import alive, children, server_roles, wait_gone
from server_utils import ServerProcess
from test_hardening_faults import Flight, _process_tree

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPTS = ["The capital of France is", "Hello world! How", "def add(a, b):\n"]


def _follower(scheduler_pid: int) -> int:
    """The tensor-parallel follower: the scheduler's spawned child that is not the resource tracker."""
    for pid in children(scheduler_pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().decode(errors="replace")
        if "spawn_main" in cmd and "resource_tracker" not in cmd:
            return pid
    raise AssertionError(f"no follower rank under the scheduler {scheduler_pid}")


def test_tp2_server_greedy_matches_tp1(tiny_model_factory):
    from sglang_duet.engine import Engine

    path = tiny_model_factory("smollm")
    eng = Engine(path, tp_size=1)
    try:
        want = [eng.generate(p, {"max_new_tokens": 16, "temperature": 0})["text"] for p in PROMPTS]
    finally:
        eng.shutdown()
    with ServerProcess(["--model-path", path, "--tp-size", "2", "--max-total-tokens", "4096"]) as s:
        c = openai.OpenAI(base_url=s.url("/v1"), api_key="none", max_retries=0)
        model = c.models.list().data[0].id
        got = [c.completions.create(model=model, prompt=p, max_tokens=16, temperature=0).choices[0].text
               for p in PROMPTS]
        stream = c.completions.create(model=model, prompt=PROMPTS[0], max_tokens=16, temperature=0, stream=True)
        streamed = "".join(ch.choices[0].text for ch in stream if ch.choices)
    assert got == want
    assert streamed == want[0]


def test_follower_killed_mid_load_fails_every_request(tiny_model_factory):
    s = ServerProcess(["--model-path", tiny_model_factory("smollm"), "--tp-size", "2",
                       "--max-total-tokens", "16384", "--dist-timeout", "60"])
    try:
        roles, root = server_roles(s.proc.pid)
        follower = _follower(roles["scheduler"])
        tree = _process_tree(s.proc.pid)
        flight = Flight(s, streams=8, plain=2, max_tokens=480)
        t_kill, _ = asyncio.run(flight.run(lambda: os.kill(follower, signal.SIGKILL)))
        delays = sorted(t - t_kill for t, _, _ in flight.ends)
        print(f"follower killed: requests ended {delays[0]:.3f}..{delays[-1]:.3f} s later")
        assert delays[-1] <= 2.0, delays
        msg = "The scheduler process died unexpectedly (exit code 1); the server is shutting down."
        for _, kind, out in flight.ends:
            assert out == ((200, True, msg) if kind == "stream" else (503, msg)), out
        assert s.proc.wait(15) == 1
        assert "tensor-parallel rank 1 died" in s.log_tail(1 << 20)
        assert not wait_gone(tree, 10), [p for p in tree if alive(p)]
        assert not os.path.exists(root)
    finally:
        s.stop()


def test_two_nodes_on_one_machine(tiny_model_factory):
    """--nnodes 2: node 1 runs only its follower rank and serves no HTTP; node 0 serves. Same tokens."""
    import subprocess
    import sys

    import httpx

    from server_utils import REPO, free_port

    path = tiny_model_factory("smollm")
    common = ["--model-path", path, "--tp-size", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port()}"]
    node1 = subprocess.Popen([sys.executable, "-m", "sglang_duet.launch_server", *common, "--node-rank", "1"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with ServerProcess([*common, "--node-rank", "0", "--max-total-tokens", "4096"]) as s:
            out = httpx.post(s.url("/generate"), timeout=60, json={
                "text": PROMPTS[0], "sampling_params": {"max_new_tokens": 16, "temperature": 0}}).json()
        from sglang_duet.engine import Engine

        eng = Engine(path, tp_size=1)
        try:
            assert out["output_ids"] == eng.generate(PROMPTS[0], {"max_new_tokens": 16, "temperature": 0})["output_ids"]
        finally:
            eng.shutdown()
        # node 0 stopped: node 1's rank sees its peer gone and exits (non-zero: it cannot tell a stop
        # from a crash), never waiting in a collective
        assert node1.wait(30) != 0
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait(5)
