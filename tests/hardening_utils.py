"""Helpers of the hardening tests: emulated servers, the server's processes seen through /proc, SSE.

The emulated executor serves with GPU-shaped step times and deterministic tokens (a pure function
of the request's seed and position), so these tests need no model weights and run in seconds.
"""
from __future__ import annotations

import os
import time

import httpx
import orjson

from server_utils import REPO

SMOLLM_CONFIG = os.path.join(REPO, "configs", "models", "smollm2-135m.json")
QWEN_CONFIG = os.path.join(REPO, "configs", "models", "qwen3-8b.json")


def emulated_args(*extra: str, model: str = SMOLLM_CONFIG, kv_tokens: int = 65536) -> list[str]:
    """An emulated-H100 server. --max-total-tokens keeps the KV free list small: the emulated pool
    of a small model on a whole H100 would hold millions of slots (a Python list of them)."""
    return ["--executor", "emulated", "--hardware", "h100", "--model-config", model,
            "--max-total-tokens", str(kv_tokens), *extra]


# ---- processes --------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of pid (from /proc/*/stat)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may hold spaces and parentheses: the fields after the last ')' are fixed
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(d))
    return out


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def server_roles(main_pid: int) -> tuple[dict[str, int], str]:
    """{"main"|"scheduler"|"detokenizer": pid} and the private socket dir, found through the unix
    sockets each process has bound (/proc/net/unix), so no test-only API is needed."""
    bound = {}  # inode -> path of sglang-duet sockets
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and "/sglang-duet-" in parts[7]:
                bound[parts[6]] = parts[7]
    roles, root = {}, None
    for pid in [main_pid, *children(main_pid)]:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                path = bound.get(link[8:-1])
                if path:
                    role = os.path.basename(path)
                    roles["scheduler" if role == "scheduler" else "detokenizer" if role == "detokenizer"
                          else "main"] = pid
                    root = os.path.dirname(path)
    return roles, root


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def wait_gone(pids, timeout: float) -> list[int]:
    """Waits until none of pids is alive; returns those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    return left


# ---- HTTP -----------------------------------------------------------------------------------------


def internal_state(server) -> dict:
    return httpx.get(server.url("/get_server_info"), headers=server.headers, timeout=10).json()["internal_states"][0]


def wait_idle(server, timeout: float = 60.0) -> dict:
    """Server-side state once nothing is in flight anywhere (main, scheduler) and the stats are fresh."""
    deadline = time.monotonic() + timeout
    while True:
        st = internal_state(server)
        if (st.get("num_running_reqs") == 0 and st.get("num_queue_reqs") == 0
                and st["num_inflight_http_requests"] == 0 and st["num_aborting"] == 0
                and st.get("num_inflight_launches") == 0 and st.get("stats_age_s", 9) < 1.0
                and st.get("submitted") == st.get("finished", 0) + st.get("aborted", 0)):
            return st
        assert time.monotonic() < deadline, f"not idle after {timeout}s: {st}"
        time.sleep(0.2)


def sse_events(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else orjson.loads(data))
    return out
