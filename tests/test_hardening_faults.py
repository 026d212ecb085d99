"""Faults mid-load: a child process killed with SIGKILL, and SIGTERM with requests in flight.

kill -9 of the scheduler or the detokenizer: every in-flight request ends with an error within a
second (streams: an error event and [DONE]; others: HTTP 503), /health turns 503, the server exits
non-zero naming the dead child, and leaves no process and no socket dir behind.
SIGTERM: requests that can finish within --shutdown-grace-s do; the rest end with an error when
it runs out; the server exits 0 within the grace period (+ a small margin) and leaves nothing.
The emulated Qwen3-8B decodes at a few ms per step, so long requests are really in flight.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import orjson
import pytest

from hardening_utils import QWEN_CONFIG, alive, children, emulated_args, server_roles, wait_gone
from server_utils import ServerProcess

pytestmark = pytest.mark.timeout(180)

GRACE_S = 2.0


class Flight:
    """Long requests kept in flight; records when and how each one ended."""

    def __init__(self, server, streams: int, plain: int, max_tokens: int = 3000):
        self.server = server
        self.ends: list[tuple[float, str, object]] = []  # (time, kind, outcome)
        self.started = 0
        self.specs = [("stream", i, max_tokens) for i in range(streams)] + [("plain", i, max_tokens)
                                                                            for i in range(plain)]

    async def one(self, client, kind, i, n):
        body = {"input_ids": [100 + i, 200, 300], "stream": kind == "stream",
                "sampling_params": {"max_new_tokens": n, "ignore_eos": True}}
        try:
            if kind == "plain":
                self.started += 1
                r = await client.post(self.server.url("/generate"), json=body)
                out = (r.status_code, r.json().get("error", {}).get("message") if r.status_code != 200
                       else len(r.json()["output_ids"]))
            else:
                async with client.stream("POST", self.server.url("/generate"), json=body) as r:
                    events = []
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            if line == "data: [DONE]":
                                events.append("[DONE]")
                            else:
                                events.append(orjson.loads(line[6:]))
                                if len(events) == 1:
                                    self.started += 1
                    last = events[-2] if len(events) >= 2 else None
                    out = (r.status_code, events[-1] == "[DONE]",
                           last.get("error", {}).get("message") if isinstance(last, dict) and "error" in last
                           else len(last["output_ids"]) if isinstance(last, dict) else None)
        except httpx.HTTPError as e:
            out = ("transport-error", type(e).__name__)
        self.ends.append((time.monotonic(), kind, out))

    async def run(self, action, short: int = 0):
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as c:
            tasks = [asyncio.create_task(self.one(c, *spec)) for spec in self.specs]
            deadline = time.monotonic() + 30
            while self.started < len(self.specs):  # every stream has its first token
                assert time.monotonic() < deadline, "requests did not start"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            shorts = [asyncio.create_task(self.one(c, "stream", 1000 + i, 60)) for i in range(short)]
            await asyncio.sleep(0.05)
            t = time.monotonic()
            await asyncio.to_thread(action)
            health = await asyncio.to_thread(_health_after, self.server)
            await asyncio.gather(*tasks, *shorts)
            return t, health


def _health_after(server) -> list:
    """/health answers until the server stops listening: the statuses seen (a 503 must come first)."""
    seen = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            code = httpx.get(server.url("/health"), timeout=1).status_code
        except httpx.HTTPError:
            seen.append("refused")
            break
        if not seen or seen[-1] != code:
            seen.append(code)
        time.sleep(0.02)
    return seen


def _process_tree(pid: int) -> list[int]:
    out = [pid]
    for c in children(pid):
        out += _process_tree(c)
    return out


@pytest.mark.parametrize("victim", ["scheduler", "detokenizer"])
def test_child_killed_mid_load(victim):
    s = ServerProcess(emulated_args(model=QWEN_CONFIG))
    try:
        roles, root = server_roles(s.proc.pid)
        tree = _process_tree(s.proc.pid)
        flight = Flight(s, streams=12, plain=4)
        t_kill, health = asyncio.run(flight.run(lambda: os.kill(roles[victim], signal.SIGKILL)))
        delays = sorted(t - t_kill for t, _, _ in flight.ends)
        print(f"{victim} killed: requests ended {delays[0]:.3f}..{delays[-1]:.3f} s later")
        assert delays[-1] <= 1.0, delays
        msg = f"The {victim} process died unexpectedly (exit code -9); the server is shutting down."
        for _, kind, out in flight.ends:
            if kind == "stream":
                assert out == (200, True, msg), out  # an error event, then [DONE]
            else:
                assert out == (503, msg), out
        # /health: 200 until the main process notices (ms), then 503 until it stops listening
        assert 503 in health and health[health.index(503) - 1:health.index(503)] in ([], [200]), health
        assert s.proc.wait(15) == 1
        log = s.log_tail(1 << 20)
        assert f"ERROR {msg}" in log
        assert not wait_gone(tree, 10), [p for p in tree if alive(p)]
        assert not os.path.exists(root)
    finally:
        s.stop()


def test_sigterm_mid_load_drains_then_exits():
    s = ServerProcess(emulated_args("--shutdown-grace-s", str(GRACE_S), model=QWEN_CONFIG))
    try:
        _, root = server_roles(s.proc.pid)
        tree = _process_tree(s.proc.pid)
        flight = Flight(s, streams=6, plain=2)
        t_term, health = asyncio.run(flight.run(lambda: s.proc.send_signal(signal.SIGTERM), short=3))
        code = s.proc.wait(GRACE_S + 5)
        t_exit = time.monotonic()
        assert code == 0, s.log_tail()
        assert t_exit - t_term < GRACE_S + 3.0
        assert health[0] in (503, "refused"), health  # never 200 after SIGTERM
        shorts = [o for _, k, o in flight.ends if k == "stream" and o[2] == 60]
        assert len(shorts) == 3, flight.ends  # short requests in flight at SIGTERM completed
        failed = [(t - t_term, o) for t, k, o in flight.ends if o[-1] == "The server is shutting down."]
        assert len(failed) == 8, flight.ends  # the long ones ended with an error once the grace ran out
        assert all(GRACE_S - 0.2 <= dt <= GRACE_S + 1.0 for dt, _ in failed), failed
        assert all(o[0] in (200, 503) for _, o in failed)
        log = s.log_tail(1 << 20)
        assert "shutting down: 11 request(s) in flight" in log and "failing 8 in-flight request(s)" in log
        assert not wait_gone(tree, 10), [p for p in tree if alive(p)]
        assert not os.path.exists(root)
    finally:
        s.stop()


def test_main_killed_children_follow_and_clean_up():
    """kill -9 of the main process: the children get SIGTERM from the kernel (PR_SET_PDEATHSIG),
    exit, and remove the socket dir the main process could not."""
    s = ServerProcess(emulated_args())
    try:
        roles, root = server_roles(s.proc.pid)
        kids = [roles["scheduler"], roles["detokenizer"]]
        s.proc.kill()
        s.proc.wait(5)
        assert not wait_gone(kids, 10)
        deadline = time.monotonic() + 5
        while os.path.exists(root) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(root)
    finally:
        s.stop()
