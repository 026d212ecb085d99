"""`python -m sglang_router.launch_router` (sglang-router, SGLang's Rust load balancer) for tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from server_utils import free_port


class Router:
    """`python -m sglang_router.launch_router` on a free port; stopped by its pid (it renames its
    process, so nothing may look for it by name)."""

    def __init__(self, worker_urls: list[str] | None = None, policy: str = "round_robin",
                 pd: tuple[list[tuple[str, int]], list[str]] | None = None):
        """`worker_urls` (data parallel) or `pd` = ([(prefill url, bootstrap port)], [decode url])."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sglang-router-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(self.port),
               "--policy", policy, "--health-check-interval-secs", "1",
               "--log-level", "warn", "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
        if pd is None:
            cmd += ["--worker-urls", *worker_urls]
            expect = len(worker_urls)
        else:
            cmd.append("--pd-disaggregation")
            for url, port in pd[0]:
                cmd += ["--prefill", url, str(port)]
            for url in pd[1]:
                cmd += ["--decode", url]
            expect = len(pd[0]) + len(pd[1])
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.tail()
            try:
                workers = httpx.get(f"{self.url}/workers", timeout=2).json()["workers"]
                if len(workers) == expect and all(w["is_healthy"] for w in workers):
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"router not ready:\n{self.tail()}")

    def tail(self) -> str:
        with open(self.log.name) as f:
            return f.read()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the launcher and the router it runs
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()
        os.unlink(self.log.name)


def openai_client(base: str):
    """The official openai client against a server or router at `base` (no retries: a failure shows)."""
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
